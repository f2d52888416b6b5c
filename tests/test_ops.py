"""approx_dot / approx_matmul / multiply vs the NumPy reference of SPEC."""

from __future__ import annotations

import functools
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from approx_test_utils import random_multiplier, underflow_edge_values

import approx_jax
from approx_jax import multipliers
from approx_jax._src import ffi, ops, reference
from approx_jax._src import lut as lut_lib

MULTIPLIERS = {
    "mbm7": lambda: multipliers.mbm(7),
    "mitchell5": lambda: multipliers.mitchell(5),
    "truncate3": lambda: multipliers.truncate(3),
    "mbm11": lambda: multipliers.mbm(11),
    "random8": lambda: random_multiplier(8, seed=3),
    "random1": lambda: random_multiplier(1, seed=4),
}

DOT_SHAPES = [
    ((1, 1), (1, 1)),
    ((5, 1), (1, 7)),
    ((3, 17), (17, 33)),
    ((2, 4, 65), (65, 9)),
    ((0, 8), (8, 5)),
    ((4, 8), (8, 0)),
    ((4, 0), (0, 6)),
    ((9,), (9, 4)),
]


def _values(rng, shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _special_values() -> np.ndarray:
    tiny = np.float32(np.finfo(np.float32).tiny)
    return np.array(
        [
            0.0,
            -0.0,
            1.0,
            -1.5,
            tiny,
            -tiny,
            tiny / 8,
            -tiny / 4,
            np.inf,
            -np.inf,
            np.nan,
            3e38,
            -2e38,
            1e-20,
            -3e-25,
            1e20,
            7.0,
            -0.1,
        ],
        dtype=np.float32,
    )


def _assert_bits_equal(got, want):
    got = np.asarray(got, np.float32)
    want = np.asarray(want, np.float32)
    assert got.shape == want.shape
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def _assert_bits_equal_nan_aside(got, want, what):
    # Same bits everywhere, NaN positions equal (NaN payloads and signs of
    # sums are not meaningful).
    got = np.asarray(got, np.float32)
    want = np.asarray(want, np.float32)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    ok = np.isnan(want) | (got.view(np.uint32) == want.view(np.uint32))
    assert ok.all(), f"{what}: {(~ok).sum()} elements differ"


def _assert_within_bound(got, ref, abs_sum, K):
    ok = reference.bound_ok(np.asarray(got), ref, abs_sum, K)
    assert ok.all(), f"{(~ok).sum()} entries outside the SPEC bound"


@pytest.fixture(params=sorted(MULTIPLIERS), scope="module")
def mult(request):
    return MULTIPLIERS[request.param]()


# --------------------------------------------------------------------------
# Elementwise products: bit-exact.


def test_multiply_random_pairs_bit_exact(mult):
    rng = np.random.default_rng(0)
    a = _values(rng, (100_000,), 10.0)
    b = _values(rng, (100_000,), 0.1)
    got = approx_jax.multiply(a, b, mult)
    _assert_bits_equal(got, reference.product(a, b, mult.lut, mult.mbits))


def test_multiply_every_mantissa_pair_bit_exact(mult):
    M = mult.mbits
    grid = (1.0 + np.arange(1 << M, dtype=np.float64) / (1 << M)).astype(np.float32)
    # Random low (ignored) mantissa bits and exponents exercise truncation.
    rng = np.random.default_rng(1)
    low = rng.integers(0, 1 << (23 - M), size=grid.shape, dtype=np.uint32)
    a = (grid.view(np.uint32) | low).view(np.float32)[:, None] * np.float32(4.0)
    b = -grid[None, :] * np.float32(0.25)
    got = approx_jax.multiply(a, b, mult)
    _assert_bits_equal(
        got,
        reference.product(
            np.broadcast_to(a, got.shape), np.broadcast_to(b, got.shape), mult.lut, M
        ),
    )


def test_multiply_special_values_bit_exact(mult):
    s = _special_values()
    a, b = np.meshgrid(s, s, indexing="ij")
    got = approx_jax.multiply(a, b, mult)
    want = reference.product(a, b, mult.lut, mult.mbits)
    _assert_bits_equal(got, want)
    # Spot checks of SPEC section 2 itself.
    got = np.asarray(got)
    assert np.isnan(got[s == np.inf][:, s == 0.0]).all()  # Inf * 0
    assert np.isnan(got[s == np.inf][:, (np.abs(s) < np.finfo(np.float32).tiny) & (s != 0)]).all()
    assert (got[s == 1e-20][:, s == -3e-25] == 0).all()  # underflow flushed
    assert np.signbit(got[s == 1e-20][:, s == -3e-25]).all()
    assert np.isposinf(got[s == 3e38][:, s == 1e20]).all()  # overflow


def test_multiply_broadcasting_and_dtypes():
    m = multipliers.mbm(7)
    rng = np.random.default_rng(2)
    a = _values(rng, (3, 1, 5))
    b = _values(rng, (4, 1))
    got = approx_jax.multiply(a, b, m)
    assert got.shape == (3, 4, 5)
    want = reference.product(*np.broadcast_arrays(a, b), m.lut, 7)
    _assert_bits_equal(got, want)
    got16 = approx_jax.multiply(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), m)
    assert got16.dtype == jnp.bfloat16


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("name", ["mbm7", "fp32"])
def test_python_scalars_keep_the_array_dtype(name, dtype):
    # A Python scalar is weakly typed: like jnp, the array's dtype wins, whether
    # or not the multiplier is exact (switching "fp32" to "mbm7" must not
    # silently promote a half-precision model to float32).
    arr = jnp.asarray([1.5, -2.0, 3.25], dtype)
    assert approx_jax.multiply(3.0, arr, name).dtype == dtype
    assert approx_jax.multiply(arr, 2.0, name).dtype == dtype
    assert jax.jit(lambda s, t: approx_jax.multiply(s, t, name))(3.0, arr).dtype == dtype
    assert approx_jax.approx_dot(arr[:, None], jnp.asarray(2.0)[None], name).dtype == dtype


# --------------------------------------------------------------------------
# Dot / matmul: sums within the SPEC bound.


@pytest.mark.parametrize("x_shape,w_shape", DOT_SHAPES)
def test_approx_dot_matches_reference(mult, x_shape, w_shape):
    rng = np.random.default_rng(5)
    x = _values(rng, x_shape)
    w = _values(rng, w_shape)
    got = approx_jax.approx_dot(x, w, mult)
    assert got.shape == x_shape[:-1] + w_shape[1:]
    assert got.dtype == jnp.float32
    ref, abs_sum = reference.dot_with_bound(
        x.reshape(int(np.prod(x_shape[:-1])), x_shape[-1]), w, mult.lut, mult.mbits
    )
    _assert_within_bound(np.asarray(got).reshape(ref.shape), ref, abs_sum, x_shape[-1])


def test_approx_dot_k1_is_bit_exact(mult):
    rng = np.random.default_rng(6)
    x = _values(rng, (7, 1))
    w = _values(rng, (1, 5))
    got = approx_jax.approx_dot(x, w, mult)
    _assert_bits_equal(got, reference.product(x, w, mult.lut, mult.mbits))


def test_approx_dot_special_values(mult):
    s = _special_values()
    x = np.stack([s, s[::-1], np.roll(s, 3)])
    w = np.stack([s, np.ones_like(s), np.roll(s, 5), -s], axis=1)
    got = approx_jax.approx_dot(x, w, mult)
    ref, abs_sum = reference.dot_with_bound(x, w, mult.lut, mult.mbits)
    _assert_within_bound(got, ref, abs_sum, s.size)


@pytest.mark.parametrize(
    "a_shape,b_shape",
    [
        ((2, 3, 5, 6), (3, 6, 4)),
        ((4, 7, 9), (4, 9, 2)),
        ((1, 5, 3), (6, 3, 8)),
        ((5, 6), (2, 6, 3)),
    ],
)
def test_approx_matmul_matches_reference(a_shape, b_shape):
    m = multipliers.mitchell(7)
    rng = np.random.default_rng(7)
    a = _values(rng, a_shape)
    b = _values(rng, b_shape)
    got = approx_jax.approx_matmul(a, b, m)
    ref, abs_sum = reference.matmul_with_bound(a, b, m.lut, 7)
    assert got.shape == ref.shape
    _assert_within_bound(got, ref, abs_sum, a_shape[-1])


@pytest.mark.parametrize(
    "a_shape,b_shape",
    [((6,), (6,)), ((6,), (3, 6, 4)), ((5, 6), (6,)), ((2, 5, 6), (6,)), ((6,), (6, 4))],
)
@pytest.mark.parametrize("stacked", [False, True])
def test_vector_operands_follow_jnp_matmul(a_shape, b_shape, stacked):
    # A 1-D operand is the 2-D product with a unit axis, dropped afterwards
    # (jnp.matmul / jnp.dot): the same products and sums, so the same bits.
    m = multipliers.stack([multipliers.mbm(7), multipliers.mitchell(5)]) if stacked else "mbm7"
    rng = np.random.default_rng(8)
    a = _values(rng, a_shape)
    b = _values(rng, b_shape)
    got = approx_jax.approx_matmul(a, b, m)
    lead = (2,) if stacked else ()
    assert got.shape == lead + jnp.matmul(a, b).shape
    full = approx_jax.approx_matmul(
        a[None, :] if a.ndim == 1 else a, b[:, None] if b.ndim == 1 else b, m
    )
    if b.ndim == 1:
        full = full[..., 0]
    if a.ndim == 1:
        full = full[..., 0, :] if b.ndim > 1 else full[..., 0]
    _assert_bits_equal(got, full)
    if len(b_shape) == 1:
        dot = approx_jax.approx_dot(a, b, m)
        assert dot.shape == lead + jnp.dot(a, b).shape
        _assert_bits_equal(dot, approx_jax.approx_dot(a, b[:, None], m)[..., 0])
    # Gradients flow through the unit axes like any reshape.
    g = jax.grad(lambda a, b: approx_jax.approx_matmul(a, b, "mbm7").sum(), argnums=(0, 1))(a, b)
    assert g[0].shape == a.shape and g[1].shape == b.shape


def test_operand_order_matters():
    m = multipliers.mitchell(3)
    # Asymmetric random LUT: swapping operands changes the products.
    r = random_multiplier(3, seed=11)
    a = np.float32([1.25, 1.625])
    b = np.float32([1.875, 1.125])
    assert not np.array_equal(
        np.asarray(approx_jax.multiply(a, b, r)), np.asarray(approx_jax.multiply(b, a, r))
    )
    x = a[None, :]
    w = b[:, None]
    _assert_bits_equal(
        approx_jax.approx_dot(x[:, :1], w[:1], m), reference.product(x[:, :1], w[:1], m.lut, 3)
    )


# --------------------------------------------------------------------------
# Gradients vs the reference VJP.


@pytest.mark.parametrize("backward", ["approx", "exact"])
def test_approx_dot_gradients(mult, backward):
    rng = np.random.default_rng(8)
    x = _values(rng, (2, 3, 11))
    w = _values(rng, (11, 6))
    dy = _values(rng, (2, 3, 6))

    def f(x, w):
        return approx_jax.approx_dot(x, w, mult, backward=backward)

    _, vjp = jax.vjp(f, x, w)
    dx, dw = vjp(dy)
    (rdx, dx_abs), (rdw, dw_abs) = reference.dot_vjp(
        x, w, dy, mult.lut, mult.mbits, backward, with_bound=True
    )
    _assert_within_bound(dx, rdx, dx_abs, 6)
    _assert_within_bound(dw, rdw, dw_abs, 6)


