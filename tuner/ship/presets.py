"""Named problem families for ``looptune build-db --preset NAME`` and ``looptune bench --preset NAME``.

Each preset is text in the shape-file format (``M N K [batch=B] [dtype=...] [layout=..]``, see
``tools/shapes/README.md``), so what a preset holds reads like a shape file and parses through
the same ``parse_shapes``.  ``C[M, N] = A[M, K] @ B[K, N]``, row-major.

=============  ========  ==============================================================
preset         problems  what
=============  ========  ==============================================================
quick          10        small float32/float64 problems: the Quickstart, under a minute
paper          2197      the LoopTune paper's grid, m, n, k each in 64..256 step 16
transformer    22        BERT-base, GPT-2 medium and 7B-class layers at short sequences
cnn            16        ResNet-50 and MobileNet convolutions lowered to GEMM (im2col, NHWC)
decode         18        LLM decode: 1-16 tokens against the weight matrices
dl-public      30        the public performance set (odd sizes, skinny, batched, float64)
=============  ========  ==============================================================
"""
from __future__ import annotations

from looptune.runtime.compiler.errors import LoopTuneError

from looptune.runtime.compiler.workload import MatmulProblem, parse_shapes

QUICK = """\
# Quickstart: ten small problems, about two seconds of tuning each
64 64 64
128 128 128
256 256 256
96 160 128
100 100 100
64 256 128
128 64 256
1 512 512
192 192 192 dtype=float64
128 128 64 batch=4
"""

TRANSFORMER = """\
# BERT-base (hidden 768, FFN 3072, 12 heads of 64), 128 and 512 tokens
128 2304 768
128 768 768
128 3072 768
128 768 3072
128 128 64 batch=12
128 64 128 batch=12
512 2304 768
512 768 768
512 3072 768
512 768 3072
512 512 64 batch=12
512 64 512 batch=12
# GPT-2 medium (hidden 1024, FFN 4096), 256 tokens
256 3072 1024
256 1024 1024
256 4096 1024
256 1024 4096
256 256 64 batch=16
# 7B-class (hidden 4096, FFN 11008), a 32-token prompt chunk
32 12288 4096
32 4096 4096
32 11008 4096
32 4096 11008
32 32 128 batch=32
"""

CNN = """\
# ResNet-50, batch 1, im2col in NHWC: C[pixels, Cout] = A[pixels, Cin*kh*kw] @ W[Cin*kh*kw, Cout]
12544 64 147
3136 64 64
3136 64 576
3136 256 64
3136 64 256
784 128 1152
784 512 128
784 128 512
196 256 2304
196 1024 256
196 256 1024
49 512 4608
49 2048 512
1 1000 2048
# MobileNet-v2 pointwise convolutions
3136 144 24
784 192 32
"""

DECODE = """\
# LLM decode: a handful of tokens times the weight matrices (skinny M)
1 768 768
1 3072 768
1 768 3072
4 768 768
4 3072 768
4 768 3072
1 4096 4096
1 11008 4096
1 4096 11008
8 4096 4096
8 11008 4096
8 4096 11008
16 4096 4096
16 11008 4096
16 4096 11008
1 1024 1024
8 1024 1024
1 32000 4096
"""

DL_PUBLIC = """\
# The public performance set (tools/shapes/dl-public.txt)
64 64 64
128 128 128
256 256 256
512 512 512
1024 1024 1024
64 512 512
64 2048 512
64 512 2048
512 1024 1024
512 4096 1024
512 1024 4096
1 1024 1024
8 1024 1024
32 4096 1024
1568 96 864
392 192 1728
98 384 3456
6272 32 288
100 100 100
131 67 263
333 333 333
600 500 400
20000 16 16
16 20000 16
16 16 20000
128 128 64 batch=8
128 64 128 batch=8
256 256 256 dtype=float64
384 384 384 layout=tn
384 384 384 layout=nt
"""


def _paper_grid() -> str:
    sizes = range(64, 257, 16)
    lines = ["# LoopTune paper benchmark: m, n, k in range(64, 257, 16)"]
    lines += [f"{m} {n} {k}" for m in sizes for n in sizes for k in sizes]
    return "\n".join(lines) + "\n"


PRESETS: dict[str, str] = {
    "quick": QUICK,
    "paper": "",            # generated on demand: 2197 lines
    "transformer": TRANSFORMER,
    "cnn": CNN,
    "decode": DECODE,
    "dl-public": DL_PUBLIC,
}


class PresetError(LoopTuneError, KeyError):
    """No preset of that name."""

    def __str__(self) -> str:
        return f"unknown preset {self.args[0]!r}; presets: {', '.join(PRESETS)}"


def preset_text(name: str) -> str:
    """The preset as shape-file text (what ``looptune build-db --preset NAME`` tunes)."""
    if name not in PRESETS:
        raise PresetError(name)
    return _paper_grid() if name == "paper" else PRESETS[name]


def preset_problems(name: str, *, threads: int = 1) -> list[MatmulProblem]:
    """The problems of a preset; lines without ``threads=`` get ``threads``."""
    return list(parse_shapes(preset_text(name).splitlines(), threads=threads))
