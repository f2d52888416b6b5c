"""Tests of the Multiplier pytree, its constructors, LUT formats and C models."""

from __future__ import annotations

import pathlib
import subprocess
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from approx_test_utils import (
    VENDORED_LUT_DIR,
    find_shared_reference_lut_dir,
    random_multiplier,
)

import approx_jax
from approx_jax._src import cmodel, reference
from approx_jax._src import lut as lut_lib
from approx_jax._src import multipliers as mm

FAMILIES = {"truncate": mm.truncate, "mitchell": mm.mitchell, "mbm": mm.mbm}
APPROXTRAIN_FILES = [
    ("ACC_7.bin", "truncate", 7),
    *((f"MBM_{M}.bin", "mbm", M) for M in (1, 3, 5, 7)),
    *((f"MIT_{M}.bin", "mitchell", M) for M in (1, 3, 5, 7)),
]

# A user-style model: Mitchell with the antilog's linear error partly corrected.
CUSTOM_C = """
float tweak_mul(float a, float b) {
  double t = (a - 1.0) + (b - 1.0);
  double p = (t < 1.0) ? 1.0 + t + t * (1.0 - t) / 8.0 : 2.0 * t;
  return (float)p;
}
"""


def tweak_py(a, b):
    t = (a.astype(np.float64) - 1.0) + (b.astype(np.float64) - 1.0)
    return np.where(t < 1.0, 1.0 + t + t * (1.0 - t) / 8.0, 2.0 * t).astype(np.float32)


def random_normal_floats(rng, n):
    """float32 values with random signs, mantissas and moderate exponents."""
    bits = (
        (rng.integers(0, 2, n, dtype=np.uint32) << 31)
        | (rng.integers(100, 155, n, dtype=np.uint32) << 23)
        | rng.integers(0, 1 << 23, n, dtype=np.uint32)
    )
    return bits.view(np.float32)


# ---------------------------------------------------------------------------
# Built-in families
# ---------------------------------------------------------------------------


def test_vendored_luts_equal_shared_reference():
    """tests/data's copy of the LUT files is the shared ground truth, file for file."""
    shared = find_shared_reference_lut_dir()
    if shared is None:
        pytest.skip("no shared/reference/approxtrain_luts above this checkout")
    shared_files = sorted(p.name for p in shared.glob("*.bin"))
    assert shared_files == sorted(p.name for p in VENDORED_LUT_DIR.glob("*.bin"))
    assert shared_files == sorted(name for name, _, _ in APPROXTRAIN_FILES)
    for name in shared_files:
        assert (VENDORED_LUT_DIR / name).read_bytes() == (shared / name).read_bytes(), name


@pytest.mark.parametrize(("file_name", "family", "M"), APPROXTRAIN_FILES)
def test_builtin_equals_approxtrain_file(reference_lut_dir, file_name, family, M):
    expected = np.fromfile(reference_lut_dir / file_name, dtype=np.uint8)
    got = FAMILIES[family](M).lut
    assert got.dtype == np.uint8
    assert got.tobytes() == expected.tobytes()


@pytest.mark.parametrize(("file_name", "family", "M"), APPROXTRAIN_FILES)
def test_numpy_reference_equals_approxtrain_file(reference_lut_dir, file_name, family, M):
    expected = np.fromfile(reference_lut_dir / file_name, dtype=np.uint8)
    assert reference.REFERENCE_LUTS[family](M).tobytes() == expected.tobytes()


@pytest.mark.parametrize("M", range(1, 12))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_c_model_equals_numpy_reference(family, M):
    multiplier = FAMILIES[family](M)
    assert multiplier.mbits == M
    assert multiplier.name == f"{family}{M}"
    assert multiplier.lut.shape == (4**M,)
    assert multiplier.lut.dtype == lut_lib.stored_dtype(M)
    np.testing.assert_array_equal(multiplier.lut, reference.REFERENCE_LUTS[family](M))


def test_builtins_are_cached_and_read_only():
    assert mm.mbm(5).lut is mm.mbm(5).lut
    with pytest.raises(ValueError):
        mm.mbm(5).lut[0] = 1


@pytest.mark.parametrize("read_only_view", [False, True])
def test_multiplier_keeps_its_own_copy_of_a_numpy_lut(read_only_view):
    # The ops cache per read-only LUT: a LUT that changed under the caller's
    # array (writeable, or seen through a read-only view of one) must not
    # change the Multiplier, nor leave a stale cached conversion behind.
    base = np.array(mm.mbm(3).lut)
    lut = base.view() if read_only_view else base
    if read_only_view:
        lut.setflags(write=False)
    m = approx_jax.Multiplier(lut, "mine", 3)
    assert not m.lut.flags.writeable and not np.shares_memory(m.lut, base)
    a, b = np.float32([1.3, 1.7, 1.2]), np.float32([1.1, 1.9, 1.6])
    want = reference.product(a, b, mm.mbm(3).lut, 3)
    np.testing.assert_array_equal(_bits(approx_jax.multiply(a, b, m)), _bits(want))
    base[:] = mm.mitchell(3).lut
    np.testing.assert_array_equal(_bits(approx_jax.multiply(a, b, m)), _bits(want))
    changed = approx_jax.multiply(a, b, approx_jax.Multiplier(lut, "mine", 3))
    want_changed = reference.product(a, b, mm.mitchell(3).lut, 3)
    np.testing.assert_array_equal(_bits(changed), _bits(want_changed))
    assert not np.array_equal(_bits(want), _bits(want_changed))


def _bits(x):
    return np.asarray(x, np.float32).view(np.uint32)


def test_truncate11_is_near_exact():
    # truncate(M) products never exceed the exact product and are within 2^-M relative.
    a, b = reference.mantissa_grid(11)
    p = reference.product(a, b, mm.truncate(11).lut, 11).astype(np.float64)
    exact = a.astype(np.float64) * b
    assert np.all(p <= exact)
    assert np.all((exact - p) / exact < 2.0**-11)


