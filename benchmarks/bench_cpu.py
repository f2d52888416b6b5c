"""CPU speed of approximate GEMM, conv and a LeNet-5 train step vs native XLA.

Prints, for each case, the median time of the approximate op and of the native
op measured alternately in the same run, and their ratio (native / approx is
the relative throughput; approx / native the slowdown).

Progress (each case as it is measured) goes to stderr, the table to stdout.

Usage:
  python benchmarks/bench_cpu.py            # full table
  python benchmarks/bench_cpu.py --quick    # smaller shapes, fewer reps
  python benchmarks/bench_cpu.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

sys.path.insert(0, os.path.dirname(__file__))
from _designs import random_design  # noqa: E402
from _timing import alternating_medians, thread_note  # noqa: E402

import approx_jax  # noqa: E402
from approx_jax import multipliers  # noqa: E402


class CaseProgress:
    """Progress per case on stderr, so that the table on stdout stays clean:
    one line per measured case, and on a terminal a live bar under them."""

    def __init__(self, total: int):
        self.console = Console(stderr=True, highlight=False)
        self.total = total
        self.done = 0
        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            disable=not self.console.is_terminal,
        )
        self.task = self.bar.add_task("bench_cpu", total=total)
        self.t_case = 0.0

    def __enter__(self):
        self.bar.start()
        return self

    def __exit__(self, *exc):
        self.bar.stop()

    def start(self, case: str, mult: str) -> None:
        self.bar.update(self.task, description=f"{case} {mult}")
        self.t_case = time.perf_counter()

    def finish(self, row) -> None:
        case, mult, ta, tn = row
        self.done += 1
        self.console.print(
            f"[{self.done}/{self.total}] {case} {mult}: approx {ta * 1e3:.2f} ms, "
            f"native {tn * 1e3:.2f} ms ({ta / tn:.2f}x) "
            f"in {time.perf_counter() - self.t_case:.1f} s",
            markup=False,
            soft_wrap=True,  # (not wrapped at 80 columns when redirected)
        )
        self.bar.advance(self.task)


def measure(rows, progress: CaseProgress, case: str, mult: str, fns: dict, reps: int) -> None:
    """One table row from ``fns`` ("approx", "native") timed alternately."""
    progress.start(case, mult)
    t = alternating_medians(fns, reps)
    rows.append((case, mult, t["approx"], t["native"]))
    progress.finish(rows[-1])


def gemm_cases(quick: bool):
    if quick:
        return [(256, 256, 256), (512, 512, 512)]
    return [(256, 256, 256), (512, 512, 512), (1024, 1024, 1024), (8192, 576, 64)]


def gemm_designs(mbits_list):
    """MBM at each width, and a random-LUT design at each width >= 7: at M = 7
    MBM's LUT runs at width 6 (half the tiles of a user's M = 7 LUT), and from
    M = 8 the built-ins' closed forms and a user's LUT take different kernel
    paths."""
    designs = [multipliers.mbm(m) for m in mbits_list]
    return designs + [random_design(m) for m in mbits_list if m >= 7]


def bench_gemm(rows, progress, designs, shapes, reps):
    rng = np.random.default_rng(0)
    native = jax.jit(lambda x, w: jnp.dot(x, w))
    for m, k, n in shapes:
        x = jnp.asarray(rng.standard_normal((m, k), np.float32))
        w = jnp.asarray(rng.standard_normal((k, n), np.float32))
        for mult in designs:
            approx = jax.jit(lambda x, w, mult=mult: approx_jax.approx_dot(x, w, mult))
            fns = {"approx": lambda: approx(x, w), "native": lambda: native(x, w)}
            measure(rows, progress, f"GEMM {m}x{k}x{n}", mult.name, fns, reps)


def bench_conv(rows, progress, mbits_list, quick, reps):
    rng = np.random.default_rng(1)
    batch = 8 if quick else 32
    x = jnp.asarray(rng.standard_normal((batch, 32, 32, 64), np.float32))
    w = jnp.asarray(rng.standard_normal((3, 3, 64, 64), np.float32) * 0.05)
    dn = ("NHWC", "HWIO", "NHWC")

    def native_loss(x, w):
        return jnp.sum(
            jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn) ** 2
        )

    native = jax.jit(jax.grad(native_loss, argnums=(0, 1)))
    for mbits in mbits_list:
        mult = multipliers.mbm(mbits)

        def approx_loss(x, w, mult=mult):
            y = approx_jax.approx_conv(
                x, w, mult, window_strides=(1, 1), padding="SAME", dimension_numbers=dn
            )
            return jnp.sum(y**2)

        approx = jax.jit(jax.grad(approx_loss, argnums=(0, 1)))
        fns = {"approx": lambda: approx(x, w), "native": lambda: native(x, w)}
        case = f"conv3x3 {batch}x32x32x64->64 fwd+bwd"
        measure(rows, progress, case, f"mbm{mbits}", fns, reps)


def bench_lenet5(rows, progress, mbits_list, reps):
    import optax

    from approx_jax import models

    model = models.create("lenet5")
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.random((64, 28, 28, 1), np.float32))
    y = jnp.asarray(rng.integers(0, 10, 64))
    params = model.init(jax.random.PRNGKey(0), x)
    opt = optax.adam(1e-3)
    state = opt.init(params)

    def make_step(mult):
        def loss_fn(p):
            logits = model.apply(p, x, mult)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        @jax.jit
        def step(p, s):
            loss, g = jax.value_and_grad(loss_fn)(p)
            updates, s = opt.update(g, s, p)
            return optax.apply_updates(p, updates), s, loss

        return step

    native = make_step(multipliers.exact())
    for mbits in mbits_list:
        approx = make_step(multipliers.mbm(mbits))
        fns = {"approx": lambda: approx(params, state), "native": lambda: native(params, state)}
        measure(rows, progress, "LeNet-5 train step (batch 64)", f"mbm{mbits}", fns, reps)


def main(argv=None):
    # Before any computation (see approx_jax.tune_cpu_allocator).
    approx_jax.tune_cpu_allocator()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer GEMM shapes (a smoke test of this script)"
    )
    parser.add_argument("--mbits", default="3,7,11", help="comma list of widths M (default 3,7,11)")
    parser.add_argument(
        "--reps", type=int, default=7, help="timed alternated rounds per case (default 7)"
    )
    parser.add_argument(
        "--only",
        default="gemm,conv,lenet5",
        help="comma list of gemm, conv, lenet5 (default: all three)",
    )
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    mbits_list = [int(v) for v in args.mbits.split(",")]
    only = set(args.only.split(","))
    rows = []
    designs = gemm_designs(mbits_list) if "gemm" in only else []
    shapes = gemm_cases(args.quick) if "gemm" in only else []
    conv_mbits = ([m for m in mbits_list if m <= 7] or mbits_list) if "conv" in only else []
    lenet_mbits = [7] if "lenet5" in only else []
    total = len(designs) * len(shapes) + len(conv_mbits) + len(lenet_mbits)
    with CaseProgress(total) as progress:
        if shapes:
            bench_gemm(rows, progress, designs, shapes, args.reps)
        if conv_mbits:
            bench_conv(rows, progress, conv_mbits, args.quick, args.reps)
        if lenet_mbits:
            bench_lenet5(rows, progress, lenet_mbits, args.reps)
    table = Table(title=f"approx_jax CPU benchmark ({thread_note()}, jax {jax.__version__})")
    for col in ("case", "multiplier", "approx ms", "native ms", "throughput vs native", "slowdown"):
        table.add_column(col)
    for case, mult, ta, tn in rows:
        table.add_row(
            case, mult, f"{ta * 1e3:.2f}", f"{tn * 1e3:.2f}", f"{tn / ta:.3f}x", f"{ta / tn:.2f}x"
        )
    # Redirected to a file, rich would wrap the table at 80 columns (cells split).
    Console(width=None if sys.stdout.isatty() else 160).print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                [dict(case=c, multiplier=m, approx_s=a, native_s=n) for c, m, a, n in rows],
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
