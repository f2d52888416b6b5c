"""C/C++ functional models: a faulty model raises CModelError, the caller survives."""

from __future__ import annotations

import numpy as np
import pytest

from approx_jax import multipliers as mm
from approx_jax._src import cmodel

EXACT = "float f(float a, float b) { return a * b; }"

FAULTY = {
    "segfault": ("float f(float a, float b) { volatile int *p = 0; return *p; }", "SIGSEGV"),
    "abort": ("#include <stdlib.h>\nfloat f(float a, float b) { abort(); return 0; }", "SIGABRT"),
    "exit": (
        "#include <stdlib.h>\nfloat f(float a, float b) { exit(3); return 0; }",
        "exited with status 3",
    ),
}


@pytest.mark.parametrize("kind", sorted(FAULTY))
def test_crashing_model_raises(require_c_compiler, isolated_cache, kind):
    source, message = FAULTY[kind]
    with pytest.raises(cmodel.CModelError, match=message):
        mm.from_c(source, "f", 3)


def test_throwing_cpp_model_raises(require_c_compiler, isolated_cache):
    source = (
        "#include <stdexcept>\n"
        'float f(float a, float b) { throw std::runtime_error("model says no"); }'
    )
    with pytest.raises(cmodel.CModelError, match="model says no"):
        mm.from_c(source, "f", 3, cpp=True)


def test_endless_model_times_out(require_c_compiler, isolated_cache, monkeypatch):
    monkeypatch.setenv("APPROX_JAX_CMODEL_TIMEOUT", "1")
    source = "float f(float a, float b) { volatile int x = 1; while (x) {} return a * b; }"
    with pytest.raises(cmodel.CModelError, match="did not finish within 1 s"):
        mm.from_c(source, "f", 3)


@pytest.mark.parametrize("value", ["0", "-1", "soon"])
def test_bad_timeout_setting(monkeypatch, value):
    monkeypatch.setenv("APPROX_JAX_CMODEL_TIMEOUT", value)
    with pytest.raises(ValueError, match="APPROX_JAX_CMODEL_TIMEOUT"):
        cmodel.model_timeout()


def test_model_that_prints_still_gives_its_products(require_c_compiler, isolated_cache):
    source = '#include <stdio.h>\nfloat f(float a, float b) { printf("x"); return a * b; }'
    np.testing.assert_array_equal(mm.from_c(source, "f", 4).lut, mm.from_c(EXACT, "f", 4).lut)


def test_flags_as_one_string(require_c_compiler, isolated_cache):
    source = "float f(float a, float b) { return SCALE * a * b; }"
    got = mm.from_c(source, "f", 4, flags="-O1 -DSCALE=1.0f")
    np.testing.assert_array_equal(got.lut, mm.from_c(EXACT, "f", 4).lut)


def test_corrupt_cached_library_is_rebuilt(require_c_compiler, isolated_cache):
    want = mm.from_c(EXACT, "f", 5).lut
    lib_dir = isolated_cache / "lib"
    for cached in lib_dir.glob("*.npy"):
        cached.unlink()
    libraries = list(lib_dir.glob("*.so"))
    assert libraries
    for lib in libraries:
        lib.write_bytes(b"\x7fELF")  # a truncated write
    np.testing.assert_array_equal(mm.from_c(EXACT, "f", 5).lut, want)
