"""A sweep of multiplier designs (8 by default): one vmapped step vs separate steps.

Measures, in the same run and alternately, (a) an approximate GEMM and (b) a
LeNet-5 train step (params and optimizer state stacked along the design axis)
for the designs in one jit-compiled vmapped call, against one call of the
single-design jitted function per design. Prints the time ratio.

Usage:
  python benchmarks/bench_vmap.py [--reps 5] [--batch 64] [--models lenet5,lenet300]
      [--designs mbm11,mitchell11,...]
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from rich.console import Console
from rich.table import Table

sys.path.insert(0, os.path.dirname(__file__))
from _timing import alternating_medians, thread_note  # noqa: E402

import approx_jax  # noqa: E402
from approx_jax import models, multipliers  # noqa: E402

MODEL_LABELS = {"lenet5": "LeNet-5", "lenet300": "LeNet-300-100"}
DESIGNS = ["mbm7", "mitchell7", "truncate7", "mbm5", "mitchell5", "truncate5", "mbm3", "mitchell3"]


def main(argv=None):
    # Before any computation (see approx_jax.tune_cpu_allocator).
    approx_jax.tune_cpu_allocator()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--reps", type=int, default=5, help="timed alternated rounds per case (default 5)"
    )
    parser.add_argument("--batch", type=int, default=64, help="train-step batch (default 64)")
    parser.add_argument(
        "--models",
        default="lenet5,lenet300",
        help="comma-separated models.create names whose train steps are timed",
    )
    parser.add_argument(
        "--designs",
        default=",".join(DESIGNS),
        help="comma-separated multiplier names to stack (default: 8 designs at M = 3..7)",
    )
    args = parser.parse_args(argv)
    names = args.designs.split(",")
    singles = [multipliers.get(n) for n in names]
    stack = multipliers.stack(singles)
    # Both sides' LUTs on the device once (as approx-jax sweep does): a NumPy
    # LUT passed to a jitted function is copied at every call.
    stack = jax.device_put(stack)
    singles = [jax.device_put(m) for m in singles]
    # The loop runs each design at its own width, as separate runs would; the
    # vmapped call runs it widened to the stack's width, which computes the
    # same products and sums (same bits). (A loop over the widened designs
    # was slower than this one, 0.81 vs 0.73 ms at 64^3 and 28.7 vs 26.0 ms
    # for the LeNet-300-100 step: a baseline that flattered the vmapped call.)
    rows = []

    def add_row(case, vmapped_s, loop_s):
        # Printed as measured too: a run cut short by a time limit keeps them.
        rows.append((case, vmapped_s, loop_s))
        ms = f"vmapped {vmapped_s * 1e3:.1f} ms, {len(names)} calls {loop_s * 1e3:.1f} ms"
        print(f"{case}: {ms}", flush=True)

    rng = np.random.default_rng(0)
    one = jax.jit(lambda x, w, m: approx_jax.approx_dot(x, w, m))
    many = jax.jit(
        jax.vmap(lambda x, w, m: approx_jax.approx_dot(x, w, m), in_axes=(None, None, 0))
    )
    for size in (64, 512):
        x = jnp.asarray(rng.standard_normal((size, size), np.float32))
        w = jnp.asarray(rng.standard_normal((size, size), np.float32))
        t = alternating_medians(
            {"vmapped": lambda: many(x, w, stack), "loop": lambda: [one(x, w, m) for m in singles]},
            args.reps,
        )
        add_row(f"GEMM {size}^3", t["vmapped"], t["loop"])

    def stacked(tree):  # one copy per design along a leading axis
        return jax.tree_util.tree_map(lambda v: jnp.stack([v] * len(names)), tree)

    for name in args.models.split(","):
        model = models.create(name)
        xb = jnp.asarray(rng.random((args.batch, *model.input_shape), np.float32))
        yb = jnp.asarray(rng.integers(0, 10, args.batch))
        opt = optax.adam(1e-3)
        params = model.init(jax.random.PRNGKey(0), xb)
        state = opt.init(params)

        def step(p, s, m, model=model, xb=xb, yb=yb, opt=opt):
            def loss_fn(p):
                logits = model.apply(p, xb, m)
                return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

            loss, g = jax.value_and_grad(loss_fn)(p)
            updates, s = opt.update(g, s, p)
            return optax.apply_updates(p, updates), s, loss

        params_d, state_d = stacked(params), stacked(state)
        one_step = jax.jit(step)
        many_step = jax.jit(jax.vmap(step))
        t = alternating_medians(
            {
                "vmapped": lambda: many_step(params_d, state_d, stack),
                "loop": lambda: [one_step(params, state, m) for m in singles],
            },
            args.reps,
        )
        label = f"{MODEL_LABELS.get(name, name)} train step (batch {args.batch})"
        add_row(label, t["vmapped"], t["loop"])

    where = thread_note() if jax.default_backend() == "cpu" else jax.devices()[0].device_kind
    n = len(names)
    table = Table(title=f"{n} designs: one vmapped call vs {n} calls ({where})")
    for col in ("case", "vmapped ms", f"{n} calls ms", f"vmapped / {n} calls"):
        table.add_column(col)
    for case, tv, tl in rows:
        table.add_row(case, f"{tv * 1e3:.1f}", f"{tl * 1e3:.1f}", f"{tv / tl:.2f}")
    # Redirected to a file, rich would wrap the table at 80 columns (cells split).
    Console(width=None if sys.stdout.isatty() else 160).print(table)


if __name__ == "__main__":
    main()