@pytest.mark.parametrize(
    "M, shapes",
    [(3, ((8, 96), (96, 64))), (7, ((4, 512), (512, 256))), (7, ((2, 3, 40), (40, 24)))],
)
def test_dx_is_sequential_dy_times_w_transpose_bit_for_bit(M, shapes):
    # Dense-layer input gradients with a wide weight matrix run as
    # (w (x)_LUT^T dy^T)^T (ops._dx_by_transposed_lut); with an asymmetric
    # LUT and special values the bits must still be those of P(dy, w) summed
    # over N ascending, like the direct form (the last case keeps it).
    m = random_multiplier(M, 40 + M)
    rng = np.random.default_rng(41)
    x = _values(rng, shapes[0])
    w = _values(rng, shapes[1])
    specials = _special_values()
    where = np.arange(0, w.size, 13)[: specials.size]
    w.reshape(-1)[where] = specials[: where.size]
    dy = _values(rng, shapes[0][:-1] + (shapes[1][1],))
    dy.reshape(-1)[::11] = 0.0
    taken = ops._dx_by_transposed_lut(int(np.prod(shapes[0][:-1])), shapes[0][-1], shapes[1][1], M)
    assert taken == (shapes[0][0] != 2)
    _, vjp = jax.vjp(lambda x, w: approx_jax.approx_dot(x, w, m), x, w)
    dx, _ = vjp(dy)
    want = reference.sequential_dot(dy.reshape(-1, w.shape[1]), w.T, m.lut, M)
    _assert_bits_equal_nan_aside(np.asarray(dx).reshape(want.shape), want, "dx")


def test_jit_grad_acceptance():
    m = multipliers.mbm(7)
    rng = np.random.default_rng(9)
    x = _values(rng, (16, 32))
    w = _values(rng, (32, 8))
    g = jax.jit(jax.grad(lambda w: approx_jax.approx_dot(x, w, m).sum()))(w)
    _, (rdw, dw_abs) = reference.dot_vjp(
        x, w, np.ones((16, 8), np.float32), m.lut, 7, with_bound=True
    )
    _assert_within_bound(g, rdw, dw_abs, 16)


@pytest.mark.parametrize("backward", ["approx", "exact"])
def test_matmul_and_multiply_gradients(backward):
    m = multipliers.mbm(5)
    rng = np.random.default_rng(10)
    a = _values(rng, (2, 4, 5))
    b = _values(rng, (5, 3))
    dy = _values(rng, (2, 4, 3))
    _, vjp = jax.vjp(lambda a, b: approx_jax.approx_matmul(a, b, m, backward=backward), a, b)
    da, db = vjp(dy)
    (rda, da_abs), (rdb, db_abs) = reference.dot_vjp(a, b, dy, m.lut, 5, backward, with_bound=True)
    _assert_within_bound(da, rda, da_abs, 3)
    _assert_within_bound(db, rdb, db_abs, 8)

    x = _values(rng, (4, 1))
    y = _values(rng, (1, 3))
    g = _values(rng, (4, 3))
    _, vjp = jax.vjp(lambda x, y: approx_jax.multiply(x, y, m, backward=backward), x, y)
    dx, dy_ = vjp(g)
    xb, yb = np.broadcast_arrays(x, y)
    if backward == "approx":
        want_dx = reference.product(g, yb, m.lut, 5).astype(np.float64).sum(1, keepdims=True)
        want_dy = reference.product(xb, g, m.lut, 5).astype(np.float64).sum(0, keepdims=True)
    else:
        want_dx = (g.astype(np.float64) * yb).sum(1, keepdims=True)
        want_dy = (xb.astype(np.float64) * g).sum(0, keepdims=True)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dy_, want_dy, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shapes", [((5, 12), (12, 7)), ((4, 64), (64, 200))])
def test_second_derivatives_are_simulated_products(shapes):
    # grad of grad (a Hessian-vector product): every product of the second
    # derivative is simulated too, by SPEC section 5's rule applied to the
    # backward pass's own products. For f(x, w) = sum(approx_dot(x, w)^2) / 2
    # and h = <v, grad_x f>: grad_x h = P(P(v, w), w^T) and grad_w h =
    # P(x^T, P(v, w)) + P(y^T, v)^T (y = approx_dot(x, w)), each summed
    # sequentially: checked bit for bit against the NumPy reference with an
    # asymmetric LUT (operand order matters). The wide case takes the
    # transposed-LUT input gradient.
    m = random_multiplier(6, 61)
    rng = np.random.default_rng(62)
    x, w = _values(rng, shapes[0]), _values(rng, shapes[1])
    v = _values(rng, shapes[0])

    def f(x, w):
        return 0.5 * jnp.sum(approx_jax.approx_dot(x, w, m) ** 2)

    def h(x, w):
        return jnp.sum(v * jax.grad(f)(x, w))

    hx, hw = jax.jit(jax.grad(h, argnums=(0, 1)))(x, w)

    def seq(a, b):
        return reference.sequential_dot(a, b, m.lut, m.mbits)

    y = seq(x, w)
    dy = seq(v, w)
    _assert_bits_equal_nan_aside(np.asarray(hx), seq(dy, w.T), "d2/dx2")
    want_w = seq(x.T, dy) + seq(y.T, v).T
    _assert_bits_equal_nan_aside(np.asarray(hw), want_w, "d2/dxdw")


def test_second_derivatives_multiply_exact_backward_and_designs():
    rng = np.random.default_rng(63)
    a, b, v = (_values(rng, (6, 5)) for _ in range(3))
    m = random_multiplier(5, 64)

    def hvp(m, backward):
        def f(a):
            return 0.5 * jnp.sum(approx_jax.multiply(a, b, m, backward=backward) ** 2)

        return jax.grad(lambda a: jnp.sum(v * jax.grad(f)(a)))(a)

    # d/da <v, P(P(a, b), b)> with a = the cotangent at each step: P(P(v, b), b).
    want = reference.product(reference.product(v, b, m.lut, 5), b, m.lut, 5)
    _assert_bits_equal_nan_aside(np.asarray(hvp(m, "approx")), want, "multiply")
    np.testing.assert_allclose(hvp(m, "exact"), v * b * b, rtol=1e-6)
    # The dense second derivative under the straight-through rule: float32 products.
    x, w = _values(rng, (3, 9)), _values(rng, (9, 4))
    u = _values(rng, (3, 9))
    f = lambda x: 0.5 * jnp.sum(approx_jax.approx_dot(x, w, m, backward="exact") ** 2)  # noqa: E731
    got = jax.grad(lambda x: jnp.sum(u * jax.grad(f)(x)))(x)
    np.testing.assert_allclose(got, (u @ w) @ w.T, rtol=1e-5, atol=1e-5)
    # vmapped over a stack of designs: each design's own second derivative.
    stack = multipliers.stack([m, multipliers.mbm(5), multipliers.mitchell(3)])
    got = jax.vmap(lambda d: hvp(d, "approx"))(stack)
    for d, single in enumerate(multipliers.unstack(stack)):
        np.testing.assert_array_equal(
            np.asarray(got[d]).view(np.uint32), np.asarray(hvp(single, "approx")).view(np.uint32)
        )


def test_no_gradient_flows_into_lut():
    m = multipliers.mbm(7)
    x = np.ones((2, 3), np.float32)
    w = np.ones((3, 2), np.float32)
    grads = jax.grad(
        lambda m, w: approx_jax.approx_dot(x, w, m).sum(), argnums=(0, 1), allow_int=True
    )(m, w)
    assert grads[0].lut.dtype == jax.dtypes.float0


# --------------------------------------------------------------------------
# jit, exact dispatch, determinism.


def test_jit_and_eager_identical_bits(mult):
    rng = np.random.default_rng(12)
    x = _values(rng, (33, 70))
    w = _values(rng, (70, 19))
    eager = approx_jax.approx_dot(x, w, mult)
    jitted = jax.jit(lambda x, w, m: approx_jax.approx_dot(x, w, m))(x, w, mult)
    again = jax.jit(lambda x, w, m: approx_jax.approx_dot(x, w, m))(x, w, mult)
    _assert_bits_equal(eager, jitted)
    _assert_bits_equal(jitted, again)


def test_designs_of_same_width_share_one_compilation():
    traces = []

    @jax.jit
    def f(x, w, m):
        traces.append(1)
        return approx_jax.approx_dot(x, w, m)

    x = np.ones((2, 3), np.float32)
    w = np.ones((3, 2), np.float32)
    f(x, w, multipliers.mbm(7))
    f(x, w, multipliers.mitchell(7))
    assert len(traces) == 1


def test_exact_dispatches_to_native():
    rng = np.random.default_rng(13)
    x = _values(rng, (4, 9))
    w = _values(rng, (9, 3))
    got = approx_jax.approx_dot(x, w, multipliers.exact())
    _assert_bits_equal(got, jnp.dot(x, w, precision=jax.lax.Precision.HIGHEST))
    hlo = jax.jit(lambda x, w: approx_jax.approx_dot(x, w, "fp32")).lower(x, w).as_text()
    assert "custom_call" not in hlo
    assert (
        "approx_jax_gemm"
        in jax.jit(lambda x, w: approx_jax.approx_dot(x, w, "mbm7")).lower(x, w).as_text()
    )


@pytest.mark.parametrize("op", ["multiply", "approx_dot", "approx_matmul", "approx_conv"])
def test_exact_under_x64_is_float32_like_every_design(op):
    # SPEC section 1: float64 operands are cast to float32 first and the result
    # back, for "fp32" as for a LUT design (with x64 on, exact() was native
    # float64: 1e-300 * 1e300 gave 1 instead of 0 * inf = NaN).
    a64 = np.float64([1e-300, 1.0 + 2.0**-30, 3.0, -2.5])
    b64 = np.float64([1e300, 1.0 + 2.0**-30, 1e-320, 1.5e-5])
    calls = {
        "multiply": lambda a, b, m: approx_jax.multiply(a, b, m),
        "approx_dot": lambda a, b, m: approx_jax.approx_dot(a[None], b[:, None], m),
        "approx_matmul": lambda a, b, m: approx_jax.approx_matmul(a[None], b[:, None], m),
        "approx_conv": lambda a, b, m: approx_jax.approx_conv(
            a.reshape(1, 1, 1, 1), b.reshape(1, 1, 1, 1), m, (1, 1), "VALID"
        ),
    }
    with jax.enable_x64(True):
        for i in range(4):  # one product per call: sums of one term are the product
            got = calls[op](jnp.asarray(a64[i : i + 1]), jnp.asarray(b64[i : i + 1]), "fp32")
            assert got.dtype == jnp.float64
            with np.errstate(over="ignore", invalid="ignore"):
                want = np.float32(a64[i]) * np.float32(b64[i])
            np.testing.assert_array_equal(np.asarray(got).ravel(), [np.float64(want)])


def test_names_resolve():
    rng = np.random.default_rng(14)
    x = _values(rng, (3, 5))
    w = _values(rng, (5, 2))
    _assert_bits_equal(
        approx_jax.approx_dot(x, w, "mbm7"), approx_jax.approx_dot(x, w, multipliers.mbm(7))
    )


# --------------------------------------------------------------------------
# Bad input.


