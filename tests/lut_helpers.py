"""LUT helpers shared by the test modules."""

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
