"""Shared timing helpers for the benchmark scripts (not part of the package)."""

from __future__ import annotations

import os
import platform
import statistics
import time

import jax


def block(tree):
    return jax.tree_util.tree_map(
        lambda x: x.block_until_ready() if hasattr(x, "block_until_ready") else x, tree
    )


def alternating_samples(
    fns: dict, reps: int = 7, warmup: int = 3, budget_s: float | None = None
) -> dict:
    """Wall times of each zero-argument function, measured alternately.

    Alternating the candidates inside one loop exposes them to the same
    machine noise, so their *ratio* is meaningful even on a busy VM.

    Args:
      fns: name -> callable returning JAX arrays.
      reps: timed repetitions (rounds) per function.
      warmup: untimed calls per function, alternated too (compilation happens
        here; with one warm-up call the native op of a new shape measured
        3.3-3.5 ms instead of 1.8-2.0 ms, 8192x576x64 right after 1024^3).
      budget_s: when set, no round starts once the timed rounds have taken
        this long and at least two are done (fewer reps for a slow case).

    Returns:
      name -> list of seconds, one per round (the i-th entries of two
      candidates come from the same round).
    """
    for _ in range(warmup):
        for fn in fns.values():
            block(fn())
    samples = {name: [] for name in fns}
    order = list(fns.items())
    t_all = time.perf_counter()
    for rep in range(reps):
        if budget_s is not None and rep >= 2 and time.perf_counter() - t_all > budget_s:
            break
        # Every other rep in reverse order, so that no candidate always runs
        # right after the same other one (what it leaves in caches and
        # threads counts: with the approximate op always first, its GEMM
        # 1024^3 throughput vs native read 6-9% higher than with it second).
        for name, fn in order if rep % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            block(fn())
            samples[name].append(time.perf_counter() - t0)
    return samples


def alternating_medians(fns: dict, reps: int = 7, warmup: int = 3) -> dict:
    """Median wall time of each zero-argument function, measured alternately
    (``alternating_samples``; same arguments).

    Returns:
      name -> median seconds.
    """
    samples = alternating_samples(fns, reps, warmup)
    return {name: statistics.median(s) for name, s in samples.items()}


def cpu_model() -> str:
    """The CPU's model name and vector width, e.g. "Intel(R) Xeon(R) Processor, AVX-512".

    Results from different VMs differ mostly by these (a Xeon does two 512-bit
    FMAs per cycle for the native op, a Zen 4 one; an AVX2-only CPU runs the
    kernels' 8-lane unit), so the tables name them.
    """
    name, flags = None, set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and name is None:
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:  # not Linux
        pass
    name = name or platform.processor() or "unknown CPU"
    # The kernels' own choice (cpu_gemm.cc BestIsa).
    if {"avx512f", "avx512dq", "avx512bw", "avx512vl"} <= flags:
        return f"{name}, AVX-512"
    if {"avx2", "fma"} <= flags:
        return f"{name}, AVX2"
    return name


def thread_note() -> str:
    return f"{os.cpu_count()} CPU cores visible ({cpu_model()}); XLA intra-op pool uses all of them"
