"""libgomp's wait policy: set for the kernels' OpenMP pool when the user has not chosen one."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from looptune.runtime.compiler.environment import OPENMP_SPIN_COUNT, set_openmp_wait_policy


def test_the_spin_count_is_set_when_unset():
    env = {"PATH": "/bin"}
    assert set_openmp_wait_policy(env) == {"GOMP_SPINCOUNT": OPENMP_SPIN_COUNT}
    assert env == {"PATH": "/bin", "GOMP_SPINCOUNT": OPENMP_SPIN_COUNT}
    assert set_openmp_wait_policy(env) == {}          # a second time changes nothing


@pytest.mark.parametrize("user", [{"GOMP_SPINCOUNT": "300000"}, {"OMP_WAIT_POLICY": "active"},
                                  {"OMP_WAIT_POLICY": "passive"}, {"GOMP_SPINCOUNT": ""}])
def test_the_users_setting_is_kept(user):
    env = dict(user)
    assert set_openmp_wait_policy(env) == {}
    assert env == user


CHILD = """
import os, numpy as np
from looptune import runtime
assert "GOMP_SPINCOUNT" not in os.environ or os.environ["GOMP_SPINCOUNT"] == "7"
a = np.ones((96, 96), np.float32)
assert (runtime.matmul(a, a, threads=2) == 96).all()
print(os.environ.get("GOMP_SPINCOUNT"), os.environ.get("OMP_WAIT_POLICY"))
"""


@pytest.mark.parametrize("user, expected", [({}, f"{OPENMP_SPIN_COUNT} None"), ({"GOMP_SPINCOUNT": "7"}, "7 None"),
                                            ({"OMP_WAIT_POLICY": "passive"}, "None passive")])
def test_set_before_the_first_kernel_library_loads(tmp_path, user, expected):
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    env.update(user, LOOPTUNE_DB="", LOOPTUNE_NO_EMBEDDED_DB="1", LOOPTUNE_NO_NUMPY_HANDOFF="1")   # the first call loads a kernel
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[-2] == expected
