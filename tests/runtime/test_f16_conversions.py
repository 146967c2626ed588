"""The float16 kernels' C conversions (``codegen_f16.prelude``), bit for bit against numpy's casts.

A small C driver includes the prelude's text, widens all 65536 half bit patterns to float32 and
narrows a set of float32 values to half: every half, the midpoint between each half and the next
(a tie: nearest even) and the float32 values on either side of it, random bit patterns over the
whole float32 range and over the half range (subnormal and overflow edges), and special values.
Built without F16C it runs the portable bit arithmetic (what an exported library runs, and any
kernel built without F16C); built with -mf16c it runs the instructions, and must agree too.
NaN: any NaN of the same sign is right (payloads are not compared)."""
from __future__ import annotations

import platform
import subprocess

import numpy as np
import pytest

from looptune.runtime.compiler.build import CODE_FLAGS, BuildSettings
from looptune.runtime.compiler.codegen_f16 import prelude

X86 = platform.machine().lower() in ("x86_64", "amd64")


def cpu_flags() -> set[str]:
    """The feature flags Linux reports for this CPU (``detect_cpu`` keeps only the ones it uses)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()

DRIVER = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
%s

/* driver IN OUT: OUT gets the 65536 halves widened (uint32 bits each), then IN's float32 values
   (uint32 bits) narrowed (uint16 each); stdout says which conversions were compiled */
int main(int argc, char **argv)
{
    if (argc != 3) return 2;
    FILE *f = fopen(argv[1], "rb");
    if (!f) return 3;
    fseek(f, 0, SEEK_END);
    const long n = ftell(f) / 4;
    fseek(f, 0, SEEK_SET);
    uint32_t *in = malloc(4 * (size_t)n + 4);
    uint16_t *narrow = malloc(2 * (size_t)n + 2);
    uint32_t *wide = malloc(4 * 65536);
    if (fread(in, 4, (size_t)n, f) != (size_t)n) return 3;
    fclose(f);
    for (uint32_t h = 0; h < 65536; h++) {
        union { float f; uint32_t u; } v = { lt_f16_to_f32((uint16_t)h) };
        wide[h] = v.u;
    }
    for (long i = 0; i < n; i++) {
        union { uint32_t u; float f; } v = { in[i] };
        narrow[i] = lt_f32_to_f16(v.f);
    }
    f = fopen(argv[2], "wb");
    fwrite(wide, 4, 65536, f);
    fwrite(narrow, 2, (size_t)n, f);
    fclose(f);
#if defined(__F16C__)
    puts("f16c");
#else
    puts("portable");
#endif
    return 0;
}
"""


def float32_inputs(seed: int = 0) -> np.ndarray:
    """float32 bit patterns to narrow: the halves, each tie between neighbouring halves and its
    float32 neighbours, random patterns (everywhere, and in and around the half range), specials."""
    halves = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    finite = halves[np.isfinite(halves)].astype(np.float32)
    with np.errstate(over="ignore"):
        up = np.nextafter(finite.astype(np.float16), np.float16(np.inf)).astype(np.float32)   # 65504 -> inf
    mid = finite / 2 + np.where(np.isinf(up), np.float32(65536.0), up) / 2   # exact (12 bits); 65520 past 65504
    mid = mid[np.isfinite(mid)]
    ties = np.concatenate([mid, np.nextafter(mid, np.float32(np.inf)), np.nextafter(mid, np.float32(-np.inf))])
    rng = np.random.default_rng(seed)
    anywhere = rng.integers(0, 1 << 32, 1 << 20, dtype=np.uint64).astype(np.uint32)
    # exponents 2^-30 .. 2^17: subnormal halves, underflow to zero and overflow to inf
    near = (rng.integers(97, 145, 1 << 19, dtype=np.uint32) << 23) | rng.integers(0, 1 << 23, 1 << 19, dtype=np.uint32)
    near |= rng.integers(0, 2, near.size, dtype=np.uint32) << 31
    special = np.array([0.0, -0.0, np.inf, -np.inf, 1 + 2.0 ** -11, 1 + 2.0 ** -10 + 2.0 ** -11, 2.0 ** -25,
                        2.0 ** -25 + 2.0 ** -48, 3 * 2.0 ** -25, 2.0 ** -14 - 2.0 ** -25, 65504, 65519.996, 65520,
                        1e-45, -1e-45, 1.17549435e-38, 3.4028235e38, -3.4028235e38, 6e-8, 65536, 1e10],
                       np.float32).view(np.uint32)
    nans = np.array([0x7fc00000, 0xffc00000, 0x7f800001, 0xff800001, 0x7fffffff, 0x7fa00000], np.uint32)
    return np.concatenate([finite.view(np.uint32), ties.view(np.uint32), anywhere, near, special, nans])


