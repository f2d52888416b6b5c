"""LUT format helpers (see docs/DESIGN.md, "LUT formats", and SPEC section 3).

Two formats exist:

* **Stored format** (``Multiplier.lut``): one unsigned integer per entry at
  index ``(i << M) | j``. The carry bit ``c`` sits in the top bit of the storage
  word and the M-bit result mantissa ``r`` in the low bits: ``uint8``
  ``c << 7 | r`` for ``M <= 7`` (byte-identical to ApproxTrain's ``.bin``
  files) and ``uint16`` ``c << 15 | r`` for ``8 <= M <= 11``.
* **Kernel format** (what the XLA kernels receive): ``uint32``
  ``(c << 23) | (r << (23 - M))``, so a product's magnitude bits are simply
  ``((ea + eb - 127) << 23) + entry``.
"""

from __future__ import annotations

import numpy as np

MIN_MBITS = 1
MAX_MBITS = 11
# Widest M whose stored format fits ApproxTrain's one-byte-per-entry files.
MAX_APPROXTRAIN_MBITS = 7


def check_mbits(M, *, arg_name: str = "M") -> int:
    """Validates a LUT mantissa width.

    Args:
      M: The value to check.
      arg_name: Name of the argument, used in the error message.

    Returns:
      ``M`` as a Python int.

    Raises:
      ValueError: If ``M`` is not an integer in ``[1, 11]``.
    """
    if isinstance(M, bool) or not isinstance(M, int | np.integer):
        raise ValueError(
            f"{arg_name} (the multiplier's mantissa width) must be an int in "
            f"[{MIN_MBITS}, {MAX_MBITS}], got {M!r} of type {type(M).__name__}"
        )
    if not MIN_MBITS <= int(M) <= MAX_MBITS:
        raise ValueError(
            f"{arg_name} (the multiplier's mantissa width) must be in "
            f"[{MIN_MBITS}, {MAX_MBITS}], got {M}"
        )
    return int(M)


def num_entries(M: int) -> int:
    """Returns the number of LUT entries, ``4**M``, of a width-``M`` multiplier.

    Args:
      M: Mantissa width.

    Returns:
      ``4**M``.
    """
    return 1 << (2 * M)


def stored_dtype(M: int) -> np.dtype:
    """Returns the stored-format dtype for width ``M``.

    Args:
      M: Mantissa width, 1..11.

    Returns:
      ``np.dtype(np.uint8)`` for ``M <= 7``, else ``np.dtype(np.uint16)``.
    """
    M = check_mbits(M)
    return np.dtype(np.uint8) if M <= MAX_APPROXTRAIN_MBITS else np.dtype(np.uint16)


def _carry_shift(M: int) -> int:
    """Bit position of the carry bit in the stored word (7 or 15)."""
    return stored_dtype(M).itemsize * 8 - 1


def encode(c, r, M: int) -> np.ndarray:
    """Packs carry bits and result mantissas into stored-format entries.

    Args:
      c: Array of carry bits (0 or 1).
      r: Array of M-bit result mantissas, broadcastable with ``c``.
      M: Mantissa width.

    Returns:
      Stored-format array (``uint8`` or ``uint16``).

    Raises:
      ValueError: If any carry is not 0/1 or any ``r`` does not fit in M bits.
    """
    M = check_mbits(M)
    c = np.asarray(c).astype(np.int64)
    r = np.asarray(r).astype(np.int64)
    if np.any((c != 0) & (c != 1)):
        raise ValueError("carry bits must be 0 or 1")
    if np.any((r < 0) | (r >= (1 << M))):
        raise ValueError(f"result mantissas must fit in M={M} bits")
    return ((c << _carry_shift(M)) | r).astype(stored_dtype(M))


