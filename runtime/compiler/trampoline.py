"""A compiled fast path for calling kernels on numpy arrays.

From Python, just reading an array's address costs 1-2 us (``a.ctypes.data``) and a
libffi call with 18 arguments another 1.3 us, which is more than a whole 8x8 matmul.
This module compiles (once per Python and numpy version, cached like kernels) a
small CPython extension that reads the array fields directly and calls the kernel
function pointer with the GIL released.  When no Python headers or compiler are
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
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from looptune.runtime.compiler import cache as disk
from looptune.runtime.compiler import environment
from looptune.runtime.compiler.abi import function_type
from looptune.runtime.compiler.build import BuildSettings

log = logging.getLogger("looptune.runtime")

_SOURCE = r"""
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>
#include <stdint.h>

GEMM_FN_TYPEDEF

/* view an operand as (batch, rows, cols) with element strides; batch stride 0 broadcasts */
static int operand(PyObject *o, int typenum, int writable, int64_t bat, int64_t shape[3], int64_t st[3], void **data)
{
    if (!PyArray_Check(o)) { PyErr_SetString(PyExc_TypeError, "expected a numpy array"); return -1; }
    PyArrayObject *a = (PyArrayObject *)o;
    if (PyArray_TYPE(a) != typenum) { PyErr_SetString(PyExc_TypeError, "array dtype does not match the kernel"); return -1; }
    if (writable && !PyArray_ISWRITEABLE(a)) { PyErr_SetString(PyExc_ValueError, "output array is read-only"); return -1; }
    int nd = PyArray_NDIM(a);
    if (nd != 2 && nd != 3) { PyErr_SetString(PyExc_ValueError, "expected a 2-D or 3-D array"); return -1; }
    npy_intp *dims = PyArray_DIMS(a), *strides = PyArray_STRIDES(a);
    int64_t item = PyArray_ITEMSIZE(a);
    for (int i = 0; i < nd; i++) if (strides[i] % item) return 1;   /* e.g. a field of a structured array: copy */
    if (nd == 3) { shape[0] = dims[0]; st[0] = strides[0] / item; }
    else { shape[0] = bat; st[0] = 0; }
    shape[1] = dims[nd - 2]; st[1] = strides[nd - 2] / item;
    shape[2] = dims[nd - 1]; st[2] = strides[nd - 1] / item;
    *data = PyArray_DATA(a);
    if (((uintptr_t)*data) % item) return 1;      /* misaligned: the caller copies and retries */
    return 0;
}

/* the bytes [lo, hi) an operand's elements span */
static void extent(const void *data, const int64_t shape[3], const int64_t st[3], int64_t item, uintptr_t *lo, uintptr_t *hi)
{
    int64_t first = 0, last = 0;
    for (int i = 0; i < 3; i++) {
        int64_t span = (shape[i] - 1) * st[i] * item;
        if (span < 0) first += span; else last += span;
    }
    *lo = (uintptr_t)data + first;
    *hi = (uintptr_t)data + last + item;
}

static int overlaps(const void *pc, const int64_t cs[3], const int64_t sc[3], const void *px, const int64_t xs[3],
                    const int64_t sx[3], int64_t item)
{
    uintptr_t clo, chi, xlo, xhi;
    extent(pc, cs, sc, item, &clo, &chi);
    extent(px, xs, sx, item, &xlo, &xhi);
    return clo < xhi && xlo < chi;
}

static PyObject *call(PyObject *self, PyObject *args)
{
    unsigned long long fn; int typenum, accumulate, nthreads; PyObject *A, *B, *C;
    if (!PyArg_ParseTuple(args, "KiOOOii", &fn, &typenum, &A, &B, &C, &accumulate, &nthreads)) return NULL;
    int64_t sc[3], cs[3], sa[3], as[3], sb[3], bs[3]; void *pa, *pb, *pc;
    int ec = operand(C, typenum, 1, 1, cs, sc, &pc), ea, eb;
    if (ec < 0) return NULL;
    if ((ea = operand(A, typenum, 0, cs[0], as, sa, &pa)) < 0 || (eb = operand(B, typenum, 0, cs[0], bs, sb, &pb)) < 0) return NULL;
    if (ec || ea || eb) return PyLong_FromLong(-3);
    if (as[0] != cs[0] || bs[0] != cs[0] || as[1] != cs[1] || bs[2] != cs[2] || as[2] != bs[1]) {
        PyErr_SetString(PyExc_ValueError, "operand shapes do not match"); return NULL;
    }
    int64_t item = PyArray_ITEMSIZE((PyArrayObject *)C);
    if (cs[0] && cs[1] && cs[2] && as[2]
        && (overlaps(pc, cs, sc, pa, as, sa, item) || overlaps(pc, cs, sc, pb, bs, sb, item))) return PyLong_FromLong(-4);
    int rc;
    int64_t work = cs[0] * cs[1] * cs[2] * as[2];
    if (work > 32768) {
        Py_BEGIN_ALLOW_THREADS
        rc = ((gemm_fn)(uintptr_t)fn)(cs[0], cs[1], cs[2], as[2], pa, sa[0], sa[1], sa[2], pb, sb[0], sb[1], sb[2],
                                      pc, sc[0], sc[1], sc[2], accumulate, nthreads);
        Py_END_ALLOW_THREADS
    } else {
        rc = ((gemm_fn)(uintptr_t)fn)(cs[0], cs[1], cs[2], as[2], pa, sa[0], sa[1], sa[2], pb, sb[0], sb[1], sb[2],
                                      pc, sc[0], sc[1], sc[2], accumulate, nthreads);
    }
    return PyLong_FromLong(rc);
}

static PyMethodDef methods[] = {{"call", call, METH_VARARGS, "call(fn, typenum, A, B, C, accumulate, nthreads) -> rc"}, {NULL, NULL, 0, NULL}};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "MODNAME", NULL, -1, methods};
PyMODINIT_FUNC PyInit_MODNAME(void) { import_array(); return PyModule_Create(&module); }
"""


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
        settings = BuildSettings.from_env()
        cache = settings.open_cache()
        ref = cache / f"{name}.json"
        path, _, _ = disk.check_ref(ref)    # a damaged entry is removed here
        if path is None:
            disk.write_ref(ref, _build(name, settings, cache, [f"-I{include}", f"-I{np.get_include()}"]))
            path, _, problem = disk.check_ref(ref)
            if path is None:
                raise OSError(f"the rebuilt trampoline does not verify: {problem}")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        return module
    except Exception as e:  # any failure: the cffi path still works
        log.warning("looptune: no compiled call trampoline (%s); calling kernels through cffi", e)
        return None


def _build(name: str, settings: BuildSettings, cache: Path, includes: list[str]) -> dict[str, Any]:
    """Compile the module into the cache (named by its content hash); returns its ref."""
    with tempfile.TemporaryDirectory(prefix=disk.TEMP_PREFIX, dir=cache) as tmp:
        src = Path(tmp) / f"{name}.c"
        src.write_text(_SOURCE.replace("MODNAME", name))
        out = Path(tmp) / f"{name}.so"
        tool = BuildSettings(compiler=settings.compiler, flags=("-O2", "-shared", "-fPIC"), arch_flags=())
        subprocess.run(tool.shared_library_command([src], out, includes), check=True, capture_output=True,
                       timeout=settings.timeout_s)
        size, sha256 = disk.sha256_of(out)
        path = disk.publish_file(out, cache, sha256, importlib.machinery.EXTENSION_SUFFIXES[0], prefix=f"{name}-")
        return {"so": path.name, "size": size, "sha256": sha256}
