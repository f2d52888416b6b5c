"""Slow, obviously-correct NumPy reference of SPEC.md (for tests and fallbacks).

Everything here follows the specification step by step on uint32 bit
patterns; speed is not a goal. The kernels (C++ CPU, CUDA) are tested against
these functions.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np

from approx_jax._src import lut as lut_lib

SIGN_MASK = np.uint32(0x80000000)
INF_BITS = np.uint32(0x7F800000)
QUIET_NAN_BITS = np.uint32(0x7FC00000)  # the one NaN every backend returns
MANTISSA_MASK = np.uint32(0x007FFFFF)


# --------------------------------------------------------------------------
# Scalar products (SPEC section 2)
# --------------------------------------------------------------------------


def _as_float32_bits(x) -> np.ndarray:
    """float32 bit patterns of ``x`` (cast to float32 first, SPEC section 1)."""
    # np.array copies into a contiguous buffer (0-d stays 0-d, unlike
    # np.ascontiguousarray), so the uint32 view is always valid.
    return np.array(x, dtype=np.float32).view(np.uint32)


def product_bits(a, b, stored_lut, M: int) -> np.ndarray:
    """Bit patterns of the simulated products ``P(a, b)`` (SPEC section 2).

    Args:
      a: First operands (broadcastable with ``b``; cast to float32). Indexes
        the high half of the LUT address.
      b: Second operands.
      stored_lut: Stored-format LUT of shape ``[4**M]``.
      M: Mantissa width.

    Returns:
      ``uint32`` array of result bit patterns, broadcast shape of ``a`` and ``b``.
    """
    M = lut_lib.check_mbits(M)
    carry_table, mantissa_table = lut_lib.decode(np.asarray(stored_lut).reshape(-1), M)
    a_bits, b_bits = np.broadcast_arrays(_as_float32_bits(a), _as_float32_bits(b))
    a_bits = a_bits.astype(np.int64)
    b_bits = b_bits.astype(np.int64)

    # Field extraction.
    sign_a, sign_b = a_bits >> 31, b_bits >> 31
    ea, eb = (a_bits >> 23) & 0xFF, (b_bits >> 23) & 0xFF
    fa, fb = a_bits & 0x7FFFFF, b_bits & 0x7FFFFF

    # Step 1: sign of the result.
    s = (sign_a ^ sign_b) << 31

    # Step 2: special operands. Subnormals (ea == 0, fa != 0) count as zero.
    a_nan = (ea == 0xFF) & (fa != 0)
    b_nan = (eb == 0xFF) & (fb != 0)
    a_inf = (ea == 0xFF) & (fa == 0)
    b_inf = (eb == 0xFF) & (fb == 0)
    a_zero = ea == 0  # zero or subnormal
    b_zero = eb == 0
    is_nan = a_nan | b_nan | (a_inf & b_zero) | (b_inf & a_zero)
    is_inf = (a_inf | b_inf) & ~is_nan

    # Step 3: zero (or subnormal) operand -> signed zero.
    is_zero = (a_zero | b_zero) & ~is_nan

    # Step 4: truncate the mantissas to M bits (low bits ignored, never rounded).
    ia = fa >> (23 - M)
    ib = fb >> (23 - M)

    # Step 5: look up carry and result mantissa; a indexes the high half.
    index = (ia << M) | ib
    c = carry_table[index]
    r = mantissa_table[index]

    # Step 6: underflow is flushed *before* the carry is added.
    e_before_carry = ea + eb - 127
    underflow = e_before_carry <= 0

    # Step 7: add the carry; overflow to Inf.
    e = e_before_carry + c
    overflow = e >= 255

    # Step 8: assemble the result.
    finite_bits = s | (np.clip(e, 0, 255) << 23) | (r << (23 - M))
    result = np.where(underflow, s, np.where(overflow, s | int(INF_BITS), finite_bits))
    result = np.where(is_zero, s, result)
    result = np.where(is_inf, s | int(INF_BITS), result)
    result = np.where(is_nan, int(QUIET_NAN_BITS), result)
    return result.astype(np.uint32)


def product(a, b, stored_lut, M: int) -> np.ndarray:
    """Simulated products ``P(a, b)`` as float32 (SPEC section 2).

    Args:
      a: First operands (cast to float32).
      b: Second operands (broadcastable with ``a``).
      stored_lut: Stored-format LUT of shape ``[4**M]``.
      M: Mantissa width.

    Returns:
      ``float32`` array of products.
    """
    return product_bits(a, b, stored_lut, M).view(np.float32)


def exact_product(a, b) -> np.ndarray:
    """Exact product of float32-cast operands in float64 (for ``backward="exact"``).

    Args:
      a: First operands.
      b: Second operands.

    Returns:
      ``float64`` array ``float64(float32(a)) * float64(float32(b))`` (exact:
      24-bit significands multiply into at most 48 bits).
    """
    return np.asarray(a, np.float32).astype(np.float64) * np.asarray(b, np.float32).astype(
        np.float64
    )


def _products64(a, b, stored_lut, M, exact: bool) -> np.ndarray:
    """float64 products under the LUT (``exact=False``) or exactly."""
    if exact:
        return exact_product(a, b)
    return product(a, b, stored_lut, M).astype(np.float64)


# --------------------------------------------------------------------------
# LUTs (SPEC sections 3 and 4)
# --------------------------------------------------------------------------


def mantissa_grid(M: int) -> tuple[np.ndarray, np.ndarray]:
    """Representative operands of every LUT entry, ``i``-major.

    Args:
      M: Mantissa width.

    Returns:
      ``(a, b)`` float32 arrays of shape ``[4**M]`` with ``a = 1 + i/2^M``,
      ``b = 1 + j/2^M`` at index ``(i << M) | j``.
    """
    M = lut_lib.check_mbits(M)
    k = np.arange(lut_lib.num_entries(M))
    i, j = k >> M, k & ((1 << M) - 1)
    scale = np.float32(2.0**-M)
    return (1 + i * scale).astype(np.float32), (1 + j * scale).astype(np.float32)


def lut_from_function(fn: Callable, M: int) -> np.ndarray:
    """Builds a stored-format LUT from a vectorised Python model (SPEC section 3).

    Args:
      fn: ``fn(a, b) -> p`` over float32 NumPy arrays (``a``, ``b`` in
        ``[1, 2)``); results are cast to float32.
      M: Mantissa width.

    Returns:
      Stored-format LUT of shape ``[4**M]``.

    Raises:
      ValueError: If a product is not finite or not in ``[1, 4)``.
    """
    a, b = mantissa_grid(M)
    p = np.asarray(fn(a, b))
    p = np.broadcast_to(p, a.shape)
    name = getattr(fn, "__qualname__", repr(fn))
    return lut_lib.encode_products(p, M, what=f"Python model {name!r}")


def _mantissa_index_grid(M: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer mantissas ``i``, ``j`` of every entry, ``i``-major, as int64."""
    k = np.arange(lut_lib.num_entries(M), dtype=np.int64)
    return k >> M, k & ((1 << M) - 1)


