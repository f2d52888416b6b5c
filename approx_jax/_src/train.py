"""Training loop for approximate-multiplier models (used by the CLI, sweeps and examples).

The train step is a pure function of ``(params, opt_state, x, y, multiplier)``
so it can be vmapped over a stack of designs (see ``approx_jax._src.sweep``);
``train`` and ``measure_step_time``, which run one design, jit it with that
design closed over (``_jit_closed_over``).

Reproducibility: ``seed`` fixes both the parameter initialisation
(``jax.random.PRNGKey(seed)``) and the minibatch order
(``numpy.random.default_rng(seed)``, reshuffled every epoch), so two runs with
the same seed, data and multiplier produce the same bits.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from approx_jax._src import data as data_lib

OPTIMIZERS = ("adam", "adamw", "sgd", "momentum")


# --------------------------------------------------------------------------
# Argument checks (shared with the sweep and the CLI).


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    """Checks that ``value`` is an int (not a bool) of at least ``minimum``.

    Args:
      name: argument name, for the message.
      value: the value to check.
      minimum: smallest allowed value.

    Returns:
      ``value`` as a Python int.

    Raises:
      TypeError: if ``value`` is not an int.
      ValueError: if ``value`` is below ``minimum``.
    """
    # bool is an int subclass, but True epochs is a caller bug; floats would
    # be truncated or break range().
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return int(value)


def check_lr(lr: Any) -> Any:
    """Checks a learning rate: a finite positive number or an optax schedule.

    Args:
      lr: a number or a callable schedule (passed to optax unchanged).

    Returns:
      ``lr`` unchanged.

    Raises:
      TypeError: if ``lr`` is neither a number nor callable.
      ValueError: if ``lr`` is NaN, infinite, zero or negative (NaN would
        train to NaN parameters without any error).
    """
    if callable(lr):
        return lr
    try:
        value = float(lr)
    except (TypeError, ValueError) as err:
        raise TypeError(f"lr must be a number or an optax schedule, got {lr!r}") from err
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"lr must be a finite positive number, got {lr!r}")
    return lr


def check_train_args(*, epochs, batch_size, eval_batch_size, seed, lr) -> None:
    """The argument checks of :func:`train` (shared with the sweep).

    Raises:
      TypeError: if an int argument is not an int, or ``lr`` is neither a
        number nor a schedule.
      ValueError: if ``epochs``, ``batch_size`` or ``eval_batch_size`` is not
        positive, ``seed`` is negative, or ``lr`` is not finite and positive.
    """
    check_int("epochs", epochs)
    check_int("batch_size", batch_size)
    check_int("eval_batch_size", eval_batch_size)
    check_int("seed", seed, minimum=0)
    check_lr(lr)


def check_data(data: Any, num_classes: int | None = None, batch_size: int | None = None) -> tuple:
    """Checks a ``(x_train, y_train, x_test, y_test)`` tuple.

    Args:
      data: the tuple, as from ``load_mnist``.
      num_classes: labels must lie in ``[0, num_classes)`` (None: not checked).
      batch_size: the training set must hold at least one batch (None: not
        checked).

    Returns:
      The four arrays as a tuple.

    Raises:
      ValueError: if ``data`` is not four arrays, images and labels differ in
        count, a split is empty, a label is out of range (cross-entropy of
        an out-of-range label is NaN or silently wrong, never an error), or
        ``batch_size`` exceeds the training examples.
    """
    try:
        x_train, y_train, x_test, y_test = data
    except (TypeError, ValueError) as err:
        raise ValueError("data must be a tuple (x_train, y_train, x_test, y_test)") from err
    for x, y, split in ((x_train, y_train, "train"), (x_test, y_test, "test")):
        if len(x) != len(y):
            raise ValueError(f"{split} split has {len(x)} examples but {len(y)} labels")
        if len(x) == 0:
            raise ValueError(f"{split} split has no examples")
        bad = None if num_classes is None else data_lib.out_of_range_label(y, num_classes)
        if bad is not None:
            raise ValueError(
                f"{split} label {bad} is out of range for "
                f"{num_classes} classes (labels must be 0..{num_classes - 1})"
            )
    if batch_size is not None and len(x_train) < batch_size:
        raise ValueError(f"batch_size {batch_size} exceeds the {len(x_train)} training examples")
    return x_train, y_train, x_test, y_test


# --------------------------------------------------------------------------
# Building blocks.


def resolve_model(model: Any, num_classes: int = 10):
    """Returns a model object for a model or a name such as ``"lenet5"``."""
    if isinstance(model, str):
        from approx_jax import models

        return models.create(model, num_classes=num_classes)
    return model


def resolve_multiplier_spec(spec: Any):
    """Turns a multiplier spec into what ``Model.apply`` takes.

    Accepts a ``Multiplier``; a name (``"mbm7"``, ``"fp32"``, ``"X_7.bin"``,
    ``"model.c:fn@5"``); a per-layer string ``"conv=mitchell7,dense=mbm7"``
    (layer kinds not named use exact fp32); or a mapping of layer kind to any
    of the above.
    """
    from approx_jax._src import multipliers as mult_lib

    if isinstance(spec, Mapping):
        out = {k: mult_lib.get("fp32") for k in LAYER_KINDS}
        for k, v in spec.items():
            if k not in LAYER_KINDS:
                raise ValueError(f"unknown layer kind {k!r} in multiplier spec; use {LAYER_KINDS}")
            out[k] = resolve_multiplier_spec(v)
        return out
    if isinstance(spec, str):
        if "=" in spec:
            parts = {}
            for item in spec.split(","):
                item = item.strip()
                if not item:
                    continue
                if "=" not in item:
                    raise ValueError(
                        f"per-layer multiplier spec {spec!r}: item {item!r} is not KIND=NAME "
                        f"(KIND one of {LAYER_KINDS})"
                    )
                k, v = item.split("=", 1)
                if k.strip() in parts:
                    raise ValueError(
                        f"per-layer multiplier spec {spec!r}: layer kind {k.strip()!r} is given "
                        "twice"
                    )
                parts[k.strip()] = v.strip()
            return resolve_multiplier_spec(parts)
        return mult_lib.get(spec)
    return spec


LAYER_KINDS = ("conv", "dense", "attention")


def multiplier_label(multiplier: Any) -> str:
    """Short human-readable name of a multiplier or per-layer dict."""
    if isinstance(multiplier, Mapping):
        return ",".join(f"{k}={multiplier_label(v)}" for k, v in multiplier.items())
    return str(getattr(multiplier, "name", multiplier))


def is_exact(multiplier: Any) -> bool:
    if isinstance(multiplier, Mapping):
        return all(is_exact(v) for v in multiplier.values())
    return bool(getattr(multiplier, "is_exact", False))


def make_optimizer(name: str = "adam", lr: float = 1e-3) -> optax.GradientTransformation:
    """An optax optimizer by name: adam (default), adamw, sgd, momentum (0.9).

    Args:
      name: ``"adam"``, ``"adamw"``, ``"sgd"`` or ``"momentum"``.
      lr: learning rate: a finite positive number or an optax schedule.

    Returns:
      The optax transformation.

    Raises:
      ValueError: for an unknown name or an invalid ``lr``.
      TypeError: if ``lr`` is neither a number nor callable.
    """
    check_lr(lr)
    if name == "adam":
        return optax.adam(lr)
    if name == "adamw":
        return optax.adamw(lr)
    if name == "sgd":
        return optax.sgd(lr)
    if name == "momentum":
        return optax.sgd(lr, momentum=0.9)
    raise ValueError(f"unknown optimizer {name!r}; choose from {OPTIMIZERS}")


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy with integer labels."""
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def make_train_step(model, optimizer: optax.GradientTransformation, backward: str = "approx"):
    """Returns the un-jitted train step.

    ``step(params, opt_state, x, y, multiplier) -> (params, opt_state, loss, acc)``
    is pure and vmappable over ``(params, opt_state, multiplier)``.
    """

    def loss_fn(params, x, y, multiplier):
        logits = model.apply(params, x, multiplier, backward=backward, train=True)
        loss = cross_entropy(logits, y)
        acc = jnp.mean((jnp.argmax(logits, axis=-1) == y).astype(jnp.float32))
        return loss, acc

    def step(params, opt_state, x, y, multiplier):
        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, y, multiplier)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, loss, acc

    return step


