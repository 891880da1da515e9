"""Batch verification of hint records in C (``verify.c``), loaded with ctypes.

The engine checks every record against the page's real bytes: ``verify`` preads each page
(from the VM's RAM file, or from ``/proc/<pid>/mem`` for pages QEMU maps privately) into one
numpy buffer and compares its XXH64 with the record's hash, for a whole batch in one call.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np

from harness.sharing.agent import build_library, library_path

PAGE = 4096
LIB_NAME = "satori_verify.so"

_u8p = np.ctypeslib.ndpointer(np.uint8, flags="C_CONTIGUOUS")
_u64p = np.ctypeslib.ndpointer(np.uint64, flags="C_CONTIGUOUS")
_i32p = np.ctypeslib.ndpointer(np.int32, flags="C_CONTIGUOUS")


def verify_source() -> Path:
    return Path(__file__).with_name("verify.c")


@functools.cache
def _lib() -> ctypes.CDLL:
    src = verify_source()
    lib = ctypes.CDLL(str(build_library(src, library_path(src, "verify", LIB_NAME), "the hint verifier")))
    lib.satori_xxh64.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint64]
    lib.satori_xxh64.restype = ctypes.c_uint64
    lib.satori_verify.argtypes = [_i32p, _u8p, _u64p, _u64p, ctypes.c_size_t, _u8p, _u8p]
    lib.satori_verify.restype = ctypes.c_size_t
    return lib


def xxh64(data: bytes, seed: int = 0) -> int:
    """XXH64 of ``data`` as the C verifier computes it (tests compare it with ``xxhash``)."""
    return int(_lib().satori_xxh64(data, len(data), seed))


def _args(fds, src, offs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    fds = np.ascontiguousarray(fds, dtype=np.int32)
    src = np.ascontiguousarray(src, dtype=np.uint8)
    offs = np.ascontiguousarray(offs, dtype=np.uint64)
    if len(src) != len(offs):
        raise ValueError("src and offs differ in length")
    if len(src) and int(src.max()) >= len(fds):
        raise ValueError("src names a file descriptor that is not given")
    return fds, src, offs


def verify(fds, src, offs, hashes, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read page i from ``fds[src[i]]`` at ``offs[i]``; return ``(pages, ok)``: the bytes read
    (n x 4096 uint8) and whether each is a whole page whose XXH64 equals ``hashes[i]``.

    ``out``: a buffer from an earlier call to reuse (grown when too small); ``pages`` is then a
    view of it, valid until the buffer is given to the next call."""
    fds, src, offs = _args(fds, src, offs)
    hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
    n = len(offs)
    if len(hashes) != n:
        raise ValueError("hashes and offs differ in length")
    base = out.base if out is not None and out.base is not None else out
    if base is None or base.dtype != np.uint8 or base.ndim != 2 or base.shape[1] != PAGE \
            or len(base) < n or not base.flags.c_contiguous:
        base = np.empty((max(n, 256), PAGE), dtype=np.uint8)
    pages = base[:n]
    ok = np.zeros(n, dtype=np.uint8)
    if n:
        _lib().satori_verify(fds, src, offs, hashes, n, pages.reshape(-1), ok)
    return pages, ok.astype(bool)

