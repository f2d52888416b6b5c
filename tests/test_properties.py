"""Property-based (hypothesis) tests of every op against the NumPy reference.

Products must be bit-exact (NaN compared after canonicalisation); sums must be
within SPEC section 5's bound ``|got - ref| <= K * 2^-24 * sum_k |P_k|``, with
the Inf/NaN pattern of the products respected (a sum is NaN if any product is
NaN or both +Inf and -Inf occur, else +-Inf if any product is +-Inf).

Two deliberate allowances beyond the bare SPEC formula, both documented in
``check_sums``:

* only where XLA itself adds (``backward="exact"``'s native products, the
  sums over broadcast or design axes of a gradient, the conv input
  gradient's fold) an absolute slack of ``K * 2^-126``: XLA:CPU runs with
  denormals flushed, so a float32 partial sum that lands in the subnormal
  range may be flushed to zero (each of the K additions can lose at most
  ``2^-126``). The kernels' own sums keep subnormals (IEEE float32) and get
  no slack;
* when ``sum |P_k|`` is within rounding of ``FLT_MAX`` a float32 partial sum
  may overflow, so a non-finite result is accepted there.

Profiles (``HYPOTHESIS_PROFILE`` env var):

* ``ci`` (default): a few hundred cases in total, derandomized, no deadline.
* ``thorough``: ``THOROUGH_SCALE`` times as many (>= 10,000 cases in total).

Ops are called eagerly (they still go through the custom call); shapes are
drawn from small sets so that the per-shape compilation cache is reused.
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import approx_jax
from approx_jax._src import lut as lut_lib
from approx_jax._src import multipliers as mult
from approx_jax._src import ops as _ops
from approx_jax._src import reference as ref

try:
    from approx_jax._src.conv import approx_conv
except ImportError:  # conv not built yet
    approx_conv = None


def _public(name):
    """The public op if ``approx_jax`` re-exports it, else the ``_src.ops`` one."""
    return getattr(approx_jax, name, None) or getattr(_ops, name)


multiply = _public("multiply")
approx_dot = _public("approx_dot")
approx_matmul = _public("approx_matmul")

# --------------------------------------------------------------------------
# Profiles.

_COMMON = dict(
    deadline=None,
    print_blob=True,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
        HealthCheck.large_base_example,
    ],
)
settings.register_profile("ci", max_examples=20, derandomize=True, database=None, **_COMMON)
settings.register_profile("thorough", max_examples=800, derandomize=False, **_COMMON)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
if PROFILE in ("ci", "thorough"):
    settings.load_profile(PROFILE)
THOROUGH_SCALE = 40


def budget(n_ci: int) -> int:
    """Examples for one test: ``n_ci`` under "ci", ``THOROUGH_SCALE`` times more otherwise."""
    return n_ci * THOROUGH_SCALE if PROFILE == "thorough" else n_ci


# --------------------------------------------------------------------------
# Float32 helpers.

FLT_MAX = float(np.finfo(np.float32).max)
MIN_NORMAL = 2.0**-126
QNAN = 0x7FC00000


def f32(bits) -> np.float32:
    return np.uint32(bits).view(np.float32)


def canonical_bits(x) -> np.ndarray:
    """uint32 bit patterns of float32 ``x`` with every NaN replaced by 0x7fc00000."""
    x = np.ascontiguousarray(np.asarray(x, np.float32))
    bits = x.view(np.uint32).copy()
    bits[np.isnan(x)] = QNAN
    return bits


def ftz(x) -> np.ndarray:
    """float32 ``x`` with subnormals flushed to (signed) zero, as XLA:CPU does."""
    x = np.asarray(x, np.float32)
    return np.where(np.abs(x) < np.float32(MIN_NORMAL), np.copysign(np.float32(0), x), x).astype(
        np.float32
    )


def assert_bits_equal(got, expected, what: str, context=None) -> None:
    got_bits = canonical_bits(got)
    exp_bits = canonical_bits(expected)
    assert got_bits.shape == exp_bits.shape, (what, got_bits.shape, exp_bits.shape)
    bad = np.flatnonzero(got_bits.reshape(-1) != exp_bits.reshape(-1))
    if bad.size:
        lines = []
        for k in bad[:8]:
            idx = np.unravel_index(k, got_bits.shape)
            extra = ""
            if context is not None:
                extra = "  " + ", ".join(
                    f"{n}={float(np.asarray(v, np.float32)[idx]):r}"
                    f"(0x{int(np.asarray(v, np.float32).view(np.uint32)[idx]):08x})"
                    for n, v in context.items()
                )
            lines.append(
                f"  at {idx}: got 0x{int(got_bits[idx]):08x}, expected 0x{int(exp_bits[idx]):08x}"
                + extra
            )
        raise AssertionError(
            f"{what}: {bad.size} of {got_bits.size} results differ in bits\n" + "\n".join(lines)
        )


def check_sums(got, products, axes, what: str, flushed: bool = False) -> None:
    """Checks ``got == sum(products, axes)`` per SPEC section 5.

    Args:
      got: result under test; reshaped to the summed shape.
      products: float64 products (may hold +-Inf and NaN).
      axes: axes of ``products`` that are summed (K = product of their sizes).
      what: label for the failure message.
      flushed: whether XLA (denormals flushed) does some of the adding; adds
        the flush-to-zero slack (see the module docstring).
    """
    axes = tuple(a % products.ndim for a in axes)
    K = math.prod(products.shape[a] for a in axes)
    P = np.asarray(products, np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        any_nan = np.isnan(P).any(axis=axes, keepdims=True)
        pos_inf = (P == np.inf).any(axis=axes, keepdims=True)
        neg_inf = (P == -np.inf).any(axis=axes, keepdims=True)
        finite = np.where(np.isfinite(P), P, 0.0)
        exp_sum = finite.sum(axis=axes, keepdims=True)
        abs_sum = np.abs(finite).sum(axis=axes, keepdims=True)
    shape = exp_sum.shape
    g = np.asarray(got, np.float32).astype(np.float64)
    assert g.size == exp_sum.size, (what, g.shape, shape)
    g = g.reshape(shape)
    expect_nan = any_nan | (pos_inf & neg_inf)
    # SPEC bound, plus the flush-to-zero slack where XLA adds (module docstring).
    tol = K * 2.0**-24 * abs_sum + (K * MIN_NORMAL if flushed else 0.0)
    may_overflow = abs_sum * (1.0 + K * 2.0**-22) >= FLT_MAX
    with np.errstate(invalid="ignore"):
        close = np.abs(g - exp_sum) <= tol
    nonfinite = ~np.isfinite(g)
    ok = np.where(
        expect_nan,
        np.isnan(g),
        np.where(
            pos_inf,
            (g == np.inf) | (may_overflow & np.isnan(g)),
            np.where(
                neg_inf,
                (g == -np.inf) | (may_overflow & np.isnan(g)),
                close | (may_overflow & nonfinite),
            ),
        ),
    )
    if not ok.all():
        bad = np.argwhere(~ok)
        lines = []
        for idx in bad[:8]:
            idx = tuple(idx)
            lines.append(
                f"  at {idx}: got {g[idx]!r}, expected {exp_sum[idx]!r} (+-{tol[idx]:.3g}), "
                f"nan={bool(expect_nan[idx])} +inf={bool(pos_inf[idx])} -inf={bool(neg_inf[idx])}"
            )
        raise AssertionError(
            f"{what}: {len(bad)} of {ok.size} sums outside the SPEC bound (K={K})\n"
            + "\n".join(lines)
        )


def reduce_axes_for(operand_batch: tuple[int, ...], full_batch: tuple[int, ...]) -> list[int]:
    """Batch axes (of ``full_batch``) over which a broadcast operand's gradient is summed."""
    pad = (1,) * (len(full_batch) - len(operand_batch)) + tuple(operand_batch)
    return [i for i, (p, f) in enumerate(zip(pad, full_batch, strict=True)) if p == 1 and f != 1]


