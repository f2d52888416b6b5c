"""Shared pytest fixtures."""

from __future__ import annotations

import os
import pathlib

import pytest

_LUT_SUBDIR = pathlib.Path("shared", "reference", "approxtrain_luts")


def find_reference_lut_dir() -> pathlib.Path | None:
    """Finds ApproxTrain's reference LUT files.

    ``$APPROX_JAX_REFERENCE_LUTS`` wins; otherwise walks up from this directory
    looking for ``shared/reference/approxtrain_luts`` (it lives next to the repo
    root, at ``../shared/reference/approxtrain_luts``).

    Returns:
      The directory, or ``None`` if it cannot be found.
    """
    override = os.environ.get("APPROX_JAX_REFERENCE_LUTS")
    if override:
        return pathlib.Path(override) if pathlib.Path(override).is_dir() else None
    for parent in pathlib.Path(__file__).resolve().parents:
        candidate = parent / _LUT_SUBDIR
        if candidate.is_dir():
            return candidate
    return None


@pytest.fixture(scope="session")
def reference_lut_dir() -> pathlib.Path:
    """Directory holding ``{ACC,MBM,MIT}_M.bin``; skips the test if absent."""
    path = find_reference_lut_dir()
    if path is None:
        pytest.skip("ApproxTrain reference LUTs (shared/reference/approxtrain_luts) not found")
    return path


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch) -> pathlib.Path:
    """Points the C-model cache ($APPROX_JAX_CACHE) at a fresh temp dir."""
    cache = tmp_path / "approx_jax_cache"
    monkeypatch.setenv("APPROX_JAX_CACHE", str(cache))
    return cache


@pytest.fixture(scope="session")
def has_c_compiler() -> bool:
    """Whether a C compiler is available for C functional models."""
    from approx_jax._src import cmodel

    return cmodel.find_compiler() is not None


@pytest.fixture
def require_c_compiler(has_c_compiler):
    """Skips the test when no C compiler is available."""
    if not has_c_compiler:
        pytest.skip("no C compiler available")