def _jit_closed_over(step, multiplier):
    """``jax.jit`` of ``step(params, opt_state, x, y)`` with the multiplier closed over.

    A constant LUT (rather than a jit argument) lets the ops tell the GEMM
    kernel its closed-form family once (``ops.closed_form_family``) instead
    of the kernel checking its 4^M entries on every call: 0.4-0.9 ms per
    GEMM at M = 11, most of a small model's step. (The callers jit once per
    training run anyway.)
    """
    return jax.jit(lambda params, opt_state, x, y: step(params, opt_state, x, y, multiplier))


def make_predict(model):
    """Returns ``(params, x, multiplier) -> predicted class`` (un-jitted, vmappable)."""

    def predict(params, x, multiplier):
        return jnp.argmax(model.apply(params, x, multiplier, train=False), axis=-1)

    return predict


def _padded_chunks(x: np.ndarray, batch_size: int):
    """Yields ``(chunk, n_valid)`` with every chunk exactly batch_size long (zero padded)."""
    n = len(x)
    for start in range(0, n, batch_size):
        chunk = x[start : start + batch_size]
        valid = len(chunk)
        if valid < batch_size:
            pad = np.zeros((batch_size - valid,) + chunk.shape[1:], chunk.dtype)
            chunk = np.concatenate([chunk, pad])
        yield chunk, valid