# --------------------------------------------------------------------------
# Value strategies.

SPECIAL_BITS = (
    0x00000000,
    0x80000000,  # +-0
    0x7F800000,
    0xFF800000,  # +-Inf
    0x7FC00000,
    0xFFC00000,
    0x7F800001,
    0xFFBFFFFF,
    0x7FFFFFFF,  # NaNs (quiet, signalling, payloads)
    0x00000001,
    0x80000001,
    0x007FFFFF,
    0x807FFFFF,
    0x00400000,  # subnormals
    0x00800000,
    0x80800000,
    0x00FFFFFF,  # smallest normals
    0x7F7FFFFF,
    0xFF7FFFFF,
    0x7F000000,
    0x7EFFFFFF,  # largest finite
    0x3F800000,
    0xBF800000,
    0x3FFFFFFF,
    0x3F7FFFFF,
    0x40000000,  # around 1 and 2
    0x5F800000,
    0x1F800000,
    0x5F7FFFFF,
    0x20000000,  # 2^64, 2^-64 (products at the edges)
)
MODERATE_SPECIAL_BITS = (
    0x00000000,
    0x80000000,
    0x7F800000,
    0xFF800000,
    0x7FC00000,
    0xFFC00000,
    0x00000001,
    0x807FFFFF,
    0x00800000,
    0x3F800000,
    0xBF800000,
    0x3FFFFFFF,
)
MODERATE_MAX = 2.0**40  # products <= 2^81: float32 sums of them cannot overflow


def _bits_from_fields(sign, exponent, mantissa) -> np.float32:
    return f32((sign << 31) | (exponent << 23) | mantissa)


FULL_ELEMENTS = st.one_of(
    st.sampled_from(SPECIAL_BITS).map(f32),
    st.floats(-8, 8, width=32),
    st.floats(width=32),  # anything: NaN, Inf, subnormal, huge
    st.integers(0, 2**32 - 1).map(f32),  # raw bit patterns (NaN payloads included)
    st.builds(  # exponents at the edges: products overflow or underflow
        _bits_from_fields,
        st.integers(0, 1),
        st.one_of(st.integers(1, 40), st.integers(215, 254)),
        st.integers(0, 2**23 - 1),
    ),
)
# Biased exponents 62..66 (|x| ~ 2^-63): products at the underflow edge
# (ea + eb - 127 in -3..5), some flushed, the others within a few binades of
# 2^-126, so sums that cancel pass through the subnormal range.
UNDERFLOW_EDGE = st.builds(
    _bits_from_fields, st.integers(0, 1), st.integers(62, 66), st.integers(0, 2**23 - 1)
)
FULL_ELEMENTS = st.one_of(FULL_ELEMENTS, UNDERFLOW_EDGE)
MODERATE_ELEMENTS = st.one_of(
    st.sampled_from(MODERATE_SPECIAL_BITS).map(f32),
    st.floats(-8, 8, width=32),
    st.floats(-MODERATE_MAX, MODERATE_MAX, width=32),
    st.floats(-(2.0**-100), 2.0**-100, width=32),  # tiny: products underflow
    UNDERFLOW_EDGE,
)

REGIMES = ("unit", "wide_exponent", "raw_bits", "extreme", "mixed", "underflow_edge")