def test_builtin_falls_back_to_numpy_without_compiler(monkeypatch):
    monkeypatch.setattr(cmodel, "find_compiler", lambda *args, **kwargs: None)
    mm._builtin_lut.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="NumPy reference"):
            fallback = mm.mitchell(4)
        np.testing.assert_array_equal(fallback.lut, reference.mitchell_lut(4))
    finally:
        mm._builtin_lut.cache_clear()


@pytest.mark.parametrize("bad", [0, 12, -1, 7.0, "7", True, None])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_builtin_rejects_bad_width(family, bad):
    with pytest.raises(ValueError, match="M"):
        FAMILIES[family](bad)


def test_exact():
    e = mm.exact()
    assert e.is_exact and not e.is_stack
    assert e.lut is None and e.name == "fp32" and e.mbits == mm.EXACT_MBITS
    assert e.num_designs == 1 and e.names == ("fp32",)
    assert "fp32" in repr(e)
    with pytest.raises(ValueError, match="no LUT"):
        e.kernel_lut()


# ---------------------------------------------------------------------------
# LUT format helpers
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("M", [1, 5, 7, 8, 11])
def test_encode_decode_round_trip(M):
    rng = np.random.default_rng(M)
    c = rng.integers(0, 2, 1000)
    r = rng.integers(0, 1 << M, 1000)
    stored = lut_lib.encode(c, r, M)
    assert stored.dtype == (np.uint8 if M <= 7 else np.uint16)
    top = 7 if M <= 7 else 15
    np.testing.assert_array_equal(stored, (c << top) | r)
    c2, r2 = lut_lib.decode(stored, M)
    np.testing.assert_array_equal(c2, c)
    np.testing.assert_array_equal(r2, r)


@pytest.mark.parametrize("M", [3, 7, 8, 11])
def test_kernel_lut_format_under_jit(M):
    stored = np.stack([mm.mbm(M).lut, mm.mitchell(M).lut])  # leading dims work
    got = jax.jit(lambda s: lut_lib.kernel_lut(s, M))(stored)
    assert got.dtype == jnp.uint32 and got.shape == stored.shape
    c, r = lut_lib.decode(stored, M)
    np.testing.assert_array_equal(np.asarray(got), (c << 23) | (r << (23 - M)))
    np.testing.assert_array_equal(np.asarray(got), lut_lib.kernel_lut_numpy(stored, M))


@pytest.mark.parametrize("asymmetric", [False, True], ids=["mbm", "random"])
@pytest.mark.parametrize(("m", "M_new"), [(1, 1), (1, 4), (3, 7), (5, 9), (7, 11)])
def test_expand_lut_preserves_products(m, M_new, asymmetric):
    rng = np.random.default_rng(m * 100 + M_new)
    narrow = random_multiplier(m, seed=m).lut if asymmetric else mm.mbm(m).lut
    wide = lut_lib.expand_lut(narrow, m, M_new)
    assert wide.shape == (4**M_new,) and wide.dtype == lut_lib.stored_dtype(M_new)
    a = random_normal_floats(rng, 20000)
    b = random_normal_floats(rng, 20000)
    np.testing.assert_array_equal(
        reference.product_bits(a, b, narrow, m), reference.product_bits(a, b, wide, M_new)
    )
    np.testing.assert_array_equal(lut_lib.shrink_lut(wide, M_new, m), narrow)


def test_expand_lut_entry_rule():
    m, M_new = 2, 4
    narrow = mm.mitchell(m).lut
    wide = lut_lib.expand_lut(narrow, m, M_new)
    c_n, r_n = lut_lib.decode(narrow, m)
    c_w, r_w = lut_lib.decode(wide, M_new)
    for i in range(1 << M_new):
        for j in range(1 << M_new):
            k_w = (i << M_new) | j
            k_n = ((i >> 2) << m) | (j >> 2)
            assert c_w[k_w] == c_n[k_n] and r_w[k_w] == r_n[k_n] << 2


def test_expand_lut_rejects_narrowing():
    with pytest.raises(ValueError, match="widen"):
        lut_lib.expand_lut(mm.mbm(5).lut, 5, 3)


def test_shrink_lut_rejects_non_expansion():
    with pytest.raises(ValueError, match="widening"):
        lut_lib.shrink_lut(mm.mbm(5).lut, 5, 3)


def test_validate_lut_errors():
    with pytest.raises(ValueError, match=r"4\*\*M = 64"):
        lut_lib.validate_lut(np.zeros(63, np.uint8), 3)
    with pytest.raises(TypeError, match="integer dtype"):
        lut_lib.validate_lut(np.zeros(64, np.float32), 3)
    with pytest.raises(TypeError, match="integer dtype"):
        lut_lib.validate_lut(np.zeros(64, bool), 3)
    bad = np.zeros(64, np.int32)
    bad[5] = 8  # r needs 4 bits at M=3
    with pytest.raises(ValueError, match="out of range"):
        lut_lib.validate_lut(bad, 3)
    bad[5] = -1
    with pytest.raises(ValueError, match="out of range"):
        lut_lib.validate_lut(bad, 3)
    ok = np.full(64, 0x87, np.int64)  # carry and r = 7: valid, dtype normalised
    assert lut_lib.validate_lut(ok, 3).dtype == np.uint8


# ---------------------------------------------------------------------------
# from_lut / from_approxtrain / to_approxtrain
# ---------------------------------------------------------------------------


