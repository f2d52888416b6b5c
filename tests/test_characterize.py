"""Tests of the SPEC section 6 error metrics."""

from __future__ import annotations

import numpy as np
import pytest
from approx_test_utils import random_multiplier

import approx_jax
from approx_jax._src import characterize as ch
from approx_jax._src import lut
from approx_jax._src import multipliers as mm


def independent_truncate_products(a, b, M):
    """truncate(M) products of normal operands, computed with frexp/floor."""
    ma, ea = np.frexp(np.abs(a).astype(np.float64))
    mb, eb = np.frexp(np.abs(b).astype(np.float64))
    p = np.floor(ma * 2 ** (M + 1)) / 2**M * (np.floor(mb * 2 ** (M + 1)) / 2**M)
    scale = np.where(p >= 2, 2.0, 1.0)
    p = np.floor(p / scale * 2**M) / 2**M * scale
    return np.sign(a) * np.sign(b) * np.ldexp(p, ea + eb - 2)


def independent_metrics(approx, exact):
    rel = (approx - exact) / np.abs(exact)
    return dict(
        bias=rel.mean(),
        mred=np.abs(rel).mean(),
        worst_case=np.abs(rel).max(),
        rms=np.sqrt((rel**2).mean()),
        error_probability=(approx != exact).mean(),
    )


@pytest.mark.parametrize("M", [1, 3, 7])
def test_uniform_metrics_truncate(M):
    i, j = np.meshgrid(np.arange(2**M), np.arange(2**M), indexing="ij")
    a, b = 1 + i / 2**M, 1 + j / 2**M
    exact = a * b
    approx = independent_truncate_products(a, b, M)
    expected = independent_metrics(approx, exact)
    result = ch.characterize(mm.truncate(M))
    assert result.mode == "uniform" and result.count == 4**M and result.mbits == M
    for key, value in expected.items():
        assert getattr(result, key) == pytest.approx(value, rel=1e-12, abs=1e-15), key
    assert result.heatmap.shape == (2**M, 2**M)
    np.testing.assert_allclose(result.heatmap, (approx - exact) / exact, rtol=1e-12, atol=1e-15)
    assert result.bias <= 0  # truncation never rounds up


def test_uniform_metrics_mitchell_known_values():
    # Mitchell's multiplier underestimates: worst case ~ -11.1% at x = y = 0.5.
    result = ch.characterize(mm.mitchell(7))
    assert result.bias < 0
    assert result.worst_case == pytest.approx(1 - 2 / 2.25, rel=1e-9)
    assert result.heatmap[64, 64] == pytest.approx(2 / 2.25 - 1, rel=1e-9)


@pytest.mark.parametrize("design", ["mbm4", "random4"])
def test_uniform_metrics_and_heatmap_from_the_lut(design):
    # Decoded straight from the LUT: O' = (1 + r/2^M) 2^c against
    # O = (1 + i/2^M)(1 + j/2^M). mbm4 errs both ways (worst case +0.1875,
    # an overestimate); a random design is asymmetric, so the heat map's
    # orientation (row i = first operand) shows.
    M = 4
    m = random_multiplier(M, seed=8) if design == "random4" else mm.get(design)
    c, r = lut.decode(np.asarray(m.lut), M)
    i, j = np.divmod(np.arange(4**M), 2**M)
    exact = (1 + i / 2**M) * (1 + j / 2**M)
    approx = (1 + r / 2**M) * 2.0**c
    result = approx_jax.characterize(m)
    for field, value in independent_metrics(approx, exact).items():
        np.testing.assert_allclose(getattr(result, field), value, rtol=1e-12, err_msg=field)
    np.testing.assert_allclose(
        result.heatmap, ((approx - exact) / exact).reshape(2**M, 2**M), rtol=1e-12
    )
    if design == "mbm4":
        assert result.worst_case == 0.1875


