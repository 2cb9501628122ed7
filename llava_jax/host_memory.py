"""Host-memory allocation for runs on XLA:CPU: keep freed memory for reuse instead of handing it back.

XLA:CPU mallocs each execution's temporary buffer (1.46 GB for the bench train step) and frees it when the
step ends. glibc serves a request that large from a worker thread with a fresh `mmap` and returns it with
`munmap` on free, so every step faults its whole working set back in page by page (296k minor faults per
step on the bench, a quarter of a core spent in the kernel). `retain_freed_memory` sets glibc's allocator to
one arena grown with brk, no mmap for large blocks and no trimming, so the second step reuses the first
step's pages: 25k faults per step and 2.96 -> 2.69 s per bench train step (BENCHMARKS.md).

The cost is that the process keeps its peak heap (as the accelerator runtimes' own caching allocators do)
and that all threads share one malloc arena. On accelerator hosts the large buffers live in device memory,
so `auto` leaves the system allocator alone there.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import logging
import os
import sys

log = logging.getLogger(__name__)

MODES = ("auto", "retain", "system")
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # mallopt parameters (malloc.h)
_ACCELERATOR_NODES = ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*", "/dev/kfd")


class HostMemoryError(ValueError):
    """An unknown host-memory mode."""


def cpu_backend_expected(platforms: str | None = None) -> bool:
    """Whether JAX will run on its CPU backend, decided without initialising a backend: the first of
    `platforms` (by default JAX_PLATFORMS / jax_platforms, comma-separated) when one is named, else whether
    this host has no accelerator device node (TPU, NVIDIA, AMD)."""
    if platforms is None:
        import jax

        platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not any(glob.glob(pattern) for pattern in _ACCELERATOR_NODES)


def _backend_initialized() -> bool:
    try:
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover - layout of a future JAX
        return False
    return xla_bridge.backends_are_initialized()


def retain_freed_memory(mode: str = "auto") -> bool:
    """Applies `mode` to this process's allocator and returns whether freed memory is now retained.

    mode: 'retain' (always, on glibc), 'system' (never), 'auto' (retain when `cpu_backend_expected`).
    Must run before JAX initialises its backend: XLA's worker threads pick their malloc arena on first use,
    so a later call changes nothing (it logs a warning and returns False). A non-glibc C library is left
    alone (False).
    """
    if mode not in MODES:
        raise HostMemoryError(f"unknown host memory mode {mode!r}; known: {', '.join(MODES)}")
    if mode == "system" or (mode == "auto" and not cpu_backend_expected()):
        return False
    if not sys.platform.startswith("linux"):
        return False
    if _backend_initialized():
        log.warning("host memory: JAX's backend is already initialised; the allocator is left as it is")
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - glibc only (musl has no mallopt parameters like these)
    except (OSError, AttributeError):
        return False
    trim_max = 2**31 - 1  # mallopt takes an int
    applied = [libc.mallopt(p, v) for p, v in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, trim_max))]
    if not all(applied):
        log.warning("host memory: mallopt refused a setting (%s); the allocator may be partly changed", applied)
        return False
    log.info("host memory: freed blocks are retained for reuse (one arena, no mmap, no trim)")
    return True