def test_from_lut_stored_and_inferred_width():
    lut = np.asarray(mm.mbm(6).lut, np.int32)
    m = mm.from_lut(lut, name="mine")
    assert m.mbits == 6 and m.name == "mine" and m.lut.dtype == np.uint8
    np.testing.assert_array_equal(m.lut, mm.mbm(6).lut)
    wide = mm.from_lut(mm.mbm(9).lut)
    assert wide.mbits == 9 and wide.lut.dtype == np.uint16
    widest = mm.from_lut(mm.truncate(11).lut)
    assert widest.mbits == 11
    np.testing.assert_array_equal(widest.lut, mm.truncate(11).lut)


def test_from_lut_accepts_jax_arrays():
    m = mm.from_lut(jnp.asarray(mm.mitchell(4).lut))
    np.testing.assert_array_equal(m.lut, mm.mitchell(4).lut)


def test_from_lut_products():
    M = 5
    a, b = reference.mantissa_grid(M)
    products = (a.astype(np.float64) * b).reshape(1 << M, 1 << M)
    m = mm.from_lut(products)
    assert m.mbits == M
    np.testing.assert_array_equal(m.lut, mm.truncate(M).lut)


@pytest.mark.parametrize("M", [1, 3, 4, 7])
def test_from_lut_square_integer_table(M):
    # [2**M, 2**M] indexed [i, j] is the i-major [4**M] LUT; M can be inferred
    # where 2**M entries are not themselves 4**m entries (odd M).
    lut = np.asarray(mm.mbm(M).lut)
    table = lut.reshape(1 << M, 1 << M)
    np.testing.assert_array_equal(mm.from_lut(table, M).lut, lut)
    if M % 2:
        assert mm.from_lut(table).mbits == M
    else:  # read as a stack of 2**M LUTs of width M / 2: the error says what to pass
        with pytest.raises(ValueError, match=f"pass M={M}"):
            mm.from_lut(table)
    stacked = mm.from_lut(np.stack([table, table]), M)
    assert stacked.is_stack and stacked.lut.shape == (2, 4**M)


def test_from_lut_square_table_is_first_operand_major():
    # An asymmetric design (mbm above is symmetric): row i of the table is
    # the first operand's mantissa, and products follow it.
    M = 3
    table = np.asarray(random_multiplier(M, seed=5).lut).reshape(8, 8)
    assert not np.array_equal(table, table.T)
    m = mm.from_lut(table, M)
    i, j = np.divmod(np.arange(64), 8)
    np.testing.assert_array_equal(np.asarray(m.lut), table[i, j])
    a = (1 + i / 8).astype(np.float32)
    b = (1 + j / 8).astype(np.float32)
    c, r = lut_lib.decode(table[i, j], M)
    want = (1 + r / 8) * 2.0**c
    np.testing.assert_array_equal(reference.product(a, b, m.lut, M), want.astype(np.float32))


def test_from_lut_stack():
    stacked = mm.from_lut(np.stack([mm.mbm(3).lut, mm.mitchell(3).lut]), name="x")
    assert stacked.is_stack and stacked.num_designs == 2 and stacked.names == ("x[0]", "x[1]")


def test_from_lut_errors():
    with pytest.raises(ValueError, match=r"4\*\*M"):
        mm.from_lut(np.zeros(100, np.uint8))
    with pytest.raises(ValueError, match=r"4\*\*M = 256"):
        mm.from_lut(np.zeros(64, np.uint8), M=4)
    with pytest.raises(ValueError, match=r"\[1, 4\)"):
        mm.from_lut(np.full(16, 4.5))
    with pytest.raises(ValueError, match=r"\[1, 4\)"):
        mm.from_lut(np.full(16, np.nan))
    with pytest.raises(TypeError):
        mm.from_lut(np.zeros(16, complex))
    with pytest.raises(ValueError, match="M"):
        mm.from_lut(np.zeros(16, np.uint8), M=0)


@pytest.mark.parametrize("array", [5, None, 1.5], ids=["int", "None", "float"])
def test_from_lut_rejects_scalars(array):
    with pytest.raises(TypeError, match=r"array of 4\*\*M LUT entries"):
        mm.from_lut(array)


@pytest.mark.parametrize(
    ("metadata", "pattern"),
    [
        ("abc", "dict or a sequence of .key, value. pairs, got str"),
        (5, "dict or a sequence of .key, value. pairs, got int"),
        ([("a", 1), "b"], "got the item 'b'"),
        ({"a": np.ones(3)}, r"metadata\['a'\] is an unhashable ndarray.*tolist"),
        ([("a", [1, np.ones(2)])], r"metadata\['a'\]\[1\] is an unhashable"),
    ],
    ids=["str", "int", "bad-pair", "array-value", "nested-array"],
)
def test_from_lut_rejects_bad_metadata(metadata, pattern):
    with pytest.raises(TypeError, match=pattern):
        mm.from_lut(mm.mbm(3).lut, metadata=metadata)


def test_from_lut_stack_name_type():
    with pytest.raises(TypeError, match="name of a stack"):
        mm.from_lut(np.stack([mm.mbm(2).lut] * 2), name=5)


@pytest.mark.parametrize(("file_name", "family", "M"), APPROXTRAIN_FILES)
def test_from_approxtrain_round_trip(reference_lut_dir, tmp_path, file_name, family, M):
    loaded = mm.from_approxtrain(reference_lut_dir / file_name)
    assert loaded.mbits == M and loaded.name == file_name[:-4]
    np.testing.assert_array_equal(loaded.lut, FAMILIES[family](M).lut)
    out = mm.to_approxtrain(loaded, tmp_path / file_name)
    assert out.read_bytes() == (reference_lut_dir / file_name).read_bytes()
    via_get = mm.get(str(reference_lut_dir / file_name))
    np.testing.assert_array_equal(via_get.lut, loaded.lut)


def _approxtrain_words(multiplier):
    """ApproxTrain's earlier 32-bit layout, built independently of the loader."""
    M = multiplier.mbits
    entries = np.asarray(multiplier.lut).astype(np.uint32)
    carry = entries >> (7 if M <= 7 else 15)
    r = entries & ((1 << M) - 1)
    return ((carry << 31) | (r << (23 - M))).astype("<u4")