def test_mbm_is_less_biased_than_mitchell():
    mit = ch.characterize("mit7")
    mbm = ch.characterize("mbm7")
    assert abs(mbm.bias) < abs(mit.bias)
    assert mbm.mred < mit.mred


def test_sample_metrics_against_independent_computation():
    rng = np.random.default_rng(0)
    n = 5000
    a = rng.uniform(1, 2, n) * 2.0 ** rng.integers(-10, 10, n) * rng.choice([-1, 1], n)
    b = rng.uniform(1, 2, n) * 2.0 ** rng.integers(-10, 10, n)
    a, b = a.astype(np.float32), b.astype(np.float32)
    M = 5
    exact = a.astype(np.float64) * b.astype(np.float64)
    approx = independent_truncate_products(a, b, M)
    expected = independent_metrics(approx, exact)
    result = ch.characterize(mm.truncate(M), samples=(a, b))
    assert result.mode == "samples" and result.count == n and result.skipped == 0
    for key, value in expected.items():
        assert getattr(result, key) == pytest.approx(value, rel=1e-12, abs=1e-15), key
    # Magnitude error: truncation only ever shrinks a product's magnitude,
    # while the signed bias mixes both signs of a (half the samples negative).
    magnitude = (np.abs(approx) - np.abs(exact)) / np.abs(exact)
    assert result.magnitude_bias == pytest.approx(magnitude.mean(), rel=1e-12)
    assert result.magnitude_bias < 0 and abs(result.bias) < abs(result.magnitude_bias) / 4
    # Heat map: mean relative error of the magnitude per (ia, ib) cell.
    ia = (a.view(np.uint32) & 0x7FFFFF) >> (23 - M)
    ib = (b.view(np.uint32) & 0x7FFFFF) >> (23 - M)
    cells = 0
    for i, j in [(3, 17), (0, 0), (31, 5), (12, 12)]:
        cell = (ia == i) & (ib == j)
        if cell.any():
            cells += 1
            assert result.heatmap[i, j] == pytest.approx(magnitude[cell].mean(), rel=1e-12)
            assert result.heatmap[i, j] <= 0
    assert cells >= 3


def test_magnitude_bias_on_signed_operands():
    # Mitchell underestimates every product's magnitude (-3.85 % over all
    # mantissa pairs): on normal-distributed operands, half the products
    # negative, SPEC's signed bias cancels to about 0 and the magnitude form
    # keeps the sign of the design's error.
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 20000)).astype(np.float32)
    signed = ch.characterize("mitchell7", samples=(a, b))
    positive = ch.characterize("mitchell7", samples=(np.abs(a), np.abs(b)))
    assert abs(signed.bias) < 0.005
    assert signed.magnitude_bias == pytest.approx(positive.magnitude_bias, rel=1e-12)
    assert positive.magnitude_bias == pytest.approx(positive.bias, rel=1e-12)
    assert signed.magnitude_bias < -0.03
    np.testing.assert_allclose(signed.heatmap, positive.heatmap, rtol=1e-12, equal_nan=True)
    uniform = ch.characterize("mitchell7")
    assert uniform.magnitude_bias == pytest.approx(uniform.bias, rel=1e-12)


def test_samples_skip_zero_and_non_finite():
    a = np.array([0.0, np.inf, np.nan, 1.5, 3e38, 1e-30], np.float32)
    b = np.array([2.0, 2.0, 1.0, 1.5, 3e38, 1e-30], np.float32)
    result = ch.characterize(mm.mbm(4), samples=(a, b))
    # Skipped: zero exact, inf exact, nan exact, 3e38^2 (beyond float32's range:
    # float32 cannot represent it either). 1e-30 * 1e-30 underflows to zero: a
    # real error, kept (relative error -1).
    assert result.count == 2 and result.skipped == 4
    assert result.worst_case == pytest.approx(1.0)