def test_bad_inputs_raise_clear_errors():
    m = multipliers.mbm(7)
    x = np.ones((2, 3), np.float32)
    with pytest.raises(TypeError, match="x"):
        approx_jax.approx_dot(np.ones((2, 3), np.int32), np.ones((3, 2), np.float32), m)
    with pytest.raises(ValueError, match="contracting"):
        approx_jax.approx_dot(x, np.ones((4, 2), np.float32), m)
    with pytest.raises(ValueError, match="w"):
        approx_jax.approx_dot(x, np.ones((3, 2, 1), np.float32), m)
    with pytest.raises(ValueError, match="contracting"):
        approx_jax.approx_dot(x, np.ones((4,), np.float32), m)
    with pytest.raises(ValueError, match="contracting"):
        approx_jax.approx_matmul(np.ones(3, np.float32), np.ones((2, 4, 5), np.float32), m)
    with pytest.raises(ValueError, match="rank"):
        approx_jax.approx_matmul(np.float32(2.0), np.ones((3, 2), np.float32), m)
    with pytest.raises(ValueError, match="backward"):
        approx_jax.approx_dot(x, np.ones((3, 2), np.float32), m, backward="nope")
    with pytest.raises(TypeError, match="multiplier"):
        approx_jax.approx_dot(x, np.ones((3, 2), np.float32), 7)
    with pytest.raises(ValueError):
        approx_jax.approx_dot(x, np.ones((3, 2), np.float32), "mbm12")
    with pytest.raises(ValueError, match="broadcast"):
        approx_jax.multiply(np.ones(3, np.float32), np.ones(4, np.float32), m)
    with pytest.raises(ValueError, match="batch"):
        approx_jax.approx_matmul(np.ones((2, 3, 4), np.float32), np.ones((5, 4, 2), np.float32), m)
    with pytest.raises(TypeError):
        approx_jax.multiply(np.ones(3, bool), np.ones(3, np.float32), m)


# --------------------------------------------------------------------------
# CPU closed-form path (xla_kernels/lut_family.h): for built-in families the
# gather kernel may compute LUT entries instead of loading them, only after
# checking the LUT entry by entry; results must be the gathers' bits.


def _knob_on_equals_off(monkeypatch, knob, on, x, w, designs, what, stacked=True):
    """approx_dot(x, w) under designs[0] and (stacked) under the stack of all
    designs, with the CPU kernel's env knob at `on` and at "0" (off): the bits
    must agree. Returns the last result with the knob on."""
    fn = jax.jit(lambda a, b, m: approx_jax.approx_dot(a, b, m))
    for m in [designs[0]] + ([multipliers.stack(designs)] if stacked else []):
        monkeypatch.setenv(knob, on)
        got = np.asarray(fn(x, w, m))
        monkeypatch.setenv(knob, "0")
        _assert_bits_equal_nan_aside(got, np.asarray(fn(x, w, m)), what)
    return got


