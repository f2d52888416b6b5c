"""approx_jax.tune_cpu_allocator: large freed buffers are reused, not re-faulted."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

_PROBE = textwrap.dedent(
    """
    import ctypes, ctypes.util, resource, sys, threading
    import approx_jax
    applied = approx_jax.tune_cpu_allocator() if sys.argv[1] == "tuned" else False
    again = approx_jax.tune_cpu_allocator() if applied else False

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]

    def step():  # a 64 MiB temporary written once on a worker thread, like an XLA buffer
        def work():
            p = libc.malloc(64 << 20)
            ctypes.memset(p, 1, 64 << 20)
            libc.free(p)

        t = threading.Thread(target=work)
        t.start()
        t.join()

    step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
    print(applied, again, faults)
    """
)


def _probe(mode: str):
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0] == "True", out[1] == "True", float(out[2])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_tuned_allocator_reuses_large_buffers():
    applied, again, tuned_faults = _probe("tuned")
    if not applied:
        pytest.skip("not glibc: tune_cpu_allocator is a no-op here")
    assert again  # idempotent
    _, _, default_faults = _probe("default")
    # 64 MiB is 16384 pages: re-faulted on every step by default, reused when tuned.
    assert default_faults > 8000
    assert tuned_faults < 100