def seeded_values(shape, seed: int, regime: str, p_special: float, moderate: bool) -> np.ndarray:
    """Large arrays: NumPy-generated from a hypothesis-drawn seed and regime."""
    rng = np.random.default_rng(seed)
    n = math.prod(shape)
    sign = rng.integers(0, 2, n, dtype=np.uint32)
    mant = rng.integers(0, 2**23, n, dtype=np.uint32)
    if moderate:
        regime = "unit" if regime in ("raw_bits", "extreme") else regime
    if regime == "unit":
        exp = rng.integers(117, 138, n, dtype=np.uint32)
    elif regime == "wide_exponent":
        lo, hi = (87, 167) if moderate else (1, 255)
        exp = rng.integers(lo, hi, n, dtype=np.uint32)
    elif regime == "raw_bits":
        exp = rng.integers(0, 256, n, dtype=np.uint32)
    elif regime == "underflow_edge":  # see UNDERFLOW_EDGE
        exp = rng.integers(62, 67, n, dtype=np.uint32)
    elif regime == "extreme":
        exp = np.where(
            rng.integers(0, 2, n) == 1,
            rng.integers(1, 40, n),
            rng.integers(215, 255, n),
        ).astype(np.uint32)
    else:  # mixed: mostly unit, some wide
        exp = np.where(
            rng.random(n) < 0.9, rng.integers(120, 135, n), rng.integers(60, 195, n)
        ).astype(np.uint32)
    bits = (sign << 31) | (exp << 23) | mant
    if p_special > 0:
        specials = np.asarray(MODERATE_SPECIAL_BITS if moderate else SPECIAL_BITS, np.uint32)
        mask = rng.random(n) < p_special
        bits = np.where(mask, specials[rng.integers(0, len(specials), n)], bits)
    return bits.astype(np.uint32).view(np.float32).reshape(shape)


@st.composite
def f32_arrays(draw, shape, moderate: bool = False):
    """float32 arrays of ``shape``: element-wise hypothesis data when small, seeded when large."""
    shape = tuple(shape)
    if math.prod(shape) <= 64:
        elements = MODERATE_ELEMENTS if moderate else FULL_ELEMENTS
        return draw(hnp.arrays(np.float32, shape, elements=elements))
    seed = draw(st.integers(0, 2**32 - 1))
    regime = draw(st.sampled_from(REGIMES))
    p_special = draw(st.sampled_from((0.0, 0.002, 0.05, 0.3)))
    note(f"seeded array {shape}: seed={seed} regime={regime} p_special={p_special}")
    return seeded_values(shape, seed, regime, p_special, moderate)


# --------------------------------------------------------------------------
# Multiplier strategies.

FAMILIES = {"mbm": mult.mbm, "mitchell": mult.mitchell, "truncate": mult.truncate}
LUT_KINDS = ("random", "saturating", "zero", "carry_only")


@functools.cache
def builtin(family: str, M: int):
    return FAMILIES[family](M)


def random_stored_lut(M: int, seed: int, kind: str) -> np.ndarray:
    """A stored-format LUT: uint8 ``c<<7|r`` for M <= 7, uint16 ``c<<15|r`` for 8..11."""
    rng = np.random.default_rng(seed)
    n = lut_lib.num_entries(M)
    if kind == "random":
        c = rng.integers(0, 2, n)
        r = rng.integers(0, 2**M, n)
    elif kind == "saturating":  # every product carries with all-ones mantissa: max overflow
        c = np.ones(n, np.int64)
        r = np.full(n, 2**M - 1)
    elif kind == "carry_only":
        c = np.ones(n, np.int64)
        r = np.zeros(n, np.int64)
    else:
        c = np.zeros(n, np.int64)
        r = np.zeros(n, np.int64)
    shift = 7 if M <= 7 else 15
    dtype = np.uint8 if M <= 7 else np.uint16
    return ((c << shift) | r).astype(dtype)


@functools.lru_cache(maxsize=64)
def lut_multiplier(M: int, seed: int, kind: str):
    return mult.from_lut(random_stored_lut(M, seed, kind), M)


@st.composite
def multipliers(draw, max_M: int = 11):
    M = draw(st.integers(1, max_M))
    kind = draw(st.sampled_from(tuple(FAMILIES) + LUT_KINDS))
    if kind in FAMILIES:
        return builtin(kind, M)
    seed = draw(st.integers(0, 2**32 - 1)) if kind == "random" else 0
    return lut_multiplier(M, seed, kind)


def stored(m):
    return np.asarray(m.lut)


def describe(m) -> str:
    return f"{m!r} M={m.mbits}"


# --------------------------------------------------------------------------
# Reference products.


def approx_products(a, b, m, design: int | None = None) -> np.ndarray:
    lut = stored(m) if design is None else stored(m)[design]
    return ref.product(np.asarray(a, np.float32), np.asarray(b, np.float32), lut, m.mbits).astype(
        np.float64
    )


def exact_products(a, b) -> np.ndarray:
    # XLA:CPU treats subnormal operands as zero (DAZ): Inf * subnormal is NaN there.
    return ref.exact_product(ftz(a), ftz(b))


def products(a, b, m, backward: str = "approx", design: int | None = None) -> np.ndarray:
    if backward == "exact":
        return exact_products(a, b)
    return approx_products(a, b, m, design)


SIDES = (0, 1, 2, 3, 7, 17)
K_SIDES = (0, 1, 2, 7, 17, 33, 65)
TAIL_SIDES = (1, 7, 17, 33, 65)


# --------------------------------------------------------------------------
# multiply


@st.composite
def broadcast_pair(draw, max_dims=3):
    shapes = draw(
        hnp.mutually_broadcastable_shapes(
            num_shapes=2, min_dims=0, max_dims=max_dims, min_side=0, max_side=5
        )
    )
    return shapes.input_shapes


