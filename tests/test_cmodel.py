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


def test_damaged_cached_lut_is_rebuilt(require_c_compiler, isolated_cache):
    want = mm.from_c(EXACT, "f", 3).lut
    cached = list((isolated_cache / "lib").glob("*.lut.npy"))
    assert cached
    for path in cached:
        lut = np.load(path)
        lut[1] = 0x7F  # carry 0 with r = 127: out of range for M = 3
        np.save(path, lut)
    np.testing.assert_array_equal(mm.from_c(EXACT, "f", 3).lut, want)


@pytest.mark.parametrize("damage", ["emptied", "halved", "garbled"])
def test_damaged_cache_entries_are_rebuilt(require_c_compiler, isolated_cache, damage):
    """Every cached file of a model emptied, cut in half (a full disk) or
    overwritten with bytes that are not UTF-8: the next call compiles and
    evaluates it again instead of failing (a halved library, loaded as it is,
    crashed with SIGBUS, blamed on the model; a garbled digest raised
    UnicodeDecodeError on every later call)."""
    want = mm.from_c(EXACT, "f", 5).lut
    files = [p for p in (isolated_cache / "lib").iterdir() if p.is_file()]
    assert any(p.suffix == ".so" for p in files), files
    for path in files:
        data = path.read_bytes()
        damaged = {"emptied": b"", "halved": data[: len(data) // 2], "garbled": b"\xff\xfe garbage"}
        path.write_bytes(damaged[damage])
    np.testing.assert_array_equal(mm.from_c(EXACT, "f", 5).lut, want)
    np.testing.assert_array_equal(mm.from_c(EXACT, "f", 5).lut, want)  # the rebuilt entry


# Names of functions the evaluating process already has (libc, libm) or of the
# generated wrapper's variables: the model's own definition must be called.
@pytest.mark.parametrize("name", ["fmul", "write", "hypotf", "strlen", "n", "out", "i", "a"])
def test_model_named_like_a_library_function_or_wrapper_variable(
    require_c_compiler, isolated_cache, name
):
    source = f"float {name}(float x, float y) {{ return x * y; }}"
    np.testing.assert_array_equal(mm.from_c(source, name, 4).lut, mm.truncate(4).lut)


def test_model_file_that_is_not_utf8_compiles(require_c_compiler, isolated_cache, tmp_path):
    # cc compiles it (a Latin-1 comment): so must from_c, with the same LUT.
    path = tmp_path / "latin1.c"
    path.write_bytes(b"/* caf\xe9 model */\nfloat my_mul(float a, float b) { return a * b; }\n")
    np.testing.assert_array_equal(mm.from_c(str(path), "my_mul", 4).lut, mm.truncate(4).lut)
    np.testing.assert_array_equal(mm.from_c(str(path), "my_mul", 4).lut, mm.truncate(4).lut)


def test_existing_path_with_parentheses_is_a_file(require_c_compiler, isolated_cache, tmp_path):
    path = tmp_path / "mul (v2).c"
    path.write_text("float my_mul(float a, float b) { return a * b; }\n")
    np.testing.assert_array_equal(mm.from_c(str(path), "my_mul", 4).lut, mm.truncate(4).lut)
    with pytest.raises(FileNotFoundError):
        mm.from_c(str(tmp_path / "missing (v3).c"), "my_mul", 4)


@pytest.mark.parametrize("value", ["inf", "1e9"])
def test_unlimited_timeout_setting(require_c_compiler, isolated_cache, monkeypatch, value):
    monkeypatch.setenv("APPROX_JAX_CMODEL_TIMEOUT", value)
    np.testing.assert_array_equal(mm.from_c(EXACT, "f", 3).lut, mm.truncate(3).lut)


@pytest.mark.parametrize("compiler", ["c++", "g++"])
def test_c_model_compiled_by_a_cxx_compiler(require_c_compiler, isolated_cache, tmp_path, compiler):
    # A C++ compiler compiles a `.c` file as C++: the generated wrapper must be
    # valid there too, and its errors must not be reported as the model's lines.
    import shutil  # noqa: PLC0415

    if shutil.which(compiler) is None:
        pytest.skip(f"{compiler} not found")
    model = tmp_path / "model.c"
    model.write_text(EXACT)
    got = mm.from_c(str(model), "f", 4, compiler=compiler)
    np.testing.assert_array_equal(got.lut, mm.truncate(4).lut)
    with pytest.raises(cmodel.CModelError, match="signature float") as e:
        mm.from_c("int f(int a, int b) { return a * b; }", "f", 3, compiler=compiler)
    assert "LUT wrapper" in str(e.value)
    with pytest.raises(cmodel.CModelError, match="not defined") as e:
        mm.from_c(str(model), "g", 3, compiler=compiler)
    # Two sentences: what is wrong, then what failed (the compiler's words below).
    assert "model source. Compiling the functional model" in str(e.value)


def test_call_to_an_undeclared_function_is_an_error(require_c_compiler, isolated_cache):
    # C compilers only warn (and leave an undefined symbol) by default.
    with pytest.raises(cmodel.CModelError, match="implicit declaration"):
        mm.from_c("float f(float a, float b) { return helper(a, b); }", "f", 3)


def test_undeclared_callee_named_like_the_model_is_not_blamed_on_the_model(
    require_c_compiler, isolated_cache
):
    # `ex` is defined; the error is the undeclared `exit` whose name contains it.
    source = "float ex(float a, float b) { if (a > 1.5f) exit(3); return a * b; }"
    with pytest.raises(cmodel.CModelError, match="exit") as e:
        mm.from_c(source, "ex", 3)
    assert "not defined in the model source" not in str(e.value)


def test_contradictory_language_arguments():
    with pytest.raises(ValueError, match="contradicts"):
        mm.from_c(EXACT, "f", 3, language="c", cpp=True)


@pytest.mark.parametrize(
    "source,cpp",
    [
        ("int f(int a, int b) { return a * b; }", False),  # would truncate 1.5 to 1
        ("float f(int a, int b) { return a * b; }", False),
        ("int f(int a, int b) { return a * b; }", True),
        # C++: a float result from integer (or bool) operands converted from 1.5
        ("float f(int a, int b) { return (float)(a * b); }", True),
        ("float f(long a, float b) { return a * b; }", True),
        ("float f(bool a, bool b) { return a; }", True),
    ],
)
def test_model_with_integer_signature_is_rejected(require_c_compiler, isolated_cache, source, cpp):
    with pytest.raises(cmodel.CModelError, match="signature float"):
        mm.from_c(source, "f", 3, cpp=cpp)


def test_double_and_template_models_are_accepted(require_c_compiler, isolated_cache):
    want = mm.truncate(4).lut
    double = mm.from_c("double f(double a, double b) { return a * b; }", "f", 4)
    np.testing.assert_array_equal(double.lut, want)
    template = mm.from_c("template <class T> T f(T a, T b) { return a * b; }", "f", 4, cpp=True)
    np.testing.assert_array_equal(template.lut, want)


@pytest.mark.parametrize(
    "source",
    [
        # an overload set whose float overload is the one called
        "float f(float a, float b) { return a * b; }\nint f(int a, int b) { return 0; }",
        "double f(const double& a, const float& b) { return a * b; }",
        "namespace { float f(float a, float b) { return a * b; } }",
    ],
)
def test_cpp_models_with_float_operands_are_accepted(require_c_compiler, isolated_cache, source):
    np.testing.assert_array_equal(mm.from_c(source, "f", 4, cpp=True).lut, mm.truncate(4).lut)


def test_model_exiting_with_the_load_failure_status_is_blamed_on_the_model(
    require_c_compiler, isolated_cache
):
    # Status 97 is also what the evaluating child uses when it cannot load the
    # library: the model's own exit(97) must not be reported as a load failure.
    source = "#include <stdlib.h>\nfloat f(float a, float b) { exit(97); return 0; }"
    with pytest.raises(cmodel.CModelError, match="exited with status 97"):
        mm.from_c(source, "f", 3)


def test_model_exiting_with_status_zero_is_named(require_c_compiler, isolated_cache):
    source = "#include <stdlib.h>\nfloat f(float a, float b) { exit(0); return 0; }"
    with pytest.raises(cmodel.CModelError, match="without writing.*exit"):
        mm.from_c(source, "f", 3)


@pytest.mark.parametrize("suffix", [".lut.npy", ".products.npy"])
def test_cached_arrays_changed_in_range_are_rebuilt(require_c_compiler, isolated_cache, suffix):
    """A cached LUT or product table whose bytes changed (a flipped bit that
    still decodes to a valid LUT) is rebuilt, not served as the design's LUT."""
    want = mm.from_c(EXACT, "f", 5).lut
    lib_dir = isolated_cache / "lib"
    if suffix == ".products.npy":
        for path in lib_dir.glob("*.lut.npy"):
            path.unlink()
    damaged = list(lib_dir.glob("*" + suffix))
    assert damaged
    for path in damaged:
        array = np.load(path)
        flat = array.reshape(-1)
        if suffix == ".lut.npy":
            flat[5] ^= 1  # still a valid LUT entry
        else:
            flat[5] = np.float32(1.5)  # still in [1, 4)
        np.save(path, array)
    np.testing.assert_array_equal(mm.from_c(EXACT, "f", 5).lut, want)


def test_builtins_fall_back_to_numpy_when_the_named_compiler_is_missing(monkeypatch):
    # $CC names a compiler that is not installed: the built-in designs still
    # build (NumPy reference, same LUT), with a warning naming it.
    from approx_jax._src import multipliers as impl

    want = impl._BUILTIN_FAMILIES["mbm"][2](6)
    monkeypatch.setenv("CC", "approx-jax-no-such-compiler")
    with pytest.warns(RuntimeWarning, match="approx-jax-no-such-compiler"):
        lut = impl._builtin_lut.__wrapped__("mbm", 6)  # (not the process-wide cache)
    np.testing.assert_array_equal(lut, want)


def test_unsafe_shared_temp_cache_is_not_used(monkeypatch, tmp_path):
    # With the home cache unwritable, the per-user temp dir is used only if
    # this user owns it and no one else may write to it.
    import os
    import tempfile

    monkeypatch.setenv("APPROX_JAX_CACHE", "/proc/approx_jax_unwritable")
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setattr(cmodel, "_private_cache", None)
    shared = tmp_path / f"approx_jax-{os.getuid()}"
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o777)  # (mkdir's mode is masked by the umask)
    chosen = cmodel.cache_dir()
    assert chosen != shared and chosen.is_dir()
    assert cmodel.cache_dir() == chosen  # one private dir per process
    os.chmod(shared, 0o700)
    monkeypatch.setattr(cmodel, "_private_cache", None)
    assert cmodel.cache_dir() == shared


def test_header_next_to_the_model_is_found_and_tracked(
    require_c_compiler, isolated_cache, tmp_path
):
    # `#include "scale.h"` resolves next to the model file (as `cc model.c` does),
    # and editing the header gives a new LUT rather than the cached one.
    (tmp_path / "scale.h").write_text("#define SCALE 1.0f\n")
    model = tmp_path / "model.c"
    model.write_text('#include "scale.h"\nfloat f(float a, float b) { return a * b * SCALE; }\n')
    first = mm.from_c(model, "f", 3)
    np.testing.assert_array_equal(first.lut, mm.truncate(3).lut)
    (tmp_path / "scale.h").write_text("#define SCALE 1.125f\n")
    second = mm.from_c(model, "f", 3)
    assert not np.array_equal(second.lut, first.lut)
    (tmp_path / "scale.h").write_text("#define SCALE 1.0f\n")
    np.testing.assert_array_equal(mm.from_c(model, "f", 3).lut, first.lut)


def test_a_cache_that_cannot_be_written_still_serves_its_entries(
    require_c_compiler, isolated_cache, tmp_path, monkeypatch
):
    # A read-only cache (a shared team cache, a read-only mount): its valid
    # entries are used, arrays it lacks are computed without being stored,
    # and a model it lacks is compiled into the per-user fallback cache.
    # (Before: every write went inside the cache's lib/ first, preprocessing
    # included, so even a cached model failed with "Read-only file system".)
    import errno
    import tempfile

    want = mm.from_c(EXACT, "f", 5).lut
    lib_dir = isolated_cache / "lib"
    for pattern in ("*.lut.npy", "*.products.npy"):
        for path in lib_dir.glob(pattern):
            path.unlink()
    root = str(isolated_cache)

    def refuse(where):
        if where is not None and str(where).startswith(root):
            raise OSError(errno.EROFS, "Read-only file system", str(where))

    real_mkstemp, real_tmpdir = tempfile.mkstemp, tempfile.TemporaryDirectory

    def mkstemp(*args, dir=None, **kwargs):
        refuse(dir)
        return real_mkstemp(*args, dir=dir, **kwargs)

    def temporary_directory(*args, dir=None, **kwargs):
        refuse(dir)
        return real_tmpdir(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(tempfile, "TemporaryDirectory", temporary_directory)
    fallback = tmp_path / "tmp"
    fallback.mkdir()
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(fallback))
    monkeypatch.setattr(cmodel, "_private_cache", None)

    assert cmodel.compile_model(EXACT, "f", 5).parent == lib_dir  # served, not rebuilt
    np.testing.assert_array_equal(cmodel.build_lut(EXACT, "f", 5), want)
    assert not list(lib_dir.glob("*.npy"))  # nothing written there
    other = cmodel.compile_model(EXACT.replace("a * b", "b * a"), "f", 5)
    assert str(other).startswith(str(fallback))
    np.testing.assert_array_equal(cmodel.build_lut(EXACT.replace("a * b", "b * a"), "f", 5), want)