@functools.cache
def _cpu_has_avx512() -> bool:
    """Whether the CPU kernel's AVX-512 unit can run here (Linux flags: the
    four subsets cpu_gemm.cc BestIsa asks for)."""
    try:
        flags = set(pathlib.Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return {"avx512f", "avx512dq", "avx512bw", "avx512vl"} <= flags


def _use_cpu_isa(monkeypatch, isa):
    """Caps the CPU kernel at instruction set `isa` (APPROX_JAX_CPU_ISA: "1"
    scalar, "2" AVX2, "3" AVX-512); skips "3" where the CPU has no AVX-512
    (it would repeat the "2" case)."""
    if isa == "3" and not _cpu_has_avx512():
        pytest.skip("no AVX-512 here: isa 3 would run the AVX2 unit of the isa 2 case")
    monkeypatch.setenv("APPROX_JAX_CPU_ISA", isa)


def _knob_keeps_reference_bits(
    monkeypatch, knob, what, shape, M, seed, family=multipliers.mbm, zero_w_columns=False
):
    """approx_dot over _wide_range_operands of `shape` under a random LUT,
    family(M) and another random LUT (alone and stacked), with the kernel's
    env knob at "1" and at "0": the bits must agree and, unless the operands
    hold the five rows' special values (whose NaN signs the reference does
    not model), equal the NumPy sequential order. zero_w_columns: w's columns
    1 and 3 all +0 / -0 (every product a signed zero: a wrong tile value for
    a zero b shows as a tiny nonzero sum)."""
    rows, K, N = shape
    x, w = _wide_range_operands(rows, K, N, seed=rows + K + N + seed * M)
    if zero_w_columns:
        w[:, 1], w[:, 3] = 0.0, -0.0
    designs = [random_multiplier(M, seed), family(M), random_multiplier(M, seed + 1)]
    got = _knob_on_equals_off(monkeypatch, knob, "1", x, w, designs, what)
    if rows != 5:
        for d, m in enumerate(designs):
            _assert_bits_equal(got[d], reference.sequential_dot(x, w, m.lut, m.mbits))


def _wide_range_operands(rows, K, N, seed):
    """Operands over 2^+-30, 3% zeros; with rows == 5 also special values,
    whose k-blocks take the kernel's exact scalar path."""
    rng = np.random.default_rng(seed)
    x = (_values(rng, (rows, K)) * np.exp2(rng.integers(-30, 30, (rows, K)))).astype(np.float32)
    w = (_values(rng, (K, N)) * np.exp2(rng.integers(-30, 30, (K, N)))).astype(np.float32)
    x[rng.random(x.shape) < 0.03] = 0.0
    if rows == 5:
        x[0, 3], x[1, 5], w[7, 2], w[9, 4] = np.inf, 3e38, np.nan, -0.0
    return x, w


@pytest.mark.parametrize(
    "family,M",
    [
        ("mitchell", 3),
        ("truncate", 5),
        ("mbm", 7),
        ("mitchell", 8),
        ("truncate", 9),
        ("mbm", 10),
        ("mitchell", 11),
        ("truncate", 11),
        ("mbm", 11),
    ],
)
@pytest.mark.parametrize("shape", [(3, 50, 10), (5, 300, 100), (2, 64, 33), (40, 70, 17)])
def test_cpu_closed_form_lut_path_is_bit_exact(family, M, shape, monkeypatch):
    rows, K, N = shape
    x, w = _wide_range_operands(rows, K, N, seed=rows + K + N + M)
    mult = getattr(multipliers, family)(M)
    closed_form = _knob_on_equals_off(
        monkeypatch, "APPROX_JAX_CPU_FORMULA", "2", x, w, [mult], "closed form vs gathers", False
    )
    if rows != 5:
        _assert_bits_equal(closed_form, reference.sequential_dot(x, w, mult.lut, mult.mbits))


@pytest.mark.parametrize("isa", ["2", "3"])
@pytest.mark.parametrize("shape", [(64, 1024, 10), (100, 300, 70), (5, 300, 100), (127, 64, 64)])
def test_closed_forms_at_m7_few_rows_equal_the_tiles(isa, shape, monkeypatch):
    # The AVX2 unit runs M = 7 with fewer than 128 rows on the closed forms
    # when every design has one, MBM included (cpu_gemm_simd.h
    # Avx2ClosedFormsWin); APPROX_JAX_CPU_FORMULA=0 hides the families, so
    # the tiles run. Same bits both ways, for mbm7 alone and for a stack of
    # MBM, Mitchell and truncate, and the reference's for mbm7.
    _use_cpu_isa(monkeypatch, isa)
    rows, K, N = shape
    x, w = _wide_range_operands(rows, K, N, seed=rows + K + N + 70)
    designs = [multipliers.mbm(7), multipliers.mitchell(7), multipliers.truncate(7)]
    got = _knob_on_equals_off(
        monkeypatch, "APPROX_JAX_CPU_FORMULA", "1", x, w, designs, "closed forms vs tiles"
    )
    if rows != 5 and K <= 300:
        _assert_bits_equal(got[0], reference.sequential_dot(x, w, designs[0].lut, 7))


@pytest.mark.parametrize(
    "family,M",
    [("mbm", M) for M in range(7, 12)]
    + [(f, M) for f in ("mitchell", "truncate") for M in range(1, 12)],
)
def test_cpu_closed_form_every_mantissa_pair(family, M, monkeypatch):
    # out[i, j] = P(1 + i/2^M, 1 + j/2^M) for every pair of mantissa indices:
    # the closed form must reproduce each LUT entry, not just the sampled ones.
    # (A closed-over built-in reaches the kernel with its family attribute,
    # ops.closed_form_family, which the kernel trusts: this is also the check
    # that every family and width the Python side names is the kernel's.)
    mult = getattr(multipliers, family)(M)
    mant = (1.0 + np.arange(2**M) / 2.0**M).astype(np.float32)
    x = mant[:, None]
    w = -mant[None, :]
    monkeypatch.setenv("APPROX_JAX_CPU_FORMULA", "2")
    got = np.asarray(jax.jit(lambda a, b: approx_jax.approx_dot(a, b, mult))(x, w))
    _assert_bits_equal(got, reference.product(x, w, mult.lut, M))


_FAMILY_CODES = {"mitchell": 1, "truncate": 2, "mbm": 3}


@pytest.mark.parametrize("M", range(1, 12))
def test_closed_form_family_names_each_builtin_and_nothing_else(M):
    names = {code: name for name, code in _FAMILY_CODES.items()}
    for name, code in _FAMILY_CODES.items():
        klut = ops.kernel_lut_of(getattr(multipliers, name)(M))
        family = ops.closed_form_family(klut, M)
        # The backward pass hands the kernel LUT^T with the same attribute.
        np.testing.assert_array_equal(ops._transposed_lut(jnp.asarray(klut), M), klut)
        if name == "mbm" and M < 7:  # (the kernel's MBM closed form starts at 7)
            assert family != code
        elif family != code:  # another family with the same entries (truncate = mitchell at M <= 2)
            other = ops.kernel_lut_of(getattr(multipliers, names[family])(M))
            np.testing.assert_array_equal(other, klut)
    # A LUT one entry away from a family, a random one: none (the kernel
    # would otherwise compute the family's entry where the LUT differs).
    lut = np.array(multipliers.mbm(M).lut)
    lut[(3 << M) % lut.size] ^= 1
    near = multipliers.from_lut(lut, M)
    assert ops.closed_form_family(ops.kernel_lut_of(near), M) == 0
    rnd = random_multiplier(M, 5)
    assert ops.closed_form_family(ops.kernel_lut_of(rnd), M) in (0, 1, 2, 3)
    # Not known at trace time: the kernel checks for itself.
    klut = ops.kernel_lut_of(multipliers.mitchell(M))
    assert ops.closed_form_family(jnp.asarray(klut), M) == -1
    assert ops.closed_form_family(np.array(klut), M) == -1  # writeable
    assert ops.closed_form_family(np.concatenate([klut, klut]), M) == -1  # a stack


@pytest.mark.parametrize("M", [3, 9, 11])
def test_gemm_family_attribute_reaches_the_kernel(M, monkeypatch):
    # The kernel trusts the attribute (no per-call pass over the LUT): told
    # that a random LUT is Mitchell's, it computes Mitchell's products. So
    # the attribute must only ever be set from the LUT itself
    # (closed_form_family), and it is: unknown (-1) or none (0) gives the
    # LUT's own products.
    monkeypatch.setenv("APPROX_JAX_CPU_FORMULA", "2")  # closed form at any shape
    rnd = random_multiplier(M, 7)
    assert ops.closed_form_family(ops.kernel_lut_of(rnd), M) == 0
    mant = (1.0 + np.arange(2**M) / 2.0**M).astype(np.float32)
    x, w = mant[:, None], mant[None, :]
    klut = jnp.asarray(ops.kernel_lut_of(rnd))
    a4, b4 = jnp.asarray(x)[None, None], jnp.asarray(w)[None, None]
    for family, like in ((-1, rnd), (0, rnd), (1, multipliers.mitchell(M))):
        got = np.asarray(ffi.gemm_call(a4, b4, klut, M, family=family))[0, 0]
        _assert_bits_equal(got, reference.product(x, w, like.lut, M))


@pytest.mark.parametrize("family", ["truncate", "mitchell", "mbm"])
def test_family_kernel_luts_equal_the_spec_reference(family):
    # closed_form_family compares LUTs with these (the kernel then trusts the
    # answer): every entry at every M must be SPEC's (reference.py).
    for M in range(1, 12):
        got = ops._family_kernel_lut.__wrapped__(family, M)
        want = ops._kernel_lut_numpy(getattr(reference, f"{family}_lut")(M), M, rows=True)
        assert got.shape == want.shape == (1, 4**M) and got.dtype == np.uint32
        assert not got.flags.writeable
        np.testing.assert_array_equal(got, want, err_msg=f"{family}{M}")


def test_lut_preparation_happens_once_per_lut(monkeypatch):
    # kernel LUT, closed-form family and device copy: made on first use of a
    # (read-only) LUT, then reused by every call, eager or traced.
    m = multipliers.truncate(10)
    x, w = jnp.ones((2, 8), jnp.float32), jnp.ones((8, 3), jnp.float32)
    want = approx_jax.approx_dot(x, w, m)
    klut = ops.kernel_lut_of(m)
    assert ops.kernel_lut_of(multipliers.truncate(10)) is klut
    assert ops.device_lut(klut) is ops.device_lut(ops.kernel_lut_of(m))
    assert isinstance(ops.device_lut(klut), jax.Array)

    def rebuilt(*args):
        raise AssertionError("the family was looked up again")

    monkeypatch.setattr(ops, "_family_kernel_lut", rebuilt)
    _assert_bits_equal(approx_jax.approx_dot(x, w, multipliers.truncate(10)), want)
    _assert_bits_equal(jax.jit(lambda x, w: approx_jax.approx_dot(x, w, m))(x, w), want)
    # A writeable LUT may change under the same array: never cached or told.
    writeable = np.array(klut)
    assert ops.device_lut(writeable) is writeable
    assert ops.closed_form_family(writeable, 10) == -1


def test_family_attribute_in_the_lowered_gemm():
    x = jnp.ones((4, 8), jnp.float32)
    w = jnp.ones((8, 3), jnp.float32)

    def attribute(fn, *args):
        text = jax.jit(fn).lower(*args).as_text()
        values = {
            ln.split("family = ")[1].split(" ")[0]
            for ln in text.splitlines()
            if "approx_jax_gemm" in ln
        }
        return values

    mbm9 = multipliers.mbm(9)
    assert attribute(lambda x, w: approx_jax.approx_dot(x, w, mbm9), x, w) == {"3"}
    # Forward and both backward products (LUT^T of a family is the family).
    loss = lambda x, w: approx_jax.approx_matmul(x, w, mbm9).sum()  # noqa: E731
    assert attribute(jax.grad(loss, argnums=(0, 1)), x, w) == {"3"}
    assert attribute(lambda x, w: approx_jax.approx_dot(x, w, random_multiplier(9, 1)), x, w) == {
        "0"
    }
    # A multiplier passed into the jitted function is traced: unknown there.
    assert attribute(lambda x, w, m: approx_jax.approx_dot(x, w, m), x, w, mbm9) == {"-1"}


# LUT facts (xla_kernels/lut_family.h): the family code in the low two bits,
# then "every entry below 2^24" and "every entry's bits below the M mantissa
# bits clear", then (bits 4-7) s when the family holds at width M - s only.
_FACTS_FORMAT, _FACTS_LOW_CLEAR, _FACTS_NARROWING = 4, 8, 16


def _narrowed(row: np.ndarray, M: int, s: int) -> np.ndarray | None:
    """The width M - s LUT whose widening is ``row`` (a kernel LUT), else None."""
    grid = row.reshape(2**M, 2**M)
    narrow = grid[:: 2**s, :: 2**s]
    wide = np.repeat(np.repeat(narrow, 2**s, axis=0), 2**s, axis=1)
    return narrow.reshape(1, -1) if np.array_equal(wide, grid) else None


def _expected_facts(klut: np.ndarray, M: int) -> list[int]:
    """The facts of each row of ``klut``, from SPEC's family LUTs and NumPy."""
    out = []
    for row in klut:
        facts = ops._family_by_comparison(row[None], M, None)
        if np.all(row < (1 << 24)):
            facts |= _FACTS_FORMAT
        if np.all(row & ((1 << (23 - M)) - 1) == 0):
            facts |= _FACTS_LOW_CLEAR
        if facts == _FACTS_FORMAT | _FACTS_LOW_CLEAR:  # no family at M: a narrower one?
            for s in range(1, M):
                narrow = _narrowed(row, M, s)
                if narrow is None:
                    break
                family = ops._family_by_comparison(narrow, M - s, None)
                if family:
                    facts |= family | s * _FACTS_NARROWING
                    break
        out.append(int(facts))
    return out


@pytest.mark.parametrize("M", [2, 7, 8, 10])
def test_lut_facts_target_answers_from_the_lut(M):
    # Each family, a random LUT, narrower designs widened to M (whose entries
    # are no family's at width M, but are at their own width), and two raw
    # kernel LUTs: one entry with a carry bit above kernel format, one with a
    # bit below the M mantissa bits.
    designs = [multipliers.mitchell(M), multipliers.truncate(M), random_multiplier(M, 3)]
    if M >= 8:
        designs += [
            multipliers.mbm(M),
            multipliers.mbm(M - 1),
            multipliers.mitchell(M - 3),
            multipliers.truncate(M - 2),
            random_multiplier(M - 2, 4),
        ]
    klut = np.array(ops.kernel_lut_of(multipliers.stack(designs)))
    high, low = klut[0].copy(), klut[2].copy()
    high[5] |= 1 << 25
    low[7] |= 1
    klut = np.concatenate([klut, high[None], low[None]])
    got = np.asarray(jax.jit(lambda k: ffi.lut_facts_call(k, M))(klut))
    assert got.dtype == np.int32
    want = _expected_facts(klut, M)
    np.testing.assert_array_equal(got, want)
    assert [v & 3 for v in want[:2]] == [1, 2 if M > 2 else 1]  # (truncate = Mitchell at M <= 2)
    assert want[-2] & _FACTS_FORMAT == 0 and want[-1] & _FACTS_LOW_CLEAR == 0
    if M >= 8:
        flags = _FACTS_FORMAT | _FACTS_LOW_CLEAR
        assert want[3] == 3 | flags
        # Widened: MBM at width M - 1 (not M - 2, where MBM's LUT is widened
        # again but no family's), Mitchell at M - 3, truncate at M - 2, and
        # no family for a random LUT at any width.
        assert want[4:8] == [3 | flags | 16, 1 | flags | 48, 2 | flags | 32, flags]


@pytest.mark.parametrize("M", [3, 9, 11])
def test_gemm_lut_facts_reach_the_kernel(M, monkeypatch):
    # As the family attribute: the kernel trusts the facts (so they must only
    # come from the LUT, through the facts target). Told that a random LUT is
    # Mitchell's, it computes Mitchell's products; unknown, or "no family",
    # gives the LUT's own. Facts apply per design of a stack; with some
    # unknown the kernel checks every LUT itself (the facts target answers
    # for all of them).
    monkeypatch.setenv("APPROX_JAX_CPU_FORMULA", "2")  # closed form at any shape
    rnd = random_multiplier(M, 7)
    mant = (1.0 + np.arange(2**M) / 2.0**M).astype(np.float32)
    x, w = mant[:, None], mant[None, :]
    klut = jnp.asarray(np.concatenate([ops.kernel_lut_of(rnd)] * 2))
    a4, b4 = jnp.asarray(x)[None, None], jnp.asarray(w)[None, None]
    flags = _FACTS_FORMAT | _FACTS_LOW_CLEAR
    mitchell = reference.product(x, w, multipliers.mitchell(M).lut, M)
    own = reference.product(x, w, rnd.lut, M)

    def narrow_product(stored_lut):
        return reference.product(x, w, stored_lut, M)

    cases = [
        ((-1, -1), (own, own)),
        ((flags, flags), (own, own)),
        ((1 | flags, 1 | flags), (mitchell, mitchell)),
        ((1 | flags, -1), (own, own)),
    ]
    if M >= 8:  # (M <= 7: a stack mixing families runs on the tiles, which read the LUT)
        cases += [((1 | flags, flags), (mitchell, own)), ((flags, 1 | flags), (own, mitchell))]
        # Told "Mitchell at width M - 2": Mitchell's products of the operands
        # truncated to M - 2 mantissa bits (the widened mitchell(M - 2)).
        narrow = multipliers.stack([multipliers.mitchell(M - 2), rnd]).lut[0]
        cases.append(((flags, 1 | flags | 2 * _FACTS_NARROWING), (own, narrow_product(narrow))))
    for facts, want in cases:
        got = ffi.gemm_call(a4, b4, klut, M, lut_facts=jnp.asarray(facts, jnp.int32))
        for d in range(2):
            _assert_bits_equal(np.asarray(got)[d, 0], want[d])


@pytest.mark.parametrize(
    "facts,pattern",
    [
        (np.zeros(2, np.float32), "lut_facts"),
        (np.zeros(3, np.int32), "lut_facts"),
        (np.zeros((2, 1), np.int32), "lut_facts"),
        (np.array([0, 16], np.int32), "lut_facts entry"),
        (np.array([-2, 0], np.int32), "lut_facts entry"),
        (np.array([0, 256], np.int32), "lut_facts entry"),
        (np.array([0, 12 | 16], np.int32), "lut_facts entry"),  # a narrowing needs a family
        (np.array([0, 13 | 8 * 16], np.int32), "lut_facts entry"),  # width 0
        (np.array([0, 1], np.int32), "lut_facts entry"),  # a family without its flags
        (np.array([0, 15 | 16 * 2], np.int32), "lut_facts entry"),  # MBM at width 6
    ],
)
def test_gemm_and_facts_targets_reject_bad_facts(facts, pattern):
    a, b = jnp.ones((1, 1, 2, 3), jnp.float32), jnp.ones((1, 1, 3, 4), jnp.float32)
    klut = jnp.asarray(np.concatenate([ops.kernel_lut_of(multipliers.mbm(8))] * 2))
    with pytest.raises(Exception, match=pattern) as info:  # noqa: PT011 - XLA's error type
        jax.block_until_ready(ffi.gemm_call(a, b, klut, 8, lut_facts=jnp.asarray(facts)))
    assert not isinstance(info.value, AssertionError)


def test_lut_facts_target_rejects_bad_operands():
    klut = jnp.asarray(ops.kernel_lut_of(multipliers.mbm(8)))
    for lut, mbits, shape, pattern in (
        (klut, 9, (1,), "entries"),
        (klut.astype(jnp.uint16), 8, (1,), "uint32"),
        (klut[0], 8, (1,), "rank"),
        (klut, 8, (2,), "one per LUT"),
        (klut, 0, (1,), "mbits"),
    ):
        call = jax.ffi.ffi_call(ffi.LUT_FACTS_TARGET, jax.ShapeDtypeStruct(shape, jnp.int32))
        with pytest.raises(Exception, match=pattern) as info:  # noqa: PT011
            jax.block_until_ready(call(lut, mbits=np.int32(mbits)))
        assert not isinstance(info.value, AssertionError)


def _compiled_targets(fn, *args) -> list[str]:
    text = jax.jit(fn).lower(*args).compile().as_text()
    return [
        ln.split('custom_call_target="')[1].split('"')[0]
        for ln in text.splitlines()
        if "custom-call(" in ln
    ]


def test_lut_facts_found_once_per_step():
    # A traced LUT at M >= ffi.LUT_FACTS_MIN_BITS (a vmapped stack, a
    # multiplier passed to the jitted function) gets one facts call, shared
    # by every GEMM of the step (XLA's CSE merges the identical calls); a
    # closed-over design (its family told by the attribute) or a narrower M
    # gets none.
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((6, 16), np.float32))
    w1 = jnp.asarray(rng.standard_normal((16, 12), np.float32))
    w2 = jnp.asarray(rng.standard_normal((12, 5), np.float32))

    def loss(ws, m):
        h = jnp.tanh(approx_jax.approx_matmul(x, ws[0], m))
        return approx_jax.approx_matmul(h, ws[1], m).sum()

    step = jax.vmap(jax.grad(loss), in_axes=(None, 0))
    assert ffi.LUT_FACTS_MIN_BITS == 10
    for M, facts_calls in ((9, 0), (10, 1)):
        stack = multipliers.stack([multipliers.mbm(M), random_multiplier(M, 1)])
        targets = _compiled_targets(step, (w1, w2), stack)
        assert targets.count("approx_jax_lut_facts") == facts_calls, targets
        assert targets.count("approx_jax_gemm") >= 3
        got = step((w1, w2), stack)
        for d in range(2):
            one = jax.grad(loss)((w1, w2), multipliers.unstack(stack)[d])
            for g, o in zip(got, one, strict=True):
                _assert_bits_equal(g[d], o)
    mbm10 = multipliers.mbm(10)
    assert "approx_jax_lut_facts" not in _compiled_targets(lambda ws: loss(ws, mbm10), (w1, w2))
    traced = _compiled_targets(jax.grad(loss), (w1, w2), mbm10)
    assert traced.count("approx_jax_lut_facts") == 1


