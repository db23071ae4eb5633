"""Keeping freed CPU memory in the process (glibc's allocator), so that a training step does not page-fault it in again.

A meta-learning step on a CPU allocates and frees the same large activations for every task. PyTorch's CPU
allocator is glibc's ``malloc``, which by default serves blocks above its (dynamic, at most 32 MiB) mmap threshold
with fresh ``mmap`` pages and returns freed heap tops to the kernel above 128 KiB: every task then touches fresh
pages, and the page faults are a sizeable part of a step's CPU time. PyTorch's CUDA allocator caches freed blocks for
the same reason; on the CPU, :func:`keep_freed_memory` tells glibc to do the same
(``mallopt(M_MMAP_THRESHOLD, 32 MiB)``, ``mallopt(M_TRIM_THRESHOLD, 2 GiB - 1)``: blocks up to 32 MiB come from
the heap, and freed heap memory is kept for reuse instead of being unmapped). It is what the environment variables
``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=...`` do, at run time.

The cost: the process keeps the memory it freed (its resident size stays near its peak instead of dropping
between steps); the peak itself barely grows. The setting is process-wide. :class:`~lightning_meta.algorithms.MetaLearner`
calls it explicitly, once, at its first training or evaluation step on a CPU (never at construction), unless
``MetaLearner.keep_freed_cpu_memory`` is False or the environment variable ``LIGHTNING_META_KEEP_FREED_MEMORY=0`` is
set, and logs that it did (once per process, INFO, logger ``lightning_meta.memory``). It is on by default because
``Trainer.fit`` on a CPU is measurably faster with it, for little more peak memory (the figures and their command:
docs/bench/maml.md). On other C libraries (musl, macOS, Windows) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

__all__ = ["keep_freed_memory", "release_freed_memory"]

log = logging.getLogger(__name__)

# glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest dynamic mmap threshold (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes a C int

#: the environment variables that make glibc do the same from process start (for subprocesses, e.g. benchmarks)
GLIBC_KEEP_ENV = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Configure glibc's ``malloc`` to keep freed memory for reuse (see the module docstring), once per process.

    Returns True if the settings are in effect (applied now or before), False where they cannot be (not glibc) or
    are switched off by ``LIGHTNING_META_KEEP_FREED_MEMORY=0``.

    Example:
        >>> keep_freed_memory() in (True, False)
        True
    """
    global _applied
    if _applied is not None:
        return _applied
    if os.environ.get("LIGHTNING_META_KEEP_FREED_MEMORY", "1").strip().lower() in ("0", "false", "no", "off"):
        _applied = False
        return False
    _applied = _mallopt()
    if _applied:
        log.info(
            "lightning-meta: glibc now keeps freed memory for reuse, process-wide (mallopt M_MMAP_THRESHOLD=32 MiB, M_TRIM_THRESHOLD=2 GiB); "
            "set LIGHTNING_META_KEEP_FREED_MEMORY=0 to leave malloc alone"
        )
    return _applied


def release_freed_memory() -> bool:
    """Hand the memory glibc keeps for reuse back to the kernel now (``malloc_trim(0)``), e.g. after a one-time
    peak such as ``task_mode="auto"``'s vmap trial, which :func:`keep_freed_memory` would otherwise keep resident.
    Returns False where this is not glibc (nothing to do), else True.

    Example:
        >>> release_freed_memory() in (True, False)
        True
    """
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim(0)
    return True


def _glibc() -> ctypes.CDLL | None:
    """The C library if it is glibc, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - AttributeError unless this is glibc
    except (OSError, AttributeError):
        return None
    return libc


def _mallopt() -> bool:
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