@settings(max_examples=budget(40))
@given(
    data=st.data(),
    m=multipliers(),
    dtype=st.sampled_from(("float32", "float32", "float16", "bfloat16")),
)
def test_multiply_bit_exact(data, m, dtype):
    sa, sb = data.draw(broadcast_pair(), label="shapes")
    a = data.draw(f32_arrays(sa), label="a")
    b = data.draw(f32_arrays(sb), label="b")
    np_dtype = jnp.dtype(dtype)
    a_in = a.astype(np_dtype)
    b_in = b.astype(np_dtype)
    got = np.asarray(multiply(a_in, b_in, m))
    assert got.dtype == np_dtype
    assert got.shape == np.broadcast_shapes(sa, sb)
    expected = ref.product(a_in.astype(np.float32), b_in.astype(np.float32), stored(m), m.mbits)
    expected = expected.astype(np_dtype)
    if dtype == "float32":
        # The kernels return exactly 0x7fc00000 for every NaN (DESIGN: kQuietNaN).
        raw = np.asarray(got, np.float32).view(np.uint32)
        assert np.all(raw[np.isnan(got)] == QNAN), "kernel NaN is not the canonical 0x7fc00000"
    assert_bits_equal(
        got.astype(np.float32),
        expected.astype(np.float32),
        f"multiply {describe(m)} {dtype}",
        context={
            "a": np.broadcast_to(a_in.astype(np.float32), got.shape),
            "b": np.broadcast_to(b_in.astype(np.float32), got.shape),
        },
    )


@settings(max_examples=budget(30))
@given(data=st.data(), m=multipliers(), backward=st.sampled_from(("approx", "exact")))
def test_multiply_grad(data, m, backward):
    sa, sb = data.draw(broadcast_pair(max_dims=2), label="shapes")
    moderate = backward == "exact"
    a = data.draw(f32_arrays(sa, moderate), label="a")
    b = data.draw(f32_arrays(sb, moderate), label="b")
    full = np.broadcast_shapes(sa, sb)
    g = data.draw(f32_arrays(full, moderate), label="g")
    _, vjp = jax.vjp(lambda x, y: multiply(x, y, m, backward=backward), a, b)
    da, db = (np.asarray(t) for t in vjp(jnp.asarray(g)))
    assert da.shape == sa and db.shape == sb
    a_full = np.broadcast_to(a, full)
    b_full = np.broadcast_to(b, full)
    # SPEC 5 elementwise: da = P(g, b), db = P(a, g).
    for got, (x, y), own, name in (
        (da, (g, b_full), sa, "da"),
        (db, (a_full, g), sb, "db"),
    ):
        axes = reduce_axes_for(own, full)
        if backward == "approx":
            P = approx_products(x, y, m)
        else:
            P = exact_products(x, y)
        if not axes:
            if backward == "approx":
                expected = P.astype(np.float32).reshape(own)
                assert_bits_equal(got, expected, f"multiply {name} {describe(m)}")
            else:  # native float32 product with flushed operands and result
                expected = ftz(np.multiply(ftz(x), ftz(y), dtype=np.float32)).reshape(own)
                assert_bits_equal(ftz(got), expected, f"multiply {name} exact")
        else:  # summed over the broadcast axes by XLA
            check_sums(got, P, axes, f"multiply {name} {backward} {describe(m)}", flushed=True)


# --------------------------------------------------------------------------
# approx_dot


@st.composite
def dot_shapes(draw):
    lead = draw(
        st.one_of(
            st.just(()),
            st.tuples(st.sampled_from(SIDES)),
            st.tuples(st.sampled_from((0, 1, 2, 3)), st.sampled_from(SIDES)),
        )
    )
    K = draw(st.sampled_from(K_SIDES))
    N = draw(st.sampled_from(SIDES + (33, 65)))
    return lead, K, N


@settings(max_examples=budget(40))
@given(data=st.data(), m=multipliers())
def test_dot(data, m):
    lead, K, N = data.draw(dot_shapes(), label="shapes")
    x = data.draw(f32_arrays(lead + (K,)), label="x")
    w = data.draw(f32_arrays((K, N)), label="w")
    got = np.asarray(approx_dot(x, w, m))
    assert got.shape == lead + (N,) and got.dtype == np.float32
    P = approx_products(x[..., :, None], w, m)  # [..., K, N]
    check_sums(got, P, (-2,), f"approx_dot {describe(m)} x{x.shape} w{w.shape}")


@settings(max_examples=budget(8))
@given(
    data=st.data(),
    m=multipliers(),
    K=st.integers(300, 2000),
    rows=st.sampled_from((1, 2, 3)),
    N=st.sampled_from((1, 2, 7)),
)
def test_dot_large_k(data, m, K, rows, N):
    x = data.draw(f32_arrays((rows, K)), label="x")
    w = data.draw(f32_arrays((K, N)), label="w")
    got = np.asarray(approx_dot(x, w, m))
    P = approx_products(x[:, :, None], w, m)
    check_sums(got, P, (-2,), f"approx_dot large K={K} {describe(m)}")


@settings(max_examples=budget(30))
@given(data=st.data(), m=multipliers(), backward=st.sampled_from(("approx", "exact")))
def test_dot_grad(data, m, backward):
    lead, K, N = data.draw(dot_shapes(), label="shapes")
    moderate = backward == "exact"
    x = data.draw(f32_arrays(lead + (K,), moderate), label="x")
    w = data.draw(f32_arrays((K, N), moderate), label="w")
    g = data.draw(f32_arrays(lead + (N,), moderate), label="g")
    _, vjp = jax.vjp(lambda a, b: approx_dot(a, b, m, backward=backward), x, w)
    dx, dw = (np.asarray(t) for t in vjp(jnp.asarray(g)))
    assert dx.shape == x.shape and dw.shape == w.shape
    # dx[..., k] = sum_j P(g[..., j], w[k, j])  (a = dy, b = w)
    P_dx = products(g[..., None, :], w, m, backward)  # [..., K, N]
    exact = backward == "exact"
    check_sums(dx, P_dx, (-1,), f"approx_dot dx {backward} {describe(m)}", flushed=exact)
    # dw[k, j] = sum_rows P(x[row, k], g[row, j])  (a = x, b = dy)
    rows = math.prod(lead)
    x_rows = x.reshape(rows, K)
    g_rows = g.reshape(rows, N)
    P_dw = products(x_rows[:, :, None], g_rows[:, None, :], m, backward)  # [R, K, N]
    check_sums(dw, P_dw, (0,), f"approx_dot dw {backward} {describe(m)}", flushed=exact)
    if backward == "approx" and x.ndim == 2 and min(x.shape + w.shape) > 0:
        # Cross-check against the reference VJP where everything is finite.
        (rdx, rdx_abs), (rdw, rdw_abs) = ref.dot_vjp(x, w, g, stored(m), m.mbits, with_bound=True)
        fin = np.isfinite(rdx) & (rdx_abs * (1 + N * 2.0**-22) < FLT_MAX)
        assert np.all(np.abs(dx[fin] - rdx[fin]) <= N * 2.0**-24 * rdx_abs[fin])


