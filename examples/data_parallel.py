"""Data-parallel training of LeNet-5 with an approximate multiplier (mbm7).

Trains a few steps twice from the same initial parameters and batches:

1. on a single device, and
2. data-parallel over ``--devices`` devices (a 1-D mesh, batch split over
   the devices, parameters replicated),

then checks that the losses and the final parameters agree within float32
tolerance (weight gradients are summed from per-device partial sums, which
changes the rounding but nothing else) and prints both.

The training step is the ordinary ``jax.jit``-compiled step: nothing in it
is specific to data parallelism. The approx_jax custom calls carry SPMD
partitioning rules, so each device runs the simulated multiplier on its own
rows only and the weight gradients become local partial products plus one
all-reduce; the script prints which collectives the compiled step contains.

On a CPU the devices are simulated with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (set here before JAX
is imported). For a multi-host run call ``jax.distributed.initialize()``
first and feed each process its own slice of every batch; the helpers in
``approx_jax.parallel`` are written for both cases.

Usage::

    python examples/data_parallel.py [--steps 5] [--devices 4] [--batch-size 64]
                                     [--random-data] [--multiplier mbm7]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time


def _parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="training steps")
    parser.add_argument("--devices", type=int, default=4, help="data-parallel devices")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch size")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--multiplier", default="mbm7", help="multiplier name")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--random-data", action="store_true", help="use random images instead of MNIST"
    )
    parser.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance")
    args = parser.parse_args(argv)
    if args.devices < 1 or args.steps < 1 or args.batch_size < 1:
        parser.error("--devices, --steps and --batch-size must be >= 1")
    if args.batch_size % args.devices:
        # Each device takes an equal slice of the global batch.
        parser.error(
            f"--batch-size {args.batch_size} must be a multiple of --devices {args.devices}"
        )
    return args


ARGS = _parse_args()
# Simulated host devices; must be set before JAX initialises its backends.
_flag = f"--xla_force_host_platform_device_count={ARGS.devices}"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from approx_jax import multipliers, parallel  # noqa: E402


def load_data(batch_size: int, steps: int, seed: int, random_data: bool):
    """Returns ``steps`` batches ``(x [B, 28, 28, 1], y [B])`` and the source name."""
    x = y = None
    source = "random"
    if not random_data:
        try:
            from approx_jax import data

            x, y, _, _ = data.load_mnist()
            source = "mnist"
        except Exception as err:  # noqa: BLE001 - fall back to random data
            print(f"MNIST unavailable ({err}); using random data")
    rng = np.random.default_rng(seed)
    if x is None:
        n = batch_size * steps
        x = rng.random((n, 28, 28, 1), dtype=np.float32)
        y = rng.integers(0, 10, n).astype(np.int32)
    order = rng.permutation(len(x))
    batches = []
    for s in range(steps):
        idx = order[(s * batch_size) % len(x) :][:batch_size]
        batches.append((x[idx], y[idx]))
    return batches, source


def make_step(model, optimizer, backward: str = "approx"):
    def loss_fn(params, x, y, multiplier):
        logits = model.apply(params, x, multiplier, backward=backward, train=False)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    def step(params, opt_state, x, y, multiplier):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y, multiplier)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step)


def train(step, params, opt_state, batches, multiplier, put_batch=None):
    losses = []
    for x, y in batches:
        if put_batch is not None:
            x, y = put_batch((x, y))
        params, opt_state, loss = step(params, opt_state, x, y, multiplier)
        losses.append(float(loss))
    return params, losses


def main() -> int:
    args = ARGS
    from approx_jax import models

    model = models.create("lenet5")
    mult = multipliers.get(args.multiplier)
    batches, source = load_data(args.batch_size, args.steps, args.seed, args.random_data)
    params0 = model.init(jax.random.PRNGKey(args.seed), jnp.asarray(batches[0][0][:1]))
    optimizer = optax.adam(args.lr)
    step = make_step(model, optimizer)
    print(
        f"LeNet-5, {args.multiplier}, {source} data, global batch {args.batch_size}, "
        f"{args.steps} steps, {len(jax.devices())} {jax.devices()[0].platform} devices"
    )

    # 1. Single device.
    t0 = time.perf_counter()
    p1, l1 = train(step, params0, optimizer.init(params0), batches, mult)
    t1 = time.perf_counter() - t0

    # 2. Data parallel: replicate params/optimizer state/LUT, shard batches.
    mesh = parallel.data_parallel_mesh(args.devices)
    params, opt_state, mult_r = parallel.replicate((params0, optimizer.init(params0), mult), mesh)
    put = lambda batch: parallel.shard_batch(batch, mesh)  # noqa: E731
    t0 = time.perf_counter()
    p2, l2 = train(step, params, opt_state, batches, mult_r, put)
    t2 = time.perf_counter() - t0

    x0, y0 = put(batches[0])
    hlo = step.lower(params, opt_state, x0, y0, mult_r).compile().as_text()
    collectives = sorted(
        set(re.findall(r"\b(all-gather|all-reduce|all-to-all|reduce-scatter)\b", hlo))
    )
    local_shapes = sorted(
        set(re.findall(r"= (f32\[[\d,]+\])[^=]*custom_call_target=\"approx_jax_gemm", hlo))
    )

    print(f"{'step':>4} {'single-device loss':>20} {'data-parallel loss':>20}")
    for i, (a, b) in enumerate(zip(l1, l2, strict=True)):
        print(f"{i:>4} {a:>20.7f} {b:>20.7f}")
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), p1, p2)
    scale = max(float(np.max(np.abs(np.asarray(a)))) for a in jax.tree.leaves(p1))
    param_diff = max(jax.tree.leaves(diffs))
    loss_diff = max(abs(a - b) for a, b in zip(l1, l2, strict=True))
    print(f"max |param diff| = {param_diff:.3e} (max |param| = {scale:.3f})")
    print(f"max |loss diff|  = {loss_diff:.3e}")
    print(f"time: single device {t1:.2f} s, data parallel {t2:.2f} s (both incl. compilation)")
    print(f"collectives in the data-parallel step: {collectives or 'none'}")
    print(f"per-device approx_jax_gemm result shapes in the step: {local_shapes}")
    ok = param_diff <= args.rtol * max(scale, 1.0) and loss_diff <= args.rtol * max(abs(l1[0]), 1.0)
    ok = ok and "all-gather" not in collectives
    print("MATCH" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