def accuracy(predict_fn: Callable, params, multiplier, x, y, batch_size: int = 500) -> Any:
    """Accuracy of a jitted ``predict_fn(params, x, multiplier)`` over (x, y).

    The last chunk is zero padded so every call has the same shape (one
    compilation). Works for vmapped predictors too: predictions with a leading
    design axis give one accuracy per design (a NumPy array).

    Raises:
      ValueError: if ``x`` is empty (no accuracy to report) or ``batch_size``
        is not positive.
    """
    if len(x) == 0:
        raise ValueError("cannot compute accuracy on an empty test set")
    check_int("eval batch_size", batch_size)
    batch_size = min(batch_size, len(x))
    correct = 0
    start = 0
    for chunk, valid in _padded_chunks(x, batch_size):
        pred = np.asarray(predict_fn(params, chunk, multiplier))[..., :valid]
        correct = correct + (pred == y[start : start + valid]).sum(-1)
        start += valid
    return correct / len(x)


def init_params(model, seed: int, sample_x: np.ndarray):
    return model.init(jax.random.PRNGKey(seed), jnp.asarray(sample_x[:1]))


# --------------------------------------------------------------------------
# Training.


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=True, dynamic_ncols=True)


def train(
    model,
    multiplier,
    data,
    *,
    epochs: int = 1,
    batch_size: int = 64,
    lr: float = 1e-3,
    optimizer: str = "adam",
    seed: int = 0,
    backward: str = "approx",
    progress: bool = True,
    time_steps: bool = False,
    eval_batch_size: int = 500,
    desc: str | None = None,
    params=None,
):
    """Trains ``model`` under ``multiplier`` and evaluates it after each epoch.

    Args:
      model: a model object (``init``/``apply``) or a name such as ``"lenet5"``.
      multiplier: a ``Multiplier``, a name, a per-layer string
        ``"conv=mitchell7,dense=mbm7"`` or a dict of layer kind to multiplier.
        Used in training and in the test evaluation.
      data: ``(x_train, y_train, x_test, y_test)`` as from ``load_mnist``.
      epochs, batch_size, lr, optimizer: the usual.
      seed: fixes the initialisation and the batch order.
      backward: ``"approx"`` (ApproxTrain) or ``"exact"`` (straight-through).
      progress: show a tqdm bar per epoch with the running loss and accuracy.
      time_steps: block after every step and record its wall time.
      params: optional initial parameters (else ``model.init`` with ``seed``).

    Returns:
      ``(params, history)``; ``history`` holds per-epoch lists ``train_loss``,
      ``train_acc``, ``test_acc``, ``epoch_time`` and, with ``time_steps``,
      ``step_times`` (seconds, first step = compile + run) and
      ``mean_step_time`` (excluding the first step of the run).

    Raises:
      TypeError: if ``epochs``, ``batch_size``, ``eval_batch_size`` or
        ``seed`` is not an int.
      ValueError: if ``epochs``, ``batch_size`` or ``eval_batch_size`` is not
        positive, ``seed`` is negative, ``lr`` is not finite and positive,
        ``batch_size`` exceeds the training examples, or ``data`` is
        malformed (empty split, labels out of range).
    """
    check_train_args(
        epochs=epochs, batch_size=batch_size, eval_batch_size=eval_batch_size, seed=seed, lr=lr
    )
    model = resolve_model(model)
    multiplier = resolve_multiplier_spec(multiplier)
    per_kind = multiplier.values() if isinstance(multiplier, Mapping) else [multiplier]
    if any(getattr(m, "is_stack", False) for m in per_kind):
        raise ValueError(
            "train() trains one design; for a stack of multipliers use "
            "approx_jax._src.sweep.train_stacked (or sweep(), or `approx-jax sweep`)"
        )
    if hasattr(model, "assignment"):
        model.assignment(multiplier)  # a kind the model lacks: warn before training
    x_train, y_train, x_test, y_test = check_data(
        data, getattr(model, "num_classes", None), batch_size
    )
    opt = make_optimizer(optimizer, lr)
    if params is None:
        params = init_params(model, seed, x_train)
    opt_state = opt.init(params)
    step = _jit_closed_over(make_train_step(model, opt, backward), multiplier)
    predict = jax.jit(make_predict(model))
    rng = np.random.default_rng(seed)
    n_steps = data_lib.num_batches(len(x_train), batch_size)
    label = desc or multiplier_label(multiplier)
    history: dict[str, Any] = {
        "multiplier": multiplier_label(multiplier),
        "epoch": [],
        "train_loss": [],
        "train_acc": [],
        "test_acc": [],
        "epoch_time": [],
    }
    if time_steps:
        history["step_times"] = []
    for epoch in range(1, epochs + 1):
        t_epoch = time.perf_counter()
        losses, accs = [], []
        with _progress(n_steps, f"{label} epoch {epoch}/{epochs}", progress) as bar:
            for i, (xb, yb) in enumerate(data_lib.batches(x_train, y_train, batch_size, rng)):
                t0 = time.perf_counter()
                params, opt_state, loss, acc = step(params, opt_state, xb, yb)
                if time_steps:
                    jax.block_until_ready(loss)
                    history["step_times"].append(time.perf_counter() - t0)
                losses.append(loss)
                accs.append(acc)
                bar.update(1)
                if progress and (i % 10 == 0 or i == n_steps - 1):
                    bar.set_postfix(
                        loss=f"{float(np.mean(losses[-10:])):.4f}",
                        acc=f"{float(np.mean(accs[-10:])):.3f}",
                    )
            train_loss = float(np.mean(np.asarray(losses)))
            train_acc = float(np.mean(np.asarray(accs)))
            test_acc = float(accuracy(predict, params, multiplier, x_test, y_test, eval_batch_size))
            bar.set_postfix(
                loss=f"{train_loss:.4f}", acc=f"{train_acc:.3f}", test_acc=f"{test_acc:.3f}"
            )
        history["epoch"].append(epoch)
        history["train_loss"].append(train_loss)
        history["train_acc"].append(train_acc)
        history["test_acc"].append(test_acc)
        history["epoch_time"].append(time.perf_counter() - t_epoch)
    if time_steps and len(history["step_times"]) > 1:
        history["mean_step_time"] = float(np.mean(history["step_times"][1:]))
    history["final_test_acc"] = history["test_acc"][-1] if history["test_acc"] else None
    history["final_train_loss"] = history["train_loss"][-1] if history["train_loss"] else None
    return params, history