def test_samples_keep_overflow_by_carry():
    # mbm7 carries at 1.93 * 1.01 (the mantissa sum plus its correction reaches
    # 2), so the simulated product overflows where the exact one, 3.3e38, fits
    # float32: an error of the design with an infinite relative error.
    a = np.array([1.93 * 2.0**127, 1.5], np.float32)
    b = np.array([1.01, 1.5], np.float32)
    exact = a.astype(np.float64) * b.astype(np.float64)
    assert np.isfinite(exact.astype(np.float32)).all()
    simulated = np.asarray(approx_jax.multiply(a, b, mm.mbm(7)))
    assert np.isinf(simulated[0]) and np.isfinite(simulated[1])
    result = ch.characterize(mm.mbm(7), samples=(a, b))
    assert result.count == 2 and result.skipped == 0
    assert result.worst_case == np.inf and result.mred == np.inf
    assert result.error_probability == np.mean(simulated != exact)


def test_exact_multiplier():
    uniform = ch.characterize("fp32")
    assert (
        uniform.mred == 0
        and uniform.magnitude_bias == 0
        and uniform.error_probability == 0
        and uniform.heatmap is None
    )
    rng = np.random.default_rng(1)
    a = rng.normal(size=1000).astype(np.float32)
    b = rng.normal(size=1000).astype(np.float32)
    sampled = ch.characterize(mm.exact(), samples=(a, b))
    # float32 rounding of each product: relative error below 2^-24.
    assert 0 < sampled.worst_case <= 2.0**-24
    assert sampled.error_probability > 0.5


def test_stack_and_table():
    stacked = mm.stack([mm.mbm(3), mm.mitchell(5)])
    results = ch.characterize(stacked)
    assert [r.name for r in results] == ["mbm3", "mitchell5"]
    assert results[0].heatmap.shape == (8, 8)  # original width restored
    assert results[1].mred == pytest.approx(ch.characterize(mm.mitchell(5)).mred)
    rows = ch.characterize_table(["fp32", stacked, "trunc7"])
    assert [r["name"] for r in rows] == ["fp32", "mbm3", "mitchell5", "truncate7"]
    assert set(rows[1]) >= {"bias", "mred", "worst_case", "rms", "error_probability", "mbits"}


def test_plot_heatmaps(tmp_path):
    results = ch.characterize(mm.stack(["mbm4", "mit4", "trunc4"])) + [ch.characterize("fp32")]
    path = ch.plot_heatmaps(results, tmp_path / "heat.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no heat maps"):
        ch.plot_heatmaps([ch.characterize("fp32")], tmp_path / "none.png")


def test_bad_arguments_are_clear_errors(tmp_path):
    # A str is iterable: it used to be characterised letter by letter.
    with pytest.raises(TypeError, match="iterable of Multipliers or names"):
        ch.characterize_table("mbm3")
    with pytest.raises(TypeError, match="single Multiplier"):
        ch.characterize_table(mm.mbm(3))
    with pytest.raises(ValueError, match=r"pair \(a, b\)"):
        ch.characterize("mbm3", samples=(np.ones(3, np.float32),))
    result = ch.characterize("mbm3")
    for columns in (0, -1, 1.5):
        with pytest.raises(ValueError, match="columns must be a positive int"):
            ch.plot_heatmaps(result, tmp_path / "heat.png", columns=columns)


