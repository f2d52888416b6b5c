"""vmap over stacks of multiplier designs: one custom call, same bits."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import approx_jax
from approx_jax import multipliers

DESIGNS = [multipliers.mbm(7), multipliers.mitchell(7), multipliers.truncate(5), multipliers.mbm(3)]


@pytest.fixture(scope="module")
def stack():
    return multipliers.stack(DESIGNS)


def _bits(x):
    return np.asarray(x, np.float32).view(np.uint32)


def _singles(stack):
    return multipliers.unstack(stack)


def _hlo(fn, *args):
    return jax.jit(fn).lower(*args).as_text()


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((6, 13)).astype(np.float32)
    w = rng.standard_normal((13, 5)).astype(np.float32)
    return x, w


OPS = {
    "dot": lambda x, w, m: approx_jax.approx_dot(x, w, m),
    "matmul": lambda x, w, m: approx_jax.approx_matmul(x[None], w[None], m),
    "multiply": lambda x, w, m: approx_jax.multiply(x[:, :5], w[:6], m),
    "conv": lambda x, w, m: approx_jax.approx_conv(
        x.reshape(1, 6, 13, 1), w[:9].reshape(3, 3, 1, 5), m, window_strides=(1, 1), padding="SAME"
    ),
}


@pytest.mark.parametrize("op", sorted(OPS))
def test_vmapped_equals_per_design(stack, op):
    x, w = _data()
    fn = OPS[op]
    batched = jax.jit(jax.vmap(fn, in_axes=(None, None, 0)))(x, w, stack)
    for d, single in enumerate(_singles(stack)):
        np.testing.assert_array_equal(_bits(batched[d]), _bits(fn(x, w, single)))
    # A stacked multiplier passed directly gives the same leading design axis.
    np.testing.assert_array_equal(_bits(fn(x, w, stack)), _bits(batched))


@pytest.mark.parametrize("op", sorted(OPS))
def test_vmapped_op_is_one_custom_call_without_loop(stack, op):
    x, w = _data()
    text = _hlo(jax.vmap(OPS[op], in_axes=(None, None, 0)), x, w, stack)
    assert text.count("stablehlo.custom_call") == 1, text
    assert "stablehlo.while" not in text
    # The shared activations are not copied per design (no f32 broadcast to
    # a leading design axis of size 4).
    assert not re.search(r"broadcast_in_dim.*-> tensor<4x[0-9x]*xf32>", text), text


def test_vmap_grad_and_grad_vmap(stack):
    x, w = _data(1)

    def loss(w, m):
        return jnp.sum(approx_jax.approx_dot(x, w, m) ** 2)

    per_design = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))(w, stack)
    for d, single in enumerate(_singles(stack)):
        np.testing.assert_array_equal(_bits(per_design[d]), _bits(jax.grad(loss)(w, single)))
    text = _hlo(jax.vmap(jax.grad(loss), in_axes=(None, 0)), w, stack)
    assert "stablehlo.while" not in text
    assert text.count("stablehlo.custom_call") == 2  # forward and dw (x is a constant)

    total = jax.grad(lambda w: jax.vmap(loss, in_axes=(None, 0))(w, stack).sum())(w)
    want = sum(np.asarray(jax.grad(loss)(w, s), np.float64) for s in _singles(stack))
    np.testing.assert_allclose(total, want, rtol=1e-5, atol=1e-5)


def test_mixed_batching_parameters_per_design(stack):
    # One set of weights per design (the sweep case) and nested vmaps.
    x, w = _data(2)
    ws = jnp.stack([w * (d + 1) for d in range(len(DESIGNS))])
    out = jax.jit(jax.vmap(lambda w, m: approx_jax.approx_dot(x, w, m)))(ws, stack)
    for d, single in enumerate(_singles(stack)):
        np.testing.assert_array_equal(_bits(out[d]), _bits(approx_jax.approx_dot(x, ws[d], single)))
    xs = jnp.stack([x, -x, 2 * x])
    nested = jax.vmap(lambda m: jax.vmap(lambda x: approx_jax.approx_dot(x, w, m))(xs))(stack)
    assert nested.shape == (len(DESIGNS), 3, 6, 5)
    for d, single in enumerate(_singles(stack)):
        for i in range(3):
            np.testing.assert_array_equal(
                _bits(nested[d, i]), _bits(approx_jax.approx_dot(xs[i], w, single))
            )
    nested_t = jax.vmap(lambda x: jax.vmap(lambda m: approx_jax.approx_dot(x, w, m))(stack))(xs)
    np.testing.assert_array_equal(_bits(nested_t), _bits(jnp.swapaxes(nested, 0, 1)))


@pytest.mark.parametrize("order", ["designs_outside", "examples_outside"])
def test_nested_vmap_copies_neither_luts_nor_shared_operands(order):
    # Per-example gradients of a sweep: a vmap over examples that leaves the
    # LUT alone goes to the GEMM's batch axis, not the design axis. On the
    # design axis every design's LUT was copied once per example and the
    # shared weights once per design: 512 MiB of temporaries here (M = 11).
    names = ["mbm11", "mitchell11"]
    rng = np.random.default_rng(9)
    xs = rng.standard_normal((16, 4, 16)).astype(np.float32)
    w = rng.standard_normal((16, 8)).astype(np.float32)

    def loss(w, x, m):
        return jnp.sum(jnp.tanh(approx_jax.approx_dot(x, w, m)))

    per_example = jax.vmap(jax.grad(loss), in_axes=(None, 0, None))
    if order == "designs_outside":
        fn = jax.jit(lambda xs: jax.vmap(lambda m: per_example(w, xs, m))(multipliers.stack(names)))
    else:
        fn = jax.jit(
            lambda xs: jnp.swapaxes(
                jax.vmap(
                    lambda x: jax.vmap(lambda m: jax.grad(loss)(w, x, m))(multipliers.stack(names))
                )(xs),
                0,
                1,
            )
        )
    compiled = fn.lower(xs).compile()
    analysis = compiled.memory_analysis()
    if analysis is not None:
        assert analysis.temp_size_in_bytes < 4 << 20, analysis.temp_size_in_bytes
    assert " while(" not in compiled.as_text()
    got = fn(xs)
    one = jax.jit(jax.grad(loss), static_argnums=2)
    for d, name in enumerate(names):
        for i in range(0, 16, 5):
            np.testing.assert_array_equal(_bits(got[d, i]), _bits(one(w, xs[i], name)))


def test_stack_pads_to_common_width(stack):
    assert stack.mbits == 7
    x, w = _data(3)
    np.testing.assert_array_equal(
        _bits(jax.vmap(lambda m: approx_jax.approx_dot(x, w, m))(stack)[3]),
        _bits(approx_jax.approx_dot(x, w, multipliers.mbm(3))),
    )


@pytest.mark.parametrize("op", sorted(OPS))
def test_closed_over_stack_reaches_xla_as_kernel_lut_constants(op):
    # vmap over a stack the program closes over (a sweep's designs,
    # approximate(fn, stack)) hands the ops a batched LUT whose value is the
    # stack's NumPy array: ops.kernel_lut_of's vmap rule converts it in NumPy,
    # so no conversion of 4^M entries per design is left for XLA to
    # constant-fold at every compile (about 3 s for three M = 11 designs).
    designs = [multipliers.mbm(9), multipliers.mitchell(8), multipliers.truncate(6)]
    closed = multipliers.stack(designs)
    x, w = _data(5)
    fn = OPS[op]
    over_closed = jax.jit(lambda x, w: jax.vmap(lambda d: fn(x, w, d))(closed))
    text = over_closed.lower(x, w).as_text()
    assert "shift_left" not in text and "shift_right" not in text, op
    got = over_closed(x, w)
    for d, single in enumerate(designs):
        np.testing.assert_array_equal(_bits(got[d]), _bits(fn(x, w, single)))
    # A stack passed straight to the op (vmapped inside).
    direct = jax.jit(lambda x, w: fn(x, w, closed))
    assert "shift_right" not in direct.lower(x, w).as_text()
    np.testing.assert_array_equal(_bits(direct(x, w)), _bits(got))
    # A stack passed as an argument is traced, and converted inside.
    as_argument = jax.jit(lambda x, w, s: jax.vmap(lambda d: fn(x, w, d))(s))
    assert "shift_right" in as_argument.lower(x, w, closed).as_text()
    np.testing.assert_array_equal(_bits(as_argument(x, w, closed)), _bits(got))


def test_closed_over_stack_under_nested_vmap_and_grad():
    # The conversion rule sits at the design level of nested vmaps, and grad
    # through the vmapped op is unchanged (the LUT is never differentiated).
    closed = multipliers.stack([multipliers.mbm(8), multipliers.mitchell(8)])
    rng = np.random.default_rng(6)
    xs = rng.standard_normal((3, 4, 7)).astype(np.float32)
    w = rng.standard_normal((7, 2)).astype(np.float32)

    def loss(w, m):
        per_batch = jax.vmap(lambda x: approx_jax.approx_dot(x, w, m))(xs)
        return jnp.sum(per_batch**2)

    grads = jax.jit(lambda w: jax.vmap(lambda d: jax.grad(loss)(w, d))(closed))(w)
    for d, single in enumerate(multipliers.unstack(closed)):
        np.testing.assert_array_equal(_bits(grads[d]), _bits(jax.grad(loss)(w, single)))
    # approximate(fn, stack) sweeps an unmodified function the same way.
    swept = jax.jit(approx_jax.approximate(lambda w: jnp.dot(xs, w), closed))
    assert "shift_right" not in swept.lower(w).as_text()
    for d, single in enumerate(multipliers.unstack(closed)):
        np.testing.assert_array_equal(
            _bits(swept(w)[d]), _bits(approx_jax.approx_dot(xs, w, single))
        )