# --------------------------------------------------------------------------
# approx_matmul


@st.composite
def matmul_shapes(draw):
    batch_a, batch_b = draw(
        hnp.mutually_broadcastable_shapes(
            num_shapes=2, min_dims=0, max_dims=2, min_side=0, max_side=3
        )
    ).input_shapes
    M = draw(st.sampled_from(SIDES))
    K = draw(st.sampled_from(K_SIDES))
    N = draw(st.sampled_from(SIDES))
    return batch_a + (M, K), batch_b + (K, N)


@settings(max_examples=budget(30))
@given(data=st.data(), m=multipliers())
def test_matmul(data, m):
    sa, sb = data.draw(matmul_shapes(), label="shapes")
    a = data.draw(f32_arrays(sa), label="a")
    b = data.draw(f32_arrays(sb), label="b")
    got = np.asarray(approx_matmul(a, b, m))
    batch = np.broadcast_shapes(sa[:-2], sb[:-2])
    assert got.shape == batch + (sa[-2], sb[-1])
    P = approx_products(a[..., :, :, None], b[..., None, :, :], m)  # [..., M, K, N]
    check_sums(got, P, (-2,), f"approx_matmul {describe(m)} a{sa} b{sb}")


@settings(max_examples=budget(25))
@given(data=st.data(), m=multipliers(), backward=st.sampled_from(("approx", "exact")))
def test_matmul_grad(data, m, backward):
    sa, sb = data.draw(matmul_shapes(), label="shapes")
    moderate = backward == "exact"
    a = data.draw(f32_arrays(sa, moderate), label="a")
    b = data.draw(f32_arrays(sb, moderate), label="b")
    batch = np.broadcast_shapes(sa[:-2], sb[:-2])
    g = data.draw(f32_arrays(batch + (sa[-2], sb[-1]), moderate), label="g")
    _, vjp = jax.vjp(lambda x, y: approx_matmul(x, y, m, backward=backward), a, b)
    da, db = (np.asarray(t) for t in vjp(jnp.asarray(g)))
    assert da.shape == sa and db.shape == sb
    nb = len(batch)
    a_full = np.broadcast_to(a, batch + sa[-2:])
    b_full = np.broadcast_to(b, batch + sb[-2:])
    # da[..., i, k] = sum_{j, broadcast batch} P(g[..., i, j], b[..., k, j])
    P_da = products(g[..., :, None, :], b_full[..., None, :, :], m, backward)  # [..., M, K, N]
    axes = reduce_axes_for(sa[:-2], batch) + [nb + 2]
    flushed = backward == "exact" or len(axes) > 1  # XLA sums the broadcast batch axes
    check_sums(da, P_da, axes, f"approx_matmul da {backward} {describe(m)} a{sa} b{sb}", flushed)
    # db[..., k, j] = sum_{i, broadcast batch} P(a[..., i, k], g[..., i, j])
    P_db = products(a_full[..., :, :, None], g[..., :, None, :], m, backward)  # [..., M, K, N]
    axes = reduce_axes_for(sb[:-2], batch) + [nb]
    flushed = backward == "exact" or len(axes) > 1
    check_sums(db, P_db, axes, f"approx_matmul db {backward} {describe(m)} a{sa} b{sb}", flushed)


# --------------------------------------------------------------------------
# Stacks of multipliers (design axis) and vmap.


@st.composite
def stacks(draw):
    members = draw(st.lists(multipliers(max_M=9), min_size=1, max_size=3))
    return mult.stack(members)


@settings(max_examples=budget(15))
@given(data=st.data(), s=stacks())
def test_stack_dot_and_vmap(data, s):
    lead, K, N = data.draw(dot_shapes(), label="shapes")
    x = data.draw(f32_arrays(lead + (K,)), label="x")
    w = data.draw(f32_arrays((K, N)), label="w")
    D = s.num_designs
    got = np.asarray(approx_dot(x, w, s))
    assert got.shape == (D,) + lead + (N,)
    vmapped = np.asarray(jax.vmap(lambda one: approx_dot(x, w, one))(s))
    assert_bits_equal(vmapped, got, "vmap over a stacked Multiplier vs stacked call")
    for d, single in enumerate(mult.unstack(s)):
        P = approx_products(x[..., :, None], w, s, design=d)
        check_sums(got[d], P, (-2,), f"stacked approx_dot design {d} of {s!r}")
        # A design inside a stack gives the same bits as on its own.
        assert_bits_equal(got[d], np.asarray(approx_dot(x, w, single)), f"design {d} vs single")