def _encode_scaled(p_scaled: np.ndarray, scale_bits: int, M: int) -> np.ndarray:
    """Encodes exact products given as integers ``p * 2**scale_bits``, ``p`` in [1, 4).

    ``c = p >= 2``; ``r`` = the top M fraction bits of ``p / 2**c`` (truncated).
    """
    one = np.int64(1) << scale_bits
    assert np.all((p_scaled >= one) & (p_scaled < 4 * one))
    carry = p_scaled >= 2 * one
    normalised = np.where(carry, p_scaled >> 1, p_scaled)  # in [1, 2), exact shift of
    # an integer: dropping the last bit is itself truncation, as wanted.
    r = (normalised - one) >> (scale_bits - M)
    return lut_lib.encode(carry, r, M)


def truncate_lut(M: int) -> np.ndarray:
    """``truncate(M)`` LUT from SPEC section 4 in exact integer arithmetic.

    Args:
      M: Mantissa width.

    Returns:
      Stored-format LUT.
    """
    M = lut_lib.check_mbits(M)
    i, j = _mantissa_index_grid(M)
    # (1 + i/2^M)(1 + j/2^M) * 2^(2M) = (2^M + i)(2^M + j), exactly.
    return _encode_scaled(((1 << M) + i) * ((1 << M) + j), 2 * M, M)


