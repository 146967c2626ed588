"""A compiled fast path for calling kernels on numpy arrays.

From Python, just reading an array's address costs 1-2 us (``a.ctypes.data``) and a
libffi call with 18 arguments another 1.3 us, which is more than a whole 8x8 matmul.
This module compiles (once per Python and numpy version, cached like kernels) a
small CPython extension that reads the array fields directly and calls the kernel
function pointer with the GIL released (``call``, behind ``Kernel.invoke``).  Its ``serve``
runs a whole ``runtime.matmul`` call for the common cases (arrays numpy computes in float32 or
float64, batch dimensions that fold into one stride, casts and copies as
``looptune.runtime.call_plan`` plans them) when the kernel is already in the
dispatch table, building the very dispatch key a plan holds; anything else it
answers None and the planned Python path takes the call.  When no Python headers or compiler are
available, or the module cannot be built, verified and loaded, ``load()`` returns None and
callers keep the cffi path.

The module is cached like kernels (``looptune.runtime.compiler.cache``): written durably,
named by its content hash, and verified (size, sha256) before it is imported, since
importing a truncated extension module kills the process with SIGBUS.  A damaged entry is
removed and rebuilt once.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import sys
import sysconfig
from pathlib import Path

import numpy as np

from looptune.runtime.compiler import environment
from looptune.runtime.compiler.abi import function_type
from looptune.runtime.compiler.build import BuildSettings, cached_helper

log = logging.getLogger("looptune.runtime")

# the extension's C text, beside this file (as ``pool.c``)
_SOURCE = Path(__file__).with_name("trampoline.c").read_text()

# the kernel ABI over untyped pointers (the module serves both dtypes)
_SOURCE = _SOURCE.replace("GEMM_FN_TYPEDEF", function_type("gemm_fn", "void"))


@functools.lru_cache(maxsize=1)
def load():
    """The compiled trampoline module, or None when it cannot be built here."""
    if environment.flag("LOOPTUNE_NO_TRAMPOLINE"):
        return None
    try:
        include = sysconfig.get_paths()["include"]
        if not os.path.exists(os.path.join(include, "Python.h")):
            return None
        ident = f"{sys.version}|{np.__version__}|{_SOURCE}"
        name = "_lt_call_" + hashlib.sha256(ident.encode()).hexdigest()[:12]
        path = cached_helper(name, _SOURCE.replace("MODNAME", name), ("-O2", "-shared", "-fPIC"),
                             importlib.machinery.EXTENSION_SUFFIXES[0], BuildSettings.from_env(),
                             [f"-I{include}", f"-I{np.get_include()}"])
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        return module
    except Exception as e:  # any failure: the cffi path still works
        log.warning("looptune: no compiled call trampoline (%s); calling kernels through cffi", e)
        return None