@settings(max_examples=budget(15))
@given(data=st.data(), s=stacks())
def test_stack_multiply_and_nested_vmap(data, s):
    sa, sb = data.draw(broadcast_pair(max_dims=2), label="shapes")
    a = data.draw(f32_arrays((3,) + sa), label="a")  # leading axis is vmapped
    b = data.draw(f32_arrays(sb), label="b")
    D = s.num_designs
    # vmap over designs of vmap over a's leading axis.
    got = np.asarray(jax.vmap(lambda one: jax.vmap(lambda ai: multiply(ai, b, one))(a))(s))
    full = np.broadcast_shapes(sa, sb)
    assert got.shape == (D, 3) + full
    a_each = a.reshape((3,) + (1,) * (len(full) - len(sa)) + sa)  # per-row broadcasting
    for d in range(D):
        expected = ref.product(a_each, b, stored(s)[d], s.mbits)
        assert_bits_equal(got[d], expected, f"nested vmap multiply design {d} of {s!r}")
    # And the reverse nesting: data axis outside, designs inside.
    got2 = np.asarray(jax.vmap(lambda ai: multiply(ai, b, s))(a))
    assert_bits_equal(np.moveaxis(got2, 1, 0), got, "vmap(data) of stacked multiply")


@settings(max_examples=budget(15))
@given(data=st.data(), s=stacks(), backward=st.sampled_from(("approx", "exact")))
def test_stack_grad_and_vmap_grad(data, s, backward):
    sa, sb = data.draw(matmul_shapes(), label="shapes")
    moderate = backward == "exact"
    a = data.draw(f32_arrays(sa, moderate), label="a")
    b = data.draw(f32_arrays(sb, moderate), label="b")
    batch = np.broadcast_shapes(sa[:-2], sb[:-2])
    out_shape = batch + (sa[-2], sb[-1])
    D = s.num_designs
    g = data.draw(f32_arrays((D,) + out_shape, moderate), label="g")
    nb = len(batch)
    a_full = np.broadcast_to(a, batch + sa[-2:])
    b_full = np.broadcast_to(b, batch + sb[-2:])

    # grad of the stacked op: cotangents of all designs summed (float32).
    _, vjp = jax.vjp(lambda x, y: approx_matmul(x, y, s, backward=backward), a, b)
    da, db = (np.asarray(t) for t in vjp(jnp.asarray(g)))
    P_da = np.stack(
        [products(g[d][..., :, None, :], b_full[..., None, :, :], s, backward, d) for d in range(D)]
    )
    axes = [0] + [1 + i for i in reduce_axes_for(sa[:-2], batch)] + [1 + nb + 2]
    check_sums(da, P_da, axes, f"stacked da {backward} {s!r}", flushed=True)
    P_db = np.stack(
        [products(a_full[..., :, :, None], g[d][..., :, None, :], s, backward, d) for d in range(D)]
    )
    axes = [0] + [1 + i for i in reduce_axes_for(sb[:-2], batch)] + [1 + nb]
    check_sums(db, P_db, axes, f"stacked db {backward} {s!r}", flushed=True)

    # vmap(grad) over the designs: one gradient per design.
    def per_design(one, gd):
        _, f_vjp = jax.vjp(lambda x, y: approx_matmul(x, y, one, backward=backward), a, b)
        return f_vjp(gd)

    vda, vdb = (np.asarray(t) for t in jax.vmap(per_design)(s, jnp.asarray(g)))
    assert vda.shape == (D,) + sa and vdb.shape == (D,) + sb
    for d in range(D):
        axes = reduce_axes_for(sa[:-2], batch) + [nb + 2]
        flushed = backward == "exact" or len(axes) > 1
        check_sums(vda[d], P_da[d], axes, f"vmap(grad) da design {d} {backward}", flushed)
        axes = reduce_axes_for(sb[:-2], batch) + [nb]
        flushed = backward == "exact" or len(axes) > 1
        check_sums(vdb[d], P_db[d], axes, f"vmap(grad) db design {d} {backward}", flushed)


# --------------------------------------------------------------------------
# approx_conv

needs_conv = pytest.mark.skipif(approx_conv is None, reason="approx_conv not available")


@st.composite
def conv_problems(draw):
    nd = draw(st.sampled_from((1, 2)))
    groups = draw(st.sampled_from((1, 1, 2)))
    n = draw(st.sampled_from((0, 1, 2)))
    cg = draw(st.sampled_from((1, 2, 3)))
    og = draw(st.sampled_from((1, 2)))
    spatial = tuple(draw(st.sampled_from((1, 2, 3, 5))) for _ in range(nd))
    window = tuple(draw(st.sampled_from((1, 2, 3))) for _ in range(nd))
    strides = tuple(draw(st.sampled_from((1, 2))) for _ in range(nd))
    lhs_dil = tuple(draw(st.sampled_from((1, 1, 2))) for _ in range(nd))
    rhs_dil = tuple(draw(st.sampled_from((1, 1, 2))) for _ in range(nd))
    padding = draw(
        st.one_of(
            st.sampled_from(("VALID", "SAME")),
            st.tuples(*[st.tuples(st.integers(0, 2), st.integers(0, 2)) for _ in range(nd)]),
        )
    )
    if isinstance(padding, str) and any(d != 1 for d in lhs_dil):
        padding = tuple((1, 1) for _ in range(nd))
    if isinstance(padding, tuple):
        padding = [tuple(p) for p in padding]
    dn = ("NWC", "WIO", "NWC") if nd == 1 else ("NHWC", "HWIO", "NHWC")
    lhs_shape = (n,) + spatial + (cg * groups,)
    rhs_shape = window + (cg, og * groups)
    params = dict(
        window_strides=strides,
        padding=padding,
        lhs_dilation=lhs_dil,
        rhs_dilation=rhs_dil,
        feature_group_count=groups,
        dimension_numbers=dn,
    )
    return lhs_shape, rhs_shape, params


def _ref_conv_params(params):
    return dict(
        window_strides=params["window_strides"],
        padding=params["padding"],
        lhs_dilation=params["lhs_dilation"],
        rhs_dilation=params["rhs_dilation"],
        feature_group_count=params["feature_group_count"],
        dimension_numbers=params["dimension_numbers"],
    )


