"""Helpers shared by the test modules (LUTs and operand values)."""

from __future__ import annotations

import numpy as np

from approx_jax import multipliers


def random_multiplier(M: int, seed: int) -> multipliers.Multiplier:
    """A multiplier with a random (generally non-symmetric) stored-format LUT."""
    rng = np.random.default_rng(seed)
    dtype = np.uint8 if M <= 7 else np.uint16
    top = 7 if M <= 7 else 15
    r = rng.integers(0, 1 << M, size=4**M)
    c = rng.integers(0, 2, size=4**M)
    return multipliers.from_lut(((c << top) | r).astype(dtype), M, name=f"random{M}")


def underflow_edge_values(rng: np.random.Generator, shape) -> np.ndarray:
    """float32 values with |x| ~ 2^-63 (biased exponents 62..66), random signs.

    Their products lie within a few binades of 2^-126 (some flushed by SPEC
    step 6), so sums that cancel pass through the subnormal range.
    """
    sign = rng.integers(0, 2, shape, dtype=np.uint32) << 31
    exponent = rng.integers(62, 67, shape, dtype=np.uint32) << 23
    mantissa = rng.integers(0, 1 << 23, shape, dtype=np.uint32)
    return (sign | exponent | mantissa).view(np.float32)
