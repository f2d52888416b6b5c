"""How fast the CPU tile kernel's inner loop can go, against a dense GEMM's (issue 5).

Compiles `benchmarks/tile_ceiling.cc` with the system C++ compiler for this
CPU (`-march=native`, AVX-512 only), runs its loops on one core (a dense GEMM
micro-kernel, the tile loop with bfloat16 tiles as shipped, float32 tiles,
both mixed; the FMA peak on registers and with an L1 operand), then times
`jnp.dot` and the approximate GEMM (mbm3) at 1024^3 on all cores in the same
run. Prints a table of products per second per core and ratios: the tile
loop's rate over `jnp.dot`'s per core is an upper bound on the whole
approximate GEMM's ratio (packing, tile builds and b's statistics come on top).

Usage:
  python benchmarks/bench_tile_ceiling.py [--seconds 0.5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, os.path.dirname(__file__))
from _timing import alternating_medians, thread_note  # noqa: E402

import approx_jax  # noqa: E402
from approx_jax import multipliers  # noqa: E402

LOOPS = {
    "fma_registers": "FMA peak: 24 chains on registers",
    "fma_l1_operand": "FMA with its own 64-byte L1 operand",
    "dense": "dense GEMM 6x64 micro-kernel (B row shared by 6 rows)",
    "tile_bf16_kb256": "tile loop, bfloat16 tiles, 256 KB (shipped: MicroTile<6, true>)",
    "tile_bf16_kb32": "tile loop, bfloat16 tiles, 32 KB (L1)",
    "tile_f32_kb16": "tile loop, float32 tiles, 32 KB (L1)",
    "tile_f32_kb256": "tile loop, float32 tiles, 512 KB (L2)",
    "tile_mixed_kb32": "tile loop, half bfloat16 half float32, 48 KB",
    "tile_mixed_kb256": "tile loop, half bfloat16 half float32, 384 KB",
}


def run_loops(seconds: float) -> dict:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise SystemExit("bench_tile_ceiling: no C++ compiler found (set CXX)")
    source = os.path.join(os.path.dirname(__file__), "tile_ceiling.cc")
    with tempfile.TemporaryDirectory() as tmp:
        binary = os.path.join(tmp, "tile_ceiling")
        cmd = [compiler, "-O3", "-march=native", "-ffp-contract=off", source, "-o", binary]
        subprocess.run(cmd, check=True)
        run = subprocess.run([binary, str(seconds)], capture_output=True, text=True)
        if run.returncode != 0:
            raise SystemExit(f"bench_tile_ceiling: {run.stderr.strip() or run.returncode}")
    rates = {}
    for line in run.stdout.splitlines():
        name, value = line.split()
        rates[name] = float(value)
    return rates


def gemm_rates(reps: int) -> dict:
    n = 1024
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((n, n), np.float32))
    b = jnp.asarray(rng.standard_normal((n, n), np.float32))
    mbm3 = multipliers.mbm(3)
    native = jax.jit(jnp.dot)
    approx = jax.jit(lambda x, y: approx_jax.approx_dot(x, y, mbm3))
    medians = alternating_medians(
        {"native": lambda: native(a, b), "approx": lambda: approx(a, b)}, reps=reps
    )
    return {name: n**3 / t for name, t in medians.items()}


def main(argv=None):
    approx_jax.tune_cpu_allocator()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=0.5, help="time per loop and round")
    parser.add_argument("--reps", type=int, default=9, help="alternated GEMM repetitions")
    args = parser.parse_args(argv)

    loops = run_loops(args.seconds)
    gemms = gemm_rates(args.reps)
    cores = len(os.sched_getaffinity(0))
    per_core = {name: rate / cores for name, rate in gemms.items()}

    table = Table(title=f"Inner loops on one core; GEMMs 1024^3 on all ({thread_note()})")
    table.add_column("loop")
    table.add_column("G products/s per core", justify="right")
    table.add_column("vs dense loop", justify="right")
    table.add_column("vs jnp.dot per core", justify="right")
    rows = [(label, loops[name]) for name, label in LOOPS.items()]
    rows += [
        ("jnp.dot 1024^3", per_core["native"]),
        ("approx_dot 1024^3, mbm3", per_core["approx"]),
    ]
    for label, rate in rows:
        table.add_row(
            label,
            f"{rate / 1e9:.1f}",
            f"{rate / loops['dense']:.2f}x",
            f"{rate / per_core['native']:.2f}x",
        )
    Console(width=150).print(table)


if __name__ == "__main__":
    main()
