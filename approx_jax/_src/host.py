"""Host (CPU) memory settings that keep large XLA buffers out of the page-fault path.

XLA:CPU allocates every buffer of a step with ``malloc``. glibc serves
requests above its mmap threshold (at most 32 MiB) with fresh ``mmap`` pages,
and per-thread arenas give freed memory back to the kernel, so each step
page-faults its large intermediates in again. A vmapped sweep has them: eight
LeNet-5 designs at batch 64 carry 50-65 MiB activations and patch matrices,
and measured ~100k minor faults per step (~20 ms per 65 MiB buffer) where the
eight single-design steps had none. With one arena, no mmap for large blocks
and a high trim threshold, freed buffers are reused: the vmapped LeNet-5
step went from 634 to 555 ms (2 cores); single-design steps were unchanged.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_applied = False


def tune_cpu_allocator(trim_threshold_bytes: int = 1 << 30) -> bool:
    """Makes glibc's malloc reuse large freed blocks instead of re-faulting them.

    Sets one malloc arena, no ``mmap`` for large blocks and a trim threshold of
    ``trim_threshold_bytes``, so XLA:CPU's big per-step buffers are recycled.
    Call it before the first JAX computation (threads that already own an
    arena keep it). The cost: up to ``trim_threshold_bytes`` of freed memory
    stays with the process. The ``approx-jax`` command and the benchmarks call
    it; library code never does. Only glibc (Linux) is affected; elsewhere this
    is a no-op.

    Args:
      trim_threshold_bytes: Free memory at the top of the heap kept before
        glibc returns it to the kernel.

    Returns:
      True when the settings were applied (now or by an earlier call).

    Example:
      >>> import approx_jax
      >>> approx_jax.tune_cpu_allocator()  # first thing in a sweep script
      True
    """
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or no libc found: nothing to tune
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = (
        mallopt(_M_ARENA_MAX, 1) == 1
        and mallopt(_M_MMAP_MAX, 0) == 1
        and mallopt(_M_TRIM_THRESHOLD, int(min(trim_threshold_bytes, 2**31 - 1))) == 1
    )
    _applied = bool(ok)
    return _applied
