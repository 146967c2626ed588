"""The smoke test of an installed LoopTune wheel (``tools/wheel_smoke.sh`` runs it in a fresh venv).

    python wheel_smoke.py WORKDIR

Checks what a user gets from ``pip install``: the packages import from site-packages, the shipped
data files are there and work (``pool.c`` builds, the embedded ``default.h5`` loads, the policy
weights load), ``runtime.matmul`` served by a generated kernel matches numpy, ``looptune info``
runs, and a one-problem ``looptune build-db`` stores a verified record.  Every check prints one
line; the first failure ends the run with exit 1.  The checks run in order as the module loads.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

WORKDIR = Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve()
LOOPTUNE = Path(sys.executable).with_name("looptune")      # the console script the wheel installed
if not os.environ.get("LOOPTUNE_DB"):
    sys.exit("run through tools/wheel_smoke.sh (a throwaway LOOPTUNE_DB and kernel cache)")


def check(name: str):
    def run(f):
        try:
            detail = f()
        except BaseException as e:  # noqa: BLE001  (any failure is the answer)
            traceback.print_exc()
            print(f"wheel smoke: FAILED {name}: {type(e).__name__}: {e}", file=sys.stderr)
            raise SystemExit(1)
        print(f"  ok  {name}{': ' + detail if detail else ''}", flush=True)
        return f
    return run


def cli(*args: str, timeout: float = 300) -> str:
    done = subprocess.run([str(LOOPTUNE), *args], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"looptune {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done.stdout


@check("import from site-packages")
def _imports():
    import looptune.database
    import looptune.runtime
    import looptune.tuner.cli  # noqa: F401

    for module in (looptune.runtime, looptune.database):
        where = Path(module.__file__).resolve()
        assert "site-packages" in where.parts, f"{module.__name__} imported from {where}, not from the wheel"
    return str(Path(looptune.runtime.__file__).parent.parent)


@check("shipped data files")
def _data():
    import looptune.runtime
    import looptune.tuner.agent

    runtime_dir = Path(looptune.runtime.__file__).parent
    files = [runtime_dir / "compiler" / "pool.c", runtime_dir / "data" / "default.h5",
             Path(looptune.tuner.agent.__file__).parent / "data" / "policy.npz"]
    missing = [str(f) for f in files if not f.is_file()]
    assert not missing, f"missing from the wheel: {missing}"
    return ", ".join(f.name for f in files)


@check("thread pool library builds from pool.c")
def _pool():
    from looptune.runtime.compiler import pool

    assert pool.load() is not None, "pool.load() returned None (see the warning above)"


@check("embedded schedule database loads")
def _embedded():
    from looptune.database import load
    from looptune.runtime.configuration import embedded_db_path

    records = load(embedded_db_path())
    assert len(records) > 0, f"{embedded_db_path()} holds no records"
    return f"{len(records)} records"


@check("shipped policy loads")
def _policy():
    from looptune.tuner.agent.policy import Policy

    return Policy.load().name


@check("runtime.matmul matches numpy")
def _matmul():
    import numpy as np

    from looptune import runtime

    runtime.configure(numpy_handoff=False)          # a generated kernel serves, whatever the records say
    rng = np.random.default_rng(0)
    for dtype, tol in ((np.float32, 1e-4), (np.float64, 1e-10)):
        a = rng.standard_normal((37, 53)).astype(dtype)
        b = rng.standard_normal((53, 41)).astype(dtype)
        source = runtime.explain(a, b).source
        assert source != "numpy", "numpy served the call"
        np.testing.assert_allclose(runtime.matmul(a, b), a @ b, rtol=tol, atol=tol)
    return f"37x41x53 float32 and float64, served from {source}"


@check("looptune info")
def _info():
    data = json.loads(cli("info", "--json"))
    return f"{data['vector_isa']}, {data['compiler']}"


@check("looptune build-db of one problem")
def _build_db():
    from looptune.database import load

    shapes, db = WORKDIR / "shapes.txt", WORKDIR / "smoke.h5"
    shapes.write_text("24 40 32\n")
    report = json.loads(cli("build-db", "--shapes", str(shapes), "--db", str(db), "--budget", "1", "--no-bench", "--json"))
    assert (report["done"], report["failed"]) == (1, 0), report
    records = list(load(db))
    assert len(records) == 1 and records[0].verified, records
    return f"{report['geomean_vs_numpy'] or float('nan'):.2f}x numpy in {report['seconds']:.1f} s"


print("wheel smoke: all checks passed")