@pytest.mark.parametrize("make", [lambda: mm.mbm(7), lambda: mm.mitchell(3), lambda: mm.mbm(10)])
def test_from_approxtrain_uint32_layout(tmp_path, make):
    expected = make()
    path = tmp_path / "mbmmantmul16.bin"  # no _M suffix, as ApproxTrain named it
    _approxtrain_words(expected).tofile(path)
    loaded = mm.from_approxtrain(path, M=expected.mbits)
    assert loaded.mbits == expected.mbits
    np.testing.assert_array_equal(loaded.lut, expected.lut)
    assert loaded.lut.dtype == expected.lut.dtype
    x = jnp.asarray(np.random.default_rng(0).standard_normal((5, 9)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(1).standard_normal((9, 4)), jnp.float32)
    np.testing.assert_array_equal(
        approx_jax.approx_dot(x, w, loaded), approx_jax.approx_dot(x, w, expected)
    )


def test_from_approxtrain_uint32_layout_from_name(tmp_path):
    path = tmp_path / "MBM_7.bin"
    _approxtrain_words(mm.mbm(7)).tofile(path)
    np.testing.assert_array_equal(mm.from_approxtrain(path).lut, mm.mbm(7).lut)
    np.testing.assert_array_equal(mm.get(str(path)).lut, mm.mbm(7).lut)
    bare = tmp_path / "mbmmantmul16.bin"
    path.rename(bare)
    with pytest.raises(ValueError, match="cannot infer M"):
        mm.get(str(bare))
    np.testing.assert_array_equal(mm.get(f"{bare}@7").lut, mm.mbm(7).lut)


def test_from_approxtrain_uint32_layout_errors(tmp_path):
    words = _approxtrain_words(mm.mbm(5))
    words[3] |= 1  # a bit below the 5 mantissa bits: the file is not M=5
    path = tmp_path / "X_5.bin"
    words.tofile(path)
    with pytest.raises(ValueError, match=r"entry 3 .* outside the carry"):
        mm.from_approxtrain(path)
    (tmp_path / "Y_9.bin").write_bytes(bytes(4**9))
    with pytest.raises(ValueError, match=r"32-bit entries: 4 \* 4\*\*M"):
        mm.from_approxtrain(tmp_path / "Y_9.bin")


def test_from_approxtrain_errors(tmp_path):
    (tmp_path / "X_3.bin").write_bytes(bytes(63))
    with pytest.raises(ValueError, match=r"4\*\*M = 64"):
        mm.from_approxtrain(tmp_path / "X_3.bin")
    (tmp_path / "noname.bin").write_bytes(bytes(16))
    with pytest.raises(ValueError, match="cannot infer M"):
        mm.from_approxtrain(tmp_path / "noname.bin")
    assert mm.from_approxtrain(tmp_path / "noname.bin", M=2).mbits == 2
    for missing in ("missing.bin", "MISSING_7.bin"):  # the missing file, not the name
        with pytest.raises(FileNotFoundError, match="no such LUT file"):
            mm.from_approxtrain(tmp_path / missing)
    with pytest.raises(ValueError, match="32-bit entries"):
        mm.from_approxtrain(tmp_path / "noname.bin", M=8)
    with pytest.raises(ValueError, match="M <= 7"):
        mm.to_approxtrain(mm.mbm(8), tmp_path / "Y_8.bin")
    with pytest.raises(ValueError, match="no LUT"):
        mm.to_approxtrain(mm.exact(), tmp_path / "Z_7.bin")


# ---------------------------------------------------------------------------
# from_python / from_c
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("M", [1, 4, 7, 8, 11])
def test_from_python_equals_from_c(require_c_compiler, M):
    from_py = mm.from_python(tweak_py, M)
    from_c = mm.from_c(CUSTOM_C, "tweak_mul", M)
    assert from_py.name == "tweak_py" and from_c.name == "tweak_mul"
    np.testing.assert_array_equal(from_py.lut, from_c.lut)


@pytest.mark.parametrize("M", [2, 7, 10])
def test_from_python_builtin_formulas(M):
    exact_product = mm.from_python(lambda a, b: a.astype(np.float64) * b, M)
    np.testing.assert_array_equal(exact_product.lut, mm.truncate(M).lut)


def _skewed_entries(M):
    """SPEC section 3 by hand for p = a + (b - 1) / 2 = 1 + x + y / 2: (c, r)."""
    i, j = np.divmod(np.arange(4**M), 2**M)
    p = 1 + i / 2**M + j / 2 ** (M + 1)  # exact in float64
    c = (p >= 2).astype(np.int64)
    r = np.floor((p / 2.0**c - 1) * 2**M).astype(np.int64)
    return c, r


def _skewed_scalar(a, b):
    if a < 1:  # (an ``if``: the array call fails, so it runs per pair)
        raise ValueError("operands are in [1, 2)")
    return float(a) + (float(b) - 1) / 2


@pytest.mark.parametrize(
    ("M", "per_pair"),
    [(2, False), (5, False), (9, False), (2, True), (5, True)],  # (a Python call per pair)
    ids=["2-vectorised", "5-vectorised", "9-vectorised", "2-per-pair", "5-per-pair"],
)
def test_from_python_keeps_operand_order(M, per_pair):
    fn = _skewed_scalar if per_pair else (lambda a, b: a + (b - 1) / 2)
    m = mm.from_python(fn, M)
    c, r = lut_lib.decode(np.asarray(m.lut), M)
    want_c, want_r = _skewed_entries(M)
    np.testing.assert_array_equal(c, want_c)
    np.testing.assert_array_equal(r, want_r)
    if M == 2:  # P(1, 1.75) = 1.375 -> r = 1; P(1.75, 1) = 1.75 -> r = 3
        assert (r[(0 << 2) | 3], r[(3 << 2) | 0]) == (1, 3)


def test_product_of_exactly_four_is_out_of_range():
    # [1, 4): a model returning 4.0 would otherwise encode as c = 1, r = 0 (2.0).
    with pytest.raises(ValueError, match=r"\[1, 4\)"):
        lut_lib.encode_products(np.full(16, 4.0), 2)
    with pytest.raises(ValueError, match=r"\[1, 4\)"):
        mm.from_python(lambda a, b: np.where((a > 1.7) & (b > 1.7), 4.0, a * b), 3)


def test_from_python_rejects_out_of_range():
    with pytest.raises(ValueError, match=r"\[1, 4\)"):
        mm.from_python(lambda a, b: a * b * 2, 3)
    with pytest.raises(ValueError, match=r"\[1, 4\)"):
        mm.from_python(lambda a, b: a - b, 3)
    with pytest.raises(ValueError, match="M"):
        mm.from_python(lambda a, b: a * b, 12)


@pytest.mark.parametrize(
    ("fn", "error", "pattern"),
    [
        (lambda a, b: (a * b)[:5], ValueError, r"shape \(64,\).*returned shape \(5,\)"),
        (lambda a, b: np.stack([a * b] * 2), ValueError, r"returned shape \(2, 64\)"),
        (lambda a, b: None, TypeError, r"real products.*shape \(64,\).*returned NoneType"),
        (lambda a, b: a * b + 0.5j, TypeError, "returned ndarray of dtype complex"),
        (lambda a, b: a > b, TypeError, "dtype bool"),
        (lambda a, b: (a * b, 1.0), ValueError, r"shape \(64,\).*returned tuple that is not"),
    ],
    ids=["short", "2d", "None", "complex", "bool", "ragged"],
)
def test_from_python_rejects_bad_returns(fn, error, pattern):
    with pytest.raises(error, match="Python model '.*lambda.*'.*" + pattern):
        mm.from_python(fn, 3)


def tweak_scalar(a, b):
    """tweak_py written for scalars, as the C model is (an ``if``; double arithmetic)."""
    t = (float(a) - 1.0) + (float(b) - 1.0)
    if t < 1.0:
        return 1.0 + t + t * (1.0 - t) / 8.0
    return 2.0 * t


@pytest.mark.parametrize("M", [1, 5, 8])
def test_from_python_scalar_model_is_called_per_pair(M):
    # The array call raises ("truth value of an array is ambiguous"): the
    # model then runs once per mantissa pair, with the vectorised model's LUT.
    m = mm.from_python(tweak_scalar, M)
    assert m.name == "tweak_scalar" and m.mbits == M
    np.testing.assert_array_equal(m.lut, mm.from_python(tweak_py, M).lut)


def test_from_python_scalar_model_equals_from_c(require_c_compiler):
    np.testing.assert_array_equal(
        mm.from_python(tweak_scalar, 6).lut, mm.from_c(CUSTOM_C, "tweak_mul", 6).lut
    )


def test_from_python_failing_on_arrays_and_scalars_names_both():
    def broken(a, b):
        if a > 1.5:  # raises on arrays; on scalars only past a = 1.5
            return 1 / 0
        return a * b

    with pytest.raises(ZeroDivisionError, match=r"failed on arrays \(ValueError.*a=1\.625"):
        mm.from_python(broken, 3)


@pytest.mark.parametrize("exact_type", ["Fraction", "Decimal"])
def test_from_python_scalar_model_may_return_exact_real_types(exact_type):
    # A scalar model computing in exact arithmetic (fractions.Fraction,
    # decimal.Decimal) gives the LUT of its float products.
    import decimal
    import fractions

    def exact(a, b):
        if exact_type == "Fraction":
            return fractions.Fraction(float(a)) * fractions.Fraction(float(b))
        return decimal.Decimal(float(a)) * decimal.Decimal(float(b))

    np.testing.assert_array_equal(mm.from_python(exact, 4).lut, mm.truncate(4).lut)


def test_from_python_constant_and_non_callable():
    assert np.all(mm.from_python(lambda a, b: 1.5, 2).lut == 1 << 1)  # r = 0.5 * 2**2
    with pytest.raises(TypeError, match="callable"):
        mm.from_python("mbm", 3)


def test_from_c_file_and_cpp(require_c_compiler, tmp_path):
    src = tmp_path / "model.c"
    src.write_text(CUSTOM_C)
    from_file = mm.from_c(src, "tweak_mul", 6)
    np.testing.assert_array_equal(from_file.lut, mm.from_python(tweak_py, 6).lut)
    cpp_src = tmp_path / "model.cpp"
    cpp_src.write_text(
        "#include <cmath>\n"
        "template <typename T> T exact_mul(T a, T b) { return a * b; }\n"
        "float trunc_cpp(float a, float b) { return exact_mul<double>(a, b); }\n"
    )
    np.testing.assert_array_equal(mm.from_c(cpp_src, "trunc_cpp", 6).lut, mm.truncate(6).lut)


def test_from_c_sees_mbits_macro(require_c_compiler):
    src = "float m_mul(float a, float b) { return 1.0f + APPROX_MBITS / 16.0f; }"
    for M in (3, 5):
        m = mm.from_c(src, "m_mul", M)
        c, r = lut_lib.decode(m.lut, M)
        assert np.all(c == 0) and np.all(r == (M << M) // 16)


def test_from_c_compile_error_shows_compiler_output(require_c_compiler, isolated_cache):
    with pytest.raises(cmodel.CModelError, match="this_is_not_c") as info:
        mm.from_c("float bad(float a, float b) { this_is_not_c; }", "bad", 3)
    assert isinstance(info.value, ValueError)
    assert "error" in str(info.value)


def test_from_c_missing_function(require_c_compiler, isolated_cache):
    with pytest.raises(ValueError, match="'missing_fn' is not defined"):
        mm.from_c(CUSTOM_C, "missing_fn", 3)
    with pytest.raises(ValueError, match="identifier"):
        mm.from_c(CUSTOM_C, "not a name", 3)


def test_from_c_out_of_range_product(require_c_compiler, isolated_cache):
    with pytest.raises(ValueError, match=r"\[1, 4\)"):
        mm.from_c("float big(float a, float b) { return 4.0f * a; }", "big", 2)


def test_from_c_explicit_compiler(require_c_compiler, isolated_cache, monkeypatch):
    compiler = cmodel.find_compiler()
    m = mm.from_c(CUSTOM_C, "tweak_mul", 4, compiler=compiler)
    np.testing.assert_array_equal(m.lut, mm.from_python(tweak_py, 4).lut)
    assert m.info["function"] == "tweak_mul" and m.info["path"] == "<source>"
    with pytest.raises(cmodel.CModelError, match="could not run compiler"):
        mm.from_c(CUSTOM_C, "tweak_mul", 4, compiler="/nonexistent/cc")
    monkeypatch.setenv("CC", "/nonexistent/cc-from-env")
    with pytest.raises(cmodel.CModelError, match="cc-from-env"):
        mm.from_c(CUSTOM_C, "tweak_mul", 3)


def test_from_c_missing_file():
    with pytest.raises(FileNotFoundError):
        mm.from_c("/nonexistent/model.c", "f", 3)


def test_from_c_cache_hit(require_c_compiler, isolated_cache, monkeypatch):
    first = mm.from_c(CUSTOM_C, "tweak_mul", 5)
    libraries = list((isolated_cache / "lib").glob("*.so"))
    products = list((isolated_cache / "lib").glob("*.products.npy"))
    assert len(libraries) == 1 and len(products) == 1

    real_run = subprocess.run

    def no_compiler(cmd, *args, **kwargs):
        # Only the preprocessor (the cache key is the preprocessed source) may run.
        if "-E" in cmd:
            return real_run(cmd, *args, **kwargs)
        raise AssertionError("compiler invoked on a cache hit")

    monkeypatch.setattr(subprocess, "run", no_compiler)
    second = mm.from_c(CUSTOM_C, "tweak_mul", 5)
    np.testing.assert_array_equal(first.lut, second.lut)
    # A different M, flag set or source is a different cache entry.
    with pytest.raises(AssertionError, match="cache hit"):
        mm.from_c(CUSTOM_C, "tweak_mul", 6)
    with pytest.raises(AssertionError, match="cache hit"):
        mm.from_c(CUSTOM_C, "tweak_mul", 5, flags=["-O1"])


def test_builtin_model_path():
    path = cmodel.builtin_model_path("mbm")
    assert path.name == "mbm.c" and "mbm_mul" in path.read_text()
    assert cmodel.builtin_model_path("truncate.c").is_file()
    with pytest.raises(FileNotFoundError):
        cmodel.builtin_model_path("nope")


# ---------------------------------------------------------------------------
# Name resolution
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "family", "M"),
    [
        ("mbm7", "mbm", 7),
        ("MBM3", "mbm", 3),
        ("mitchell5", "mitchell", 5),
        ("mit7", "mitchell", 7),
        ("Mitchell_2", "mitchell", 2),
        ("truncate7", "truncate", 7),
        ("trunc11", "truncate", 11),
        ("bf16", "truncate", 7),
        ("BF16", "truncate", 7),
        ("bfloat16", "truncate", 7),
        ("acc7", "truncate", 7),  # ApproxTrain's ACC_7.bin
        ("ACC_5", "truncate", 5),
    ],
)
def test_get_names(name, family, M):
    got = mm.get(name)
    assert got.mbits == M
    np.testing.assert_array_equal(got.lut, FAMILIES[family](M).lut)


