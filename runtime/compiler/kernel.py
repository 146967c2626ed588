"""Load a built kernel through cffi and call it on numpy arrays.

``Kernel`` is the in-process handle the runtime and the measurement worker use; it
turns (batch, m, k) x (batch, k, n) -> (batch, m, n) numpy views into the ABI's
pointer-and-stride arguments without copying.
"""
from __future__ import annotations

from looptune.runtime.compiler.errors import LoopTuneError

import ctypes
import threading
from dataclasses import dataclass

import numpy as np
from cffi import FFI

from looptune.runtime.compiler import trampoline
from looptune.runtime.compiler.codegen import ABI_ARGS

_ffi = FFI()
_ffi.cdef(f"typedef int (*lt_sgemm_fn)({ABI_ARGS.format(T='float')});")
_ffi.cdef(f"typedef int (*lt_dgemm_fn)({ABI_ARGS.format(T='double')});")
_FN_TYPE = {"float32": "lt_sgemm_fn", "float64": "lt_dgemm_fn"}
_PTR_TYPE = {"float32": ("const float *", "float *"), "float64": ("const double *", "double *")}

_libs: dict[str, ctypes.CDLL] = {}
_libs_lock = threading.Lock()


class KernelError(LoopTuneError, RuntimeError):
    """A kernel returned a failure code (``code``: -1 memory, -2 layout precondition, -3 alignment)."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


ERRORS = {-1: "out of memory for packing buffers", -2: "operand strides do not meet this kernel's layout precondition",
          -3: "an operand is not aligned to its element size"}


def _library(path: str) -> ctypes.CDLL:
    with _libs_lock:
        lib = _libs.get(path)
        if lib is None:
            # RTLD_LOCAL keeps each kernel library's symbols to itself.
            lib = _libs[path] = ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL)
        return lib


@dataclass(frozen=True)
class Kernel:
    so_path: str
    symbol: str
    dtype: str

    def __post_init__(self) -> None:
        addr = ctypes.cast(getattr(_library(self.so_path), self.symbol), ctypes.c_void_p).value
        object.__setattr__(self, "address", addr)
        object.__setattr__(self, "_typenum", np.dtype(self.dtype).num)
        module = trampoline.load()
        object.__setattr__(self, "_fast", module.call if module is not None else None)
        object.__setattr__(self, "_fn", _ffi.cast(_FN_TYPE[self.dtype], addr))
        object.__setattr__(self, "_ptrs", _PTR_TYPE[self.dtype])
        object.__setattr__(self, "_item", np.dtype(self.dtype).itemsize)

    def raw(self, batch, m, n, k, a_ptr, sa, b_ptr, sb, c_ptr, sc, accumulate=0, nthreads=1) -> int:
        """Call with addresses and element strides (each s* a (batch, row, col) triple)."""
        ca, cb = self._ptrs  # type: ignore[attr-defined]
        return self._fn(batch, m, n, k,  # type: ignore[attr-defined]
                        _ffi.cast(ca, a_ptr), sa[0], sa[1], sa[2],
                        _ffi.cast(ca, b_ptr), sb[0], sb[1], sb[2],
                        _ffi.cast(cb, c_ptr), sc[0], sc[1], sc[2],
                        accumulate, nthreads)

    def __call__(self, a: np.ndarray, b: np.ndarray, c: np.ndarray, *, accumulate: bool = False, nthreads: int = 1) -> np.ndarray:
        """C (batch, m, n) = A (batch, m, k) @ B (batch, k, n), written into ``c``; 2-D arrays are batch 1
        (a 2-D A or B with a 3-D C is broadcast over the batch)."""
        fast = self._fast  # type: ignore[attr-defined]
        if fast is not None:
            rc = fast(self.address, self._typenum, a, b, c, int(accumulate), nthreads)  # type: ignore[attr-defined]
            if rc != 0:
                raise KernelError(f"{self.symbol} returned {rc}: {ERRORS.get(rc, 'unknown error')}", rc)
            return c
        if a.ndim == 2:
            a, b, c = a[None], b[None], c[None]
        dt = np.dtype(self.dtype)
        if a.dtype != dt or b.dtype != dt or c.dtype != dt:
            raise TypeError(f"kernel is {self.dtype}; got {a.dtype}, {b.dtype}, {c.dtype}")
        batch, m, k = a.shape
        if b.shape != (batch, k, b.shape[2]) or c.shape != (batch, m, b.shape[2]):
            raise ValueError(f"shapes do not match: {a.shape} @ {b.shape} -> {c.shape}")
        if not c.flags.writeable:
            raise ValueError("output array is read-only")
        it = self._item  # type: ignore[attr-defined]
        rc = self.raw(batch, m, b.shape[2], k,
                      a.ctypes.data, tuple(s // it for s in a.strides),
                      b.ctypes.data, tuple(s // it for s in b.strides),
                      c.ctypes.data, tuple(s // it for s in c.strides),
                      int(accumulate), nthreads)
        if rc != 0:
            raise KernelError(f"{self.symbol} returned {rc}: {ERRORS.get(rc, 'unknown error')}", rc)
        return c