def test_sample_operands_broadcast_and_bad_dtypes_raise():
    # (a, b) broadcast as arrays (a column of activations against a row of
    # weights), not after flattening; complex or text operands are refused.
    rng = np.random.default_rng(3)
    a = rng.standard_normal((6, 1)).astype(np.float32)
    b = rng.standard_normal((1, 5)).astype(np.float32)
    got = ch.characterize("mitchell4", samples=(a, b))
    want = ch.characterize("mitchell4", samples=np.broadcast_arrays(a, b))
    assert (got.bias, got.mred, got.worst_case, got.count) == (
        want.bias,
        want.mred,
        want.worst_case,
        want.count,
    )
    assert got.count == 30
    with pytest.raises(TypeError, match="complex"):
        ch.characterize("mbm3", samples=(a.astype(np.complex64), b))
    with pytest.raises(TypeError, match="not numeric"):
        ch.characterize("mbm3", samples=(np.array(["1.5"]), b))
    with pytest.raises(ValueError, match="do not broadcast"):
        ch.characterize("mbm3", samples=(np.ones(3), np.ones(4)))
    # No pairs at all is an error (as samples=[] is); pairs that all fall out
    # (zeros, NaN) give NaN metrics with a warning saying why.
    with pytest.raises(ValueError, match="no operand pairs"):
        ch.characterize("mbm3", samples=(np.array([]), np.array([])))
    with pytest.raises(ValueError, match="no operand pairs"):
        ch.characterize("mbm3", samples=np.zeros((0, 2), np.float32))
    with pytest.warns(RuntimeWarning, match="none of the 3 sample pairs"):
        skipped = ch.characterize(
            "mbm3", samples=(np.float32([0, np.nan, 1]), np.float32([1, 2, 0]))
        )
    assert skipped.skipped == 3 and np.isnan(skipped.mred)


def test_exact_multiplier_on_samples_scores_what_the_native_op_computes():
    # fp32 products as approx_jax.multiply(..., "fp32") gives them: XLA flushes
    # subnormal operands and results, so those pairs are off by 100 %.
    # (1e-39 x 1e10: a subnormal operand of a normal product; FLT_MIN x 2:
    # the smallest normal operand, exact.)
    tiny = np.finfo(np.float32).tiny
    a = np.float32([1e-40, 3e-39, 1e-20, 2.0, 1.1, 1e-39, tiny])
    b = np.float32([2.0, 1.5, 1e-20, 3.0, 1.3, 1e10, 2.0])
    native = np.asarray(approx_jax.multiply(a, b, "fp32"), np.float64)
    exact = a.astype(np.float64) * b.astype(np.float64)
    result = approx_jax.characterize("fp32", samples=(a, b))
    expected = independent_metrics(native, exact)
    for field, value in expected.items():
        np.testing.assert_allclose(getattr(result, field), value, rtol=1e-12, err_msg=field)
    assert result.worst_case == 1.0 and result.skipped == 0


def test_plot_heatmaps_bad_inputs_are_clear_and_leak_no_figure(tmp_path):
    import matplotlib.pyplot as plt

    result = approx_jax.characterize("mbm3")
    before = set(plt.get_fignums())
    with pytest.raises(TypeError, match="ErrorMetrics"):
        approx_jax.plot_heatmaps(approx_jax.characterize_table(["mbm3"]), tmp_path / "x.png")
    with pytest.raises(TypeError, match="ErrorMetrics"):
        approx_jax.plot_heatmaps(mm.mbm(3), tmp_path / "x.png")
    with pytest.raises(TypeError, match="path"):
        approx_jax.plot_heatmaps(result, None)
    with pytest.raises(OSError):
        approx_jax.plot_heatmaps(result, tmp_path / "missing" / "x.png")
    assert set(plt.get_fignums()) == before


def test_metrics_read_by_key_under_field_names_and_abbreviations():
    result = ch.characterize("mitchell5")
    # Independent values: Mitchell's products over every mantissa pair.
    M = 5
    x = 1 + np.arange(2**M) / 2**M
    a, b = np.meshgrid(x, x, indexing="ij")
    f = (a - 1) + (b - 1)
    mitchell = np.where(f < 1, 1 + f, 2 * f)
    expected = independent_metrics(mitchell.ravel(), (a * b).ravel())
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, rel=1e-12), key
    for alias, field in [
        ("MRED", "mred"),
        ("WCRE", "worst_case"),
        ("worst-case relative error", "worst_case"),
        ("EP", "error_probability"),
        ("Error probability", "error_probability"),
        ("mean_relative_error", "bias"),
        ("RMSRE", "rms"),
    ]:
        assert alias in result and result[alias] == getattr(result, field), alias
    assert result.MRED == result.mred and result.WCRE == result.worst_case
    assert result.error_rate == result.error_probability
    with pytest.raises(AttributeError, match="no attribute 'loss'"):
        _ = result.loss
    assert not hasattr(result, "_private")
    assert dict(result)["mred"] == result.mred and set(dict(result)) == set(result.keys())
    assert "loss" not in result and result.get("loss", 7) == 7
    with pytest.raises(KeyError, match="not a metric.*mred"):
        result["loss"]
    with pytest.raises(TypeError, match="str"):
        result[0]


