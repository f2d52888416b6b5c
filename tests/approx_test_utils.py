"""Helpers shared by the test modules (LUTs and operand values)."""

from __future__ import annotations

import os
import pathlib

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


_LUT_SUBDIR = pathlib.Path("shared", "reference", "approxtrain_luts")
# A copy of the shared files, for checkouts without shared/ beside them.
VENDORED_LUT_DIR = pathlib.Path(__file__).resolve().parent / "data" / "approxtrain_luts"


def find_reference_lut_dir() -> pathlib.Path | None:
    """Finds ApproxTrain's reference LUT files.

    ``$APPROX_JAX_REFERENCE_LUTS`` wins; otherwise walks up from this directory
    looking for ``shared/reference/approxtrain_luts`` (it lives next to the repo
    root, at ``../shared/reference/approxtrain_luts``:
    :func:`find_shared_reference_lut_dir`); otherwise the copy in
    ``tests/data/approxtrain_luts``.

    Returns:
      The directory, or ``None`` if it cannot be found.
    """
    override = os.environ.get("APPROX_JAX_REFERENCE_LUTS")
    if override:
        return pathlib.Path(override) if pathlib.Path(override).is_dir() else None
    shared = find_shared_reference_lut_dir()
    if shared is not None:
        return shared
    return VENDORED_LUT_DIR if VENDORED_LUT_DIR.is_dir() else None


def find_shared_reference_lut_dir() -> pathlib.Path | None:
    """The project's shared ground-truth LUT directory above this checkout.

    Returns:
      ``shared/reference/approxtrain_luts`` in the nearest parent directory
      that has it, or ``None``.
    """
    for parent in pathlib.Path(__file__).resolve().parents:
        candidate = parent / _LUT_SUBDIR
        if candidate.is_dir():
            return candidate
    return None


def xla_flags(*extra: str) -> str:
    """``XLA_FLAGS`` for a subprocess: this process's flags (the tests' LLVM
    optimization level, see conftest.py) without a host device count, plus
    ``extra``."""
    kept = [
        f
        for f in os.environ.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    return " ".join(kept + list(extra))
