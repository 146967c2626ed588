"""Load built kernels and call them on numpy arrays: the one loader and the one call path.

Everything that runs a kernel goes through ``Kernel``: ``runtime.matmul``, the measurement
worker (which times ``Kernel.invoke``, the very call matmul makes), the tests.

``Kernel.invoke(a, b, c, accumulate, nthreads) -> rc`` turns (batch, m, k) x (batch, k, n)
-> (batch, m, n) numpy views (2-D operands are batch 1, or broadcast over C's batch) into
the ABI's pointer-and-stride arguments without copying.  It is the compiled trampoline
(``looptune.runtime.compiler.trampoline``) with the kernel's address bound, or, where no
trampoline can be built, the same checks in Python and a cffi call.  Return codes are the
ABI's (``looptune.runtime.compiler.abi.ERRORS``): -3 means an operand is misaligned and the
caller should take another path; bad types or shapes raise TypeError / ValueError.
"""
from __future__ import annotations

import ctypes
import functools
import itertools
import logging
import os
import shutil
import tempfile
import threading
from typing import Protocol, runtime_checkable

import numpy as np
from cffi import FFI

from looptune.runtime.compiler import environment, pool, trampoline
from looptune.runtime.compiler.abi import C_TYPE, OUTPUT_DTYPE, KernelError, function_type
from looptune.runtime.compiler.build import BuildError
from looptune.runtime.compiler.cache import TEMP_PREFIX
from looptune.runtime.compiler.workload import numpy_dtype

__all__ = ["Kernel", "KernelError", "KernelLike", "KernelLoadError", "load_library"]

log = logging.getLogger("looptune.runtime")

_ffi = FFI()
_ffi.cdef("\n".join(function_type(f"lt_{d}_fn", d) for d in C_TYPE))
_ffi.cdef("\n".join(function_type(f"lt_{d}_fused_fn", d, fused=True) for d in C_TYPE if d != "float16"))

_libs: dict[str, tuple[tuple[int, int, int], ctypes.CDLL]] = {}   # realpath -> (file identity, library)
_libs_lock = threading.Lock()
_copies = itertools.count(1)


def _renew_libs_lock() -> None:
    """In a forked child: a fresh ``_libs_lock``.  Only the forking thread survives a fork, so a
    lock another thread held then (say, inside dlopen) would never be released in the child, and
    its first kernel load would deadlock."""
    global _libs_lock
    _libs_lock = threading.Lock()


if hasattr(os, "register_at_fork"):     # POSIX
    os.register_at_fork(after_in_child=_renew_libs_lock)


class KernelLoadError(BuildError):
    """A shared object or a kernel symbol in it could not be loaded."""


@runtime_checkable
class KernelLike(Protocol):
    """What a dispatch-table entry serves a call with, and every call path calls: a compiled
    ``Kernel``, ``runtime.numpy_kernel.NumpyKernel`` (numpy serves) or ``runtime.verdicts.Trial``
    (a trial against numpy under way).  ``invoke(a, b, c, accumulate, nthreads)`` computes
    ``C = (accumulate ? C : 0) + A @ B`` and returns 0 or an ``abi.ERRORS`` code.  The compiled
    ``serve`` path reads one more attribute, ``address``: a kernel function it calls itself, 0 for
    numpy (it calls numpy.matmul), absent for an entry it must leave to the Python paths."""

    symbol: str
    dtype: str

    def invoke(self, a: np.ndarray, b: np.ndarray, c: np.ndarray, accumulate: int, nthreads: int) -> int: ...


def load_library(so_path: str | os.PathLike) -> ctypes.CDLL:
    """dlopen a shared object, once per process (RTLD_LOCAL: each library keeps its symbols).

    Libraries are never closed: unloading code that started OpenMP threads is unsafe.  The
    dynamic loader hands back an already-loaded library when the *path* matches, so a file
    rebuilt in place would silently run the old code; such a file is loaded from a fresh copy
    (deleted once loaded).  Failures raise ``KernelLoadError``.

    Kernels run their parallel loops on LoopTune's thread pool (``looptune.runtime.compiler.pool``),
    loaded into the global symbol scope before the first kernel library, whose weak reference to
    it is bound when it is loaded.  They also link libgomp (their fallback), which reads its
    environment once, when the first of them is loaded here: its idle-thread spin is bounded
    first (``environment.set_openmp_wait_policy``), so an OpenMP team and numpy's BLAS pool do
    not spin against each other between calls.
    """
    try:
        st = os.stat(so_path)
    except OSError as e:
        raise KernelLoadError(f"cannot open {so_path}: {e.strerror}") from None
    real = os.path.realpath(so_path)
    ident = (st.st_ino, st.st_size, st.st_mtime_ns)
    with _libs_lock:
        entry = _libs.get(real)
        if entry is not None and entry[0] == ident:
            return entry[1]
        path = real if entry is None else _fresh_copy(real)
        pool.load()     # first: a kernel binds its weak reference to the pool when it is loaded
        pool.serve_new_openblas()
        if environment.set_openmp_wait_policy() and _libgomp_loaded():
            log.debug("looptune: libgomp was loaded before the first kernel; GOMP_SPINCOUNT comes too late for it")
        try:
            lib = ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL)
        except OSError as e:
            raise KernelLoadError(f"dlopen failed: {e}") from None
        finally:
            if path != real:
                os.unlink(path)
        _libs[real] = (ident, lib)
        return lib