@pytest.mark.parametrize("name", ["fp32", "exact", "FP32", " Exact "])
def test_get_exact(name):
    assert mm.get(name).is_exact


def test_get_passthrough_and_errors():
    m = mm.mbm(4)
    assert mm.get(m) is m
    with pytest.raises(ValueError, match="valid forms") as info:
        mm.get("bogus9")
    assert "mbmM" in str(info.value) and ".bin" in str(info.value)
    with pytest.raises(ValueError, match="1..11"):
        mm.get("mbm12")
    with pytest.raises(TypeError):
        mm.get(7)


@pytest.mark.parametrize("spec", ["model.c:mul", "model.cpp", "dir/m.cc:mul@", "m.c:mul@x"])
def test_get_c_model_spec_without_width_says_what_is_missing(spec):
    with pytest.raises(ValueError, match="function@M"):
        mm.get(spec)


def test_get_c_model_spec(require_c_compiler):
    spec = f"{cmodel.builtin_model_path('mitchell')}:mitchell_mul@6"
    np.testing.assert_array_equal(mm.get(spec).lut, mm.mitchell(6).lut)


# ---------------------------------------------------------------------------
# Stacks
# ---------------------------------------------------------------------------


def test_stack_unstack():
    designs = [mm.mbm(3), mm.mitchell(7), mm.truncate(5)]
    stacked = mm.stack(designs)
    assert stacked.is_stack and stacked.num_designs == 3 and stacked.mbits == 7
    assert stacked.names == ("mbm3", "mitchell7", "truncate5")
    assert stacked.lut.shape == (3, 4**7)
    assert "stack of 3" in repr(stacked)
    np.testing.assert_array_equal(stacked.lut[0], lut_lib.expand_lut(mm.mbm(3).lut, 3, 7))
    for original, restored in zip(designs, mm.unstack(stacked), strict=True):
        assert restored.name == original.name and restored.mbits == original.mbits
        assert restored.metadata == original.metadata
        np.testing.assert_array_equal(restored.lut, original.lut)
    # Stacks flatten; names resolve; a single design unstacks to itself.
    nested = mm.stack([stacked, "mbm9"])
    assert nested.num_designs == 4 and nested.mbits == 9 and nested.lut.dtype == np.uint16
    assert mm.unstack(mm.mbm(2))[0].name == "mbm2"