def mitchell_lut(M: int) -> np.ndarray:
    """``mitchell(M)`` LUT from SPEC section 4 in exact integer arithmetic.

    Args:
      M: Mantissa width.

    Returns:
      Stored-format LUT.
    """
    M = lut_lib.check_mbits(M)
    i, j = _mantissa_index_grid(M)
    one = 1 << M
    t = i + j  # t * 2^M
    p = np.where(t < one, one + t, 2 * t)  # p * 2^M
    return _encode_scaled(p, M, M)


def mbm_lut(M: int) -> np.ndarray:
    """``mbm(M)`` LUT from SPEC section 4 in exact integer arithmetic.

    Args:
      M: Mantissa width.

    Returns:
      Stored-format LUT.
    """
    M = lut_lib.check_mbits(M)
    i, j = _mantissa_index_grid(M)
    # Work in units of 2^-(M + 7): fine enough for x' (M bits) and C = 5 * 2^-6
    # (C/2 = 5 * 2^-7).
    scale_bits = M + 7
    one = 1 << scale_bits
    x_forced = (i | 1) << 7  # x' = x with bit 2^-M set
    y_forced = (j | 1) << 7
    t = x_forced + y_forced
    correction = 5 << (scale_bits - 6)  # C = 2^-4 + 2^-6 = 5 * 2^-6
    half_correction = 5 << (scale_bits - 7)
    g = (t - one) + half_correction
    g = np.where(g >= one, t - one, g)  # skip the correction if it would carry out
    p = np.where(t < one, one + t + correction, 2 * (one + g))
    return _encode_scaled(p, scale_bits, M)


REFERENCE_LUTS: dict[str, Callable[[int], np.ndarray]] = {
    "truncate": truncate_lut,
    "mitchell": mitchell_lut,
    "mbm": mbm_lut,
}


# --------------------------------------------------------------------------
# Matrix products (SPEC section 5)
# --------------------------------------------------------------------------


def matmul_with_bound(a, b, stored_lut, M: int | None, *, exact: bool = False):
    """Reference ``sum_k P(a[..., i, k], b[..., k, j])`` and ``sum_k |P|``.

    Args:
      a: ``[..., I, K]`` first operands.
      b: ``[..., K, J]`` second operands (batch dims broadcast like ``np.matmul``).
      stored_lut: Stored-format LUT (ignored when ``exact``).
      M: Mantissa width (ignored when ``exact``).
      exact: Use exact products instead of the LUT.

    Returns:
      ``(ref, abs_sum)``: float64 arrays of shape ``[..., I, J]``.
    """
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    # products[..., i, k, j] = P(a[..., i, k], b[..., k, j])
    products = _products64(a[..., :, :, None], b[..., None, :, :], stored_lut, M, exact)
    return products.sum(axis=-2), np.abs(products).sum(axis=-2)


def matmul(a, b, stored_lut, M: int) -> np.ndarray:
    """Reference approximate matrix product (float64 sum of reference products).

    Args:
      a: ``[..., I, K]`` first operands.
      b: ``[..., K, J]`` second operands.
      stored_lut: Stored-format LUT.
      M: Mantissa width.

    Returns:
      float64 ``[..., I, J]``.
    """
    return matmul_with_bound(a, b, stored_lut, M)[0]


