"""Multiplier designs shared by the benchmark scripts (not part of the package)."""

from __future__ import annotations

import numpy as np


def random_design(mbits: int):
    """A design with no closed form, as a user's own C model would be.

    Args:
      mbits: Mantissa width M (1..11).

    Returns:
      A ``Multiplier`` named ``random{M}`` whose LUT has its carry and result
      mantissa drawn uniformly (seeded by M), so every index bit matters and
      every product is a LUT read: the built-ins have closed forms (and MBM a
      narrower effective width) that the kernels may use instead.
    """
    # Imported here: bench_gpu.py imports approx_jax only once it has a device.
    from approx_jax import multipliers

    rng = np.random.default_rng(mbits)
    r = rng.integers(0, 1 << mbits, size=4**mbits)
    c = rng.integers(0, 2, size=4**mbits)
    dtype, top = (np.uint8, 7) if mbits <= 7 else (np.uint16, 15)
    return multipliers.from_lut(((c << top) | r).astype(dtype), mbits, name=f"random{mbits}")