def test_stack_errors():
    with pytest.raises(ValueError, match="at least one"):
        mm.stack([])
    with pytest.raises(ValueError, match="cannot be stacked"):
        mm.stack([mm.mbm(7), mm.exact()])


@pytest.mark.parametrize("bad", ["mbm7", mm.mbm(3), 42], ids=["str", "Multiplier", "int"])
def test_stack_rejects_a_single_item(bad):
    with pytest.raises(TypeError, match="stack takes a sequence of multipliers or names"):
        mm.stack(bad)


def test_arguments_of_the_wrong_type_are_named(tmp_path):
    with pytest.raises(TypeError, match=r"multipliers\[1\] must be an approx_jax Multiplier"):
        mm.stack([mm.mbm(7), 42])
    with pytest.raises(TypeError, match="multiplier must be an approx_jax Multiplier.*int"):
        mm.get(5)
    with pytest.raises(TypeError, match="multiplier must be an approx_jax Multiplier.*int"):
        approx_jax.characterize(42)
    with pytest.raises(TypeError, match="path must be a str or os.PathLike, got int"):
        mm.from_approxtrain(5)
    with pytest.raises(TypeError, match="path must be a str or os.PathLike, got int"):
        mm.to_approxtrain("mbm7", 5)
    written = mm.to_approxtrain("mbm3", tmp_path / "MBM_3.bin")  # a Path is fine
    assert np.array_equal(mm.from_approxtrain(str(written)).lut, mm.mbm(3).lut)