def test_samples_as_one_array_of_pairs_equal_the_pair_of_arrays():
    rng = np.random.default_rng(4)
    pairs = rng.standard_normal((500, 2)).astype(np.float32)
    by_rows = ch.characterize("mbm6", samples=pairs)
    by_arrays = ch.characterize("mbm6", samples=(pairs[:, 0], pairs[:, 1]))
    assert by_rows.count == 500
    assert by_rows.as_dict() == by_arrays.as_dict()
    # A [2, N] array (N != 2) is a pair of operand rows, as a tuple is.
    assert ch.characterize("mbm6", samples=pairs.T).as_dict() == by_arrays.as_dict()
    # A [2, 2] array is two pairs, as the docstring says of [N, 2] arrays,
    # and so is a list of pairs; a list of two arrays is (a, b).
    square = pairs[:2]
    by_square_rows = ch.characterize("mbm6", samples=(square[:, 0], square[:, 1])).as_dict()
    assert by_square_rows != ch.characterize("mbm6", samples=(square[0], square[1])).as_dict()
    assert ch.characterize("mbm6", samples=square).as_dict() == by_square_rows
    listed = ch.characterize("mbm6", samples=pairs[:3].tolist())
    assert listed.as_dict() == ch.characterize("mbm6", samples=pairs[:3]).as_dict()
    as_list = ch.characterize("mbm6", samples=[pairs[:, 0], pairs[:, 1]])
    assert as_list.as_dict() == by_arrays.as_dict()
    with pytest.raises(ValueError, match="list of 3 items, not of"):
        ch.characterize("mbm6", samples=[[1.5, 2.0], [1.0], [2.0, 3.0]])


@pytest.mark.parametrize("samples", [{"a": [1.5]}, "1.5,2.5", {1.5, 2.5}])
def test_samples_of_the_wrong_kind_are_rejected(samples):
    with pytest.raises(TypeError, match=r"samples must be a pair \(a, b\).*\[N, 2\]"):
        ch.characterize("mbm6", samples=samples)


def test_samples_of_the_wrong_shape_name_it():
    with pytest.raises(ValueError, match=r"\[N, 2\] array, got an array of shape \(5, 3\)"):
        ch.characterize("mbm6", samples=np.ones((5, 3), np.float32))


def test_samples_are_the_same_pairs_for_every_design():
    # 1.45 * 2^64 * 1.45 * 2^63 = 2.1 * 2^127 lies beyond float32's range:
    # skipped for every design, also one (Mitchell) whose own product of
    # the pair stays finite; which pairs count must not depend on the design.
    a = np.array([1.45 * 2.0**64, 1.5, 3.0], np.float32)
    b = np.array([1.45 * 2.0**63, 1.5, 5.0], np.float32)
    assert np.isfinite(np.asarray(approx_jax.multiply(a, b, mm.mitchell(7))))[0]
    assert np.isinf(np.asarray(approx_jax.multiply(a, b, mm.truncate(7))))[0]
    results = ch.characterize(mm.stack([mm.mitchell(7), mm.truncate(7), mm.mbm(7)]), (a, b))
    assert [(r.count, r.skipped) for r in results] == [(2, 1)] * 3
