"""Shared pytest fixtures."""

from __future__ import annotations

import os
import pathlib

# XLA's own code in the tests (the fusions around the custom calls, Flax
# layers, optax updates) is compiled by LLVM at optimization level 0, before
# any JAX backend starts: compiling is most of the suite's time (520 -> 404 s
# on 2 cores, the same VM and hour), and the tests check values, not XLA's speed. The kernels under
# test are the built extension's, unchanged. The whole suite passes at XLA's
# default level too: XLA_FLAGS=--xla_backend_optimization_level=3 runs it so
# (subprocesses inherit the flag through approx_test_utils.xla_flags).
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()

import pytest  # noqa: E402
from approx_test_utils import find_reference_lut_dir  # noqa: E402


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
