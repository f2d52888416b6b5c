"""Evaluate an ordinary (unmodified) Flax model on simulated approximate hardware.

  PYTHONPATH=. python examples/approximate_pretrained.py [--epochs 2] [--out DIR]

The model below is plain Flax (``nn.Conv`` / ``nn.Dense``, nothing from
approx_jax). It is trained in float32 on the embedded MNIST digits, then
``approx_jax.approximate(model.apply, stack)`` evaluates it with every
convolution and matrix product on each multiplier of a design stack: one
jit-compiled call, vmapped over the designs (post-training evaluation, as
TFApprox / AdaPT do, without swapping any layer). Prints a table of test
accuracy vs the multiplier's MRED (over all mantissa pairs, and over the
operand pairs the model's layers multiply: ``approx_jax.operand_samples``)
and writes it as JSON and a PNG plot into ``--out`` (default
``runs/approximate_pretrained``).
"""

from __future__ import annotations

import argparse
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optax  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from tqdm import tqdm  # noqa: E402

import approx_jax  # noqa: E402
from approx_jax import multipliers  # noqa: E402
from approx_jax.data import batches, load_mnist  # noqa: E402

DESIGNS = ["truncate7", "mbm7", "mitchell7", "mbm5", "mitchell5", "truncate4", "mbm3", "mitchell3"]


class CNN(nn.Module):
    """A small Flax CNN, written without approx_jax."""

    @nn.compact
    def __call__(self, x):
        x = nn.max_pool(nn.relu(nn.Conv(16, (5, 5))(x)), (2, 2), (2, 2))
        x = nn.max_pool(nn.relu(nn.Conv(32, (5, 5))(x)), (2, 2), (2, 2))
        x = nn.relu(nn.Dense(128)(x.reshape(x.shape[0], -1)))
        return nn.Dense(10)(x)


def _label_offsets(xs, ys) -> list[int]:
    """Vertical offsets (points) of the design names: a name next to an earlier
    one (mitchell3 and mitchell5 share an accuracy and nearly their MRED) moves
    a line down instead of printing over it."""
    spans = [(max(v) - min(v)) or 1.0 for v in (xs, ys)]
    placed, offsets = [], []
    for x, y in zip(xs, ys, strict=True):
        fx, fy = (x - min(xs)) / spans[0], (y - min(ys)) / spans[1]
        dy = 3
        while any(abs(fx - px) < 0.15 and abs(fy - py) < 0.08 and d == dy for px, py, d in placed):
            dy -= 10
        placed.append((fx, fy, dy))
        offsets.append(dy)
    return offsets


def _fmt(mred: float) -> str:
    """Four decimals, or two significant digits for tiny values (fp32's rounding)."""
    return "0" if mred == 0 else (f"{mred:.4f}" if mred >= 1e-4 else f"{mred:.1e}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    # (Under runs/, which git ignores, as the CLI's output folders.)
    parser.add_argument("--out", default="runs/approximate_pretrained")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    x_train, y_train, x_test, y_test = load_mnist()
    model = CNN()
    params = model.init(jax.random.PRNGKey(0), x_train[:1])
    opt = optax.adam(1e-3)
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(p):
            return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y).mean()

        grads = jax.grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    steps = args.epochs * (len(x_train) // 64)
    with tqdm(total=steps, desc="float32 training") as bar:
        for epoch in range(args.epochs):
            for x, y in batches(x_train, y_train, 64, rng=epoch):
                params, opt_state = step(params, opt_state, x, y)
                bar.update()

    def accuracy(logits):
        return jnp.mean(jnp.argmax(logits, -1) == y_test)

    stack = multipliers.stack(DESIGNS)
    # One compiled call: every product of every layer on every design.
    approx_logits = jax.jit(
        jax.vmap(lambda m: approx_jax.approximate(model.apply, m)(params, x_test))
    )
    accs = jax.vmap(accuracy)(approx_logits(stack))
    fp32 = float(accuracy(model.apply(params, x_test)))
    metrics = approx_jax.characterize(stack)
    # The multipliers' error on the operand pairs this model's layers really
    # multiply (test digits, trained weights), averaged over the layers.
    pairs = approx_jax.operand_samples(model.apply, num=20000)(params, x_test)
    on_model = [
        sum(approx_jax.characterize(m, samples=ab).mred for ab in pairs.values()) / len(pairs)
        for m in multipliers.unstack(stack)
    ]

    # fp32's own error on those pairs: the float32 rounding of each product
    # (the reference is the exact float64 product), as `approx-jax evaluate`.
    fp32_on_model = sum(
        approx_jax.characterize(multipliers.exact(), samples=ab).mred for ab in pairs.values()
    ) / len(pairs)
    rows = [("fp32 (native)", 0.0, fp32_on_model, fp32)]
    rows += [(m.name, m.mred, r, float(a)) for m, r, a in zip(metrics, on_model, accs, strict=True)]
    table = Table(title=f"Plain Flax CNN trained in float32, tested on {len(x_test)} digits")
    for col in ("multiplier", "MRED (all pairs)", "MRED (layer operands)", "test accuracy"):
        table.add_column(col)
    for name, mred, mred_model, acc in rows:
        table.add_row(name, _fmt(mred), _fmt(mred_model), f"{100 * acc:.1f} %")
    Console().print(table)
    keys = ("multiplier", "mred", "mred_layer_operands", "accuracy")
    (out / "results.json").write_text(
        json.dumps([dict(zip(keys, r, strict=True)) for r in rows], indent=1)
    )
    fig, ax = plt.subplots(figsize=(6, 4))
    points = [(name, mred, 100 * acc) for name, mred, _, acc in rows[1:]]
    offsets = _label_offsets([p[1] for p in points], [p[2] for p in points])
    for (name, mred, acc), dy in zip(points, offsets, strict=True):
        ax.scatter(mred, acc)
        ax.annotate(name, (mred, acc), fontsize=8, xytext=(3, dy), textcoords="offset points")
    ax.axhline(100 * fp32, color="gray", ls="--", label="fp32")
    ax.set_xlabel("MRED of the multiplier (all mantissa pairs)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Post-training evaluation on simulated multipliers")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_mred.png", dpi=120)
    print(f"wrote {out / 'results.json'} and {out / 'accuracy_vs_mred.png'}")


if __name__ == "__main__":
    main()