def test_stack_sliced_with_tree_map_is_detected():
    stacked = mm.stack(["mbm3", "mbm5", "mit2"])
    sliced = jax.tree.map(lambda lut: lut[1:], stacked)
    assert "names do not match" in repr(sliced)
    with pytest.raises(ValueError, match=r"2 LUTs but 3 names.*stack\(unstack\(s\)"):
        mm.unstack(sliced)
    # The supported way keeps names and widths.
    assert [m.name for m in mm.unstack(mm.stack(mm.unstack(stacked)[1:]))] == [
        "mbm5",
        "mitchell2",
    ]


# ---------------------------------------------------------------------------
# Pytree behaviour
# ---------------------------------------------------------------------------


def test_pytree_flatten_unflatten():
    m = mm.mbm(5)
    leaves, treedef = jax.tree_util.tree_flatten(m)
    assert len(leaves) == 1 and leaves[0] is m.lut
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert rebuilt.name == m.name and rebuilt.mbits == 5 and rebuilt.metadata == m.metadata
    assert jax.tree_util.tree_leaves(mm.exact()) == []
    doubled = jax.tree_util.tree_map(lambda x: x, m)
    assert isinstance(doubled, mm.Multiplier)


def test_metadata_is_hashable():
    m = mm.from_lut(mm.mbm(3).lut, metadata={"area": 1.5, "tags": ["a", "b"]})
    hash(m.metadata)
    assert m.info["area"] == 1.5 and m.info["tags"] == ("a", "b")


def test_jit_does_not_retrace_for_designs_of_same_width():
    traces = []

    @jax.jit
    def first_entries(x, multiplier):
        traces.append(multiplier.mbits)
        return x + multiplier.kernel_lut()[..., :4].astype(jnp.float32)

    first_entries(1.0, mm.mbm(7))
    first_entries(1.0, mm.mitchell(7))
    first_entries(1.0, mm.from_lut(np.asarray(mm.truncate(7).lut), name="custom"))
    assert len(traces) == 1
    first_entries(1.0, mm.mbm(5))  # a different width is a different program
    assert len(traces) == 2
    out = jax.jit(lambda m: m)(mm.mbm(3))
    assert isinstance(out, mm.Multiplier) and out.mbits == 3


def test_vmap_over_stack():
    stacked = mm.stack([mm.mbm(4), mm.mitchell(4), mm.truncate(4)])
    got = jax.vmap(lambda m: m.kernel_lut()[7])(stacked)
    expected = lut_lib.kernel_lut_numpy(stacked.lut, 4)[:, 7]
    np.testing.assert_array_equal(np.asarray(got), expected)


def test_invalid_direct_construction():
    with pytest.raises(ValueError, match="mbits"):
        mm.Multiplier(np.zeros(16, np.uint8), "x", 0)
    with pytest.raises(ValueError, match="exact"):
        mm.Multiplier(None, "x", 7)


def _kernel_format(M):
    return np.asarray(mm.mbm(M).kernel_lut())


@pytest.mark.parametrize(
    ("lut", "M", "error", "pattern"),
    [
        (_kernel_format(5), 5, ValueError, "out of range.*kernel-format entries"),
        (np.full(64, 255, np.uint8), 3, ValueError, "entry .0,. = 255 is out of range"),
        (np.full(64, -1, np.int32), 3, ValueError, "= -1 is out of range"),
        (np.full(64, 2**40, np.int64), 3, ValueError, "out of range"),
        (np.ones(64, np.float32), 3, TypeError, "integer dtype"),
        (np.zeros(63, np.uint8), 3, ValueError, r"4\*\*M = 64"),
        (np.zeros((2, 2, 16), np.uint8), 2, ValueError, "shape"),
        ([0, 1, 2, 3] * 3, 2, ValueError, r"4\*\*M = 16"),
        (jnp.full(16, 0x90, jnp.uint8), 2, ValueError, "out of range"),
    ],
    ids=["kernel", "255", "negative", "2**40", "float", "size", "rank3", "list", "jax"],
)
def test_direct_construction_validates_lut(lut, M, error, pattern):
    with pytest.raises(error, match="invalid lut for Multiplier 'x' with mbits=.*" + pattern):
        mm.Multiplier(lut, "x", M)


