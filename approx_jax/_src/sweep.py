"""Design sweeps: train one model per approximate multiplier in a single vmapped step.

All LUT designs are stacked with ``multipliers.stack`` (narrower designs are
widened exactly to the common M) and the train step is
``jit(vmap(step, in_axes=(0, 0, None, None, 0)))`` over
``(params, opt_state, x, y, multiplier)``: parameters and optimizer state
carry a leading design axis, the minibatch is shared, and the approximate
matmuls fold the design axis into one custom call per layer.

Every design starts from the *same* initial parameters (``model.init`` with
``seed``) and sees the *same* batches in the same order (``numpy`` generator
seeded with ``seed``), as ``train.train(model, design, seed=seed)`` would;
differences between designs are due to the multiplier only. (Not bit for bit
the same run as ``train.train``: the simulated products, and the gradients
made of them, are bit-identical vmapped or not, but XLA compiles native
float32 reductions (a bias gradient's sum over the batch, the loss) and the
vmapped optimizer update differently, about 1e-8 apart per step, which
training amplifies. A design's run does not depend on which other designs
share the stack.)

The exact ``fp32`` multiplier is not a LUT, so it cannot join the stack; it is
trained separately with the native op (same init, same batches).
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from approx_jax._src import data as data_lib
from approx_jax._src import multipliers as mult_lib
from approx_jax._src import train as train_lib


def stack_params(params, num_designs: int):
    """Copies a parameter pytree ``num_designs`` times along a new leading axis."""
    return jax.tree_util.tree_map(
        lambda p: jnp.broadcast_to(p, (num_designs,) + jnp.shape(p)).copy(), params
    )


def _as_stack(stacked) -> mult_lib.Multiplier:
    """The design stack ``train_stacked`` trains: a stack, or a list of designs."""
    if isinstance(stacked, list | tuple):
        return mult_lib.stack([mult_lib.get(m) for m in stacked])
    if isinstance(stacked, mult_lib.Multiplier) and stacked.is_stack:
        return stacked
    raise TypeError(
        "train_stacked trains a stack of designs (multipliers.stack([...]) or a list of "
        f"designs); got {stacked!r}: for one design use train()"
    )


def _is_stacked_params(params, model, x_train, num_designs: int) -> bool:
    """Whether ``params`` already carry the design axis (a stacked run's result)."""
    single = jax.eval_shape(lambda: train_lib.init_params(model, 0, x_train[:1]))
    try:
        stacked = jax.tree.map(
            lambda p, s: tuple(jnp.shape(p)) == (num_designs, *s.shape), params, single
        )
    except ValueError:  # another structure: left to the model to report
        return False
    leaves = jax.tree.leaves(stacked)
    return bool(leaves) and all(leaves)


def make_vmapped_step(model, optimizer, backward: str = "approx"):
    """``jit(vmap(step))`` over (params, opt_state, multiplier); the batch is shared.

    The step donates ``params`` and ``opt_state`` (their buffers are reused
    for the results, halving the stacked state's memory): use only the
    returned ones after a call.
    """
    step = train_lib.make_train_step(model, optimizer, backward)
    return jax.jit(jax.vmap(step, in_axes=(0, 0, None, None, 0)), donate_argnums=(0, 1))


def make_vmapped_predict(model):
    predict = train_lib.make_predict(model)
    return jax.jit(jax.vmap(predict, in_axes=(0, None, 0)))


def mred_of(multiplier) -> float | None:
    """MRED of a design from ``characterize`` (None if characterisation is unavailable)."""
    try:
        from approx_jax._src import characterize as char_lib
    except ImportError:
        return None
    result = char_lib.characterize(multiplier)
    return float(result["mred"] if isinstance(result, dict) else result.mred)


def train_stacked(
    model,
    stacked,
    data,
    *,
    epochs: int = 1,
    batch_size: int = 64,
    lr: float = 1e-3,
    optimizer: str = "adam",
    seed: int = 0,
    backward: str = "approx",
    progress: bool = True,
    eval_batch_size: int = 500,
    params=None,
):
    """Trains one copy of ``model`` per design of a stacked multiplier, all at once.

    One jit-compiled step, vmapped over the designs (parameters and optimizer
    state carry a leading design axis; the data batch is shared).

    Args:
      model: a ``Model`` or its name.
      stacked: ``multipliers.stack([...])``, or a list of designs (names or
        Multipliers, stacked here).
      data: ``(x_train, y_train, x_test, y_test)``.
      epochs, batch_size, lr, optimizer, seed, backward, progress,
        eval_batch_size: as for ``train.train``.
      params: initial parameters: one model's (copied per design), or a
        stacked run's result (to continue it).

    Returns:
      ``(stacked_params, history)``; history lists are per epoch, each entry a
      list with one value per design.

    Raises:
      TypeError, ValueError: for invalid ``epochs``, ``batch_size``, ``lr``,
        ``seed`` or ``data``, as for ``train.train``; TypeError for a single
        design (use ``train.train``).
    """
    train_lib.check_train_args(
        epochs=epochs, batch_size=batch_size, eval_batch_size=eval_batch_size, seed=seed, lr=lr
    )
    model = train_lib.resolve_model(model)
    x_train, y_train, x_test, y_test = train_lib.check_data(
        data, getattr(model, "num_classes", None), batch_size
    )
    stacked = _as_stack(stacked)
    D = stacked.num_designs
    opt = train_lib.make_optimizer(optimizer, lr)
    if params is None:
        params = train_lib.init_params(model, seed, x_train)
    if not _is_stacked_params(params, model, x_train, D):
        params = stack_params(params, D)
    opt_state = jax.vmap(opt.init)(params)
    vstep = make_vmapped_step(model, opt, backward)
    vpredict = make_vmapped_predict(model)
    # The designs' LUTs on the device once: a NumPy stack is copied to the
    # device at every call (16 MiB per design at M = 11, 7 ms a step for four).
    on_device = jax.device_put(stacked)
    rng = np.random.default_rng(seed)
    n_steps = data_lib.num_batches(len(x_train), batch_size)
    history: dict[str, Any] = {
        "designs": list(stacked.names),
        "epoch": [],
        "train_loss": [],
        "train_acc": [],
        "test_acc": [],
        "epoch_time": [],
    }
    for epoch in range(1, epochs + 1):
        t_epoch = time.perf_counter()
        losses, accs = [], []
        desc = f"sweep x{D} epoch {epoch}/{epochs}"
        with train_lib._progress(n_steps, desc, progress) as bar:
            for i, (xb, yb) in enumerate(data_lib.batches(x_train, y_train, batch_size, rng)):
                params, opt_state, loss, acc = vstep(params, opt_state, xb, yb, on_device)
                losses.append(loss)
                accs.append(acc)
                bar.update(1)
                if progress and (i % 10 == 0 or i == n_steps - 1):
                    recent = np.mean(np.stack(losses[-10:]), axis=0)
                    bar.set_postfix(loss="[" + " ".join(f"{v:.3f}" for v in recent) + "]")
            train_loss = np.mean(np.stack(losses), axis=0)
            train_acc = np.mean(np.stack(accs), axis=0)
            test_acc = np.asarray(
                train_lib.accuracy(vpredict, params, on_device, x_test, y_test, eval_batch_size)
            )
            bar.set_postfix(test_acc="[" + " ".join(f"{v:.3f}" for v in test_acc) + "]")
        history["epoch"].append(epoch)
        history["train_loss"].append([float(v) for v in train_loss])
        history["train_acc"].append([float(v) for v in train_acc])
        history["test_acc"].append([float(v) for v in test_acc])
        history["epoch_time"].append(time.perf_counter() - t_epoch)
    return params, history


def _trained_alone(name: str, mbits: int, mred, params, hist) -> dict:
    """A ``sweep`` result of a design trained on its own (``train.train``'s output)."""
    return {
        "name": name,
        "mbits": mbits,
        "mred": mred,
        "test_acc": hist["final_test_acc"],
        "final_train_loss": hist["final_train_loss"],
        "history": {k: hist[k] for k in ("epoch", "train_loss", "train_acc", "test_acc")},
        "vmapped": False,
        "params": params,
    }


def sweep(
    model,
    designs,
    data,
    *,
    epochs: int = 1,
    batch_size: int = 64,
    lr: float = 1e-3,
    optimizer: str = "adam",
    seed: int = 0,
    backward: str = "approx",
    progress: bool = True,
    eval_batch_size: int = 500,
    characterize: bool = True,
    params=None,
    vmapped: bool = True,
) -> dict:
    """Trains ``model`` under every design and reports accuracy against MRED.

    Args:
      model: a model object or name.
      designs: multiplier names or Multipliers (a stack counts as its
        designs); LUT designs are trained together in one vmapped step,
        ``fp32`` separately with the native op.
      data: ``(x_train, y_train, x_test, y_test)``.
      characterize: compute each design's MRED (SPEC section 6).
      params: initial parameters of every design (e.g. a pretrained fp32
        model's, for approximation-aware fine-tuning), else ``model.init``
        with ``seed``.
      vmapped: train the LUT designs together in one vmapped step (default);
        False trains them one after another, each with its multiplier closed
        over, which may be faster on a CPU for long runs of an M >= 8 stack
        that widens a design without a closed form (widened, it gathers
        every product from a LUT 4x larger per bit; a built-in runs its
        closed form at its own width either way).

    Returns:
      A dict with ``results`` (one entry per design in the given order:
      ``name``, ``mbits``, ``mred``, ``test_acc``, ``final_train_loss``,
      ``history`` (per-epoch lists for that design), ``vmapped``), the stacked
      ``history``, timing, and ``params``: each design's trained params (one
      pytree per entry of ``results``, in its order).

    Raises:
      TypeError: if ``designs`` is a single name or Multiplier rather than a
        sequence of them, or an int argument is not an int.
      ValueError: if ``designs`` is empty, or for invalid ``epochs``,
        ``batch_size``, ``lr``, ``seed`` or ``data`` (as for ``train.train``).
    """
    from approx_jax._src import multipliers as mult_lib

    mult_lib.check_design_sequence(
        designs, "designs must be a sequence of multiplier names or Multipliers"
    )
    designs = list(designs)
    if not designs:
        raise ValueError("designs is empty: nothing to sweep")
    # Checked before the (possibly long) characterisation and initialisation.
    train_lib.check_train_args(
        epochs=epochs, batch_size=batch_size, eval_batch_size=eval_batch_size, seed=seed, lr=lr
    )
    model = train_lib.resolve_model(model)
    train_lib.check_data(data, getattr(model, "num_classes", None), batch_size)

    # A stack among the designs stands for its members (one result each).
    resolved = mult_lib.designs_of(designs)
    order = []  # (kind, index) to restore the given order
    exact, luts = [], []
    for m in resolved:
        if m.is_exact:
            order.append(("exact", len(exact)))
            exact.append(m)
        else:
            order.append(("lut", len(luts)))
            luts.append(m)
    common = dict(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        optimizer=optimizer,
        seed=seed,
        backward=backward,
        progress=progress,
        eval_batch_size=eval_batch_size,
    )
    init = train_lib.init_params(model, seed, data[0]) if params is None else params
    out: dict[str, Any] = {"results": [], "stack_mbits": None, "timing": {}}
    lut_entries = []
    if luts and not vmapped:
        t0 = time.perf_counter()
        for m in luts:
            trained = train_lib.train(model, m, data, params=init, desc=str(m.name), **common)
            mred = mred_of(m) if characterize else None
            lut_entries.append(_trained_alone(str(m.name), int(m.mbits), mred, *trained))
        out["timing"]["sequential_seconds"] = time.perf_counter() - t0
    elif luts:
        stacked = mult_lib.stack(luts)
        out["stack_mbits"] = stacked.mbits
        t0 = time.perf_counter()
        stacked_params, hist = train_stacked(model, stacked, data, params=init, **common)
        out["timing"]["stacked_seconds"] = time.perf_counter() - t0
        out["history"] = hist
        for d, m in enumerate(luts):
            per = {k: [v[d] for v in hist[k]] for k in ("train_loss", "train_acc", "test_acc")}
            per["epoch"] = list(hist["epoch"])
            lut_entries.append(
                {
                    "name": str(m.name),
                    "mbits": int(m.mbits),
                    "mred": mred_of(m) if characterize else None,
                    "test_acc": per["test_acc"][-1] if per["test_acc"] else None,
                    "final_train_loss": per["train_loss"][-1] if per["train_loss"] else None,
                    "history": per,
                    "vmapped": True,
                    "params": jax.tree.map(lambda v, d=d: v[d], stacked_params),
                }
            )
    exact_entries = []
    for m in exact:
        t0 = time.perf_counter()
        trained = train_lib.train(model, m, data, params=init, desc="fp32 (native)", **common)
        out["timing"]["fp32_seconds"] = time.perf_counter() - t0
        exact_entries.append(_trained_alone("fp32", 23, 0.0, *trained))
    for kind, i in order:
        out["results"].append(exact_entries[i] if kind == "exact" else lut_entries[i])
    # The trained params, one pytree per result (same order), kept apart from
    # the JSON-able results.
    out["params"] = [r.pop("params") for r in out["results"]]
    return out
