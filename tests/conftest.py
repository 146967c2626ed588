import os

import pytest


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", help="rewrite golden files instead of comparing")


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