def decode(lut, M: int) -> tuple[np.ndarray, np.ndarray]:
    """Splits stored-format entries into carry bits and result mantissas.

    Args:
      lut: Stored-format integer array (any shape).
      M: Mantissa width.

    Returns:
      ``(c, r)``: ``int64`` arrays of the same shape as ``lut``.
    """
    M = check_mbits(M)
    words = np.asarray(lut).astype(np.int64)
    return (words >> _carry_shift(M)) & 1, words & ((1 << M) - 1)


def encode_products(p, M: int, *, what: str = "functional model") -> np.ndarray:
    """Encodes product values ``p`` in ``[1, 4)`` as stored entries (SPEC 3).

    ``c = 1`` if the float32 exponent field of ``p`` exceeds 127; ``r`` is the
    top M bits of ``p``'s 23-bit mantissa field (truncation, never rounding).

    Args:
      p: Array of ``4**M`` products (any float dtype; cast to float32 first,
        as a C model returning ``float`` would), ``i``-major.
      M: Mantissa width.
      what: Description of the producer, for error messages.

    Returns:
      Stored-format array of shape ``[4**M]``.

    Raises:
      ValueError: If the size is wrong or a product is not finite or not in
        ``[1, 4)``.
    """
    M = check_mbits(M)
    p32 = np.asarray(p, dtype=np.float32).reshape(-1)
    if p32.size != num_entries(M):
        raise ValueError(
            f"{what} produced {p32.size} products; expected 4**M = {num_entries(M)} "
            f"entries for M={M}"
        )
    bad = ~(np.isfinite(p32) & (p32 >= 1.0) & (p32 < 4.0))
    if np.any(bad):
        k = int(np.flatnonzero(bad)[0])
        i, j = k >> M, k & ((1 << M) - 1)
        raise ValueError(
            f"{what} returned p={float(p32[k])!r} for a={1 + i / 2**M}, "
            f"b={1 + j / 2**M} (i={i}, j={j}, M={M}); products of mantissas in "
            "[1, 2) must be finite and in [1, 4)"
        )
    bits = p32.view(np.uint32)
    carry = ((bits >> 23) & 0xFF) > 127
    mantissa = (bits & 0x7FFFFF) >> (23 - M)
    return encode(carry, mantissa, M)


def validate_lut(array, M: int) -> np.ndarray:
    """Checks a stored-format LUT (or stack of LUTs) and normalises its dtype.

    Args:
      array: Integer array of shape ``[4**M]`` or ``[D, 4**M]``.
      M: Mantissa width.

    Returns:
      The LUT as a NumPy array of ``stored_dtype(M)``.

    Raises:
      TypeError: If the array does not have an integer dtype.
      ValueError: If the shape is wrong or an entry has bits set outside the
        carry bit and the low M bits.
    """
    M = check_mbits(M)
    arr = np.asarray(array)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(
            f"a stored-format LUT must have an integer dtype, got {arr.dtype}; "
            "pass product values through from_lut (float arrays) instead"
        )
    if arr.ndim not in (1, 2) or arr.shape[-1] != num_entries(M):
        raise ValueError(
            f"LUT of shape {arr.shape} is invalid for M={M}: expected 4**M = "
            f"{num_entries(M)} entries (shape [{num_entries(M)}] or [D, {num_entries(M)}])"
        )
    if arr.ndim == 2 and arr.shape[0] == 0:
        raise ValueError("a stack of LUTs needs at least one design")
    words = arr.astype(np.int64)
    allowed = (1 << _carry_shift(M)) | ((1 << M) - 1)
    bad = (words < 0) | ((words & ~allowed) != 0)
    if np.any(bad):
        k = np.unravel_index(int(np.flatnonzero(bad)[0]), arr.shape)
        raise ValueError(
            f"LUT entry {tuple(int(x) for x in k)} = {int(arr[k])} is out of range for "
            f"M={M}: the stored format is {stored_dtype(M).name} c << "
            f"{_carry_shift(M)} | r with r < 2**{M}"
        )
    return words.astype(stored_dtype(M))


