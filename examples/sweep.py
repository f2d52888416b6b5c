"""Train one model per multiplier design in a single vmapped, jit-compiled step.

  PYTHONPATH=. python examples/sweep.py [--designs mbm7,mitchell7,truncate5,mitchell3]

Parameters and optimizer state get a leading design axis; ``jax.vmap`` maps
the train step over (params, opt_state, multiplier) with the batch shared, and
the approximate matmuls fold the design axis into one custom call per layer.
All designs start from the same init and see the same batches. (``fp32`` has
no LUT and cannot be stacked; ``approx-jax sweep`` trains it separately.)
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import approx_jax
from approx_jax import characterize, models, multipliers
from approx_jax.data import batches, load_mnist

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument(
    "--designs", default="mbm7,mitchell7,truncate5,mitchell3", help="comma-separated LUT designs"
)
designs = parser.parse_args().designs.split(",")
approx_jax.tune_cpu_allocator()  # before the first large buffer (see its docstring)
stacked = multipliers.stack(designs)  # LUT [D, 4**7]: narrower designs widened exactly
D = stacked.num_designs
x_train, y_train, x_test, y_test = load_mnist()
x_train, y_train = x_train[:1024], y_train[:1024]  # keep the CPU demo short
model = models.create("lenet300")
opt = optax.adam(1e-3)
init = model.init(jax.random.PRNGKey(0), x_train[:1])
params = jax.tree.map(lambda p: jnp.broadcast_to(p, (D,) + p.shape), init)
opt_state = jax.vmap(opt.init)(params)


def step(params, opt_state, x, y, mult):
    def loss_fn(p):
        logits = model.apply(p, x, mult, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


vstep = jax.jit(jax.vmap(step, in_axes=(0, 0, None, None, 0)))
vpredict = jax.jit(jax.vmap(lambda p, x, m: model.apply(p, x, m).argmax(-1), in_axes=(0, None, 0)))
for i, (xb, yb) in enumerate(batches(x_train, y_train, 64, np.random.default_rng(0))):
    params, opt_state, loss = vstep(params, opt_state, xb, yb, stacked)
    print(f"step {i:2d} loss per design {np.round(np.asarray(loss), 4)}", flush=True)
acc = np.asarray(vpredict(params, x_test, stacked) == y_test).mean(-1)
for name, m, a in zip(designs, multipliers.unstack(stacked), acc, strict=True):
    print(f"{name:10s} M={m.mbits}  MRED={characterize(m).mred:.4f}  test acc={a:.4f}")