def measure_step_time(
    model,
    multiplier,
    x: np.ndarray,
    y: np.ndarray,
    *,
    batch_size: int = 64,
    steps: int = 10,
    warmup: int = 1,
    optimizer: str = "adam",
    lr: float = 1e-3,
    backward: str = "approx",
    seed: int = 0,
    max_seconds: float | None = 20.0,
) -> float:
    """Mean wall time (seconds) of one jit-compiled train step, compile excluded.

    Runs ``warmup`` untimed steps (the first compiles), then up to ``steps``
    timed steps on consecutive batches, each blocked on, stopping early once
    ``max_seconds`` have been spent timing (at least one step always runs).
    Comparing this for an approximate multiplier and for ``"fp32"`` gives the
    simulation overhead.

    Raises:
      TypeError: if ``batch_size`` or ``seed`` is not an int.
      ValueError: if ``x`` is empty, ``batch_size`` is not positive, ``seed``
        is negative or ``lr`` is invalid.
    """
    check_int("batch_size", batch_size)
    check_int("seed", seed, minimum=0)
    if len(x) == 0:
        raise ValueError("cannot time train steps without examples (x is empty)")
    model = resolve_model(model)
    multiplier = resolve_multiplier_spec(multiplier)
    opt = make_optimizer(optimizer, lr)
    params = init_params(model, seed, x)
    opt_state = opt.init(params)
    step = _jit_closed_over(make_train_step(model, opt, backward), multiplier)
    batch_size = min(batch_size, len(x))
    n = len(x) // batch_size
    xs = [jnp.asarray(x[i * batch_size : (i + 1) * batch_size]) for i in range(min(n, 8))]
    ys = [jnp.asarray(y[i * batch_size : (i + 1) * batch_size]) for i in range(min(n, 8))]
    for i in range(max(warmup, 1)):
        params, opt_state, loss, _ = step(params, opt_state, xs[i % len(xs)], ys[i % len(ys)])
    jax.block_until_ready((params, loss))
    t0 = time.perf_counter()
    done = 0
    for i in range(max(steps, 1)):
        params, opt_state, loss, _ = step(params, opt_state, xs[i % len(xs)], ys[i % len(ys)])
        jax.block_until_ready((params, loss))
        done += 1
        if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
            break
    return (time.perf_counter() - t0) / done
