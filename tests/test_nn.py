"""Flax hooks and layers (approx_jax.nn, approx_jax.nn.linen)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen, nnx

import approx_jax
import approx_jax.nn as ann
from approx_jax._src import multipliers as mult_lib
from approx_jax._src import ops, reference


def _x(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _shapes(tree):
    return jax.tree.map(jnp.shape, tree)


def _assert_bound(got, ref, abs_sum, K):
    ok = reference.bound_ok(np.asarray(got), ref, abs_sum, K)
    assert ok.all(), f"{(~ok).sum()} entries outside the SPEC bound"


# --------------------------------------------------------------------------
# Hooks.


@pytest.mark.parametrize(
    "lhs_shape,rhs_shape,dn",
    [
        ((5, 4), (4, 3), (((1,), (0,)), ((), ()))),  # Dense
        ((2, 3, 4), (4, 6), (((2,), (0,)), ((), ()))),  # Dense over a batch
        ((4, 5), (4, 3), (((0,), (0,)), ((), ()))),  # contract a leading axis
        ((2, 3, 5, 4), (2, 4, 6), (((3,), (1,)), ((0,), (0,)))),  # batched
        ((2, 7, 3, 4), (3, 4, 5), (((2, 3), (0, 1)), ((), ()))),  # LinearGeneral out proj
        ((3, 2, 4, 5), (5, 3, 6), (((3,), (0,)), ((0,), (1,)))),  # batch dims not leading in rhs
    ],
)
def test_dot_general_hook_matches_reference(lhs_shape, rhs_shape, dn):
    m = mult_lib.mbm(7)
    lhs = np.asarray(_x(lhs_shape, 1))
    rhs = np.asarray(_x(rhs_shape, 2))
    got = ann.dot_general(m)(lhs, rhs, dn, precision=None, out_sharding=None)
    want_shape = jax.lax.dot_general(lhs, rhs, dn).shape
    assert got.shape == want_shape
    # Reference: the same layout transformation in NumPy, products by reference.
    (lc, rc), (lb, rb) = dn
    lf = [d for d in range(lhs.ndim) if d not in lc + lb]
    rf = [d for d in range(rhs.ndim) if d not in rc + rb]
    bsz = int(np.prod([lhs.shape[d] for d in lb]))
    k = int(np.prod([lhs.shape[d] for d in lc]))
    a3 = lhs.transpose(list(lb) + lf + list(lc)).reshape(bsz, -1, k)
    b3 = rhs.transpose(list(rb) + list(rc) + rf).reshape(bsz, k, -1)
    ref, abs_sum = reference.matmul_with_bound(a3, b3, m.lut, m.mbits)
    _assert_bound(np.asarray(got).reshape(ref.shape), ref, abs_sum, k)


def test_dot_general_hook_fp32_is_lax_and_preferred_type():
    lhs, rhs = _x((3, 4), 1), _x((4, 2), 2)
    dn = (((1,), (0,)), ((), ()))
    np.testing.assert_array_equal(
        ann.dot_general("fp32")(lhs, rhs, dn), jax.lax.dot_general(lhs, rhs, dn)
    )
    out = ann.dot_general("mbm7")(
        lhs.astype(jnp.bfloat16),
        rhs.astype(jnp.bfloat16),
        dn,
        preferred_element_type=jnp.float32,
    )
    assert out.dtype == jnp.float32


def test_approx_dot_general_accepts_int_axes():
    # lax.dot_general takes a bare int for a single contracting/batch axis.
    lhs, rhs = _x((3, 4), 1), _x((4, 2), 2)
    got = ann.approx_dot_general(lhs, rhs, ((1, 0), ((), ())), "mbm7")
    want = ann.approx_dot_general(lhs, rhs, (((1,), (0,)), ((), ())), "mbm7")
    assert got.shape == jax.lax.dot_general(lhs, rhs, ((1, 0), ((), ()))).shape
    np.testing.assert_array_equal(got, want)
    a, b = _x((2, 3, 4), 3), _x((2, 4, 5), 4)
    got = ann.approx_dot_general(a, b, ((2, 1), (0, 0)), "mbm7")
    np.testing.assert_array_equal(
        got, ann.approx_dot_general(a, b, (((2,), (1,)), ((0,), (0,))), "mbm7")
    )


def test_conv_hook_none_dimension_numbers_means_lax_nchw():
    x = _x((2, 3, 6, 6), 1)  # NCHW
    w = _x((4, 3, 3, 3), 2)  # OIHW
    hook = ann.conv_general_dilated("mitchell5")
    got = hook(x, w, (1, 1), "SAME")
    want = ann.conv_general_dilated("fp32")(x, w, (1, 1), "SAME")
    assert got.shape == want.shape == (2, 4, 6, 6)
    np.testing.assert_allclose(got, want, rtol=0.2, atol=0.5)


def test_hooks_and_layers_reject_a_stack_but_attention_maps_it():
    stacked = mult_lib.stack(["mbm7", "mitchell5"])
    with pytest.raises(ValueError, match="vmap"):
        ann.dot_general(stacked)
    with pytest.raises(ValueError, match="vmap"):
        ann.Conv(2, 3, (3, 3), multiplier=stacked, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="vmap"):
        ann.linen.Dense(3, multiplier=stacked).init(jax.random.key(0), _x((2, 4)))
    q = _x((2, 5, 2, 4))
    out = ann.dot_product_attention(q, q, q, multiplier=stacked)
    assert out.shape == (2, 2, 5, 2, 4)
    np.testing.assert_array_equal(
        out[1], ann.dot_product_attention(q, q, q, multiplier="mitchell5")
    )


# --------------------------------------------------------------------------
# nnx layers.


def test_nnx_fp32_layers_equal_flax_exactly():
    x = _x((4, 10))
    ours, theirs = ann.Linear(10, 5, rngs=nnx.Rngs(0)), nnx.Linear(10, 5, rngs=nnx.Rngs(0))
    assert _shapes(nnx.state(ours)) == _shapes(nnx.state(theirs))
    np.testing.assert_array_equal(ours(x), theirs(x))
    assert ann.Dense is ann.Linear

    xi = _x((2, 9, 9, 4))
    kwargs = dict(strides=2, padding="VALID", kernel_dilation=2, feature_group_count=2)
    ours = ann.Conv(4, 6, (3, 3), rngs=nnx.Rngs(0), **kwargs)
    theirs = nnx.Conv(4, 6, (3, 3), rngs=nnx.Rngs(0), **kwargs)
    assert _shapes(nnx.state(ours)) == _shapes(nnx.state(theirs))
    np.testing.assert_array_equal(ours(xi), theirs(xi))

    xs = _x((2, 7, 16))
    ours = ann.MultiHeadAttention(4, 16, decode=False, rngs=nnx.Rngs(0))
    theirs = nnx.MultiHeadAttention(4, 16, decode=False, rngs=nnx.Rngs(0))
    assert _shapes(nnx.state(ours, nnx.Param)) == _shapes(nnx.state(theirs, nnx.Param))
    np.testing.assert_array_equal(ours(xs), theirs(xs))


def test_nnx_linear_approx_equals_approx_dot_and_loads_flax_params():
    x = _x((4, 10))
    flax_layer = nnx.Linear(10, 5, rngs=nnx.Rngs(1))
    ours = ann.Linear(10, 5, multiplier="mbm7", rngs=nnx.Rngs(0))
    nnx.update(ours, nnx.state(flax_layer, nnx.Param))  # Flax checkpoint -> approx layer
    want = ops.approx_dot(x, flax_layer.kernel[...], "mbm7") + flax_layer.bias[...]
    np.testing.assert_array_equal(ours(x), want)
    assert ours.multiplier.name == "mbm7" and ours.backward == "approx"
    # ... and back: approx layer params into a Flax layer.
    back = nnx.Linear(10, 5, rngs=nnx.Rngs(2))
    nnx.update(back, nnx.state(ours, nnx.Param))
    np.testing.assert_array_equal(back(x), flax_layer(x))


def test_nnx_einsum_and_linear_general_layers():
    # Layers named like nnx.Einsum / nnx.LinearGeneral, with Flax's parameters
    # (nnx.Einsum's einsum_op / LinearGeneral's dot_general hooks inside).
    m = mult_lib.mitchell(5)
    x = _x((4, 10))
    ours = ann.Einsum("bd,dh->bh", (10, 5), (5,), multiplier=m, rngs=nnx.Rngs(0))
    flax_layer = nnx.Einsum("bd,dh->bh", (10, 5), (5,), rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(ours.kernel[...], flax_layer.kernel[...])
    want = ops.approx_dot(x, ours.kernel[...], m) + ours.bias[...]
    np.testing.assert_array_equal(ours(x), want)
    assert isinstance(ann.einsum(m), ann.EinsumOp) and ours.multiplier == m
    fp32 = ann.Einsum("bd,dh->bh", (10, 5), (5,), rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(fp32(x), flax_layer(x))
    with pytest.raises(TypeError, match="einsum_op"):
        ann.Einsum("bd,dh->bh", (10, 5), einsum_op=jnp.einsum, rngs=nnx.Rngs(0))

    xs = _x((2, 3, 8))
    general = ann.LinearGeneral(8, (2, 4), multiplier=m, rngs=nnx.Rngs(0))
    flat = general.kernel[...].reshape(8, 8)
    want = ops.approx_dot(xs, flat, m).reshape(2, 3, 2, 4) + general.bias[...]
    np.testing.assert_array_equal(general(xs), want)
    plain = nnx.LinearGeneral(8, (2, 4), rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(ann.LinearGeneral(8, (2, 4), rngs=nnx.Rngs(0))(xs), plain(xs))


def test_nnx_layer_multiplier_can_be_switched():
    x = _x((2, 6, 8))
    m5, m7 = mult_lib.mitchell(5), mult_lib.mbm(7)
    layers = {
        "linear": lambda m: ann.Linear(8, 4, multiplier=m, rngs=nnx.Rngs(0)),
        "einsum": lambda m: ann.Einsum("bld,dh->blh", (8, 4), multiplier=m, rngs=nnx.Rngs(0)),
        "conv": lambda m: ann.Conv(8, 4, (3,), multiplier=m, rngs=nnx.Rngs(0)),
        "mha": lambda m: ann.MultiHeadAttention(2, 8, multiplier=m, decode=False, rngs=nnx.Rngs(0)),
    }
    for name, make in layers.items():
        for value in ("mbm7", m7):  # a name or a Multiplier (its LUT is array data)
            layer = make(m5)
            layer.multiplier = value
            assert layer.multiplier == m7 and layer.backward == "approx", name
            np.testing.assert_array_equal(layer(x), make(m7)(x), err_msg=name)
    # The attention layer reports the hooks its projections call.
    mha = layers["mha"](m5)
    mha.out.dot_general = ann.dot_general(m7)
    assert mha.multiplier == m7


def test_nnx_conv_approx_matches_reference_and_trains():
    m = mult_lib.mitchell(5)
    layer = ann.Conv(3, 4, (3, 3), strides=1, padding="SAME", multiplier=m, rngs=nnx.Rngs(0))
    x = _x((2, 6, 6, 3))
    got = layer(x)
    ref, abs_sum, K = reference.conv_general_dilated_with_bound(
        np.asarray(x),
        np.asarray(layer.kernel[...]),
        m.lut,
        m.mbits,
        (1, 1),
        "SAME",
        None,
        None,
        1,
        ("NHWC", "HWIO", "NHWC"),
    )
    _assert_bound(np.asarray(got - layer.bias[...]), ref, abs_sum, K)

    grads = nnx.grad(lambda mod: jnp.sum(mod(x) ** 2))(layer)
    assert grads.kernel[...].shape == (3, 3, 3, 4)
    assert np.all(np.isfinite(grads.kernel[...]))


def test_nnx_layers_under_nnx_jit():
    layer = ann.Linear(6, 3, multiplier="truncate3", backward="exact", rngs=nnx.Rngs(0))
    x = _x((2, 6))
    np.testing.assert_array_equal(nnx.jit(lambda mod, x: mod(x))(layer, x), layer(x))


# --------------------------------------------------------------------------
# Attention.


def _attention_reference(q, k, v, m):
    """Stage-wise reference: logits from reference products, float32 softmax."""
    depth = q.shape[-1]
    qs = np.asarray(q / jnp.sqrt(depth).astype(jnp.float32))
    logits, labs = reference.matmul_with_bound(
        qs.transpose(0, 2, 1, 3), np.asarray(k).transpose(0, 2, 3, 1), m.lut, m.mbits
    )
    return logits, labs


@pytest.mark.filterwarnings("ignore:Using 'Module.sow\\(\\)' outside:DeprecationWarning")
def test_dot_product_attention_matches_reference():
    m = mult_lib.mbm(5)
    q, k, v = _x((2, 5, 3, 4), 1), _x((2, 6, 3, 4), 2), _x((2, 6, 3, 4), 3)

    class Holder(nnx.Module):
        pass

    holder = Holder()
    out = ann.dot_product_attention(q, k, v, module=holder, multiplier=m)
    assert out.shape == (2, 5, 3, 4)
    weights = np.asarray(holder.attention_weights.get_value()[0])  # [b, h, q, k]
    logits, _ = _attention_reference(q, k, v, m)
    np.testing.assert_allclose(
        weights, jax.nn.softmax(logits.astype(np.float32)), rtol=1e-5, atol=1e-6
    )
    # Second product: a = attention weight, b = value.
    ref, abs_sum = reference.matmul_with_bound(
        weights, np.asarray(v).transpose(0, 2, 1, 3), m.lut, m.mbits
    )
    _assert_bound(np.asarray(out).transpose(0, 2, 1, 3), ref, abs_sum, 6)
    # It really is approximate.
    exact = ann.dot_product_attention(q, k, v)
    assert np.max(np.abs(np.asarray(out) - np.asarray(exact))) > 1e-4


def test_dot_product_attention_mask_gqa_and_fp32_identity():
    q, k, v = _x((2, 4, 4, 8), 1), _x((2, 4, 2, 8), 2), _x((2, 4, 2, 8), 3)
    np.testing.assert_array_equal(
        ann.dot_product_attention(q, k, v), nnx.dot_product_attention(q, k, v)
    )
    got = ann.dot_product_attention(q, k, v, is_causal=True, multiplier="mbm7")
    want = nnx.dot_product_attention(q, k, v, is_causal=True)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0.1, atol=0.1)
    # The first query position attends only to the first key (weight exactly 1,
    # all others exactly 0): output = P(1, value[0]) under the multiplier.
    m = mult_lib.mbm(7)
    want0 = reference.product(
        np.float32(1.0), np.repeat(np.asarray(v)[:, 0], 2, axis=-2), m.lut, m.mbits
    )
    np.testing.assert_array_equal(np.asarray(got[:, 0]), want0)


@pytest.mark.parametrize("with_module", [False, True])
def test_dot_product_attention_applies_a_callers_promote_dtype(with_module):
    # As nnx.dot_product_attention: promote_dtype runs first and the
    # computation is in its dtype (it was only forwarded with fp32).
    q, k, v = _x((2, 4, 2, 8), 1), _x((2, 4, 2, 8), 2), _x((2, 4, 2, 8), 3)
    calls = []

    def to_bf16(arrays, dtype=None):
        calls.append(dtype)
        return tuple(jnp.asarray(a, jnp.bfloat16) for a in arrays)

    module = nnx.Linear(1, 1, rngs=nnx.Rngs(0)) if with_module else None
    kwargs = {"module": module, "multiplier": "mbm7"}
    got = ann.dot_product_attention(q, k, v, promote_dtype=to_bf16, **kwargs)
    assert calls == [None]
    assert got.dtype == jnp.bfloat16
    bf = [t.astype(jnp.bfloat16) for t in (q, k, v)]
    np.testing.assert_array_equal(got, ann.dot_product_attention(*bf, **kwargs))
    # The same on Flax's side (fp32 forwards the hook).
    flax_out = nnx.dot_product_attention(q, k, v, promote_dtype=to_bf16)
    assert flax_out.dtype == ann.dot_product_attention(q, k, v, promote_dtype=to_bf16).dtype


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_nnx_attention_follows_flaxs_two_orders(dtype):
    # Without dropout and a module to sow into, nnx.dot_product_attention is
    # jax.nn.dot_product_attention: float32 logits of the unscaled query, then
    # the scale. With depth 8 the scale 1/sqrt(8) is not a power of two, so
    # scaling first (Flax's other path, and linen's) gives other products.
    m = mult_lib.mbm(7)
    q, k, v = (_x((2, 5, 2, 8), s).astype(dtype) for s in (1, 2, 3))
    mask = jax.random.bernoulli(jax.random.key(9), 0.7, (2, 2, 5, 5))
    for kw in ({}, {"mask": mask, "is_causal": True}):
        want = approx_jax.approximate(
            lambda q, k, v, kw=kw: nnx.dot_product_attention(q, k, v, **kw), m
        )
        got = ann.dot_product_attention(q, k, v, multiplier=m, **kw)
        np.testing.assert_array_equal(got, want(q, k, v))
        assert got.dtype == dtype
    # Flax's other path (dropout configured, here switched off).
    kw = {"dropout_rate": 0.5, "deterministic": True}
    want = approx_jax.approximate(lambda q, k, v: nnx.dot_product_attention(q, k, v, **kw), m)
    np.testing.assert_array_equal(
        ann.dot_product_attention(q, k, v, multiplier=m, **kw), want(q, k, v)
    )
    if dtype == jnp.float32:
        # The logits against the reference: products of the unscaled query, then the scale.
        logits, _ = reference.matmul_with_bound(
            np.asarray(q).transpose(0, 2, 1, 3), np.asarray(k).transpose(0, 2, 3, 1), m.lut, m.mbits
        )
        scaled = (logits * np.float32(1 / np.sqrt(8))).astype(np.float32)
        want_out, abs_sum = reference.matmul_with_bound(
            np.asarray(jax.nn.softmax(jnp.asarray(scaled))),
            np.asarray(v).transpose(0, 2, 1, 3),
            m.lut,
            m.mbits,
        )
        got = np.asarray(ann.dot_product_attention(q, k, v, multiplier=m)).transpose(0, 2, 1, 3)
        np.testing.assert_allclose(got, want_out, rtol=1e-4, atol=1e-5)
    # The layer: bit-equal to the Flax layer under approximate(), value and input gradient.
    flax_mha = nnx.MultiHeadAttention(2, 16, decode=False, dtype=dtype, rngs=nnx.Rngs(0))
    mha = ann.MultiHeadAttention(2, 16, decode=False, dtype=dtype, multiplier=m, rngs=nnx.Rngs(0))
    graph, state = nnx.split(flax_mha)
    x = _x((2, 5, 16))
    simulated = approx_jax.approximate(lambda s, x: nnx.merge(graph, s)(x), m)
    np.testing.assert_array_equal(mha(x), simulated(state, x))
    np.testing.assert_array_equal(
        jax.grad(lambda x: jnp.sum(mha(x).astype(jnp.float32)))(x),
        jax.grad(lambda x: jnp.sum(simulated(state, x).astype(jnp.float32)))(x),
    )


def test_mha_approx_gradients_and_backward_modes():
    xs = _x((2, 5, 8))
    outs = {}
    for backward in ("approx", "exact"):
        mha = ann.MultiHeadAttention(
            2, 8, multiplier="mbm7", backward=backward, decode=False, rngs=nnx.Rngs(0)
        )
        grads = nnx.grad(lambda mod: jnp.sum(mod(xs) ** 2))(mha)
        outs[backward] = grads.query.kernel[...]
        assert np.all(np.isfinite(outs[backward]))
    assert not np.array_equal(outs["approx"], outs["exact"])


# --------------------------------------------------------------------------
# linen layers.


@pytest.mark.parametrize("mult", ["fp32", "mbm7"])
def test_linen_layers_params_and_fp32_identity(mult):
    key = jax.random.key(0)
    x, xi, xs = _x((4, 10)), _x((2, 9, 9, 4)), _x((2, 7, 16))
    cases = [
        (ann.linen.Dense(5, multiplier=mult), linen.Dense(5), x),
        (
            ann.linen.Conv(6, (3, 3), strides=2, multiplier=mult),
            linen.Conv(6, (3, 3), strides=2),
            xi,
        ),
        (
            ann.linen.MultiHeadDotProductAttention(4, multiplier=mult),
            linen.MultiHeadDotProductAttention(4),
            xs,
        ),
    ]
    for ours, theirs, inp in cases:
        p_ours, p_theirs = ours.init(key, inp), theirs.init(key, inp)
        assert _shapes(p_ours) == _shapes(p_theirs)
        y_ours, y_theirs = ours.apply(p_theirs, inp), theirs.apply(p_theirs, inp)
        if mult == "fp32":
            np.testing.assert_array_equal(y_ours, y_theirs)
            jax.tree.map(np.testing.assert_array_equal, p_ours, p_theirs)
        else:
            assert y_ours.shape == y_theirs.shape
            assert np.max(np.abs(np.asarray(y_ours) - np.asarray(y_theirs))) > 1e-4


def test_linen_dense_inside_compact_module_keeps_flax_names():
    class Net(linen.Module):
        approx: bool

        @linen.compact
        def __call__(self, x):
            dense = ann.linen.Dense if self.approx else linen.Dense
            return dense(3)(linen.relu(dense(8)(x)))

    x = _x((2, 4))
    p_flax = Net(False).init(jax.random.key(0), x)
    p_ours = Net(True).init(jax.random.key(0), x)
    assert _shapes(p_flax) == _shapes(p_ours)
    assert set(p_ours["params"]) == {"Dense_0", "Dense_1"}
    np.testing.assert_array_equal(Net(True).apply(p_flax, x), Net(False).apply(p_flax, x))


def test_linen_attention_matches_nnx_function():
    m = mult_lib.mitchell(5)
    q, k, v = _x((2, 5, 3, 4), 1), _x((2, 6, 3, 4), 2), _x((2, 6, 3, 4), 3)
    np.testing.assert_array_equal(
        ann.linen.dot_product_attention(q, k, v, multiplier=m),
        ann.dot_product_attention(q, k, v, multiplier=m),
    )
    np.testing.assert_array_equal(
        ann.linen.dot_product_attention(q, k, v), linen.dot_product_attention(q, k, v)
    )


def test_linen_layer_copies_compute_with_their_own_multiplier():
    # clone / dataclasses.replace carry the installed hooks over; a copy with
    # another multiplier or backward mode must compute with it (it computed
    # with the original's while reporting the new one).
    key = jax.random.key(0)
    x = _x((2, 5, 6))
    cases = [
        (lambda **kw: ann.linen.Dense(4, **kw), linen.Dense(4)),
        (lambda **kw: ann.linen.Conv(4, (3,), **kw), linen.Conv(4, (3,))),
        (
            lambda **kw: ann.linen.MultiHeadDotProductAttention(2, **kw),
            linen.MultiHeadDotProductAttention(2),
        ),
    ]
    for make, plain in cases:
        p = plain.init(key, x)
        native = plain.apply(p, x)
        mbm5 = make(multiplier="mbm5").apply(p, x)
        np.testing.assert_array_equal(
            make(multiplier="mbm5").clone(multiplier="fp32").apply(p, x), native
        )
        np.testing.assert_array_equal(make().clone(multiplier="mbm5").apply(p, x), mbm5)
        grads = {
            mode: jax.grad(lambda p, layer=layer: jnp.sum(layer.apply(p, x) ** 2))(p)
            for mode, layer in (
                ("approx", make(multiplier="mbm5")),
                ("exact", make(multiplier="mbm5").clone(backward="exact")),
                ("exact_direct", make(multiplier="mbm5", backward="exact")),
            )
        }
        jax.tree.map(np.testing.assert_array_equal, grads["exact"], grads["exact_direct"])
        assert not all(
            np.array_equal(a, b)
            for a, b in zip(
                jax.tree.leaves(grads["exact"]), jax.tree.leaves(grads["approx"]), strict=True
            )
        )


def test_linen_layer_rejects_a_hook_and_an_approximate_multiplier():
    with pytest.raises(ValueError, match="either multiplier= or dot_general="):
        ann.linen.Dense(4, multiplier="mbm5", dot_general=jax.lax.dot_general)
    with pytest.raises(ValueError, match="conv_general_dilated="):
        ann.linen.Conv(
            4, (3,), multiplier="mbm5", conv_general_dilated=jax.lax.conv_general_dilated
        )
    # Flax's attention einsum hooks would be silently replaced by the
    # simulated products (the layer's and the function's).
    einsum_cls = lambda: jnp.einsum  # noqa: E731
    with pytest.raises(ValueError, match="qk_attn_weights_einsum_cls="):
        ann.linen.MultiHeadDotProductAttention(
            2,
            multiplier="mbm5",
            qk_attn_weights_einsum_cls=einsum_cls,
            attn_weights_value_einsum_cls=einsum_cls,
        )
    q = _x((1, 4, 2, 3))
    with pytest.raises(ValueError, match="exact multiplier only"):
        ann.linen.dot_product_attention(
            q,
            q,
            q,
            multiplier="mbm5",
            qk_attn_weights_einsum=jnp.einsum,
            attn_weights_value_einsum=jnp.einsum,
        )
    mha = ann.linen.MultiHeadDotProductAttention(
        2, qk_attn_weights_einsum_cls=einsum_cls, attn_weights_value_einsum_cls=einsum_cls
    )
    xq = _x((1, 4, 6))
    p = mha.init(jax.random.key(0), xq)
    np.testing.assert_array_equal(
        mha.apply(p, xq), linen.MultiHeadDotProductAttention(2).apply(p, xq)
    )
    # With the default (exact) multiplier, the user's hook is the layer's.
    x = _x((2, 6))
    layer = ann.linen.Dense(4, dot_general=ann.dot_general("mitchell5"))
    p = linen.Dense(4).init(jax.random.key(0), x)
    np.testing.assert_array_equal(
        layer.apply(p, x), ann.linen.Dense(4, multiplier="mitchell5").apply(p, x)
    )


def test_linen_attention_force_fp32_softmax_returns_float32():
    q = _x((1, 4, 2, 3))
    kw = dict(dtype=jnp.bfloat16, force_fp32_for_softmax=True)
    assert linen.dot_product_attention(q, q, q, **kw).dtype == jnp.float32
    assert ann.linen.dot_product_attention(q, q, q, multiplier="mbm5", **kw).dtype == jnp.float32


def test_identical_fresh_layers_share_one_nnx_jit_trace():
    """Layers hold their multiplier in a static hook: hooks compare by value,
    so a freshly built layer with the same design reuses the trace (another
    design retraces)."""
    traces = []

    @nnx.jit
    def forward(layer, x):
        traces.append(1)
        return layer(x)

    x = jnp.ones((4, 16))
    outs = [forward(ann.Linear(16, 8, multiplier="mbm7", rngs=nnx.Rngs(0)), x) for _ in range(3)]
    assert len(traces) == 1
    np.testing.assert_array_equal(outs[0], outs[2])
    other = forward(ann.Linear(16, 8, multiplier="mitchell7", rngs=nnx.Rngs(0)), x)
    assert len(traces) == 2 and not np.array_equal(other, outs[0])
    for make in (
        lambda: ann.Conv(1, 4, (3, 3), multiplier="mbm7", rngs=nnx.Rngs(0)),
        lambda: ann.MultiHeadAttention(2, 8, multiplier="mbm7", decode=False, rngs=nnx.Rngs(0)),
    ):
        traces.clear()
        xs = jnp.ones((1, 6, 6, 1)) if isinstance(make(), ann.Conv) else jnp.ones((1, 3, 8))
        forward(make(), xs)
        forward(make(), xs)
        assert len(traces) == 1
    assert ann.dot_general("mbm7") == ann.dot_general("mbm7")
    assert ann.dot_general("mbm7") != ann.dot_general("mbm7", backward="exact")
    assert ann.dot_general("mbm7") != ann.conv_general_dilated("mbm7")


def test_linen_multi_head_attention_other_name():
    # As flax.linen.MultiHeadAttention: the same layer, named after that class
    # in a compact module, so its Flax checkpoint's tree loads as it is.
    class Net(linen.Module):
        mha: type

        @linen.compact
        def __call__(self, x):
            return self.mha(num_heads=2)(x)

    x = _x((2, 5, 8))
    flax_params = Net(linen.MultiHeadAttention).init(jax.random.key(0), x)
    ours = Net(ann.linen.MultiHeadAttention)
    assert _shapes(ours.init(jax.random.key(0), x)) == _shapes(flax_params)
    assert "MultiHeadAttention_0" in flax_params["params"]
    np.testing.assert_array_equal(
        ours.apply(flax_params, x), Net(linen.MultiHeadAttention).apply(flax_params, x)
    )
    # Code that dispatches on Flax's classes (isinstance) finds it under both names.
    layer = ann.linen.MultiHeadAttention(num_heads=2, multiplier="mbm7")
    assert isinstance(layer, linen.MultiHeadAttention)
    assert isinstance(layer, linen.MultiHeadDotProductAttention)
    assert isinstance(layer, ann.linen.MultiHeadDotProductAttention)