def check_against_bound(got, expected, abs_sum, K: int, what: str, flushed: bool = False) -> None:
    """SPEC bound against a reference (ref, sum|P|) pair; non-finite refs compared exactly.

    For conv the inputs are "moderate" (no huge finite values), so a float32
    overflow of a partial sum cannot happen and the reference's float64
    NaN/Inf pattern is the expected one. ``flushed`` as in ``check_sums``.
    """
    got = np.asarray(got, np.float32).astype(np.float64)
    expected = np.asarray(expected, np.float64)
    abs_sum = np.asarray(abs_sum, np.float64)
    assert got.shape == expected.shape, (what, got.shape, expected.shape)
    tol = max(K, 1) * (2.0**-24 * abs_sum + (MIN_NORMAL if flushed else 0.0))
    with np.errstate(invalid="ignore"):
        close = np.abs(got - expected) <= tol
    ok = np.where(
        np.isfinite(expected), close, (np.isnan(expected) & np.isnan(got)) | (got == expected)
    )
    if not ok.all():
        bad = np.argwhere(~ok)
        lines = [
            f"  at {tuple(i)}: got {got[tuple(i)]!r}, expected {expected[tuple(i)]!r}"
            for i in bad[:8]
        ]
        raise AssertionError(
            f"{what}: {len(bad)} of {ok.size} outputs wrong (K={K})\n" + "\n".join(lines)
        )


def has_padded_products(params) -> bool:
    """Whether some window position falls into padding or an lhs-dilation hole."""
    pad = params["padding"]
    padded = pad == "SAME" or (not isinstance(pad, str) and any(lo or hi for lo, hi in pad))
    return padded or any(d != 1 for d in params["lhs_dilation"])


def finite_only(x) -> np.ndarray:
    """``x`` with every Inf/NaN replaced by 1.5."""
    return np.where(np.isfinite(x), x, np.float32(1.5)).astype(np.float32)


@needs_conv
@settings(max_examples=budget(20))
@given(data=st.data(), m=multipliers(max_M=9))
def test_conv(data, m):
    lhs_shape, rhs_shape, params = data.draw(conv_problems(), label="problem")
    x = data.draw(f32_arrays(lhs_shape, moderate=True), label="lhs")
    w = data.draw(f32_arrays(rhs_shape, moderate=True), label="rhs")
    if has_padded_products(params):
        # Inf/NaN weights meeting padding: see test_conv_padding_contributes_no_product.
        w = finite_only(w)
    got = np.asarray(approx_conv(x, w, m, **params))
    expected, abs_sum, K = ref.conv_general_dilated_with_bound(
        x, w, stored(m), m.mbits, **_ref_conv_params(params)
    )
    check_against_bound(got, expected, abs_sum, K, f"approx_conv {describe(m)} {params}")


@needs_conv
@settings(max_examples=budget(15))
@given(data=st.data(), m=multipliers(max_M=9), backward=st.sampled_from(("approx", "exact")))
def test_conv_grad(data, m, backward):
    lhs_shape, rhs_shape, params = data.draw(conv_problems(), label="problem")
    x = data.draw(f32_arrays(lhs_shape, moderate=True), label="lhs")
    w = data.draw(f32_arrays(rhs_shape, moderate=True), label="rhs")
    if backward == "exact":
        x, w = ftz(x), ftz(w)
    strides_or_holes = zip(params["window_strides"], params["lhs_dilation"], strict=True)
    if backward == "approx" and all(st == 1 or ld == 1 for st, ld in strides_or_holes):
        # The input gradient is convs of dy padded by the window: Inf/NaN
        # weights meet its padding (see test_conv_padding_contributes_no_product).
        w = finite_only(w)
    y, vjp = jax.vjp(lambda a, b: approx_conv(a, b, m, backward=backward, **params), x, w)
    g = data.draw(f32_arrays(y.shape, moderate=True), label="dy")
    if backward == "exact":
        g = ftz(g)
    if has_padded_products(params):
        # Inf/NaN cotangents meeting padding in dW: see test_conv_padding_contributes_no_product.
        g = finite_only(g)
    dx, dw = (np.asarray(t) for t in vjp(jnp.asarray(g)))
    (rdx, rdx_abs), (rdw, rdw_abs) = ref.conv_vjp(
        x, w, g, stored(m), m.mbits, backward, with_bound=True, **_ref_conv_params(params)
    )
    window = math.prod(rhs_shape[:-2])
    c_out = rhs_shape[-1]
    k_dx = c_out * window  # products per input position (upper bound)
    k_dw = max(1, lhs_shape[0] * math.prod(y.shape[1:-1]))  # products per kernel entry
    # The input gradient's patch contributions are folded (added) by XLA.
    check_against_bound(
        dx, rdx, rdx_abs, k_dx, f"approx_conv d_lhs {backward} {describe(m)} {params}", True
    )
    check_against_bound(
        dw,
        rdw,
        rdw_abs,
        k_dw,
        f"approx_conv d_rhs {backward} {describe(m)} {params}",
        flushed=backward == "exact",
    )


# --------------------------------------------------------------------------
# Kernel tails: sizes around the kernels' blocking (1, 7, 17, 33, 65) on both
# sides, finite values only, so any mis-indexed tail element shows up.


@settings(max_examples=budget(20))
@given(
    data=st.data(),
    m=multipliers(max_M=8),
    M=st.sampled_from(TAIL_SIDES),
    K=st.sampled_from(TAIL_SIDES),
    N=st.sampled_from(TAIL_SIDES),
    B=st.sampled_from((1, 2, 3)),
)
def test_matmul_kernel_tails(data, m, M, K, N, B):
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    a = seeded_values((B, M, K), seed, "unit", 0.0, True)
    b = seeded_values((K, N), seed + 1, "unit", 0.0, True)
    got = np.asarray(approx_matmul(a, b, m))
    P = approx_products(a[..., :, :, None], b, m)  # [B, M, K, N]
    check_sums(got, P, (-2,), f"tails B={B} M={M} K={K} N={N} {describe(m)}")