def test_direct_construction_checks_stack_names():
    with pytest.raises(ValueError, match="name has 3 entries for a stack of 2"):
        mm.Multiplier(np.zeros((2, 16), np.uint8), ("a", "b", "c"), 2)
    # One name for a stack names each design (as from_lut does).
    one = mm.Multiplier(np.zeros((2, 16), np.uint8), "a", 2)
    assert one.names == ("a[0]", "a[1]") and one.num_designs == 2
    assert [m.name for m in mm.unstack(one)] == ["a[0]", "a[1]"]


def test_stack_widths_survive_a_cached_jit():
    # Stacks that differ only in their members' widths (same names, same
    # common M) are different pytree structures: a jit cache hit handed back
    # the first stack's widths, and unstack / characterize then read the
    # second stack's LUTs at those widths.
    a5 = mm.from_lut(random_multiplier(5, 1).lut, name="a")
    a3 = mm.from_lut(random_multiplier(3, 2).lut, name="a")
    first, second = mm.stack([a5, mm.mbm(5)]), mm.stack([a3, mm.mbm(5)])
    identity = jax.jit(lambda s: s)
    identity(first)
    out = identity(second)
    assert [m.mbits for m in mm.unstack(out)] == [3, 5]
    np.testing.assert_array_equal(mm.unstack(out)[0].lut, a3.lut)


def test_unstack_keeps_a_from_lut_stacks_metadata():
    luts = np.stack([np.asarray(mm.mbm(3).lut), np.asarray(mm.mitchell(3).lut)])
    stacked = mm.from_lut(luts, 3, name=["a", "b"], metadata={"paper": "X"})
    for member in mm.unstack(stacked):
        assert member.info["paper"] == "X" and member.info["source"] == "lut"


@pytest.mark.parametrize(
    "lut",
    [
        np.asarray(mm.mbm(5).lut, np.int32),
        jnp.asarray(mm.mbm(5).lut),
        mm.mbm(5).lut.tolist(),
    ],
    ids=["int32", "jax", "list"],
)
def test_direct_construction_accepts_valid_luts(lut):
    m = mm.Multiplier(lut, "x", 5)
    assert float(approx_jax.multiply(1.5, 1.5, m)) == 2.1875
    assert len(jax.tree_util.tree_leaves(m)) == 1  # a list is stored as one array


def test_direct_construction_under_transformations():
    """Traced LUTs skip the value check; jit/vmap/grad over ops still work."""
    lut = mm.mbm(5).lut
    expected = float(approx_jax.multiply(1.5, 1.5, mm.mbm(5)))
    traced = jax.jit(lambda lut: approx_jax.multiply(1.5, 1.5, mm.Multiplier(lut, "x", 5)))
    assert float(traced(jnp.asarray(lut))) == expected
    # A concrete LUT built inside jit is still validated, at trace time.
    with pytest.raises(ValueError, match="invalid lut"):
        jax.jit(lambda x: x * mm.Multiplier(np.full(16, 255, np.uint8), "x", 2).mbits)(1.0)
    stacked = mm.Multiplier(np.stack([lut, mm.mitchell(5).lut]), ("mbm5", "mitchell5"), 5)
    per_design = jax.vmap(lambda m: approx_jax.multiply(1.5, 1.5, m))(stacked)
    assert per_design.shape == (2,) and float(per_design[0]) == expected
    grad = jax.grad(lambda a, m: approx_jax.multiply(a, 1.5, m))(1.5, mm.Multiplier(lut, "x", 5))
    assert np.isfinite(float(grad))


def test_no_warnings_building_builtins():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mm.truncate(3)


def test_source_files_present():
    for name in ("truncate", "mitchell", "mbm"):
        text = pathlib.Path(cmodel.builtin_model_path(name)).read_text()
        assert "APPROX_MBITS" in text


def test_to_approxtrain_takes_a_name(tmp_path):
    path = mm.to_approxtrain("mbm7", tmp_path / "N_7.bin")
    np.testing.assert_array_equal(mm.from_approxtrain(path).lut, mm.mbm(7).lut)


def test_multipliers_compare_and_hash_by_value():
    """Equal name, width, metadata and LUT entries: equal and same hash (a jit
    static argument or an nnx graph then does not retrace per new object);
    any difference, including one LUT entry, makes them unequal."""
    import copy
    import pickle

    a, b = mm.mbm(7), mm.get("mbm7")
    assert a == b and hash(a) == hash(b) and len({a, b, mm.mbm(7)}) == 1
    assert pickle.loads(pickle.dumps(a)) == a and copy.deepcopy(a) == a
    assert mm.exact() == mm.exact() and mm.exact() != a
    assert a != mm.mitchell(7) and a != mm.mbm(6)
    lut = np.array(a.lut)
    lut[5] ^= 1
    assert mm.from_lut(lut, 7, name="mbm7") != a
    assert mm.from_lut(np.asarray(a.lut), 7, name="other") != a
    s = mm.stack(["mbm7", "mitchell5"])
    assert mm.stack(mm.unstack(s)) == s and mm.stack(["mitchell5", "mbm7"]) != s
    assert a != "mbm7"

    traces = []

    @jax.jit
    def traced_twice(m):  # a tracer LUT equals only its own object
        traces.append(m == m and m != mm.mbm(7))
        return m.lut

    traced_twice(a)
    assert traces == [True]
    calls = []

    def f(x, m):
        calls.append(1)
        return approx_jax.approx_dot(x, jnp.ones((4, 3)), m)

    g = jax.jit(f, static_argnums=1)
    for _ in range(3):
        g(jnp.ones((2, 4)), mm.get("mbm7"))
    g(jnp.ones((2, 4)), mm.mitchell(7))
    assert len(calls) == 2