def _stack_matmul(x, w, m):
    return approx_jax.approx_matmul(x, w, m)


def _assert_vmapped_stack_equals_each_design(x, w, designs, grads=True):
    """vmap over ``stack(designs)`` gives each design's own bits.

    Forward, and both gradients if ``grads``.
    """
    stack = multipliers.stack(designs)

    def loss(x, w, m):
        return jnp.sum(jnp.sin(_stack_matmul(x, w, m)))

    grad = jax.grad(loss, argnums=(0, 1))
    got = jax.jit(jax.vmap(_stack_matmul, in_axes=(None, None, 0)))(x, w, stack)
    got_g = jax.jit(jax.vmap(grad, in_axes=(None, None, 0)))(x, w, stack) if grads else None
    for d, m in enumerate(designs):
        _assert_bits_equal(got[d], _stack_matmul(x, w, m))
        if grads:
            for g, one in zip(got_g, grad(x, w, m), strict=True):
                _assert_bits_equal(g[d], one)


@pytest.mark.parametrize("shape", [(5, 300, 100), (40, 70, 17), (6, 5000, 3), (300, 40, 3)])
def test_widened_families_run_their_closed_form_at_their_width(shape):
    # A stack pads narrower designs to the widest M; the facts name the
    # family of each at its own width (mbm10 at 10 in a stack of 11), and the
    # kernel runs that closed form on operands decomposed at that width:
    # the same bits as each design alone, forward and both gradients, with
    # special values in some k-blocks (rows == 5), split-K (K = 5000) and
    # few columns (300x40x3).
    rows, K, N = shape
    x, w = _wide_range_operands(rows, K, N, seed=rows + K + N)
    designs = [
        multipliers.mbm(10),
        multipliers.mitchell(11),
        multipliers.mitchell(8),
        multipliers.truncate(9),
        random_multiplier(9, 2),
    ]
    stack = multipliers.stack(designs)
    facts = np.asarray(jax.jit(lambda k: ffi.lut_facts_call(k, 11))(ops.kernel_lut_of(stack)))
    flags = _FACTS_FORMAT | _FACTS_LOW_CLEAR
    np.testing.assert_array_equal(
        facts, [3 | flags | 16, 1 | flags, 1 | flags | 48, 2 | flags | 32, flags]
    )
    # (inf and nan operands (rows == 5) make the gradients nan)
    _assert_vmapped_stack_equals_each_design(x, w, designs, grads=rows != 5)


@pytest.mark.parametrize("shape", [(25, 4100, 48), (200, 330, 72), (5, 9000, 100)])
def test_stack_of_widths_runs_each_width_as_its_own_call(shape):
    # Enough work per design (>= 2^22 products) that the kernel runs a stack
    # whose designs narrow as runs of one width each, at that width
    # (cpu_gemm.cc GemmDirect): runs of one design and of two, each family
    # at its own width, random LUTs at their effective width, MBM's one bit
    # narrower still. (A mutant that narrows each run's first LUT for all of
    # its designs fails here.) The same bits as each design
    # alone, forward and both gradients; special values in some k-blocks
    # (rows == 5) and split-K (K = 9000).
    rows, K, N = shape
    x, w = _wide_range_operands(rows, K, N, seed=rows + K + N + 11)
    designs = [
        multipliers.mbm(7),
        multipliers.mitchell(3),
        multipliers.truncate(3),
        random_multiplier(5, 6),
        random_multiplier(5, 8),
        multipliers.mitchell(7),
        random_multiplier(7, 7),
        multipliers.mbm(3),
    ]
    # (inf and nan operands (rows == 5) make the gradients nan)
    _assert_vmapped_stack_equals_each_design(x, w, designs, grads=rows != 5)


@pytest.mark.parametrize("shape", [(64, 300, 64), (6, 5000, 3)])
def test_widened_families_below_the_facts_width_run_their_closed_form(shape):
    # At M = 8 and 9 no LUT facts are computed (ffi.LUT_FACTS_MIN_BITS); the
    # kernel finds a widened built-in's family and width itself
    # (cpu_gemm.cc DesignFamilies: mbm8 at 8 in a stack of 9) and runs that
    # closed form at that width: the same bits as each design alone,
    # forward and both gradients, beside a widened random LUT (widened, but
    # no family's: it gathers) and designs at the stack's width. The
    # harness's kind-7 cases fail under a mutant that keeps the full width.
    rows, K, N = shape
    x, w = _wide_range_operands(rows, K, N, seed=rows + K + N + 9)
    designs = [
        multipliers.mbm(8),
        multipliers.mitchell(9),
        multipliers.mitchell(5),
        multipliers.truncate(7),
        random_multiplier(7, 3),
        random_multiplier(9, 4),
    ]
    stack = multipliers.stack(designs)
    assert stack.mbits == 9 < ffi.LUT_FACTS_MIN_BITS
    vf = jax.vmap(_stack_matmul, in_axes=(None, None, 0))
    assert "approx_jax_lut_facts" not in _compiled_targets(vf, x, w, stack)
    _assert_vmapped_stack_equals_each_design(x, w, designs)


@pytest.mark.parametrize("M", [8, 9, 10, 11])
@pytest.mark.parametrize("shape", [(3, 50, 10), (5, 300, 100), (40, 70, 17), (6, 5000, 3)])
def test_cpu_16bit_lut_gathers_are_bit_exact(M, shape, monkeypatch):
    # M >= 8 gathers may read a 16-bit copy of the LUT (entries >> (23 - M);
    # cpu_gemm.cc MakeCompactLuts): forced on vs off, and vs the NumPy
    # sequential order, with special values in some k-blocks and a stack
    # mixing a closed-form family (which never gathers) with random LUTs.
    rows, K, N = shape
    x, w = _wide_range_operands(rows, K, N, seed=rows + K + N + M)
    designs = [random_multiplier(M, 1), multipliers.mbm(M), random_multiplier(M, 2)]
    compact = _knob_on_equals_off(
        monkeypatch, "APPROX_JAX_CPU_LUT16", "2", x, w, designs, "16-bit vs 32-bit LUT gathers"
    )
    if rows != 5 and K < 4096:
        for d, m in enumerate(designs):
            _assert_bits_equal(compact[d], reference.sequential_dot(x, w, m.lut, M))


@pytest.mark.parametrize("M", [1, 3, 5, 6, 7])
@pytest.mark.parametrize("shape", [(64, 100, 70), (5, 300, 100), (40, 33, 130)])
def test_cpu_bfloat16_tiles_by_byte_lookup_are_bit_exact(M, shape, monkeypatch):
    # With AVX-512 VBMI the bfloat16 tiles (M <= 7) are built by byte permutes
    # and a 16-bit add of b's sign and exponent (cpu_gemm_avx512.cc
    # BuildTilesBf16Bytes) instead of permutes of the 32-bit LUT row and a
    # float multiply: the same tile bits, so on (automatic) and off must be
    # bit-equal, and equal the NumPy sequential order. Random LUTs and MBM
    # (effective width M - 1 in a stack), zeros, special values (rows = 5),
    # one and two LUT registers (M <= 6, M = 7). Without VBMI both runs take
    # the permute builder.
    _knob_keeps_reference_bits(
        monkeypatch, "APPROX_JAX_CPU_VBMI", "byte-lookup vs permute tiles", shape, M, seed=3
    )


@pytest.mark.parametrize("isa", ["2", "3"])
@pytest.mark.parametrize("M", [1, 3, 5, 7])
@pytest.mark.parametrize("shape", [(64, 100, 70), (5, 300, 100), (200, 40, 33)])
def test_cpu_bfloat16_tiles_are_bit_exact(M, shape, isa, monkeypatch):
    # The tile path (M <= 7) stores its expanded tiles as bfloat16 pairs
    # (exact: a tile value has at most 7 mantissa bits) on AVX-512 and on
    # AVX2 (cpu_gemm_avx2.cc BuildTilesBf16); APPROX_JAX_CPU_BF16_TILES=0
    # keeps float32 tiles. Both must give the same bits, equal to the NumPy
    # sequential order: random LUTs and MBM (effective width M - 1 in a
    # stack), zeros, special values (rows = 5), a partial column block.
    # APPROX_JAX_CPU_ISA=2 runs the AVX2 unit on an AVX-512 machine too.
    _use_cpu_isa(monkeypatch, isa)
    _knob_keeps_reference_bits(
        monkeypatch, "APPROX_JAX_CPU_BF16_TILES", "bfloat16 vs float32 tiles", shape, M, seed=5
    )