def dot_with_bound(x, w, stored_lut, M: int):
    """Reference ``approx_dot(x, w)`` with its error-bound scale.

    Args:
      x: ``[..., I, K]`` activations (operand ``a``); a 1-D ``x`` is one row.
      w: ``[K, J]`` weights (operand ``b``).
      stored_lut: Stored-format LUT.
      M: Mantissa width.

    Returns:
      ``(ref, abs_sum)``: float64 ``[..., I, J]`` (``[J]`` for 1-D ``x``).
    """
    x = np.asarray(x, np.float32)
    if x.ndim == 1:
        ref, abs_sum = matmul_with_bound(x[None, :], w, stored_lut, M)
        return ref[0], abs_sum[0]
    return matmul_with_bound(x, w, stored_lut, M)


def dot(x, w, stored_lut, M: int) -> np.ndarray:
    """Reference ``approx_dot(x, w)``: float64 sum over k of ``P(x[..., k], w[k, j])``.

    Args:
      x: ``[..., I, K]`` (or ``[K]``) activations.
      w: ``[K, J]`` weights.
      stored_lut: Stored-format LUT.
      M: Mantissa width.

    Returns:
      float64 result.
    """
    return dot_with_bound(x, w, stored_lut, M)[0]


def sequential_dot(a, b, stored_lut, M: int) -> np.ndarray:
    """float32 sum over k ascending from +0 of the products ``P(a[i, k], b[k, j])``.

    The order every kernel uses when K is not split (``xla_kernels/split_k.h``),
    so kernel results must equal this bit for bit (NaN payloads aside).

    Args:
      a: ``[I, K]`` left operands.
      b: ``[K, J]`` right operands.
      stored_lut: Stored-format LUT.
      M: Mantissa width.

    Returns:
      float32 ``[I, J]``.
    """
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    rows, K = a.shape
    N = b.shape[1]
    acc = np.zeros((rows, N), np.float32)
    step = max(1, (1 << 22) // max(1, rows * N))  # bound the product block's memory
    with np.errstate(invalid="ignore", over="ignore"):
        for k0 in range(0, K, step):
            k1 = min(K, k0 + step)
            p = product_bits(a[:, k0:k1, None], b[None, k0:k1, :], stored_lut, M).view(np.float32)
            for k in range(k1 - k0):
                acc = (acc + p[:, k, :]).astype(np.float32)
    return acc


def dot_vjp(x, w, dy, stored_lut, M: int, backward: str = "approx", *, with_bound: bool = False):
    """Reference gradients of ``approx_dot`` (SPEC section 5).

    ``dx = approx(dy, w^T)`` with ``a = dy``, ``b = w``; ``dw = approx(x^T, dy)``
    with ``a = x``, ``b = dy`` (summed over every batch row).

    Args:
      x: ``[..., I, K]`` activations.
      w: ``[K, J]`` weights.
      dy: ``[..., I, J]`` cotangent.
      stored_lut: Stored-format LUT.
      M: Mantissa width.
      backward: ``"approx"`` (LUT products) or ``"exact"`` (exact products).
      with_bound: Also return the ``sum |P|`` arrays.

    Returns:
      ``(dx, dw)`` float64, or ``((dx, dx_abs_sum), (dw, dw_abs_sum))`` if
      ``with_bound``. The number of summed terms is ``J`` for ``dx`` and
      ``x.size // K`` for ``dw``.
    """
    if backward not in ("approx", "exact"):
        raise ValueError(f"backward must be 'approx' or 'exact', got {backward!r}")
    exact = backward == "exact"
    x = np.asarray(x, np.float32)
    w = np.asarray(w, np.float32)
    dy = np.asarray(dy, np.float32)
    K, J = w.shape
    # dx[..., i, k] = sum_j P(dy[..., i, j], w[k, j])
    dx = matmul_with_bound(dy, w.T, stored_lut, M, exact=exact)
    # dw[k, j] = sum_rows P(x[row, k], dy[row, j])
    x_rows = x.reshape(-1, K)
    dy_rows = dy.reshape(-1, J)
    dw = matmul_with_bound(x_rows.T, dy_rows, stored_lut, M, exact=exact)
    if with_bound:
        return dx, dw
    return dx[0], dw[0]


def bound_ok(got, ref, abs_sum, K: int) -> np.ndarray:
    """Elementwise SPEC section 5 check ``|got - ref| <= K * 2^-24 * sum |P|``.

    Args:
      got: Result under test (any float dtype).
      ref: float64 reference sums.
      abs_sum: float64 sums of ``|P_k|``.
      K: Number of summed terms (``max(K, 1)`` is used).

    Returns:
      Boolean array. NaN must match NaN and infinities must match exactly.
      Where ``abs_sum == 0`` (every product an exact zero) ``got`` must be
      zero up to a tiny absolute slack (the smallest float32 subnormal).
    """
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    abs_sum = np.asarray(abs_sum, np.float64)
    tolerance = max(int(K), 1) * 2.0**-24 * abs_sum
    tolerance = np.where(abs_sum == 0, float(np.finfo(np.float32).smallest_subnormal), tolerance)
    with np.errstate(invalid="ignore"):
        close = np.abs(got - ref) <= tolerance
    both_nan = np.isnan(got) & np.isnan(ref)
    same_inf = np.isinf(ref) & (got == ref)
    return np.where(np.isfinite(ref), close, both_nan | same_inf)


# --------------------------------------------------------------------------
# Convolutions (SPEC section 5)
# --------------------------------------------------------------------------


class _ConvGeometry:
    """Index arithmetic of ``lax.conv_general_dilated`` in canonical N C S layout.

    Convolution is cross-correlation (no kernel flip), as in XLA. Positions
    that fall into padding or into the holes of an lhs (base) dilation
    contribute no product at all, as in XLA's reference evaluator.
    """

    def __init__(
        self,
        lhs_shape,
        rhs_shape,
        window_strides,
        padding,
        lhs_dilation,
        rhs_dilation,
        feature_group_count,
        dimension_numbers,
    ):
        import jax  # Only for its dimension-number and padding parsing.

        nd = len(lhs_shape) - 2
        self.dnums = jax.lax.conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers)
        lhs_perm, rhs_perm, out_perm = self.dnums
        self.lhs_perm, self.rhs_perm, self.out_perm = lhs_perm, rhs_perm, out_perm
        self.strides = tuple(window_strides) if window_strides is not None else (1,) * nd
        self.lhs_dilation = tuple(lhs_dilation) if lhs_dilation is not None else (1,) * nd
        self.rhs_dilation = tuple(rhs_dilation) if rhs_dilation is not None else (1,) * nd
        n, c, *in_spatial = np.take(lhs_shape, lhs_perm)
        o, cg, *k_spatial = np.take(rhs_shape, rhs_perm)
        self.batch, self.in_features, self.in_spatial = int(n), int(c), [int(s) for s in in_spatial]
        self.out_features, self.group_features = int(o), int(cg)
        self.k_spatial = [int(k) for k in k_spatial]
        g = int(feature_group_count)
        if c != g * cg or o % g:
            raise ValueError(
                f"feature_group_count={g} is inconsistent with {c} input features, "
                f"{cg} kernel input features and {o} output features"
            )
        self.groups = g
        if isinstance(padding, str):
            if any(d != 1 for d in self.lhs_dilation):
                raise ValueError("string padding with lhs_dilation is not supported (as in lax)")
            dilated_k = [
                (k - 1) * d + 1 for k, d in zip(self.k_spatial, self.rhs_dilation, strict=True)
            ]
            padding = jax.lax.padtype_to_pads(self.in_spatial, dilated_k, self.strides, padding)
        self.padding = [(int(lo), int(hi)) for lo, hi in padding]
        self.out_spatial = []
        for size, k, s, (lo, hi), ld, rd in zip(
            self.in_spatial,
            self.k_spatial,
            self.strides,
            self.padding,
            self.lhs_dilation,
            self.rhs_dilation,
            strict=True,
        ):
            dilated_in = (size - 1) * ld + 1 if size > 0 else 0
            dilated_k = (k - 1) * rd + 1
            span = dilated_in + lo + hi - dilated_k
            self.out_spatial.append(max(0, span // s + 1) if span >= 0 else 0)

    def taps(self):
        """Iterates over kernel tap positions (tuples of spatial indices)."""
        return itertools.product(*(range(k) for k in self.k_spatial))

    def input_positions(self, tap):
        """For one kernel tap: undilated input index and validity per output position.

        Returns:
          ``(index, valid)``: lists (one per spatial dim) of int arrays over that
          dim's output positions.
        """
        indices, valids = [], []
        for d, k in enumerate(tap):
            out = np.arange(self.out_spatial[d])
            # Position in the padded, lhs-dilated input.
            dilated = out * self.strides[d] + k * self.rhs_dilation[d] - self.padding[d][0]
            ld = self.lhs_dilation[d]
            valid = (dilated >= 0) & (dilated % ld == 0) & (dilated // ld < self.in_spatial[d])
            indices.append(np.where(valid, dilated // ld, 0))
            valids.append(valid)
        return indices, valids

    def gather_input(self, x, c, indices, valids):
        """``x[n, group(o)*Cg + c, idx(out)]`` as ``[N, O, *OUT]`` plus its mask."""
        og = self.out_features // self.groups
        channel = (np.arange(self.out_features) // og) * self.group_features + c
        mesh = np.ix_(*indices)
        values = x[:, channel][(slice(None), slice(None), *mesh)]
        mask = np.ones(self.out_spatial, dtype=bool)
        for d, valid in enumerate(valids):
            shape = [1] * len(valids)
            shape[d] = -1
            mask = mask & valid.reshape(shape)
        return values, channel, mesh, mask


def _to_canonical(array, perm):
    return np.transpose(np.asarray(array, np.float32), perm)


def _from_canonical(array, perm):
    return np.transpose(array, np.argsort(perm))


def conv_general_dilated_with_bound(
    lhs,
    rhs,
    stored_lut,
    M: int | None,
    window_strides=None,
    padding="VALID",
    lhs_dilation=None,
    rhs_dilation=None,
    feature_group_count: int = 1,
    dimension_numbers=None,
    *,
    exact: bool = False,
    batch_group_count: int = 1,
):
    """Reference convolution with ``a`` = input, ``b`` = kernel, and ``sum |P|``.

    Args:
      lhs: Input, layout per ``dimension_numbers`` (default NCHW-style).
      rhs: Kernel (default OIHW-style).
      stored_lut: Stored-format LUT (ignored when ``exact``).
      M: Mantissa width (ignored when ``exact``).
      window_strides: Strides (default 1).
      padding: ``"SAME"``, ``"VALID"``, ``"SAME_LOWER"`` or ``[(lo, hi), ...]``.
      lhs_dilation: Input (base) dilation.
      rhs_dilation: Kernel (window) dilation.
      feature_group_count: Number of feature groups.
      dimension_numbers: As accepted by ``jax.lax.conv_general_dilated``
        (e.g. ``("NHWC", "HWIO", "NHWC")``) or ``None``.
      exact: Use exact products instead of the LUT.
      batch_group_count: Batch groups (lax's definition): the input's batch
        and the kernel's output features are cut into this many contiguous
        groups, group ``b`` of each convolved together, and the results
        concatenated along the output features.

    Returns:
      ``(ref, abs_sum, K)``: float64 output in the output layout, float64 sum
      of ``|P|`` and the number of products per output (``Cg * prod(kernel)``).
    """
    geo = _ConvGeometry(
        np.shape(lhs),
        np.shape(rhs),
        window_strides,
        padding,
        lhs_dilation,
        rhs_dilation,
        feature_group_count,
        dimension_numbers,
    )
    if batch_group_count > 1:
        parts = [
            conv_general_dilated_with_bound(
                x_part,
                w_part,
                stored_lut,
                M,
                window_strides,
                padding,
                lhs_dilation,
                rhs_dilation,
                feature_group_count,
                dimension_numbers,
                exact=exact,
            )
            for x_part, w_part in zip(
                np.split(np.asarray(lhs), batch_group_count, axis=geo.lhs_perm[0]),
                np.split(np.asarray(rhs), batch_group_count, axis=geo.rhs_perm[0]),
                strict=True,
            )
        ]
        out_axis = geo.out_perm[1]
        return (
            np.concatenate([ref for ref, _, _ in parts], axis=out_axis),
            np.concatenate([abs_sum for _, abs_sum, _ in parts], axis=out_axis),
            parts[0][2],
        )
    x = _to_canonical(lhs, geo.lhs_perm)
    w = _to_canonical(rhs, geo.rhs_perm)
    out_shape = (geo.batch, geo.out_features, *geo.out_spatial)
    total = np.zeros(out_shape)
    abs_total = np.zeros(out_shape)
    for tap in geo.taps():
        indices, valids = geo.input_positions(tap)
        for c in range(geo.group_features):
            values, _, _, mask = geo.gather_input(x, c, indices, valids)
            weight = w[(slice(None), c, *tap)].reshape((1, -1) + (1,) * len(tap))
            p = _products64(values, weight, stored_lut, M, exact)
            p = np.where(mask, p, 0.0)  # padding / dilation holes: no product
            total += p
            abs_total += np.abs(p)
    K = geo.group_features * int(np.prod(geo.k_spatial))
    return _from_canonical(total, geo.out_perm), _from_canonical(abs_total, geo.out_perm), K


def conv_general_dilated(
    lhs,
    rhs,
    stored_lut,
    M: int,
    window_strides=None,
    padding="VALID",
    lhs_dilation=None,
    rhs_dilation=None,
    feature_group_count: int = 1,
    dimension_numbers=None,
    *,
    batch_group_count: int = 1,
) -> np.ndarray:
    """Reference approximate convolution (float64 sum of reference products).

    Args:
      lhs: Input (operand ``a``).
      rhs: Kernel (operand ``b``).
      stored_lut: Stored-format LUT.
      M: Mantissa width.
      window_strides: Strides.
      padding: ``"SAME"``, ``"VALID"`` or explicit pairs.
      lhs_dilation: Input dilation.
      rhs_dilation: Kernel dilation.
      feature_group_count: Feature groups.
      dimension_numbers: As for ``jax.lax.conv_general_dilated``.
      batch_group_count: Batch groups (see ``conv_general_dilated_with_bound``).

    Returns:
      float64 output in the output layout.
    """
    return conv_general_dilated_with_bound(
        lhs,
        rhs,
        stored_lut,
        M,
        window_strides,
        padding,
        lhs_dilation,
        rhs_dilation,
        feature_group_count,
        dimension_numbers,
        batch_group_count=batch_group_count,
    )[0]


def conv_vjp(
    lhs,
    rhs,
    dy,
    stored_lut,
    M: int | None,
    backward: str = "approx",
    window_strides=None,
    padding="VALID",
    lhs_dilation=None,
    rhs_dilation=None,
    feature_group_count: int = 1,
    dimension_numbers=None,
    *,
    with_bound: bool = False,
):
    """Reference gradients of the approximate convolution (SPEC section 5).

    Input gradient: products with ``a = dy``, ``b = kernel``. Kernel gradient:
    ``a = input``, ``b = dy``. Both are computed by the forward index
    arithmetic: every (output position, tap) pair that produced a forward
    product contributes one backward product.

    Args:
      lhs: Input.
      rhs: Kernel.
      dy: Output cotangent (output layout).
      stored_lut: Stored-format LUT.
      M: Mantissa width.
      backward: ``"approx"`` or ``"exact"``.
      window_strides: Strides.
      padding: Padding.
      lhs_dilation: Input dilation.
      rhs_dilation: Kernel dilation.
      feature_group_count: Feature groups.
      dimension_numbers: As for ``jax.lax.conv_general_dilated``.
      with_bound: Also return the ``sum |P|`` arrays.

    Returns:
      ``(d_lhs, d_rhs)`` float64 in the input/kernel layouts, or
      ``((d_lhs, d_lhs_abs), (d_rhs, d_rhs_abs))`` if ``with_bound``.
    """
    if backward not in ("approx", "exact"):
        raise ValueError(f"backward must be 'approx' or 'exact', got {backward!r}")
    exact = backward == "exact"
    geo = _ConvGeometry(
        np.shape(lhs),
        np.shape(rhs),
        window_strides,
        padding,
        lhs_dilation,
        rhs_dilation,
        feature_group_count,
        dimension_numbers,
    )
    x = _to_canonical(lhs, geo.lhs_perm)
    w = _to_canonical(rhs, geo.rhs_perm)
    g = _to_canonical(dy, geo.out_perm)
    dx, dx_abs = np.zeros(x.shape), np.zeros(x.shape)
    dw, dw_abs = np.zeros(w.shape), np.zeros(w.shape)
    nd = len(geo.k_spatial)
    for tap in geo.taps():
        indices, valids = geo.input_positions(tap)
        for c in range(geo.group_features):
            values, channel, mesh, mask = geo.gather_input(x, c, indices, valids)
            # Kernel gradient: a = input, b = dy; summed over batch and output positions.
            p = np.where(mask, _products64(values, g, stored_lut, M, exact), 0.0)
            reduce_axes = (0, *range(2, 2 + nd))
            dw[(slice(None), c, *tap)] += p.sum(axis=reduce_axes)
            dw_abs[(slice(None), c, *tap)] += np.abs(p).sum(axis=reduce_axes)
            # Input gradient: a = dy, b = kernel; scattered back to the input position.
            weight = w[(slice(None), c, *tap)].reshape((1, -1) + (1,) * nd)
            q = np.where(mask, _products64(g, weight, stored_lut, M, exact), 0.0)
            full_index = np.ix_(np.arange(geo.batch), channel, *(idx for idx in indices))
            np.add.at(dx, full_index, q)
            np.add.at(dx_abs, full_index, np.abs(q))
    d_lhs = (_from_canonical(dx, geo.lhs_perm), _from_canonical(dx_abs, geo.lhs_perm))
    d_rhs = (_from_canonical(dw, geo.rhs_perm), _from_canonical(dw_abs, geo.rhs_perm))
    if with_bound:
        return d_lhs, d_rhs
    return d_lhs[0], d_rhs[0]


def multiply(a, b, stored_lut, M: int) -> np.ndarray:
    """Elementwise reference products (alias of :func:`product`).

    Args:
      a: First operands.
      b: Second operands.
      stored_lut: Stored-format LUT.
      M: Mantissa width.

    Returns:
      float32 products.
    """
    return product(a, b, stored_lut, M)


__all__: Sequence[str] = (
    "QUIET_NAN_BITS",
    "bound_ok",
    "conv_general_dilated",
    "conv_general_dilated_with_bound",
    "conv_vjp",
    "dot",
    "dot_vjp",
    "dot_with_bound",
    "exact_product",
    "lut_from_function",
    "mantissa_grid",
    "matmul",
    "matmul_with_bound",
    "mbm_lut",
    "mitchell_lut",
    "multiply",
    "product",
    "product_bits",
    "sequential_dot",
    "truncate_lut",
)