def kernel_lut(stored, M: int):
    """Converts stored-format entries to the kernel format (works inside jit).

    Args:
      stored: Stored-format array (NumPy or JAX, any leading dims).
      M: Mantissa width (static).

    Returns:
      ``jnp.uint32`` array ``(c << 23) | (r << (23 - M))`` of the same shape.
    """
    import jax.numpy as jnp  # Deferred: keeps the NumPy-only helpers light.

    M = check_mbits(M)
    words = jnp.asarray(stored).astype(jnp.uint32)
    carry = (words >> _carry_shift(M)) & jnp.uint32(1)
    mantissa = words & jnp.uint32((1 << M) - 1)
    return (carry << 23) | (mantissa << (23 - M))


def kernel_lut_numpy(stored, M: int) -> np.ndarray:
    """NumPy twin of :func:`kernel_lut` (for tests and the reference).

    Args:
      stored: Stored-format array.
      M: Mantissa width.

    Returns:
      ``np.uint32`` kernel-format array.
    """
    c, r = decode(stored, M)
    return ((c << 23) | (r << (23 - M))).astype(np.uint32)


def expand_lut(stored, m: int, M_new: int) -> np.ndarray:
    """Widens a width-``m`` LUT to width ``M_new`` without changing any product.

    The entry for ``(i', j')`` at width ``M_new`` is the entry for
    ``(i' >> d, j' >> d)`` at width ``m`` with ``r`` shifted left by
    ``d = M_new - m``. Because SPEC step 4 truncates operands, the widened
    LUT's index bits ``i' >> d`` equal the narrow LUT's index, so every product
    is bit-identical.

    Args:
      stored: Stored-format array of shape ``[..., 4**m]``.
      m: Its width.
      M_new: Target width, ``>= m``.

    Returns:
      Stored-format array of shape ``[..., 4**M_new]`` and
      ``stored_dtype(M_new)``.

    Raises:
      ValueError: If ``M_new < m`` or the shape does not match ``m``.
    """
    m = check_mbits(m, arg_name="m")
    M_new = check_mbits(M_new, arg_name="M_new")
    if M_new < m:
        raise ValueError(f"expand_lut can only widen: M_new={M_new} < m={m}")
    arr = np.asarray(stored)
    if arr.shape[-1:] != (num_entries(m),):
        raise ValueError(
            f"expected 4**m = {num_entries(m)} entries on the last axis, got {arr.shape}"
        )
    shift = M_new - m
    idx = np.arange(1 << M_new) >> shift
    # Narrow index of every wide (i', j') pair, i'-major.
    narrow_index = ((idx[:, None] << m) | idx[None, :]).reshape(-1)
    c, r = decode(arr, m)
    return encode(c[..., narrow_index], r[..., narrow_index] << shift, M_new)


def shrink_lut(stored, M: int, m_new: int) -> np.ndarray:
    """Inverse of :func:`expand_lut` for a LUT that came from one.

    Args:
      stored: Stored-format array of shape ``[..., 4**M]``.
      M: Its width.
      m_new: Target width, ``<= M``.

    Returns:
      The width-``m_new`` LUT that :func:`expand_lut` would widen back to
      ``stored``.

    Raises:
      ValueError: If ``stored`` is not an expansion of a width-``m_new`` LUT.
    """
    M = check_mbits(M)
    m_new = check_mbits(m_new, arg_name="m_new")
    if m_new > M:
        raise ValueError(f"shrink_lut can only narrow: m_new={m_new} > M={M}")
    arr = np.asarray(stored)
    shift = M - m_new
    idx = np.arange(1 << m_new) << shift
    wide_index = ((idx[:, None] << M) | idx[None, :]).reshape(-1)
    c, r = decode(arr[..., wide_index], M)
    narrow = encode(c, r >> shift, m_new)
    if not np.array_equal(expand_lut(narrow, m_new, M), arr.astype(stored_dtype(M))):
        raise ValueError(f"LUT is not an exact widening of a width-{m_new} LUT")
    return narrow