@pytest.mark.parametrize("M", [4, 5, 6, 7])
@pytest.mark.parametrize("shape", [(64, 100, 70), (5, 300, 100), (200, 40, 33)])
def test_cpu_pair_table_tiles_are_bit_exact(M, shape, monkeypatch):
    # AVX2 builds the bfloat16 tiles of 4 <= M <= 7 from a pair table (two
    # mantissa values per word, rows transposed 8 x 8, the scale added to the
    # exponent field: cpu_gemm_avx2.cc BuildTilesBf16Pairs); APPROX_JAX_CPU_PAIR_TILES=0
    # gathers one value at a time and multiplies by the scale. Same bits,
    # equal to the NumPy sequential order: zero columns, a partial column
    # block, special values (rows = 5). (Exponents at the fast path's bounds:
    # tools/gemm_harness.cc test, strategies 1 and 4.)
    _use_cpu_isa(monkeypatch, "2")  # the AVX2 unit, on any x86-64 CPU
    _knob_keeps_reference_bits(
        monkeypatch,
        "APPROX_JAX_CPU_PAIR_TILES",
        "pair-table vs gathered tiles",
        shape,
        M,
        seed=7,
        family=multipliers.mitchell,
        zero_w_columns=True,
    )


@pytest.mark.parametrize("M", [1, 2, 3])
@pytest.mark.parametrize("shape", [(64, 100, 70), (5, 300, 100), (203, 40, 33)])
def test_cpu_permute_tiles_are_bit_exact(M, shape, monkeypatch):
    # Opt-in AVX2 kernel for M <= 3 (APPROX_JAX_CPU_PERM_TILES=1:
    # cpu_gemm_avx2.cc MicroPermTile): panels of 8 rows, one permute of a b
    # element's 2^M tile values per 8 products, c transposed in and out. Same
    # bits as the tile kernel and the NumPy sequential order: row counts that
    # are not multiples of 8, a partial column block, special values (rows = 5).
    _use_cpu_isa(monkeypatch, "2")  # the AVX2 unit, on any x86-64 CPU
    _knob_keeps_reference_bits(
        monkeypatch, "APPROX_JAX_CPU_PERM_TILES", "permute vs tile kernel", shape, M, seed=9
    )


@pytest.mark.parametrize(("isa", "M"), [("2", 2), ("2", 3), ("3", 3), ("3", 5)])
def test_cpu_rows_first_split_is_bit_exact(M, isa, monkeypatch):
    # At widths <= 6 (AVX-512) or <= 3 (AVX2) the tile path splits the rows
    # before the columns (cpu_gemm_simd_impl.h RunGemm);
    # APPROX_JAX_CPU_ROWS_FIRST=0 splits the columns first. A shape that both
    # split differently (more column blocks than tasks on both units, enough
    # rows for two row chunks): the same bits, equal to the NumPy sequential
    # order.
    _use_cpu_isa(monkeypatch, isa)
    _knob_keeps_reference_bits(
        monkeypatch, "APPROX_JAX_CPU_ROWS_FIRST", "rows vs columns first", (260, 50, 520), M, 11
    )


@pytest.mark.parametrize("isa", ["1", "2", "3"])
@pytest.mark.parametrize("specials", [False, True])
def test_cpu_transposed_problem_reads_b_in_place_bit_exact(specials, isa, monkeypatch):
    # Few rows and many columns at M = 7 run as the transposed problem
    # (cpu_gemm.cc GemmTransposed), whose a = b^T is copied, or read in place
    # strip by strip (ImplicitA::plain_ld) where b is beyond L2.
    # APPROX_JAX_CPU_PLAIN_T=2 reads it in place for any size, =0 copies:
    # the same bits, equal to the NumPy sequential order (the scalar unit,
    # isa 1, materialises the strips). With special values in both operands
    # the two must still agree (the reference does not model NaN signs).
    _use_cpu_isa(monkeypatch, isa)
    M, rows, K, N = 7, 40, 150, 170
    x, w = _wide_range_operands(rows, K, N, seed=rows + 3)
    if specials:
        x[0, 3], x[17, 5], x[39, 149] = np.inf, 3e38, -0.0
        w[7, 2], w[9, 169], w[0, 0] = np.nan, -0.0, 1e-39
    designs = [random_multiplier(M, 5), multipliers.mbm(M), random_multiplier(M, 6)]
    got = _knob_on_equals_off(
        monkeypatch, "APPROX_JAX_CPU_PLAIN_T", "2", x, w, designs, "b^T in place vs copied"
    )
    if not specials:
        for d, m in enumerate(designs):
            _assert_bits_equal(got[d], reference.sequential_dot(x, w, m.lut, m.mbits))


@pytest.mark.parametrize("isa", ["1", "2", "3"])
@pytest.mark.parametrize("M,cols,K", [(6, 1, 150), (7, 2, 150), (8, 1, 4500)])
def test_cpu_matrix_vector_product_transposed_bit_exact(M, cols, K, isa, monkeypatch):
    # One or two columns and many rows at 6 <= M <= 8 run as the transposed
    # problem on the direct kernel, which reads the matrix in place
    # (cpu_gemm.cc PrefersTransposedDirect, GemmProblem::b_plain_ld; K = 4500
    # splits k). APPROX_JAX_CPU_MATVEC=0 keeps the tile / gather paths: the
    # same bits, equal to the NumPy sequential order; with special values
    # in both operands the two must still agree.
    _use_cpu_isa(monkeypatch, isa)
    rows = 300
    x, w = _wide_range_operands(rows, K, cols, seed=M + cols)
    designs = [random_multiplier(M, 7), multipliers.mbm(M), random_multiplier(M, 8)]
    got = _knob_on_equals_off(monkeypatch, "APPROX_JAX_CPU_MATVEC", "1", x, w, designs, "matvec")
    for d, m in enumerate(designs):
        _assert_bits_equal(got[d], _chunked_sequential_dot(x, w, m))
    x[0, 3], x[17, 5], x[299, K - 1] = np.inf, 3e38, -0.0
    w[7, 0], w[9, cols - 1], w[0, 0] = np.nan, -0.0, 1e-39
    _knob_on_equals_off(monkeypatch, "APPROX_JAX_CPU_MATVEC", "1", x, w, designs, "matvec specials")


@pytest.mark.parametrize(
    "u,v,rows_changed",
    [
        (0b0000101, 0b0110010, 1),  # a row that the narrow design repeats (u & 15 != 0)
        (0b0100000, 0b0100011, 1),  # a row it keeps, inside a run of equal entries
        (0b0100000, 0b0110000, 1),  # the first entry of a run
        (127, 127, 1),
        (0b0100000, 0b0100011, 16),  # the same entry in all 16 rows the design repeats
    ],
)
def test_cpu_effective_width_sees_one_changed_entry(u, v, rows_changed):
    # The CPU kernels run a LUT that ignores the low bits of both indices (a
    # narrow design widened to a stack's M) at its narrow width (cpu_gemm.cc
    # ComputeEffectiveWidths / WidenedBy, which compares rows and runs of
    # entries). mbm3 widened to M = 7 with one entry changed is not narrow:
    # its products, that entry's included, must equal the reference. (Changed
    # in all 16 rows of its group, the rows still repeat each other and only
    # the runs of equal entries within a row tell.)
    M, m = 7, 3
    widened = lut_lib.expand_lut(multipliers.mbm(m).lut, m, M)
    wide = widened.copy()
    for row in range(u, u + rows_changed):
        wide[(row << M) | v] ^= 1  # another valid entry: the lowest result-mantissa bit
    design = multipliers.from_lut(wide, M)
    rng = np.random.default_rng(u * 131 + v)
    rows, K, N = 64, 96, 80
    ia = rng.integers(0, 1 << M, (rows, K))
    ib = rng.integers(0, 1 << M, (K, N))
    ia[rng.integers(0, rows), 7], ib[7, rng.integers(0, N)] = u, v  # the changed pair is used
    sign_x = np.where(rng.random((rows, K)) < 0.5, -1.0, 1.0)
    sign_w = np.where(rng.random((K, N)) < 0.5, -1.0, 1.0)
    x = (sign_x * (1 + ia / 2.0**M) * np.exp2(rng.integers(-8, 8, (rows, K)))).astype(np.float32)
    w = (sign_w * (1 + ib / 2.0**M) * np.exp2(rng.integers(-8, 8, (K, N)))).astype(np.float32)
    got = approx_jax.approx_dot(jnp.asarray(x), jnp.asarray(w), design)
    _assert_bits_equal(got, reference.sequential_dot(x, w, design.lut, M))
    # The changed entry moves the product it is used in (so the check above
    # can tell the widths apart).
    narrow = multipliers.from_lut(widened, M)
    assert not np.array_equal(
        np.asarray(got), np.asarray(approx_jax.approx_dot(jnp.asarray(x), jnp.asarray(w), narrow))
    )


@pytest.mark.parametrize("M", [10, 11])
@pytest.mark.parametrize("shape", [(5, 40, 300), (9, 300, 70), (6, 100, 40), (3, 4500, 130)])
def test_cpu_lut_row_streaming_is_bit_exact(M, shape, monkeypatch):
    # M >= 10 gathers from a LUT with no closed form may stream each (row, k)
    # pair's LUT row across many column blocks (cpu_gemm_simd_impl.h,
    # Plan::stream): only the loop order changes, so streamed (forced) and
    # unstreamed results must be bit-equal, and equal the NumPy sequential
    # order; special values, split-K (K = 4500) and a stack with a
    # closed-form design included.
    rows, K, N = shape
    x, w = _wide_range_operands(rows, K, N, seed=rows + K + N + M)
    designs = [random_multiplier(M, 7), multipliers.mbm(M)]
    streamed = _knob_on_equals_off(
        monkeypatch, "APPROX_JAX_CPU_STREAM", "2", x, w, designs, "streamed vs plain LUT gathers"
    )
    if rows != 5 and K < 4096:
        _assert_bits_equal(streamed[0], reference.sequential_dot(x, w, designs[0].lut, M))