def _libgomp_loaded() -> bool:
    """Whether this process already holds the system libgomp (another extension loaded it)."""
    try:
        ctypes.CDLL("libgomp.so.1", mode=os.RTLD_NOLOAD)
    except (OSError, AttributeError):
        return False
    return True


def _fresh_copy(real: str) -> str:
    """A copy of ``real`` under a name the dynamic loader has not seen (next to it if possible;
    the name marks it temporary, so the cache cleans it up if we die before deleting it)."""
    name = f"{TEMP_PREFIX}reload-{os.getpid()}-{next(_copies)}-{os.path.basename(real)}"
    for directory in (os.path.dirname(real), tempfile.gettempdir()):
        path = os.path.join(directory, name)
        try:
            shutil.copyfile(real, path)
            return path
        except OSError as e:
            error = e
    raise KernelLoadError(f"cannot copy {real} to reload it: {error}")


class Kernel:
    """One kernel symbol of a loaded shared object.

    ``invoke(a, b, c, accumulate, nthreads) -> rc`` is the call path (see the module
    docstring); calling the object does the same and raises ``KernelError`` for a non-zero
    code.  ``raw`` calls the ABI directly with addresses and element strides (any strides).
    """

    __slots__ = ("so_path", "symbol", "dtype", "address", "typenum", "invoke", "_cfn", "_ptr_types", "_np_dtype",
                 "_out_dtype", "fused")

    def __init__(self, so_path: str, symbol: str, dtype: str, fused: bool = False) -> None:
        if dtype not in C_TYPE:
            raise ValueError(f"kernels are {', '.join(C_TYPE)}, not {dtype!r}")
        if not symbol.isidentifier():
            raise KernelLoadError(f"not a C identifier: {symbol!r}")
        lib = load_library(so_path)
        try:
            fn = getattr(lib, symbol)
        except AttributeError:
            raise KernelLoadError(f"symbol {symbol!r} not found in {so_path}") from None
        self.so_path, self.symbol, self.dtype = so_path, symbol, dtype
        self.address: int = ctypes.cast(fn, ctypes.c_void_p).value  # type: ignore[assignment]
        self._np_dtype = numpy_dtype(dtype)
        self._out_dtype = numpy_dtype(OUTPUT_DTYPE[dtype])
        self.typenum: int = self._np_dtype.num
        self.fused = fused          # a kernel with a fused epilogue: ``invoke_fused`` calls it
        self._cfn = _ffi.cast(f"lt_{dtype}_fused_fn" if fused else f"lt_{dtype}_fn", self.address)
        self._ptr_types = (f"const {C_TYPE[dtype]} *", f"{C_TYPE[OUTPUT_DTYPE[dtype]]} *")
        module = trampoline.load()
        # a partial of a C function: calling it runs no Python bytecode
        self.invoke = (functools.partial(module.call, self.address, self.typenum) if module is not None and not fused
                       else self._invoke_cffi)

    def __repr__(self) -> str:
        return f"Kernel({self.so_path!r}, {self.symbol!r}, {self.dtype!r})"

    def error(self, code: int) -> KernelError:
        """The exception for a non-zero return code of this kernel."""
        return KernelError.from_code(self.symbol, code)

    def __call__(self, a: np.ndarray, b: np.ndarray, c: np.ndarray, *, accumulate: bool = False,
                 nthreads: int = 1) -> np.ndarray:
        """C (batch, m, n) = A (batch, m, k) @ B (batch, k, n), written into ``c``; 2-D arrays are batch 1
        (a 2-D A or B with a 3-D C is broadcast over the batch)."""
        rc = self.invoke(a, b, c, int(accumulate), nthreads)
        if rc != 0:
            raise self.error(rc)
        return c

    def raw(self, batch, m, n, k, a_ptr, sa, b_ptr, sb, c_ptr, sc, accumulate=0, nthreads=1, *epilogue) -> int:
        """Call with addresses and element strides (each s* a (batch, row, col) triple); a fused
        kernel's epilogue arguments follow (``abi.EPILOGUE_ARGS``)."""
        ca, cc = self._ptr_types
        return self._cfn(batch, m, n, k,
                         _ffi.cast(ca, a_ptr), sa[0], sa[1], sa[2],
                         _ffi.cast(ca, b_ptr), sb[0], sb[1], sb[2],
                         _ffi.cast(cc, c_ptr), sc[0], sc[1], sc[2],
                         accumulate, nthreads, *epilogue)

    def invoke_fused(self, a, b, c, bias, residual, accumulate: int, nthreads: int) -> int:
        """A fused kernel's call: ``bias`` a 1-D array of C's dtype and length n (or None),
        ``residual`` an array of C's shape and dtype, strides of 0 where it broadcasts (or None);
        neither may overlap ``c`` (the caller copies them).  Returns the kernel's code, -3 for a
        misaligned operand."""
        extra = []
        if bias is not None:
            if bias.ndim != 1 or bias.shape[0] != c.shape[-1] or bias.dtype != c.dtype or bias.strides[0] % bias.itemsize:
                raise ValueError("bias must be a vector of C's dtype and width")
            extra += [_ffi.cast(self._ptr_types[1], bias.ctypes.data), bias.strides[0] // bias.itemsize]
            if bias.ctypes.data % bias.itemsize:
                return -3
        else:
            extra += [_ffi.NULL, 0]
        if residual is not None:
            if residual.shape != c.shape or residual.dtype != c.dtype or any(s % residual.itemsize for s in residual.strides):
                raise ValueError("residual must have C's shape and dtype")
            st = [s // residual.itemsize for s in residual.strides]
            extra += [_ffi.cast(self._ptr_types[1], residual.ctypes.data), *([0] + st if residual.ndim == 2 else st)]
            if residual.ctypes.data % residual.itemsize:
                return -3
        else:
            extra += [_ffi.NULL, 0, 0, 0]
        return self._invoke_cffi(a, b, c, accumulate, nthreads, extra)

    def _invoke_cffi(self, a, b, c, accumulate: int, nthreads: int, extra: list | None = None) -> int:
        """``invoke`` without the trampoline: the trampoline's checks, then a cffi call."""
        c_shape, sc, c_ok = self._operand(c, True, 1)
        a_shape, sa, a_ok = self._operand(a, False, c_shape[0])
        b_shape, sb, b_ok = self._operand(b, False, c_shape[0])
        if not (a_ok and b_ok and c_ok):
            return -3
        batch, m, n = c_shape
        if a_shape[:2] != (batch, m) or b_shape[0] != batch or b_shape[2] != n or a_shape[2] != b_shape[1]:
            raise ValueError("operand shapes do not match")
        if c.size and a.size and b.size and (np.may_share_memory(c, a) or np.may_share_memory(c, b)):
            return -4
        return self.raw(batch, m, n, a_shape[2], a.ctypes.data, sa, b.ctypes.data, sb, c.ctypes.data, sc,
                        accumulate, nthreads, *(extra or ()))

    def _operand(self, x, writable: bool, batch: int) -> tuple[tuple[int, int, int], tuple[int, int, int], bool]:
        """(shape, element strides, aligned) of an operand as (batch, rows, cols); batch stride 0 broadcasts."""
        if not isinstance(x, np.ndarray):
            raise TypeError("expected a numpy array")
        if x.dtype != (self._out_dtype if writable else self._np_dtype):
            raise TypeError("array dtype does not match the kernel")
        if writable and not x.flags.writeable:
            raise ValueError("output array is read-only")
        if x.ndim not in (2, 3):
            raise ValueError("expected a 2-D or 3-D array")
        item = x.itemsize
        if any(s % item for s in x.strides):
            return (0, 0, 0), (0, 0, 0), False      # e.g. a field of a structured array: the caller copies
        st = tuple(s // item for s in x.strides)
        if x.ndim == 2:
            shape, st = (batch, *x.shape), (0, *st)
        else:
            shape = x.shape
        return shape, st, x.ctypes.data % item == 0  # type: ignore[return-value]
