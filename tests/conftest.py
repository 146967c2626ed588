"""Suite-wide set-up: an isolated kernel cache and user database, hypothesis profiles, the
``target`` marker, a check that no test leaves a thread running, and, in CI, no skipping for
a missing optional dependency."""
import os
import re
import threading
import time

import pytest
from hypothesis import HealthCheck, settings

# CI is derandomized (a failure reproduces from the printed example) and never has deadlines
# (a loaded 2-core machine stalls processes for 0.1-0.2 s).  Locally: random, still no deadlines.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, print_blob=True)
IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if IN_CI else "dev"))

# Skip reasons that mean "an optional dependency is missing" (torch, gymnasium, dask, ml_dtypes: any
# failed import; the C compiler, and the helpers only it builds).  In CI (CI set) such a skip is a
# failure: CI installs everything, so the skip would hide a broken install.  Hardware and platform
# skips (no AMX or AVX2 on this CPU, an ISA without fast bf16 kernels, no root for a tmpfs) stay skips.
MISSING_DEPENDENCY = re.compile(
    r"could not import|no module named|is optional: pip install|needs ml_dtypes|needs (a C compiler|gcc)"
    r"|no C compiler|no thread pool library here|no compiled trampoline here", re.IGNORECASE)

# Test modules whose outcome depends on the code generator's target (vector ISA): CI runs them
# again with LOOPTUNE_ISA=avx2 and LOOPTUNE_ISA=portable (``pytest -m target``).
TARGET_MODULES = {
    "test_codegen_vs_numpy.py", "test_agent_schedules_replay.py", "test_matmul_api.py", "test_mutate.py",
    "test_templates.py", "test_kernel_cache.py", "test_fork_threads.py", "test_runner.py", "test_exact_size_kernels.py",
    "test_layouts.py", "test_runtime_fallbacks.py",
}

# Threads a test may leave behind: interpreter-wide pools started once per process.
LONG_LIVED_THREADS = ("looptune-db-watch", "ThreadPoolExecutor", "asyncio", "Dask", "IO loop", "Profile", "TCP-Executor", "Nanny",
                      "AsyncProcess", "looptune-pool")
THREAD_GRACE_S = 10.0


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", help="rewrite golden files instead of comparing")


def pytest_configure(config):
    config.addinivalue_line("markers", "target: depends on the code generator's target ISA (rerun per ISA in CI)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in TARGET_MODULES:
            item.add_marker(pytest.mark.target)


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr or "")


def _fail_missing_dependency(report) -> None:
    """In CI, turn a skip for a missing optional dependency into a failure (same report, failed)."""
    if not (IN_CI and report.skipped) or getattr(report, "wasxfail", None) is not None:
        return
    reason = _skip_reason(report).removeprefix("Skipped: ")
    if MISSING_DEPENDENCY.search(reason):
        report.outcome = "failed"
        report.longrepr = (f"would skip: {reason}; in CI (CI={os.environ.get('CI')}) a missing optional dependency "
                           f"fails: install it (pip install -e \".[dev]\", a C compiler)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_missing_dependency(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield                 # a module-level pytest.importorskip skips the whole module here
    _fail_missing_dependency(outcome.get_result())


@pytest.fixture
def update_golden(request):
    return request.config.getoption("--update-golden")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Kernels built by the suite go to a per-run cache, unless the caller chose one; the user
    database is a fresh file per run."""
    if not os.environ.get("LOOPTUNE_CACHE_DIR"):
        os.environ["LOOPTUNE_CACHE_DIR"] = str(tmp_path_factory.mktemp("kernel-cache"))
    # never read or write the developer's own schedule database from the suite
    os.environ["LOOPTUNE_DB"] = str(tmp_path_factory.mktemp("user-db") / "schedules.h5")
    yield


@pytest.fixture(autouse=True)
def _no_thread_left_behind(request):
    """A test that starts threads must end them: after the test, new threads get
    ``THREAD_GRACE_S`` to finish, then the test fails naming them."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + THREAD_GRACE_S
    for t in set(threading.enumerate()) - before:
        if t.name.startswith(LONG_LIVED_THREADS):
            continue
        t.join(max(0.0, deadline - time.monotonic()))
    alive = sorted(t.name for t in set(threading.enumerate()) - before
                   if t.is_alive() and not t.name.startswith(LONG_LIVED_THREADS))
    assert not alive, f"{request.node.nodeid} left threads running: {alive}"


@pytest.fixture
def in_private_tmpfs(tmp_path):
    """``run(script, *args, timeout=...)``: run a Python script under ``unshare -m`` (a private mount
    namespace, where it may mount a small tmpfs on ``tmp_path / "mnt"``, passed as its first
    argument) and return the finished process; skips where that needs what this machine lacks
    (root, unshare(1), mount namespaces)."""
    import shutil
    import subprocess
    import sys
    import textwrap

    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root and unshare(1) for a private tmpfs")
    probe = subprocess.run([unshare, "-m", "true"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"no private mount namespace here: {probe.stderr.decode()[-200:]}")
    mnt = tmp_path / "mnt"
    mnt.mkdir()

    def run(script: str, *args: str, timeout: float):
        path = tmp_path / "in_private_tmpfs.py"
        path.write_text(textwrap.dedent(script))
        return subprocess.run([unshare, "-m", "--propagation", "private", sys.executable, str(path), str(mnt), *args],
                              capture_output=True, text=True, timeout=timeout)

    run.mnt = mnt
    return run