@pytest.mark.parametrize("M", [10, 11])
@pytest.mark.parametrize("shape", [(13, 70, 150), (8, 33, 1100), (4, 9, 65)])
def test_cpu_four_row_gathers_are_bit_exact(M, shape, monkeypatch):
    # The streamed kernel gathers four rows' LUT entries per 64-bit lane
    # (AVX-512: QuadStep on a per-k interleaved table of the 16-bit LUT copy;
    # rows beyond a multiple of four, other ISAs, a 32-bit LUT and
    # APPROX_JAX_CPU_QUAD=0 gather one row at a time).
    # Same products, same order: bit-equal either way and to the NumPy
    # sequential order; column tails (150, 1100 and 65 are no multiple of 16),
    # special values (the exact scalar path of their panels) and a stack with
    # a closed-form design included.
    rows, K, N = shape
    x, w = _wide_range_operands(rows, K, N, seed=rows * K + N + M)
    x[min(5, rows - 1), K // 2] = np.nan
    monkeypatch.setenv("APPROX_JAX_CPU_STREAM", "2")
    # (The four-row tables are made from the 16-bit LUT copy, which problems
    # this small would not pay for on their own.)
    monkeypatch.setenv("APPROX_JAX_CPU_LUT16", "2")
    designs = [random_multiplier(M, 11), multipliers.mitchell(M)]
    quads = _knob_on_equals_off(
        monkeypatch, "APPROX_JAX_CPU_QUAD", "1", x, w, designs, "four-row vs one-row gathers"
    )
    _assert_bits_equal_nan_aside(
        quads[0], reference.sequential_dot(x, w, designs[0].lut, M), "four-row gathers vs NumPy"
    )


def test_cpu_lut_row_streaming_transposed_is_bit_exact(monkeypatch):
    # Few columns, many rows, M = 10, a random LUT: the automatic mode runs
    # the transposed problem so that the LUT rows stream across the rows
    # (cpu_gemm.cc PrefersTransposedStream); the bits are those of the direct
    # gathers (streaming off) and of the NumPy sequential order.
    x, w = _wide_range_operands(2100, 500, 16, seed=3)
    x[7, 100] = np.inf  # a k-block of one panel on the exact scalar path
    mult = random_multiplier(10, 8)
    auto = _knob_on_equals_off(
        monkeypatch, "APPROX_JAX_CPU_STREAM", "1", x, w, [mult], "transposed streaming", False
    )
    _assert_bits_equal(auto[:64], reference.sequential_dot(x[:64], w, mult.lut, 10))


@pytest.mark.parametrize("mode", ["2", "1"])
def test_cpu_closed_form_per_design_in_a_stack(mode, monkeypatch):
    # A stack mixing families (and a random LUT, which has none): each design
    # takes its own closed form or the gathers, with the bits of single calls.
    monkeypatch.setenv("APPROX_JAX_CPU_FORMULA", mode)
    designs = [
        multipliers.mbm(11),
        multipliers.mitchell(11),
        multipliers.truncate(11),
        random_multiplier(11, 3),
        multipliers.mitchell(8),
    ]
    stacked = multipliers.stack(designs)
    rng = np.random.default_rng(77)
    x = _values(rng, (6, 700))
    w = _values(rng, (700, 40))
    x[0, 5] = np.inf  # one k-block of one panel on the exact scalar path
    got = np.asarray(jax.jit(lambda a, b: approx_jax.approx_dot(a, b, stacked))(x, w))
    assert got.shape == (len(designs), 6, 40)
    for d, m in enumerate(designs):
        single = approx_jax.approx_dot(x, w, m)
        _assert_bits_equal_nan_aside(got[d], single, f"design {d} ({m.name}) vs a single call")


@pytest.mark.parametrize("design", ["random7", "mbm7", "random6"])
@pytest.mark.parametrize("shape", [(40, 70, 300), (64, 130, 1024), (33, 5000, 140)])
def test_cpu_few_rows_transposed_formulation_is_bit_exact(design, shape):
    # Few rows and many columns at M' >= 6: the CPU kernel runs the transposed
    # problem (out^T = w^T (x) x^T under the transposed LUT, cpu_gemm.cc);
    # products and the sequential order (split-K chunks for K = 5000) must not
    # change, special values included, alone and in a design stack.
    rows, K, N = shape
    rng = np.random.default_rng(rows + K + N)
    mult = {
        "random7": random_multiplier(7, 5),
        "random6": random_multiplier(6, 6),
        "mbm7": multipliers.mbm(7),
    }[design]
    x = (_values(rng, (rows, K)) * np.exp2(rng.integers(-20, 20, (rows, K)))).astype(np.float32)
    w = _values(rng, (K, N))
    x[rng.random(x.shape) < 0.02] = 0.0
    got = np.asarray(jax.jit(lambda a, b: approx_jax.approx_dot(a, b, mult))(x, w))
    # split_k.h: K >= 4096 with a small output is summed in chunks of 1024
    # (each from +0, ascending), the chunk sums added in order.
    chunk = 1024 if K >= 4096 else K
    want = np.zeros((rows, N), np.float32)
    for k0 in range(0, K, chunk):
        part = reference.sequential_dot(
            x[:, k0 : k0 + chunk], w[k0 : k0 + chunk], mult.lut, mult.mbits
        )
        want = part if k0 == 0 else (want + part).astype(np.float32)
    _assert_bits_equal(got, want)
    x[1, 3], w[7, 2], w[9, 4] = np.inf, np.nan, -0.0  # exact scalar path in some k-blocks
    got = np.asarray(jax.jit(lambda a, b: approx_jax.approx_dot(a, b, mult))(x, w))
    if K < 1000:
        want = reference.sequential_dot(x, w, mult.lut, mult.mbits)
        _assert_bits_equal_nan_aside(got, want, "vs the sequential order")
    stacked = multipliers.stack([mult, multipliers.mitchell(7)])
    both = np.asarray(jax.jit(lambda a, b: approx_jax.approx_dot(a, b, stacked))(x, w))
    for d, m in enumerate([mult, multipliers.mitchell(7)]):
        single = approx_jax.approx_dot(x, w, m)
        _assert_bits_equal_nan_aside(both[d], single, f"design {d} vs a single call")


@pytest.mark.parametrize("M", [2, 4, 5, 6, 7])
@pytest.mark.parametrize("shape", [(3, 300, 100), (1, 77, 33), (7, 40, 64)])
def test_cpu_few_rows_lut_lookup_is_bit_exact(M, shape):
    # Few rows: the gather path, which on AVX-512 looks LUT rows of width <= 6
    # up with in-register permutes; a widened (narrower) design in a stack
    # looks up its narrow LUT. Both must keep the SPEC bits and the order.
    rows, K, N = shape
    rng = np.random.default_rng(M * 100 + rows)
    x = _values(rng, (rows, K))
    w = (_values(rng, (K, N)) * np.exp2(rng.integers(-10, 10, (K, N)))).astype(np.float32)
    w[rng.random(w.shape) < 0.02] = -0.0
    mult = random_multiplier(M, M)
    got = np.asarray(jax.jit(lambda a, b: approx_jax.approx_dot(a, b, mult))(x, w))
    _assert_bits_equal(got, reference.sequential_dot(x, w, mult.lut, mult.mbits))
    stacked = multipliers.stack([mult, random_multiplier(7, 1)])
    both = np.asarray(jax.jit(lambda a, b: approx_jax.approx_dot(a, b, stacked))(x, w))
    _assert_bits_equal(both[0], got)


def _chunked_sequential_dot(x, w, mult):
    """reference.sequential_dot in split_k.h's order: K >= 4096 with a small
    output is summed in chunks of 1024 (each from +0), the chunk sums in order."""
    K = x.shape[1]
    chunk = 1024 if K >= 4096 else K
    want = None
    for k0 in range(0, K, chunk):
        part = reference.sequential_dot(
            x[:, k0 : k0 + chunk], w[k0 : k0 + chunk], mult.lut, mult.mbits
        )
        with np.errstate(invalid="ignore"):  # (inf + -inf: NaN, as in the kernel)
            want = part if want is None else (want + part).astype(np.float32)
    return want


@pytest.mark.parametrize("M", [1, 3, 7, 8, 11])
@pytest.mark.parametrize(
    "shape",
    [
        (1, 300, 100),
        (2, 33, 17),
        (4, 64, 5000),
        (3, 4100, 40),
        (900, 70, 1),
        (37, 50, 3),
        (130, 4100, 4),
        (1, 1, 1),
    ],
)
def test_cpu_few_rows_or_columns_are_bit_exact(M, shape):
    # One or two rows: the direct kernel (b's columns in the vector lanes,
    # each product computed from the operands' bits lane by lane); a few
    # more rows, or one to four columns: the gather and tile paths with
    # mostly empty panels or column blocks. Special values of every kind, in
    # either operand, take the scalar paths; the sums keep the sequential
    # order (split-K chunks for K > 4096).
    rows, K, N = shape
    rng = np.random.default_rng(M * 1000 + rows * 7 + N)
    x = (_values(rng, (rows, K)) * np.exp2(rng.integers(-70, 70, (rows, K)))).astype(np.float32)
    w = (_values(rng, (K, N)) * np.exp2(rng.integers(-70, 70, (K, N)))).astype(np.float32)
    special = _special_values()
    for a in (x, w):
        hit = rng.random(a.shape) < 0.01
        a[hit] = rng.choice(special, int(hit.sum()))
    mult = random_multiplier(M, M + 40)
    got = np.asarray(jax.jit(lambda a, b: approx_jax.approx_dot(a, b, mult))(x, w))
    _assert_bits_equal_nan_aside(got, _chunked_sequential_dot(x, w, mult), "vs the reference")
    # A stack of two designs: each keeps the bits of its single call.
    other = multipliers.mbm(M)
    both = np.asarray(
        jax.jit(lambda a, b: approx_jax.approx_dot(a, b, multipliers.stack([mult, other])))(x, w)
    )
    _assert_bits_equal_nan_aside(both[0], got, "stacked design 0")
    _assert_bits_equal_nan_aside(both[1], approx_jax.approx_dot(x, w, other), "stacked design 1")


@pytest.mark.parametrize("M", [2, 7, 11])
@pytest.mark.parametrize("shape", [(2, 1, 1500), (700, 1, 3), (1, 1, 3000), (3000, 1, 1)])
def test_cpu_direct_kernel_products_at_the_exponent_edges(M, shape):
    # K = 1: each output is its one product (from +0), so every product of
    # the direct kernel (one row) and the paths of few columns is compared
    # bit for bit, here with exponents where
    # SPEC flushes (ea + eb - 127 <= 0, before the carry) or overflows to Inf
    # (the carry included), and zeros, subnormals, Inf and NaN among them.
    rows, K, N = shape
    rng = np.random.default_rng(M + rows)

    def edge_values(shape):
        low = underflow_edge_values(rng, shape)  # products around 2^-126
        high = (low.view(np.uint32) + np.uint32(128 << 23)).view(np.float32)  # around 2^128
        v = np.where(rng.random(shape) < 0.5, low, high).astype(np.float32)
        hit = rng.random(shape) < 0.05
        v[hit] = rng.choice(_special_values(), int(hit.sum()))
        return v

    x, w = edge_values((rows, K)), edge_values((K, N))
    mult = random_multiplier(M, M + 90)
    got = np.asarray(jax.jit(lambda a, b: approx_jax.approx_dot(a, b, mult))(x, w))
    _assert_bits_equal_nan_aside(got, reference.sequential_dot(x, w, mult.lut, mult.mbits), "K=1")
    edge = reference.product_bits(x[:, :, None], w[None], mult.lut, mult.mbits)[:, 0, :]
    magnitude = edge & 0x7FFFFFFF
    assert np.any(magnitude == 0) and np.any(magnitude == 0x7F800000)  # both edges hit


def test_cpu_stack_mixing_cheap_closed_forms_and_tiles():
    # Few rows: Mitchell / truncate take their closed form, MBM and a random LUT
    # the tiles (or the transposed problem); a stack mixing them runs as runs
    # of like designs. Every design must keep the bits of its single call,
    # with shared and with per-design activations.
    designs = [
        multipliers.mitchell(7),
        multipliers.mbm(7),
        multipliers.truncate(7),
        random_multiplier(7, 9),
        multipliers.mitchell(7),
    ]
    stacked = multipliers.stack(designs)
    rng = np.random.default_rng(5)
    x = _values(rng, (64, 300))
    w = _values(rng, (300, 256))
    x[3, 7] = np.inf
    got = np.asarray(jax.jit(lambda a, b: approx_jax.approx_dot(a, b, stacked))(x, w))
    xs = _values(rng, (len(designs), 64, 300))
    per = np.asarray(jax.jit(jax.vmap(lambda a, m: approx_jax.approx_dot(a, w, m)))(xs, stacked))
    for d, m in enumerate(designs):
        for out, a in ((got[d], x), (per[d], xs[d])):
            single = approx_jax.approx_dot(a, w, m)
            _assert_bits_equal_nan_aside(out, single, f"design {d} ({m.name}) vs a single call")


# --------------------------------------------------------------------------
# Subnormal partial sums: the kernels add in IEEE float32 (XLA:CPU's threads
# run with denormals flushed; the kernels keep subnormal sums, as the CUDA
# kernels and SPEC section 5's float32 summation do).


def _sequential_dot_flushed(a, b, mult):
    """``reference.sequential_dot`` with every partial sum flushed as under FTZ."""
    p = reference.product_bits(a[:, :, None], b[None], mult.lut, mult.mbits).view(np.float32)
    acc = np.zeros((a.shape[0], b.shape[1]), np.float32)
    for k in range(a.shape[1]):
        acc = (acc + p[:, k, :]).astype(np.float32)
        acc[np.abs(acc) < np.float32(2.0**-126)] = 0.0
    return acc


def test_subnormal_partial_sum_keeps_its_value():
    s = np.float32(2.0**-63)
    x = np.array([[1.5 * s, -1.25 * s]], np.float32)
    w = np.array([[s], [s]], np.float32)
    # 1.5 * 2^-126 - 1.25 * 2^-126 = 2^-128, a subnormal (flushed to 0 under FTZ).
    for m in ("truncate4", "mitchell3"):
        got = np.asarray(approx_jax.approx_dot(x, w, m))
        assert got.view(np.uint32)[0, 0] == np.float32(2.0**-128).view(np.uint32), (m, got)


@pytest.mark.parametrize("shape", [(200, 40, 70), (3, 40, 70), (64, 35, 3), (70, 33, 300)])
def test_subnormal_partial_sums_bit_exact(mult, shape):
    rows, K, N = shape
    rng = np.random.default_rng(rows * K + N)
    x = underflow_edge_values(rng, (rows, K))
    w = underflow_edge_values(rng, (K, N))
    want = reference.sequential_dot(x, w, mult.lut, mult.mbits)
    # The case under test occurs: flushing the partial sums would change results
    # (at M = 1 products are 1 or 1.5 times a power of two: too coarse to cancel
    # into the subnormal range often enough to be sure of it here).
    if mult.mbits > 1:
        assert (_sequential_dot_flushed(x, w, mult) != want).any()
    got = jax.jit(lambda a, b: approx_jax.approx_dot(a, b, mult))(x, w)
    _assert_bits_equal(got, want)
    stacked = multipliers.stack([mult, multipliers.mitchell(3)])
    both = np.asarray(jax.jit(lambda a, b: approx_jax.approx_dot(a, b, stacked))(x, w))
    _assert_bits_equal(both[0], want)
    # Gradients: dx = P(dy, w^T), dw = P(x^T, dy), each in the sequential order.
    dy = underflow_edge_values(rng, (rows, N))
    _, vjp = jax.vjp(lambda a, b: approx_jax.approx_dot(a, b, mult), x, w)
    dx, dw = vjp(jnp.asarray(dy))
    _assert_bits_equal(dx, reference.sequential_dot(dy, w.T, mult.lut, mult.mbits))
    _assert_bits_equal(dw, reference.sequential_dot(x.T, dy, mult.lut, mult.mbits))


@pytest.mark.parametrize("op", ["approx_dot", "approx_matmul"])
@pytest.mark.parametrize("design", ["mbm7", "fp32", "stack"])
def test_preferred_element_type(op, design):
    # bfloat16 operands, float32 result: the float32 products and sums that a
    # bfloat16 result would be rounded from (as lax.dot_general's option).
    rng = np.random.default_rng(3)
    x = jnp.asarray(_values(rng, (2, 5, 12)), jnp.bfloat16)
    w = jnp.asarray(_values(rng, (12, 3)), jnp.bfloat16)
    m = (
        multipliers.stack([multipliers.mbm(7), multipliers.mitchell(5)])
        if design == "stack"
        else design
    )
    fn = getattr(approx_jax, op)
    if design == "fp32":  # the native op with the same option
        native = getattr(jnp, {"approx_dot": "dot", "approx_matmul": "matmul"}[op])
        f32 = functools.partial(
            native, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32
        )
    else:
        f32 = lambda a, b: fn(a.astype(jnp.float32), b.astype(jnp.float32), m)  # noqa: E731
    got = fn(x, w, m, preferred_element_type=jnp.float32)
    assert got.dtype == jnp.float32
    _assert_bits_equal(got, f32(x, w))
    assert fn(x, w, m).dtype == jnp.bfloat16
    vec = fn(x, w[:, 0], m, preferred_element_type=jnp.float32)
    assert vec.dtype == jnp.float32
    _assert_bits_equal(vec, f32(x, w[:, 0]))
    gx, gw = jax.grad(
        lambda a, b: fn(a, b, m, preferred_element_type=jnp.float32).sum(), argnums=(0, 1)
    )(x, w)
    assert gx.dtype == jnp.bfloat16 and gw.dtype == jnp.bfloat16
    with pytest.raises(TypeError, match="preferred_element_type"):
        fn(x.astype(jnp.float32), w, m, preferred_element_type=jnp.bfloat16)
    with pytest.raises(TypeError, match="preferred_element_type"):
        fn(x, w, m, preferred_element_type=jnp.int32)


def test_jax_export_with_disabled_checks():
    rng = np.random.default_rng(0)
    x = _values(rng, (6, 20))
    w = _values(rng, (20, 4))
    f = jax.jit(lambda a, b: approx_jax.approx_dot(a, b, "mbm7"))
    with pytest.raises(ValueError, match="custom calls"):
        jax.export.export(f)(x, w)
    checks = approx_jax.export_disabled_checks()
    exported = jax.export.export(f, disabled_checks=checks)(x, w)
    _assert_bits_equal(exported.call(x, w), f(x, w))
    conv = jax.jit(lambda a: approx_jax.approx_conv(a, np.ones((3, 3, 4, 2), np.float32), "mbm7"))
    xc = _values(rng, (2, 6, 6, 4))
    _assert_bits_equal(jax.export.export(conv, disabled_checks=checks)(xc).call(xc), conv(xc))
    # A traced M >= 10 multiplier adds the LUT facts call.
    g = jax.jit(lambda a, b, m: approx_jax.approx_dot(a, b, m))
    m10 = multipliers.mbm(10)
    exported = jax.export.export(g, disabled_checks=checks)(x, w, m10)
    assert ffi.LUT_FACTS_TARGET in exported.mlir_module()
    _assert_bits_equal(exported.call(x, w, m10), g(x, w, m10))


def test_jax_export_serialises_multiplier_arguments():
    # A Multiplier argument is part of the exported calling convention (its
    # pytree node is registered for serialisation); the deserialised function
    # takes any design of the same width, a stack of the same widths too.
    pytest.importorskip("flatbuffers")  # jax.export's serialisation format
    rng = np.random.default_rng(1)
    x = _values(rng, (6, 20))
    w = _values(rng, (20, 4))
    checks = approx_jax.export_disabled_checks()
    f = jax.jit(lambda a, b, m: approx_jax.approx_dot(a, b, m))
    exported = jax.export.export(f, disabled_checks=checks)(x, w, multipliers.mbm(7))
    restored = jax.export.deserialize(exported.serialize())
    for m in (multipliers.mbm(7), multipliers.mitchell(7), multipliers.truncate(7)):
        _assert_bits_equal(restored.call(x, w, m), approx_jax.approx_dot(x, w, m))
    stack = multipliers.stack([multipliers.mbm(5), multipliers.mitchell(7)])
    g = jax.jit(jax.vmap(lambda m, a, b: approx_jax.approx_dot(a, b, m), in_axes=(0, None, None)))
    restored = jax.export.deserialize(
        jax.export.export(g, disabled_checks=checks)(stack, x, w).serialize()
    )
    _assert_bits_equal(restored.call(stack, x, w), g(stack, x, w))


@pytest.mark.parametrize(
    "op, shapes",
    [
        (lambda a, b: approx_jax.approx_dot(a, b, "mbm7"), ((None, 20), (20, 4))),
        (lambda a, b: approx_jax.approx_matmul(a, b, "mbm7"), ((None, 3, 20), (20, 4))),
        (lambda a, b: approx_jax.multiply(a, b, "mbm7"), ((None, 20), (20,))),
        (lambda a, b: approx_jax.approx_conv(a, b, "mbm7"), ((None, 6, 6, 4), (3, 3, 4, 2))),
    ],
)
def test_shape_polymorphic_export_is_refused_clearly(op, shapes):
    """A symbolic batch dimension (``jax.export.symbolic_shape``) gets a clear
    NotImplementedError naming the operand, not an error from deep inside the
    shape arithmetic."""
    (batch,) = jax.export.symbolic_shape("batch")
    specs = [
        jax.ShapeDtypeStruct(tuple(batch if d is None else d for d in s), jnp.float32)
        for s in shapes
    ]
    checks = approx_jax.export_disabled_checks()
    with pytest.raises(NotImplementedError, match="symbolic shape"):
        jax.export.export(jax.jit(op), disabled_checks=checks)(*specs)


@pytest.mark.parametrize("make", [lambda: multipliers.mbm(11), lambda: random_multiplier(9, 4)])
def test_closed_over_multiplier_reaches_xla_as_a_kernel_lut_constant(make):
    # The ops convert a multiplier's LUT to the kernel format before their
    # inner jit (ops.kernel_lut_of, cached per read-only NumPy LUT): a closed-
    # over multiplier must not leave the conversion of its 4^M entries in the
    # program (XLA constant-folded it at every compile: ~0.8 s per op at
    # M = 11), and the converted entries must be lut.kernel_lut's.
    mult = make()
    x = jnp.ones((4, 8), jnp.float32)
    w = jnp.ones((8, 3), jnp.float32)
    text = jax.jit(lambda a, b: approx_jax.approx_dot(a, b, mult)).lower(x, w).as_text()
    assert "shift_left" not in text and "shift_right" not in text
    want = np.asarray(mult.kernel_lut()).reshape(1, -1)
    np.testing.assert_array_equal(ops.kernel_lut_of(mult), want)
    assert np.shares_memory(ops.kernel_lut_of(mult), ops.kernel_lut_of(mult))  # converted once
    # Passed as an argument, the LUT is traced and converted inside.
    got = jax.jit(lambda a, b, m: approx_jax.approx_dot(a, b, m))(x, w, mult)
    np.testing.assert_array_equal(got, approx_jax.approx_dot(x, w, mult))


_SCRATCH_PROBE = """
import gc, sys
import jax, jax.numpy as jnp, numpy as np
import approx_jax
def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) // 1024 for l in f if l.startswith("VmRSS"))
m = approx_jax.multipliers.mbm(9)
rng = np.random.default_rng(0)
x = jnp.asarray(rng.standard_normal((100_000, 64)), jnp.float32)
w = jnp.asarray(rng.standard_normal((64, 640)), jnp.float32)
approx_jax.approx_dot(x[:64], w, m).block_until_ready()
gc.collect()
before = rss_mb()
y = approx_jax.approx_dot(x, w, m).block_until_ready()
assert np.isfinite(float(y[-1, -1]))
del y
gc.collect()
print(rss_mb() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_cpu_gemm_scratch_does_not_grow_with_the_rows(tmp_path):
    # The kernel keeps its scratch per thread between calls (XLA's pool
    # threads live as long as the process): a task's pack of a is bounded
    # (kPackBudget), not sized by its rows. Before, this 100000x64x640 product
    # kept about 590 MB after its result was freed; now a few tens of MB.
    # The approx_jax this process imported (installed, or built in place),
    # not a source checkout in the working directory.
    home = str(pathlib.Path(approx_jax.__file__).resolve().parents[1])
    out = subprocess.run(
        [sys.executable, "-c", _SCRATCH_PROBE],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": home},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    retained_mb = int(out.stdout.split()[-1])
    assert retained_mb < 150, f"{retained_mb} MB kept after the result was freed"