def run_driver(tmp_path, prelude_text: str, flags: tuple[str, ...], inputs: np.ndarray) -> tuple[str, np.ndarray, np.ndarray]:
    """Compile the driver around ``prelude_text`` with ``flags``: (path compiled, widened, narrowed)."""
    src, exe = tmp_path / "driver.c", tmp_path / "driver"
    src.write_text(DRIVER % prelude_text)
    compiler = BuildSettings.from_env().compiler
    built = subprocess.run([compiler, *CODE_FLAGS, *flags, str(src), "-o", str(exe)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    (tmp_path / "in.bin").write_bytes(inputs.astype("<u4").tobytes())
    done = subprocess.run([str(exe), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = (tmp_path / "out.bin").read_bytes()
    wide = np.frombuffer(out[:4 << 16], "<u4")
    narrow = np.frombuffer(out[4 << 16:], "<u2")
    return done.stdout.strip(), wide, narrow


def mismatches(got: np.ndarray, expect: np.ndarray, float_type) -> np.ndarray:
    """Indices where ``got`` and ``expect`` (bit patterns of ``float_type``) differ: bits, except
    that a NaN of the same sign matches any NaN."""
    g, e = got.view(float_type), expect.view(float_type)
    both_nan = np.isnan(g) & np.isnan(e) & (np.signbit(g) == np.signbit(e))
    return np.flatnonzero((got != expect) & ~both_nan)


def check_against_numpy(tmp_path, prelude_text: str, flags: tuple[str, ...]) -> tuple[str, list[str]]:
    """(which conversions ran, a description of each kind of mismatch with numpy)."""
    inputs = float32_inputs()
    path, wide, narrow = run_driver(tmp_path, prelude_text, flags, inputs)
    halves = np.arange(1 << 16, dtype=np.uint16)
    problems = []
    bad = mismatches(wide, halves.view(np.float16).astype(np.float32).view(np.uint32), np.float32)
    if bad.size:
        h = int(halves[bad[0]])
        problems.append(f"{bad.size} halves widened wrong, first 0x{h:04x}: got 0x{int(wide[bad[0]]):08x}")
    with np.errstate(over="ignore"):
        expect = inputs.view(np.float32).astype(np.float16).view(np.uint16)
    bad = mismatches(narrow, expect, np.float16)
    if bad.size:
        x = int(inputs[bad[0]])
        problems.append(f"{bad.size} of {inputs.size} float32 narrowed wrong, first 0x{x:08x} "
                        f"({inputs.view(np.float32)[bad[0]]!r}): got 0x{int(narrow[bad[0]]):04x}, "
                        f"numpy 0x{int(expect[bad[0]]):04x}")
    return path, problems


def test_inputs_cover_the_edges():
    x = float32_inputs().view(np.float32)
    for value in (1 + 2.0 ** -11, 2.0 ** -25, 65520, 65519.996, 6e-8):
        assert np.float32(value) in x
    with np.errstate(over="ignore"):
        halves = x.astype(np.float16)
    assert np.isinf(halves).sum() > 1000 and (halves == 0).sum() > 1000          # overflow and underflow
    assert (np.abs(halves) < np.float16(2.0 ** -14)).sum() > 10000                 # subnormal results


def test_portable_conversions_are_numpys_bit_for_bit(tmp_path):
    flags = ("-mno-f16c",) if X86 else ()       # whatever the compiler's default, no F16C
    path, problems = check_against_numpy(tmp_path, "\n".join(prelude()), flags)
    assert path == "portable"
    assert not problems, problems


@pytest.mark.skipif(not X86, reason="F16C is an x86-64 extension")
def test_f16c_conversions_are_numpys_bit_for_bit(tmp_path):
    if "f16c" not in cpu_flags():
        pytest.skip("this CPU has no F16C (or Linux does not say)")
    path, problems = check_against_numpy(tmp_path, "\n".join(prelude()), ("-mf16c",))
    assert path == "f16c"
    assert not problems, problems