@needs_conv
@pytest.mark.xfail(
    strict=True,
    reason="documented approx_conv semantics: padding and lhs-dilation holes are zero-valued "
    "inputs that go through the multiplier (as ApproxTrain's im2col), so P(0, inf) = NaN there; "
    "the input gradient is convs of dy padded by the window (as XLA's transposed conv)",
)
@pytest.mark.parametrize(
    "case", ("same_padding_forward", "lhs_dilation_forward", "same_padding_dw", "valid_dx")
)
def test_conv_padding_contributes_no_product(case):
    """Positions in padding or in lhs-dilation holes contribute *no* product
    (reference.py, as XLA's HLO evaluator), so a non-finite kernel weight (or
    cotangent, for the kernel gradient) that only ever meets padding must not
    turn the result into NaN via P(0, Inf) = NaN."""
    m = builtin("mbm", 7)
    dn = ("NWC", "WIO", "NWC")
    x = np.float32([1.0, 2.0, 3.0]).reshape(1, 3, 1)
    if case == "same_padding_dw":
        w = np.float32([1.0, 1.0, 1.0]).reshape(3, 1, 1)
        params = dict(padding="SAME", dimension_numbers=dn)
        y, vjp = jax.vjp(lambda a, b: approx_conv(a, b, m, **params), x, w)
        g = np.float32([np.inf, 1.0, 1.0]).reshape(1, 3, 1)
        _, got = vjp(jnp.asarray(g))
        _, expected = ref.conv_vjp(x, w, g, stored(m), m.mbits, **params)
    elif case == "valid_dx":
        w = np.float32([np.inf, 1.0, 1.0]).reshape(3, 1, 1)
        x = np.float32([1.0, 2.0, 3.0, 4.0]).reshape(1, 4, 1)
        params = dict(padding="VALID", dimension_numbers=dn)
        y, vjp = jax.vjp(lambda a, b: approx_conv(a, b, m, **params), x, w)
        g = np.float32([1.0, 1.0]).reshape(1, 2, 1)
        got, _ = vjp(jnp.asarray(g))
        expected, _ = ref.conv_vjp(x, w, g, stored(m), m.mbits, **params)
    else:
        w = np.float32([np.inf, 1.0, 1.0]).reshape(3, 1, 1)
        if case == "same_padding_forward":
            params = dict(padding="SAME", dimension_numbers=dn)
        else:
            params = dict(padding=[(0, 0)], lhs_dilation=(2,), dimension_numbers=dn)
        got = approx_conv(x, w, m, **params)
        expected = ref.conv_general_dilated(x, w, stored(m), m.mbits, **params)
    got = np.asarray(got, np.float64)
    assert np.array_equal(np.isnan(got), np.isnan(expected)), (got.ravel(), expected.ravel())
    assert np.array_equal(np.isinf(got), np.isinf(expected)), (got.ravel(), expected.ravel())


# --------------------------------------------------------------------------
# Zero-size dimensions, spelled out (the property tests above also draw them).

ZERO_SIZE_CASES = {
    "multiply-empty": (lambda m: multiply(np.ones(0, np.float32), np.ones(0, np.float32), m), (0,)),
    "multiply-bcast-empty": (
        lambda m: multiply(np.ones((2, 0), np.float32), np.ones((1, 0), np.float32), m),
        (2, 0),
    ),
    "dot-M0": (
        lambda m: approx_dot(np.ones((0, 3), np.float32), np.ones((3, 4), np.float32), m),
        (0, 4),
    ),
    "dot-K0": (
        lambda m: approx_dot(np.ones((2, 0), np.float32), np.ones((0, 4), np.float32), m),
        (2, 4),
    ),
    "dot-N0": (
        lambda m: approx_dot(np.ones((2, 3), np.float32), np.ones((3, 0), np.float32), m),
        (2, 0),
    ),
    "matmul-B0": (
        lambda m: approx_matmul(np.ones((0, 2, 3), np.float32), np.ones((3, 4), np.float32), m),
        (0, 2, 4),
    ),
    "dot-K0-grad": (
        lambda m: jax.grad(lambda x: approx_dot(x, np.ones((0, 4), np.float32), m).sum())(
            np.ones((2, 0), np.float32)
        ),
        (2, 0),
    ),
}


@pytest.mark.parametrize("case", sorted(ZERO_SIZE_CASES))
def test_zero_size_dims(case):
    fn, shape = ZERO_SIZE_CASES[case]
    got = np.asarray(fn(builtin("mbm", 4)))
    assert got.shape == shape
    assert np.all(got == 0)  # empty, or K = 0 sums (exact zeros)


@pytest.mark.parametrize("which", ("gemm_M0", "gemm_N0", "multiply_n0"))
def test_zero_size_canonical_calls(which):
    """The canonical (partitioned) custom-call wrappers keep zero-size dimensions:
    the result type must be [D, B, M, N] even when M, N or n is 0."""
    from approx_jax._src import partitioning

    m = builtin("mbm", 3)
    klut = _ops.kernel_lut_of(m)
    if which == "gemm_M0":
        out = partitioning.gemm_call(jnp.ones((1, 1, 0, 3)), jnp.ones((1, 1, 3, 2)), klut, 3)
        assert out.shape == (1, 1, 0, 2)
    elif which == "gemm_N0":
        out = partitioning.gemm_call(jnp.ones((1, 1, 2, 3)), jnp.ones((1, 1, 3, 0)), klut, 3)
        assert out.shape == (1, 1, 2, 0)
    else:
        out = partitioning.multiply_call(jnp.ones((1, 0)), jnp.ones((1, 0)), klut, 3)
        assert out.shape == (1, 0)
