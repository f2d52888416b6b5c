"""Input validation: every public entry point rejects bad input with a
TypeError/ValueError that names the offending argument, and never crashes.

The FFI handlers themselves validate their operands too: invalid calls made
directly through ``approx_jax._src.ffi`` must surface as Python exceptions
(an ``ffi::Error`` from the handler), never as an abort.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import approx_jax
from approx_jax._src import ffi
from approx_jax._src import lut as lut_lib
from approx_jax._src import multipliers as mult
from approx_jax._src import ops as _ops

try:
    from approx_jax._src.conv import approx_conv
except ImportError:  # conv not built yet
    approx_conv = None


def _public(name):
    return getattr(approx_jax, name, None) or getattr(_ops, name)


multiply = _public("multiply")
approx_dot = _public("approx_dot")
approx_matmul = _public("approx_matmul")

needs_conv = pytest.mark.skipif(approx_conv is None, reason="approx_conv not available")

M3 = mult.mbm(3)
F = np.ones((2, 3), np.float32)
W = np.ones((3, 4), np.float32)


def names(arg: str) -> str:
    """Regex: the message names the argument as a whole word (e.g. 'x' or `x`)."""
    return rf"(?<![A-Za-z0-9_]){re.escape(arg)}(?![A-Za-z0-9_])"


# --------------------------------------------------------------------------
# Positive controls (the bad-input tests below must not pass for a trivial reason).


def test_valid_calls_work():
    assert multiply(F, F, M3).shape == (2, 3)
    assert approx_dot(F, W, M3).shape == (2, 4)
    assert approx_matmul(F[None], W, M3).shape == (1, 2, 4)
    assert multiply(F, F, "mbm3").shape == (2, 3)
    assert approx_dot(F, W, "mitchell5", backward="exact").shape == (2, 4)


# --------------------------------------------------------------------------
# dtypes

BAD_DTYPES = (np.int32, np.bool_, np.uint8, np.complex64)


@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(
    "op, arg, call",
    [
        ("multiply", "a", lambda bad: multiply(bad, F, M3)),
        ("multiply", "b", lambda bad: multiply(F, bad, M3)),
        ("approx_dot", "x", lambda bad: approx_dot(bad, W, M3)),
        ("approx_dot", "w", lambda bad: approx_dot(F, bad.reshape(3, 2), M3)),
        ("approx_matmul", "a", lambda bad: approx_matmul(bad, W, M3)),
        ("approx_matmul", "b", lambda bad: approx_matmul(F, bad.reshape(3, 2), M3)),
    ],
)
def test_non_float_dtype_rejected(op, arg, call, dtype):
    bad = np.ones((2, 3), dtype)
    with pytest.raises(TypeError, match=names(arg)):
        call(bad)


@pytest.mark.parametrize("dtype", (jnp.float32, jnp.bfloat16), ids=lambda d: jnp.dtype(d).name)
def test_python_int_scalar_is_a_weak_float(dtype):
    # As in `x * 2`: a Python int takes the other operand's dtype like 2.0 does
    # (a bool or an integer array is still refused, above).
    x = jnp.asarray([1.5, -3.0, 0.75], dtype)
    pairs = ((multiply(x, 2, M3), multiply(x, 2.0, M3)), (multiply(2, x, M3), multiply(2.0, x, M3)))
    for got, want in pairs:
        assert got.dtype == jnp.dtype(dtype)
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    with pytest.raises(TypeError, match="b must"):
        multiply(x, True, M3)


@needs_conv
@pytest.mark.parametrize("dtype", (np.int32, np.bool_), ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("arg", ("x", "kernel"))
def test_conv_non_float_dtype_rejected(arg, dtype):
    x = np.ones((1, 4, 4, 2), np.float32)
    w = np.ones((3, 3, 2, 1), np.float32)
    if arg == "x":
        x = x.astype(dtype)
    else:
        w = w.astype(dtype)
    with pytest.raises(TypeError, match=names(arg)):
        approx_conv(x, w, M3)


# --------------------------------------------------------------------------
# ranks, contracting dimensions, broadcasting


@pytest.mark.parametrize(
    "arg, x, w",
    [
        ("x", np.float32(1.0), W),
        ("w", F, np.ones((1, 3, 4), np.float32)),
        ("w", F, np.float32(2.0)),
    ],
)
def test_dot_rank_errors(arg, x, w):
    with pytest.raises(ValueError, match=names(arg)):
        approx_dot(x, w, M3)


@pytest.mark.parametrize(
    "arg, a, b",
    [
        ("a", np.float32(1.0), W),
        ("b", F, np.float32(1.0)),
    ],
)
def test_matmul_rank_errors(arg, a, b):
    with pytest.raises(ValueError, match=names(arg)):
        approx_matmul(a, b, M3)


def test_mismatched_k():
    with pytest.raises(ValueError, match=r"K|contract"):
        approx_dot(F, np.ones((4, 5), np.float32), M3)
    with pytest.raises(ValueError, match=r"K|contract"):
        approx_matmul(np.ones((2, 2, 3), np.float32), np.ones((2, 4, 5), np.float32), M3)


def test_broadcast_failures():
    with pytest.raises(ValueError, match="broadcast"):
        multiply(np.ones(3, np.float32), np.ones(4, np.float32), M3)
    with pytest.raises(ValueError, match="broadcast"):
        approx_matmul(np.ones((2, 3, 4), np.float32), np.ones((3, 4, 5), np.float32), M3)


# --------------------------------------------------------------------------
# multipliers: widths, names, backward modes

BAD_M = (0, 12, -1, 2.5, "7", None, True)


@pytest.mark.parametrize("family", ("mbm", "mitchell", "truncate"))
@pytest.mark.parametrize("M", BAD_M, ids=repr)
def test_builtin_bad_width(family, M):
    with pytest.raises((TypeError, ValueError), match=r"\bM\b|mbits|width"):
        getattr(mult, family)(M)


@pytest.mark.parametrize("M", [m for m in BAD_M if m is not None], ids=repr)  # None: inferred
def test_from_lut_bad_width(M):
    with pytest.raises((TypeError, ValueError), match=r"\bM\b|mbits|width"):
        mult.from_lut(np.zeros(16, np.uint8), M)


@pytest.mark.parametrize("name", ("foo", "mbm12", "mbm0", "mbm", "mitchell_12", "", "mbm7x"))
@pytest.mark.parametrize("op", ("multiply", "approx_dot", "approx_matmul"))
def test_unknown_multiplier_name(op, name):
    fn = {
        "multiply": lambda m: multiply(F, F, m),
        "approx_dot": lambda m: approx_dot(F, W, m),
        "approx_matmul": lambda m: approx_matmul(F, W, m),
    }[op]
    with pytest.raises(
        ValueError, match=re.escape(repr(name.strip())) if name.strip() else "multiplier"
    ):
        fn(name)


@pytest.mark.parametrize(
    "bad",
    (3, 7.0, None, np.zeros(16, np.uint8), object()),
    ids=("int", "float", "None", "uint8_array", "object"),
)
def test_multiplier_wrong_type(bad):
    with pytest.raises(TypeError, match=r"[Mm]ultiplier"):
        approx_dot(F, W, bad)


@pytest.mark.parametrize("backward", ("approximate", "", "APPROX", None, 1, "fp32"), ids=repr)
@pytest.mark.parametrize("op", ("multiply", "approx_dot", "approx_matmul", "approx_conv"))
def test_bad_backward(op, backward):
    if op == "approx_conv":
        if approx_conv is None:
            pytest.skip("approx_conv not available")
        call = lambda: approx_conv(
            np.ones((1, 4, 4, 2), np.float32),
            np.ones((3, 3, 2, 1), np.float32),
            M3,
            backward=backward,
        )  # noqa: E731,E501
    else:
        call = {
            "multiply": lambda: multiply(F, F, M3, backward=backward),
            "approx_dot": lambda: approx_dot(F, W, M3, backward=backward),
            "approx_matmul": lambda: approx_matmul(F, W, M3, backward=backward),
        }[op]
    with pytest.raises(ValueError, match="backward"):
        call()


# --------------------------------------------------------------------------
# LUTs (from_lut) and stacks


@pytest.mark.parametrize(
    "array, M, exc, pattern",
    [
        (np.zeros(15, np.uint8), 2, ValueError, r"entries|4\*\*M|shape"),
        (np.zeros(16, np.uint8), 3, ValueError, r"entries|4\*\*M|shape"),
        (np.zeros(17, np.uint8), None, ValueError, r"entries|4\*\*M"),
        (np.zeros((2, 2, 16), np.uint8), 2, ValueError, r"shape|rank|entries"),
        (np.zeros((0, 16), np.uint8), 2, ValueError, r"design|empty|at least"),
        (np.zeros(16, np.bool_), 2, TypeError, r"dtype|bool"),
        (np.zeros(16, np.complex64), 2, TypeError, r"dtype|complex"),
        (np.array(["a"] * 16), 2, TypeError, r"dtype"),
        (np.full(16, 0x10, np.uint8), 2, ValueError, r"range|entry"),  # bits outside c|r
        (np.full(16, 0x40, np.uint8), 2, ValueError, r"range|entry"),
        (np.full(16, -1, np.int32), 2, ValueError, r"range|entry"),
        (np.full(16, 0x8000, np.uint16), 2, ValueError, r"range|entry"),  # uint16 carry for M<=7
        (np.full(4**8, 0x4000, np.uint16), 8, ValueError, r"range|entry"),
        (np.full(4**8, 0x0100, np.uint16), 8, ValueError, r"range|entry"),  # r needs > 8 bits
        (np.full(16, 5.0, np.float32), 2, ValueError, r"\[1, 4\)|range"),  # products out of [1, 4)
        (np.full(16, 0.5, np.float32), 2, ValueError, r"\[1, 4\)|range"),
        (np.full(16, np.nan, np.float32), 2, ValueError, r"\[1, 4\)|finite"),
        (np.full(16, np.inf, np.float32), 2, ValueError, r"\[1, 4\)|finite"),
        (np.full(15, 1.5, np.float32), 2, ValueError, r"entries"),
    ],
    ids=lambda v: v if isinstance(v, str | int | type(None)) else None,
)
def test_from_lut_rejects(array, M, exc, pattern):
    with pytest.raises(exc, match=pattern):
        mult.from_lut(array, M)


def test_from_lut_accepts_both_stored_formats():
    """Positive control: uint8 c<<7|r for M <= 7, uint16 c<<15|r for 8..11."""
    m7 = mult.from_lut(np.full(4**7, 0x80 | 0x7F, np.uint8), 7)
    m8 = mult.from_lut(np.full(4**8, 0x8000 | 0xFF, np.uint16), 8)
    assert m7.mbits == 7 and m8.mbits == 8
    # c=1, r=all ones: 1.0 * 1.0 -> 2 * (2 - 2^-M)
    assert float(multiply(np.float32(1), np.float32(1), m7)) == 2 * (2 - 2.0**-7)
    assert float(multiply(np.float32(1), np.float32(1), m8)) == 2 * (2 - 2.0**-8)


def test_stack_errors():
    with pytest.raises(ValueError, match="at least one|empty"):
        mult.stack([])
    with pytest.raises(ValueError, match="exact"):
        mult.stack([mult.mbm(3), mult.exact()])
    with pytest.raises(ValueError, match=r"\bnames?\b"):
        mult.from_lut(np.zeros((2, 16), np.uint8), 2, name=("a", "b", "c"))
    with pytest.raises((TypeError, ValueError), match=r"[Mm]ultiplier|name"):
        mult.stack([mult.mbm(3), 42])


def _raw_multiplier(lut, mbits):
    """A Multiplier built without going through from_lut (its own validation only)."""
    return mult.Multiplier(lut, "hand-made", mbits)


@pytest.mark.parametrize(
    "lut, mbits",
    [
        (np.zeros(16, np.uint8), 3),  # 4**2 entries labelled M=3
        (np.zeros((2, 64), np.uint8), 2),  # stacked LUT rows of the wrong size
        (np.zeros((2, 2, 16), np.uint8), 2),  # rank-3 LUT
        (np.zeros(16, np.float32), 2),  # not an integer LUT
    ],
    ids=("size", "stacked-size", "rank3", "float"),
)
def test_inconsistent_multiplier_rejected_with_value_error(lut, mbits):
    """A hand-built Multiplier whose LUT does not fit its width must give a
    TypeError/ValueError (at construction or at the op), not a runtime error
    from inside the custom call."""
    with pytest.raises((TypeError, ValueError), match=r"LUT|lut|entries|M="):
        m = _raw_multiplier(lut, mbits)
        approx_dot(F, W, m)


# --------------------------------------------------------------------------
# C functional models


BROKEN_SOURCE = "float broken_mul(float a, float b) { return a * b }\n"  # missing ';'


def test_broken_c_model_reports_compiler_error(isolated_cache, require_c_compiler):
    with pytest.raises(ValueError) as info:
        mult.from_c(BROKEN_SOURCE, "broken_mul", 3)
    message = str(info.value)
    assert "error" in message
    # The compiler's own diagnostic travels in the message.
    assert re.search(r"expected ['‘]?;['’]?", message), message


def test_c_model_missing_function(isolated_cache, require_c_compiler):
    source = "float some_mul(float a, float b) { return a * b; }\n"
    with pytest.raises(ValueError, match="other_mul"):
        mult.from_c(source, "other_mul", 3)


@pytest.mark.parametrize(
    "body", ("return 5.0f;", "return 0.5f;", "return a * b * (1.0f / 0.0f);", "return 0.0f / 0.0f;")
)
def test_c_model_out_of_range_products(isolated_cache, require_c_compiler, body):
    source = f"float bad_mul(float a, float b) {{ {body} }}\n"
    with pytest.raises(ValueError, match=r"\[1, 4\)"):
        mult.from_c(source, "bad_mul", 2)


def test_c_model_bad_function_name(isolated_cache, require_c_compiler):
    with pytest.raises(ValueError, match="function"):
        mult.from_c("float f(float a, float b) { return a * b; }\n", "f; int x", 2)


# --------------------------------------------------------------------------
# convolution parameters

X4 = np.ones((1, 5, 5, 4), np.float32)
K4 = np.ones((3, 3, 4, 2), np.float32)


@needs_conv
@pytest.mark.parametrize(
    "kwargs, lhs, rhs, exc, pattern",
    [
        ({}, np.ones((5, 4), np.float32), np.ones((3, 4), np.float32), ValueError, r"\bx\b"),
        ({}, X4, np.ones((3, 4, 2), np.float32), ValueError, "kernel"),
        ({}, X4, np.ones((3, 3, 3, 2), np.float32), ValueError, r"kernel|feature"),
        ({"feature_group_count": 0}, X4, K4, ValueError, "feature_group_count"),
        ({"feature_group_count": 3}, X4, K4, ValueError, "feature_group_count"),
        ({"feature_group_count": 2.0}, X4, K4, TypeError, "feature_group_count"),
        (
            {"feature_group_count": 2},
            X4,
            np.ones((3, 3, 2, 3), np.float32),
            ValueError,
            "feature_group_count",
        ),
        ({"padding": "FOO"}, X4, K4, ValueError, "padding"),
        ({"padding": [(1, 1)]}, X4, K4, ValueError, "padding"),
        ({"padding": [(1, 1, 1), (1, 1, 1)]}, X4, K4, ValueError, "padding"),
        ({"window_strides": (1,)}, X4, K4, ValueError, "window_strides"),
        ({"window_strides": (0, 1)}, X4, K4, ValueError, "window_strides"),
        ({"window_strides": (-1, 1)}, X4, K4, ValueError, "window_strides"),
        ({"window_strides": (1.5, 1)}, X4, K4, (TypeError, ValueError), "window_strides"),
        ({"lhs_dilation": (0, 1)}, X4, K4, ValueError, "lhs_dilation"),
        ({"rhs_dilation": (1, 0)}, X4, K4, ValueError, "rhs_dilation"),
        ({"rhs_dilation": (1, 1, 1)}, X4, K4, ValueError, "rhs_dilation"),
        ({"dimension_numbers": ("NCHW", "OIHW")}, X4, K4, (TypeError, ValueError), r"dimension"),
        (
            {"dimension_numbers": ("NXYC", "HWIO", "NHWC")},
            X4,
            K4,
            (TypeError, ValueError),
            r"dimension|NXYC",
        ),
        ({"batch_group_count": 2}, X4, K4, ValueError, "batch_group_count"),
    ],
)
def test_conv_parameter_errors(kwargs, lhs, rhs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        approx_conv(lhs, rhs, M3, **kwargs)


@needs_conv
def test_conv_valid_control():
    assert approx_conv(X4, K4, M3, padding="SAME").shape == (1, 5, 5, 2)


# --------------------------------------------------------------------------
# FFI handlers receiving invalid operands: exceptions, never aborts.


def _klut(M, designs=1):
    return jnp.asarray(lut_lib.kernel_lut_numpy(np.zeros((designs, 4**M), np.uint8), M))


def _f32(*shape):
    return jnp.ones(shape, jnp.float32)


GEMM_BAD = {
    "lut-too-small": (lambda: (_f32(1, 1, 2, 3), _f32(1, 1, 3, 4), _klut(2)[:, :15], 2), "entries"),
    "lut-too-big": (lambda: (_f32(1, 1, 2, 3), _f32(1, 1, 3, 4), _klut(3), 2), "entries"),
    "lut-float": (lambda: (_f32(1, 1, 2, 3), _f32(1, 1, 3, 4), _f32(1, 16), 2), "uint32"),
    "lut-uint16": (
        lambda: (_f32(1, 1, 2, 3), _f32(1, 1, 3, 4), jnp.zeros((1, 16), jnp.uint16), 2),
        "uint32",
    ),
    "lut-rank1": (lambda: (_f32(1, 1, 2, 3), _f32(1, 1, 3, 4), _klut(2)[0], 2), "rank"),
    "mbits-0": (
        lambda: (_f32(1, 1, 2, 3), _f32(1, 1, 3, 4), jnp.zeros((1, 1), jnp.uint32), 0),
        "mbits",
    ),
    "mbits-12": (
        lambda: (_f32(1, 1, 2, 3), _f32(1, 1, 3, 4), jnp.zeros((1, 16), jnp.uint32), 12),
        "mbits",
    ),
    "mbits-neg": (
        lambda: (_f32(1, 1, 2, 3), _f32(1, 1, 3, 4), jnp.zeros((1, 16), jnp.uint32), -3),
        "mbits",
    ),
    "mbits-huge": (
        lambda: (_f32(1, 1, 2, 3), _f32(1, 1, 3, 4), jnp.zeros((1, 16), jnp.uint32), 40),
        "mbits",
    ),
    "k-mismatch": (lambda: (_f32(1, 1, 2, 3), _f32(1, 1, 4, 4), _klut(2), 2), "M/K/N|inconsistent"),
    "designs-mismatch": (lambda: (_f32(2, 1, 2, 3), _f32(3, 1, 3, 4), _klut(2), 2), "design|axes"),
    "lut-designs-mismatch": (
        lambda: (_f32(2, 1, 2, 3), _f32(1, 1, 3, 4), _klut(2, 3), 2),
        "design|axes",
    ),
    "batch-mismatch": (lambda: (_f32(1, 2, 2, 3), _f32(1, 3, 3, 4), _klut(2), 2), "batch|axes"),
    "rank3-operands": (lambda: (_f32(1, 2, 3), _f32(1, 3, 4), _klut(2), 2), "rank"),
    "int-operands": (
        lambda: (jnp.ones((1, 1, 2, 3), jnp.int32), _f32(1, 1, 3, 4), _klut(2), 2),
        "float32",
    ),
}


def _raw_gemm(a, b, klut, mbits):
    """``ffi.gemm_call`` without its Python-side shape logic getting in the way."""
    if a.ndim == 4 and b.ndim == 4 and klut.ndim == 2:
        return ffi.gemm_call(a, b, klut, mbits)
    designs = max(a.shape[0], b.shape[0], klut.shape[0])
    shape = (designs, 1, a.shape[-2], b.shape[-1])
    facts = jnp.full(klut.shape[:1], ffi.LUT_FACTS_UNKNOWN, jnp.int32)
    return jax.ffi.ffi_call(ffi.GEMM_TARGET, jax.ShapeDtypeStruct(shape, jnp.float32))(
        a, b, klut, facts, mbits=np.int32(mbits), family=np.int32(ffi.FAMILY_UNKNOWN)
    )


@pytest.mark.parametrize("jit", (False, True), ids=("eager", "jit"))
@pytest.mark.parametrize("case", sorted(GEMM_BAD))
def test_gemm_handler_rejects_invalid_operands(case, jit):
    make, pattern = GEMM_BAD[case]
    a, b, klut, mbits = make()
    fn = lambda a, b, k: _raw_gemm(a, b, k, mbits)
    if jit:
        fn = jax.jit(fn)
    with pytest.raises(Exception, match=pattern) as info:
        jax.block_until_ready(fn(a, b, klut))
    assert not isinstance(info.value, AssertionError)


MUL_BAD = {
    "lut-too-small": (lambda: (_f32(1, 5), _f32(1, 5), _klut(2)[:, :15], 2), "entries"),
    "lut-float": (lambda: (_f32(1, 5), _f32(1, 5), _f32(1, 16), 2), "uint32"),
    "mbits-12": (lambda: (_f32(1, 5), _f32(1, 5), jnp.zeros((1, 16), jnp.uint32), 12), "mbits"),
    "n-mismatch": (lambda: (_f32(1, 5), _f32(1, 6), _klut(2), 2), "shape"),
    "designs-mismatch": (lambda: (_f32(2, 5), _f32(3, 5), _klut(2), 2), "design"),
    "rank1": (lambda: (jnp.ones((5,), jnp.float32), _f32(1, 5), _klut(2), 2), "shape"),
}


def _raw_multiply(a, b, klut, mbits):
    designs = max(a.shape[0] if a.ndim == 2 else 1, b.shape[0], klut.shape[0])
    shape = (designs, a.shape[-1])
    return jax.ffi.ffi_call(ffi.MULTIPLY_TARGET, jax.ShapeDtypeStruct(shape, jnp.float32))(
        a, b, klut, mbits=np.int32(mbits)
    )


@pytest.mark.parametrize("case", sorted(MUL_BAD))
def test_multiply_handler_rejects_invalid_operands(case):
    make, pattern = MUL_BAD[case]
    a, b, klut, mbits = make()
    with pytest.raises(Exception, match=pattern) as info:
        jax.block_until_ready(_raw_multiply(a, b, klut, mbits))
    assert not isinstance(info.value, AssertionError)


def test_handler_survives_garbage_kernel_lut():
    """Kernel-format entries with stray high bits must not crash (any result is fine)."""
    klut = jnp.full((1, 16), 0xFFFFFFFF, jnp.uint32)
    a = jnp.asarray(np.float32([1.5, 3e38, -2.0, 1e-30, np.inf]).reshape(1, 1, 1, 5))
    b = jnp.asarray(np.float32([1.5, 3e38, 7.0, 1e-30, 2.0]).reshape(1, 1, 5, 1))
    jax.block_until_ready(ffi.gemm_call(a, b, klut, 2))
    jax.block_until_ready(ffi.multiply_call(a.reshape(1, 5), b.reshape(1, 5), klut, 2))


@pytest.mark.parametrize("family", [-2, 4, 1 << 20])
def test_gemm_handler_rejects_an_unknown_family(family):
    a, b, klut = _f32(1, 1, 2, 3), _f32(1, 1, 3, 4), _klut(2)
    with pytest.raises(Exception, match="family") as info:  # noqa: PT011 - XLA's error type
        jax.block_until_ready(ffi.gemm_call(a, b, klut, 2, family=family))
    assert not isinstance(info.value, AssertionError)


def test_error_then_success():
    """A rejected call leaves the runtime usable."""
    make, _ = GEMM_BAD["lut-too-small"]
    with pytest.raises(Exception):  # noqa: B017 - any runtime error, not a crash
        jax.block_until_ready(_raw_gemm(*make()))
    assert approx_dot(F, W, M3).shape == (2, 4)


def test_a_multiplier_rebuilt_with_a_bad_lut_is_refused_at_trace_time():
    # tree_unflatten skips the constructors' checks (a tree_map, an optimizer
    # touching the pytree): the ops check the LUT again before any kernel.
    m5 = mult.mbm(5)
    leaves, treedef = jax.tree_util.tree_flatten(m5)
    assert len(leaves) == 1
    too_few = jax.tree_util.tree_unflatten(treedef, [mult.mbm(3).lut])
    with pytest.raises(ValueError, match="64 entries per design, expected 4\\*\\*M = 1024"):
        approx_jax.approx_dot(F, W, too_few)
    as_floats = jax.tree_util.tree_unflatten(treedef, [np.asarray(m5.lut, np.float32)])
    with pytest.raises(TypeError, match="must hold integers"):
        approx_jax.approx_dot(F, W, as_floats)


def test_missing_native_module_names_a_shadowed_installation(monkeypatch, tmp_path):
    # A source checkout without a build, imported ahead of an installed
    # approx_jax (`python -m pytest` in the checkout): the error says so
    # instead of asking to install what is installed.
    from approx_jax._src import ffi

    installed = tmp_path / "site-packages" / "approx_jax"
    installed.mkdir(parents=True)
    (installed / "_cpu_kernels.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    monkeypatch.setattr(
        ffi, "_load_error", ImportError("No module named 'approx_jax._cpu_kernels'")
    )
    monkeypatch.syspath_prepend(str(installed.parent))
    with pytest.raises(RuntimeError, match="shadows the installed package at .*site-packages"):
        ffi._require_kernels()
    monkeypatch.setattr(ffi, "_installed_elsewhere", lambda here: None)
    with pytest.raises(RuntimeError, match="pip install"):
        ffi._require_kernels()


@pytest.mark.parametrize(
    ("error", "recorded"),
    [
        (ModuleNotFoundError("No module", name="approx_jax._cpu_kernels"), True),  # not built
        (ImportError("undefined symbol: foo", name="_cpu_kernels"), True),  # fails to load
        # The package half initialised by another thread's import: not about the
        # kernels, and recorded it disabled them for the life of the process.
        (ImportError("cannot import name 'EinsumOp'", name="approx_jax._src.transform"), False),
    ],
)
def test_only_the_kernel_module_itself_counts_as_missing_kernels(monkeypatch, error, recorded):
    import importlib

    from approx_jax._src import ffi

    def fail(name, *args, **kwargs):
        raise error

    monkeypatch.setattr(importlib, "import_module", fail)
    monkeypatch.setattr(ffi, "_load_error", None)
    monkeypatch.setattr(ffi, "_registered_platforms", [])
    if recorded:
        ffi._register_all()
        assert ffi._load_error is error
    else:
        with pytest.raises(ImportError, match="EinsumOp"):
            ffi._register_all()
        assert ffi._load_error is None
    assert ffi.registered_platforms() == ()
