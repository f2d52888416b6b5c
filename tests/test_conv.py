"""approx_conv vs the NumPy reference convolution (SPEC sections 2 and 5)."""

from __future__ import annotations

import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from approx_test_utils import random_multiplier, underflow_edge_values
from jax import lax

import approx_jax
from approx_jax._src import conv as conv_lib
from approx_jax._src import ffi, ops, partitioning, reference
from approx_jax._src import multipliers as mult_lib
from approx_jax._src.conv import approx_conv


def _bits(x):
    return np.asarray(x, np.float32).view(np.uint32)


MULTIPLIERS = {
    "mbm7": lambda: mult_lib.mbm(7),
    "mitchell5": lambda: mult_lib.mitchell(5),
    "truncate3": lambda: mult_lib.truncate(3),
    "random4": lambda: random_multiplier(4, seed=11),
}
MULT_NAMES = list(MULTIPLIERS)

CHANNELS_LAST = {
    1: ("NWC", "WIO", "NWC"),
    2: ("NHWC", "HWIO", "NHWC"),
    3: ("NDHWC", "DHWIO", "NDHWC"),
}


def _data(shape, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    # A few exact zeros and wide magnitudes exercise SPEC's special cases.
    x.reshape(-1)[::7] = 0.0
    return x * np.float32(2.0) ** rng.integers(-3, 4, size=shape).astype(np.float32)


@pytest.fixture(params=["cpu", "accelerator"])
def conv_path(request, monkeypatch):
    """Which Python path of ``approx_conv`` runs: this backend's, or a GPU's.

    "accelerator" turns off the CPU-only in-place conv targets, so the CPU
    kernels run the path a GPU takes (patch matrices, batch chunks by
    ``_conv_chunked``, design groups around the patch GEMMs): its Python
    logic is tested without a GPU.
    """
    if request.param == "accelerator":
        monkeypatch.setattr(conv_lib, "_in_place_targets_apply", lambda geometry: False)
    jax.clear_caches()  # approx_conv's jitted body was traced with the other path
    yield request.param
    jax.clear_caches()


def _check(got, ref, abs_sum, K):
    ok = reference.bound_ok(np.asarray(got), ref, abs_sum, K)
    assert ok.all(), (
        f"{(~ok).sum()} of {ok.size} outside the SPEC bound; max err "
        f"{np.max(np.abs(np.asarray(got, np.float64) - ref))}"
    )


def _case(nd, strides, padding, lhs_dil, rhs_dil, groups_kind, mult_name, seed=0, batch=2):
    c_in = {1: 2, 2: 4, "depthwise": 4}[groups_kind] if groups_kind != 1 else 3
    groups = {1: 1, 2: 2, "depthwise": c_in}[groups_kind]
    c_out = {1: 4, 2: 4, "depthwise": 8}[groups_kind]
    spatial = {1: (9,), 2: (7, 6), 3: (5, 4, 4)}[nd]
    window = {1: (3,), 2: (3, 2), 3: (2, 3, 2)}[nd]
    x = _data((batch, *spatial, c_in), seed)
    w = _data((*window, c_in // groups, c_out), seed + 1)
    if isinstance(padding, tuple):
        padding = padding[:nd]
    elif lhs_dil != 1:  # lax (and SPEC's reference) need explicit pads with lhs dilation
        padding = ((1, 2), (2, 0), (0, 1))[:nd] if padding == "SAME" else ((0, 0),) * nd
    kwargs = dict(
        window_strides=(strides,) * nd,
        padding=padding,
        lhs_dilation=(lhs_dil,) * nd,
        rhs_dilation=(rhs_dil,) * nd,
        feature_group_count=groups,
    )
    return x, w, kwargs, MULTIPLIERS[mult_name]()


def _reference(x, w, m, kwargs, nd):
    return reference.conv_general_dilated_with_bound(
        x,
        w,
        m.lut,
        m.mbits,
        kwargs["window_strides"],
        kwargs["padding"],
        kwargs["lhs_dilation"],
        kwargs["rhs_dilation"],
        kwargs["feature_group_count"],
        CHANNELS_LAST[nd],
    )


EXPLICIT = ((1, 0), (2, 1), (0, 1))
PADDINGS = ["SAME", "VALID", EXPLICIT]
GROUPS = [1, 2, "depthwise"]

# 2-D: every (stride, padding, rhs dilation) combination, cycling the other axes.
GRID_2D = [
    (s, p, ld, rd, GROUPS[i % 3], MULT_NAMES[i % 4])
    for i, (s, p, rd, ld) in enumerate(itertools.product([1, 2], PADDINGS, [1, 2], [1, 2]))
]
GRID_1D = [
    (s, p, ld, rd, GROUPS[i % 3], MULT_NAMES[(i + 1) % 4])
    for i, (s, p, ld, rd) in enumerate(
        [
            (1, "SAME", 1, 1),
            (2, "VALID", 1, 2),
            (1, EXPLICIT, 2, 1),
            (2, "SAME", 2, 2),
            (1, "VALID", 1, 1),
            (2, EXPLICIT, 1, 2),
        ]
    )
]


@pytest.mark.parametrize("strides,padding,lhs_dil,rhs_dil,groups,mult", GRID_2D)
def test_conv2d_matches_reference(strides, padding, lhs_dil, rhs_dil, groups, mult):
    x, w, kwargs, m = _case(2, strides, padding, lhs_dil, rhs_dil, groups, mult)
    got = approx_conv(x, w, m, **kwargs)
    ref, abs_sum, K = _reference(x, w, m, kwargs, 2)
    assert got.shape == ref.shape
    assert got.dtype == jnp.float32
    _check(got, ref, abs_sum, K)


@pytest.mark.parametrize("strides,padding,lhs_dil,rhs_dil,groups,mult", GRID_1D)
def test_conv1d_matches_reference(strides, padding, lhs_dil, rhs_dil, groups, mult):
    x, w, kwargs, m = _case(1, strides, padding, lhs_dil, rhs_dil, groups, mult)
    got = approx_conv(x, w, m, **kwargs)
    ref, abs_sum, K = _reference(x, w, m, kwargs, 1)
    assert got.shape == ref.shape
    _check(got, ref, abs_sum, K)


def test_conv3d_matches_reference():
    x, w, kwargs, m = _case(3, 2, EXPLICIT, 1, 2, 2, "mbm7", batch=1)
    kwargs["window_strides"] = (1, 2, 1)
    got = approx_conv(x, w, m, **kwargs)
    ref, abs_sum, K = _reference(x, w, m, kwargs, 3)
    assert got.shape == ref.shape
    _check(got, ref, abs_sum, K)


def test_lhs_dilation_and_padding_geometry_equal_lax():
    """Exact products through the lowering reproduce lax's geometry bit for bit."""
    # truncate(11) is not exact, so check geometry with small integers, whose
    # products and sums are exact under any of these multipliers: 1 * k.
    x = np.ones((2, 6, 5, 3), np.float32)
    w = np.arange(1, 1 + 3 * 3 * 3 * 4, dtype=np.float32).reshape(3, 3, 3, 4)
    kwargs = dict(
        window_strides=(2, 1), padding=((2, 1), (0, 2)), lhs_dilation=(2, 3), rhs_dilation=(1, 2)
    )
    got = approx_conv(x, w, mult_lib.truncate(11), **kwargs)
    want = lax.conv_general_dilated(
        x, w, dimension_numbers=CHANNELS_LAST[2], precision=lax.Precision.HIGHEST, **kwargs
    )
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_fp32_equals_lax_exactly():
    x = _data((2, 8, 8, 4), 3)
    w = _data((3, 3, 2, 6), 4)
    kwargs = dict(window_strides=(2, 1), padding="SAME", rhs_dilation=(1, 2), feature_group_count=2)
    got = approx_conv(x, w, "fp32", **kwargs)
    want = lax.conv_general_dilated(
        x, w, dimension_numbers=CHANNELS_LAST[2], precision=lax.Precision.HIGHEST, **kwargs
    )
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("lhs_dil", [(1, 1), (2, 3)])
@pytest.mark.parametrize("padding", [((-1, 1), (-1, 1)), ((-2, -1), (1, -1)), ((2, -1), (0, -2))])
def test_fp32_negative_padding_matches_reference(padding, lhs_dil):
    # XLA:CPU's native conv mishandles negative low padding (openxla/xla#48713);
    # the exact multiplier crops the input itself.
    x = _data((2, 7, 6, 2), 5)
    w = _data((3, 2, 2, 3), 6)
    kwargs = dict(window_strides=(2, 1), padding=padding, lhs_dilation=lhs_dil)
    got = approx_conv(x, w, "fp32", **kwargs)
    ref, abs_sum, K = reference.conv_general_dilated_with_bound(
        x, w, None, None, dimension_numbers=CHANNELS_LAST[2], exact=True, **kwargs
    )
    _check(got, ref, abs_sum, K)
    # The input gradient flows through the crop: compare with the LUT path's
    # exact-backward gradient of a multiplier whose products are exact here.
    ints = np.round(x * 4)
    grad = jax.grad(lambda x: approx_conv(x, w, "fp32", **kwargs).sum())(ints)
    want = jax.grad(
        lambda x: approx_conv(x, w, mult_lib.truncate(11), backward="exact", **kwargs).sum()
    )(ints)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(want), rtol=1e-6, atol=1e-5)


def test_positional_arguments_follow_lax_order():
    # A positional lax.conv_general_dilated call carries over by inserting the
    # multiplier: (window_strides, padding, lhs_dilation, rhs_dilation,
    # dimension_numbers, feature_group_count, ...).
    x = _data((2, 4, 9, 8), 7)  # NCHW
    w = _data((6, 2, 3, 3), 8)  # OIHW, 2 groups
    args = ((2, 1), ((1, 0), (2, 1)), (1, 2), (2, 1), ("NCHW", "OIHW", "NCHW"), 2)
    assert approx_conv(x, w, "fp32", *args).shape == lax.conv_general_dilated(x, w, *args).shape
    m = mult_lib.mbm(5)
    got = approx_conv(x, w, m, *args)
    want = approx_conv(
        x,
        w,
        m,
        window_strides=args[0],
        padding=args[1],
        lhs_dilation=args[2],
        rhs_dilation=args[3],
        dimension_numbers=args[4],
        feature_group_count=args[5],
    )
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(TypeError):
        approx_conv(x, w, m, *args, 1, None, None, "exact")  # backward is keyword-only


def test_nchw_oihw_dimension_numbers():
    m = mult_lib.mitchell(5)
    x = _data((2, 4, 7, 6), 5)  # NCHW
    w = _data((6, 2, 3, 3), 6)  # OIHW, 2 groups
    dn = ("NCHW", "OIHW", "NCHW")
    got = approx_conv(
        x,
        w,
        m,
        window_strides=(1, 2),
        padding=EXPLICIT[:2],
        feature_group_count=2,
        dimension_numbers=dn,
    )
    ref, abs_sum, K = reference.conv_general_dilated_with_bound(
        x, w, m.lut, m.mbits, (1, 2), EXPLICIT[:2], None, None, 2, dn
    )
    assert got.shape == ref.shape
    _check(got, ref, abs_sum, K)
    # The same convolution in channels-last layout gives the same bits.
    got_nhwc = approx_conv(
        x.transpose(0, 2, 3, 1),
        w.transpose(2, 3, 1, 0),
        m,
        window_strides=(1, 2),
        padding=EXPLICIT[:2],
        feature_group_count=2,
    )
    np.testing.assert_array_equal(np.asarray(got), np.asarray(got_nhwc).transpose(0, 3, 1, 2))


GRAD_CASES = [
    # nd, strides, padding, lhs_dil, rhs_dil, groups, mult
    (2, 2, EXPLICIT, 1, 1, 2, "mbm7"),
    (2, 1, "SAME", 1, 2, "depthwise", "mitchell5"),
    (2, 2, "VALID", 2, 1, 1, "random4"),
    (1, 2, "SAME", 1, 2, 2, "truncate3"),
]


@pytest.mark.parametrize("backward", ["approx", "exact"])
@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: f"{c[0]}d-{c[5]}-{c[6]}")
def test_gradients_match_reference_conv_vjp(case, backward, conv_path):
    nd, strides, padding, lhs_dil, rhs_dil, groups, mult = case
    x, w, kwargs, m = _case(nd, strides, padding, lhs_dil, rhs_dil, groups, mult, seed=7)
    y, vjp = jax.vjp(lambda x, w: approx_conv(x, w, m, backward=backward, **kwargs), x, w)
    dy = _data(y.shape, 9)
    dx, dw = vjp(jnp.asarray(dy))
    (rx, ax), (rw, aw) = reference.conv_vjp(
        x,
        w,
        dy,
        m.lut,
        m.mbits,
        backward,
        kwargs["window_strides"],
        kwargs["padding"],
        kwargs["lhs_dilation"],
        kwargs["rhs_dilation"],
        kwargs["feature_group_count"],
        CHANNELS_LAST[nd],
        with_bound=True,
    )
    # Terms per input-gradient entry <= taps * Og; per kernel-gradient entry = N * P.
    k_dx = int(np.prod(w.shape[:-2])) * w.shape[-1]
    k_dw = int(np.prod(y.shape[:-1]))
    _check(dx, rx, ax, k_dx)
    _check(dw, rw, aw, k_dw)


@pytest.mark.parametrize(
    "layout,mult,strides,padding",
    [
        ("NHWC", "mbm7", 1, "SAME"),
        ("NCHW", "random4", 2, "VALID"),
        ("NHWC", "truncate3", 1, EXPLICIT[:2]),
    ],
)
def test_batch_groups_match_reference(layout, mult, strides, padding, conv_path):
    # XLA's batch groups (its kernel gradient of a grouped convolution):
    # input samples [b * n, (b + 1) * n) meet output-feature group b.
    groups, n = 3, 2
    dn = ("NHWC", "HWIO", "NHWC") if layout == "NHWC" else ("NCHW", "OIHW", "NCHW")
    x = _data((groups * n, 6, 5, 4), 3)
    w = _data((3, 2, 4, 6), 4)
    if layout == "NCHW":
        x, w = x.transpose(0, 3, 1, 2), w.transpose(3, 2, 0, 1)
    m = MULTIPLIERS[mult]()
    kwargs = dict(window_strides=(strides,) * 2, padding=padding, dimension_numbers=dn)
    got = approx_conv(x, w, m, batch_group_count=groups, **kwargs)
    ref, abs_sum, K = reference.conv_general_dilated_with_bound(
        x,
        w,
        m.lut,
        m.mbits,
        (strides,) * 2,
        padding,
        dimension_numbers=dn,
        batch_group_count=groups,
    )
    assert (
        got.shape
        == ref.shape
        == (lax.conv_general_dilated(x, w, batch_group_count=groups, **kwargs).shape)
    )
    _check(got, ref, abs_sum, K)
    # The geometry is lax's: with values whose products and sums are exact
    # (a few significant bits, truncate(11)), the two agree exactly.
    xi, wi = np.round(x * 4) / 4, np.round(w * 4) / 4
    np.testing.assert_array_equal(
        np.asarray(approx_conv(xi, wi, mult_lib.truncate(11), batch_group_count=groups, **kwargs)),
        np.asarray(
            lax.conv_general_dilated(
                xi, wi, batch_group_count=groups, precision=lax.Precision.HIGHEST, **kwargs
            )
        ),
    )
    # Gradients (products P(dy, w) and P(x, dy), SPEC section 5) and a stack.
    dy = _data(got.shape, 5)
    dx, dw = jax.vjp(lambda x, w: approx_conv(x, w, m, batch_group_count=groups, **kwargs), x, w)[
        1
    ](jnp.asarray(dy))
    parts = [
        reference.conv_vjp(
            xp,
            wp,
            dyp,
            m.lut,
            m.mbits,
            "approx",
            (strides,) * 2,
            padding,
            None,
            None,
            1,
            dn,
            with_bound=True,
        )
        for xp, wp, dyp in zip(
            np.split(x, groups, axis=0),
            np.split(w, groups, axis=dn[1].index("O")),
            np.split(dy, groups, axis=dn[2].index("C")),
            strict=True,
        )
    ]
    rx = np.concatenate([p[0][0] for p in parts], axis=0)
    ax = np.concatenate([p[0][1] for p in parts], axis=0)
    rw = np.concatenate([p[1][0] for p in parts], axis=dn[1].index("O"))
    aw = np.concatenate([p[1][1] for p in parts], axis=dn[1].index("O"))
    _check(dx, rx, ax, 3 * 2 * 2)
    _check(dw, rw, aw, n * int(np.prod(got.shape)) // (got.shape[0] * 6))
    stacked = approx_conv(
        x, w, mult_lib.stack([m, mult_lib.mitchell(3)]), batch_group_count=groups, **kwargs
    )
    np.testing.assert_array_equal(_bits(stacked[0]), _bits(got))


def test_gradient_of_exact_multiplier_matches_lax():
    x = _data((2, 6, 6, 2), 1)
    w = _data((3, 3, 2, 3), 2)
    f = lambda x, w: approx_conv(x, w, "fp32", window_strides=2).sum()
    g = lambda x, w: lax.conv_general_dilated(
        x, w, (2, 2), "SAME", dimension_numbers=CHANNELS_LAST[2], precision=lax.Precision.HIGHEST
    ).sum()
    for a, b in zip(jax.grad(f, (0, 1))(x, w), jax.grad(g, (0, 1))(x, w), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_stack_gives_design_axis_in_one_call():
    x = _data((2, 6, 5, 3), 1)
    w = _data((3, 3, 3, 4), 2)
    designs = [mult_lib.mbm(7), mult_lib.mitchell(5)]
    stacked = mult_lib.stack(designs)
    got = jax.jit(lambda x, w, m: approx_conv(x, w, m, window_strides=2))(x, w, stacked)
    assert got.shape == (2, 2, 3, 3, 4)
    for d, m in enumerate(designs):
        np.testing.assert_array_equal(
            np.asarray(got[d]), np.asarray(approx_conv(x, w, m, window_strides=2))
        )
    # One custom call for both designs (on CPU the in-place conv target).
    hlo = jax.jit(lambda x, w, m: approx_conv(x, w, m)).lower(x, w, stacked).as_text()
    assert hlo.count("approx_jax_gemm") + hlo.count("approx_jax_conv") == 1
    # vmap over the stack's LUTs is the same thing.
    got_vmap = jax.vmap(lambda m: approx_conv(x, w, m, window_strides=2))(stacked)
    np.testing.assert_array_equal(np.asarray(got_vmap), np.asarray(got))


def test_vmap_over_designs_with_batched_inputs_and_kernels():
    """The sweep case: per-design activations and kernels and LUTs, one vmap."""
    designs = [mult_lib.mbm(7), mult_lib.truncate(3)]
    stacked = mult_lib.stack(designs)
    xs = np.stack([_data((2, 5, 5, 2), 1), _data((2, 5, 5, 2), 2)])
    ws = np.stack([_data((3, 3, 2, 3), 3), _data((3, 3, 2, 3), 4)])
    loss = lambda x, w, m: jnp.sum(approx_conv(x, w, m, window_strides=2) ** 2)
    vals, (dxs, dws) = jax.jit(jax.vmap(jax.value_and_grad(loss, (0, 1))))(xs, ws, stacked)
    for d, m in enumerate(designs):
        val, (dx, dw) = jax.value_and_grad(loss, (0, 1))(xs[d], ws[d], m)
        np.testing.assert_allclose(vals[d], val, rtol=1e-6)
        np.testing.assert_allclose(dxs[d], dx, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(dws[d], dw, rtol=1e-6, atol=1e-6)


def test_chunked_batch_matches_unchunked(monkeypatch, conv_path):
    # The patch-matrix forward pass (the in-place one never runs in chunks).
    monkeypatch.setattr(conv_lib, "IMPLICIT_MIN_CHANNELS", None)
    m = mult_lib.mbm(7)
    x = _data((7, 6, 6, 3), 1)
    w = _data((3, 3, 3, 4), 2)
    f = lambda x, w: approx_conv(x, w, m, padding="SAME")
    y_full, vjp_full = jax.vjp(f, x, w)
    dy = jnp.asarray(_data(y_full.shape, 3))
    dx_full, dw_full = vjp_full(dy)
    # Four samples per chunk (7 = 4 + 3, the batch padded by one sample):
    # forces lax.map + checkpoint and the padding.
    assert conv_lib._chunk_size(7, 4 * 36 * 27, 4 * 4 * 36 * 27) == 4
    monkeypatch.setattr(conv_lib, "PATCH_CHUNK_BYTES", 4 * 4 * 36 * 27)
    y, vjp = jax.vjp(f, x, w)
    dx, dw = vjp(dy)
    jaxpr = str(jax.make_jaxpr(f)(x, w))
    assert "scan" in jaxpr or "while" in jaxpr
    # Which path ran: the CPU reads the kernel gradient's patches in place.
    hlo = jax.jit(lambda x, w, dy: jax.vjp(f, x, w)[1](dy)).lower(x, w, dy).as_text()
    in_place = jax.default_backend() == "cpu" and conv_path == "cpu"
    assert ("approx_jax_conv_wgrad" in hlo) == in_place
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_full))
    np.testing.assert_array_equal(np.asarray(dx), np.asarray(dx_full))
    # The kernel gradient is one GEMM over the whole batch whatever the
    # chunks (CPU: read in place; elsewhere the chunk partials are added).
    if in_place:
        np.testing.assert_array_equal(_bits(dw), _bits(dw_full))
    else:
        np.testing.assert_allclose(np.asarray(dw), np.asarray(dw_full), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("n", "chunk"), [(7, 4), (8, 4), (5, 2), (1, 1)])
def test_batch_chunks_round_trip(n, chunk):
    v = jnp.arange(2 * n * 3, dtype=jnp.float32).reshape(2, n, 3)
    chunks = conv_lib._chunks_of(v, chunk)
    assert chunks.shape == (-(-n // chunk), 2, chunk, 3)
    np.testing.assert_array_equal(np.asarray(conv_lib._unchunk(chunks, n)), np.asarray(v))


def test_exact_backward_chunked_kernel_gradient_is_the_same_on_both_paths(monkeypatch):
    # backward="exact" over batch chunks: the CPU path's kernel-gradient
    # partials are added in the order of _conv_chunked's transpose.
    m = mult_lib.mbm(7)
    x, w = _data((5, 6, 6, 4), 41), _data((3, 3, 4, 5), 42)
    dy = jnp.asarray(_data((5, 6, 6, 5), 43))
    monkeypatch.setattr(conv_lib, "PATCH_CHUNK_BYTES", 1)
    f = lambda x, w: approx_conv(x, w, m, padding="SAME", backward="exact")  # noqa: E731
    jax.clear_caches()
    dx_cpu, dw_cpu = jax.vjp(f, x, w)[1](dy)
    monkeypatch.setattr(conv_lib, "_in_place_targets_apply", lambda geometry: False)
    jax.clear_caches()
    dx_acc, dw_acc = jax.vjp(f, x, w)[1](dy)
    jax.clear_caches()
    np.testing.assert_array_equal(_bits(dx_cpu), _bits(dx_acc))
    np.testing.assert_array_equal(_bits(dw_cpu), _bits(dw_acc))


def test_same_lower_padding():
    x, w = _data((2, 7, 6, 3), 51), _data((2, 4, 3, 5), 52)
    kwargs = dict(window_strides=(2, 1), padding="SAME_LOWER")
    dims = CHANNELS_LAST[2]
    native = lax.conv_general_dilated(
        x, w, dimension_numbers=dims, precision=lax.Precision.HIGHEST, **kwargs
    )
    np.testing.assert_array_equal(_bits(approx_conv(x, w, "fp32", **kwargs)), _bits(native))
    # With a multiplier: the reference of SPEC on SAME_LOWER's explicit pads
    # (the extra padding goes before, not after).
    pads = lax.padtype_to_pads((7, 6), (2, 4), (2, 1), "SAME_LOWER")
    assert pads != lax.padtype_to_pads((7, 6), (2, 4), (2, 1), "SAME")
    m = mult_lib.mbm(7)
    ref, abs_sum, K = reference.conv_general_dilated_with_bound(
        x, w, m.lut, m.mbits, (2, 1), pads, dimension_numbers=dims
    )
    got = approx_conv(x, w, m, **kwargs)
    assert got.shape == ref.shape
    _check(got, ref, abs_sum, K)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(rhs_dilation=(2, 1), padding="SAME"),
        dict(lhs_dilation=(2, 2), padding=((1, 2), (2, 0))),
        dict(window_strides=(2, 1), padding="VALID", feature_group_count=2),
    ],
    ids=["rhs-dilation", "lhs-dilation", "strides-groups"],
)
def test_stacked_designs_keep_the_geometry(kwargs):
    designs = [mult_lib.mbm(7), mult_lib.mitchell(5)]
    stack = mult_lib.stack(designs)
    x, w = _data((2, 7, 6, 4), 61), _data((3, 2, 4 // kwargs.get("feature_group_count", 1), 6), 62)
    got = approx_conv(x, w, stack, **kwargs)
    for d, m in enumerate(mult_lib.unstack(stack)):
        np.testing.assert_array_equal(_bits(got[d]), _bits(approx_conv(x, w, m, **kwargs)))
    assert got.shape[1:] == approx_conv(x, w, "fp32", **kwargs).shape


@pytest.mark.parametrize("per_call", [1, 2, 4])
def test_vmapped_sweep_keeps_the_chunk_budget(monkeypatch, per_call, conv_path):
    """vmap over designs with per-design inputs: groups of designs, same bits."""
    designs = [mult_lib.mbm(7), mult_lib.mitchell(5), mult_lib.truncate(3), mult_lib.mbm(3)]
    stacked = mult_lib.stack(designs)
    xs = np.stack([_data((3, 6, 6, 2), 10 + d) for d in range(4)])
    ws = np.stack([_data((3, 3, 2, 5), 20 + d) for d in range(4)])
    dys = np.stack([_data((3, 6, 6, 5), 30 + d) for d in range(4)])
    # Budget: `per_call` designs' patch matrices (3 * 36 taps-rows of 9 * 2 floats).
    monkeypatch.setattr(conv_lib, "PATCH_CHUNK_BYTES", per_call * 4 * 3 * 36 * 18)
    f = lambda x, w, m: approx_conv(x, w, m, padding="SAME")

    def fwd_bwd(x, w, m, dy):
        y, vjp = jax.vjp(lambda x, w: f(x, w, m), x, w)
        return (y, *vjp(dy))

    got = jax.jit(jax.vmap(fwd_bwd))(xs, ws, stacked, dys)
    for d, m in enumerate(mult_lib.unstack(stacked)):
        want = jax.jit(fwd_bwd)(xs[d], ws[d], m, dys[d])
        for g, w_ in zip(got, want, strict=True):
            np.testing.assert_array_equal(_bits(g[d]), _bits(w_))
    # Each GEMM on a patch matrix holds as many designs as the budget allows
    # for its own `a` operand ([D, G, rows, K]; the input gradient's patches
    # of dy have K = 9 * 5, the forward's 9 * 2): fewer than all: a loop.
    hlo = jax.jit(jax.vmap(fwd_bwd)).lower(xs, ws, stacked, dys).as_text()
    budget = conv_lib.PATCH_CHUNK_BYTES
    gemm_lines = [ln for ln in hlo.splitlines() if "approx_jax_gemm" in ln and "call" in ln]
    assert gemm_lines
    per_gemm = []
    for ln in gemm_lines:
        operand = re.search(r":\s*\(tensor<(\d+)x(\d+)x(\d+)x(\d+)xf32>", ln)
        result = re.search(r"->\s*\(?tensor<(\d+)x", ln)
        assert operand and result, ln
        designs, rows_k = int(result.group(1)), int(operand.group(3)) * int(operand.group(4))
        if rows_k in (3 * 36 * 18, 3 * 36 * 45):  # a patch matrix (not patches^T)
            fit = max(d for d in (1, 2, 4) if d * 4 * rows_k <= budget or d == 1)
            assert designs == fit, ln
        per_gemm.append(designs)
    assert ("while" in hlo) == (min(per_gemm) < 4)


# The input gradient as convs of dy (padded by the window) with the flipped,
# I/O-swapped kernel, one per phase of the stride, on the forward targets.
INPUT_GRAD_CASES = {
    # name: (x shape, kernel shape, approx_conv kwargs)
    "5x5_same": ((2, 7, 6, 4), (5, 5, 4, 6), dict(padding="SAME")),
    "lhs_rhs_dilated_negative_pad": (
        (2, 5, 6, 3),
        (3, 2, 3, 4),
        dict(padding=((2, -1), (-1, 2)), lhs_dilation=(2, 1), rhs_dilation=(1, 2)),
    ),
    "1d_groups_two_out": ((3, 9, 4), (3, 2, 4), dict(padding="VALID", feature_group_count=2)),
    "3d": ((1, 4, 5, 3, 3), (2, 3, 2, 3, 5), dict(padding="SAME", rhs_dilation=(2, 1, 1))),
    "3x3_stride2_same": ((2, 7, 8, 4), (3, 3, 4, 6), dict(window_strides=2, padding="SAME")),
    "1x1_stride2": ((2, 5, 6, 3), (1, 1, 3, 4), dict(window_strides=2, padding="VALID")),
    "stride_2x3_rhs_dilated": (
        (2, 9, 10, 3),
        (3, 2, 3, 4),
        dict(window_strides=(2, 3), rhs_dilation=(2, 1), padding=((1, 2), (0, 1))),
    ),
    "1d_stride3_groups": (
        (3, 11, 4),
        (5, 2, 6),
        dict(window_strides=3, padding=((2, 1),), feature_group_count=2),
    ),
    "3d_stride_lhs_dilated": (
        (1, 4, 5, 3, 3),
        (2, 3, 2, 3, 4),
        dict(window_strides=(2, 1, 1), lhs_dilation=(1, 2, 1), padding=((0, 1), (1, 0), (0, 0))),
    ),
}


def _sequential_input_grad(x_shape, w, dy, m, geo):
    """The input gradient as float32 sums, term by term, in the kernels' order.

    Each entry is one sum from +0 over the taps that reach it, the window
    walked backwards (last tap first, row-major over the dimensions), then
    the output channels, of the SPEC products P(dy, w) (reference.product);
    the padding's zero products add nothing and are skipped. Which output
    position a tap takes each input position from is the reference's
    index arithmetic (``geo``: its ``_ConvGeometry``).
    """
    cg, og = geo.group_features, geo.out_features // geo.groups
    channel = np.arange(x_shape[-1])
    acc = np.zeros(x_shape, np.float32)
    out_grid = np.meshgrid(*(np.arange(n) for n in geo.out_spatial), indexing="ij")
    for tap in reversed(list(geo.taps())):
        indices, valids = geo.input_positions(tap)  # per output position
        valid = np.logical_and.reduce(np.meshgrid(*valids, indexing="ij"))
        # One tap reaches an input position from at most one output position.
        ins = tuple(g[valid] for g in np.meshgrid(*indices, indexing="ij"))
        outs = tuple(g[valid] for g in out_grid)
        for o in range(og):
            dy_o = np.asarray(dy)[(slice(None), *outs)][..., (channel // cg) * og + o]  # [N, V, C]
            w_o = np.asarray(w)[tap][channel % cg, (channel // cg) * og + o]  # [C]
            term = reference.product(dy_o, w_o, m.lut, m.mbits)
            acc[(slice(None), *ins)] = acc[(slice(None), *ins)] + term
    return acc


@pytest.mark.parametrize("mult", ["mbm7", "random4"])
@pytest.mark.parametrize("case", sorted(INPUT_GRAD_CASES))
def test_input_gradient_sums_in_kernel_order(case, mult, conv_path):
    """Strided or not, every input-gradient entry is one float32 sum in a fixed
    order (the phases' convs of dy): the bits of that sum written out here."""
    x_shape, w_shape, kwargs = INPUT_GRAD_CASES[case]
    nd = len(x_shape) - 2
    m = MULTIPLIERS[mult]()
    x, w = _data(x_shape, 74), _data(w_shape, 75)
    y, vjp = jax.vjp(lambda x, w: approx_conv(x, w, m, **kwargs), x, w)
    dy = _data(y.shape, 76)
    dx, _ = vjp(jnp.asarray(dy))
    as_tuple = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v,) * nd  # noqa: E731
    strides = as_tuple(kwargs.get("window_strides", 1))
    lhs, rhs = as_tuple(kwargs.get("lhs_dilation", 1)), as_tuple(kwargs.get("rhs_dilation", 1))
    geometry = (strides, kwargs["padding"], lhs, rhs, kwargs.get("feature_group_count", 1))
    (rx, ax), _ = reference.conv_vjp(
        x, w, dy, m.lut, m.mbits, "approx", *geometry, CHANNELS_LAST[nd], with_bound=True
    )
    _check(dx, rx, ax, int(np.prod(w_shape[:nd])) * w_shape[-1])
    if all(st == 1 or ld == 1 for st, ld in zip(strides, lhs, strict=True)):
        geo = reference._ConvGeometry(x_shape, w_shape, *geometry, CHANNELS_LAST[nd])
        want = _sequential_input_grad(x_shape, w, dy, m, geo)
        np.testing.assert_array_equal(_bits(dx), _bits(want))


@pytest.mark.parametrize("stride", [1, 2])
def test_vmapped_input_gradient_needs_no_design_groups(monkeypatch, stride):
    """A sweep's vmap(grad) of a conv whose patches exceed the budget: on CPU
    one custom call per product (forward, kernel gradient, and input gradient:
    one per phase, 4 for a 2-D stride of 2), no loop."""
    designs = [mult_lib.mbm(7), mult_lib.mitchell(5), mult_lib.truncate(3), random_multiplier(6, 5)]
    stacked = mult_lib.stack(designs)
    xs = np.stack([_data((3, 6, 6, 4), 80 + d) for d in range(4)])
    ws = np.stack([_data((3, 3, 4, 5), 90 + d) for d in range(4)])
    monkeypatch.setattr(conv_lib, "PATCH_CHUNK_BYTES", 4 * 3 * 36 * 36)  # one design's patches
    loss = lambda x, w, m: jnp.sum(  # noqa: E731
        jnp.tanh(approx_conv(x, w, m, window_strides=stride, padding="SAME"))
    )
    grads = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1))))
    got = grads(xs, ws, stacked)
    for d, m in enumerate(mult_lib.unstack(stacked)):
        want = jax.jit(jax.grad(loss, argnums=(0, 1)))(xs[d], ws[d], m)
        for g, w_ in zip(got, want, strict=True):
            np.testing.assert_array_equal(_bits(g[d]), _bits(w_))
    hlo = grads.lower(xs, ws, stacked).as_text()
    calls = re.findall(r"custom_call @(approx_jax_\w+)", hlo)
    if jax.default_backend() == "cpu":
        phases = 1 if stride == 1 else 4
        assert sorted(calls) == ["approx_jax_conv"] * (1 + phases) + ["approx_jax_conv_wgrad"]
        assert "while" not in hlo


def test_dtype_and_preferred_element_type():
    x = _data((1, 5, 5, 2), 1).astype(jnp.bfloat16)
    w = _data((3, 3, 2, 2), 2).astype(jnp.bfloat16)
    assert approx_conv(x, w, "mbm7").dtype == jnp.bfloat16
    assert approx_conv(x, w, "mbm7", preferred_element_type=jnp.float32).dtype == jnp.float32


@pytest.mark.parametrize(
    "args,kwargs,exc,match",
    [
        (((1, 5, 5, 2), (3, 3, 2)), {}, ValueError, "same rank"),
        (((5, 2), (3, 2)), {}, ValueError, "rank >= 3"),
        (((1, 5, 5, 3), (3, 3, 2, 4)), {}, ValueError, "kernel input-feature dimension"),
        (((1, 5, 5, 4), (3, 3, 2, 3)), {"feature_group_count": 2}, ValueError, "output-feature"),
        (((1, 5, 5, 3), (3, 3, 1, 3)), {"feature_group_count": 2}, ValueError, "divisible"),
        (((1, 5, 5, 2), (3, 3, 2, 4)), {"padding": "FULL"}, ValueError, "padding"),
        (((1, 5, 5, 2), (3, 3, 2, 4)), {"padding": ((1, 1),)}, ValueError, "padding"),
        (((1, 5, 5, 2), (3, 3, 2, 4)), {"window_strides": (1, 2, 3)}, ValueError, "window_strides"),
        (((1, 5, 5, 2), (3, 3, 2, 4)), {"lhs_dilation": 2}, ValueError, "explicit"),
        (((1, 5, 5, 2), (3, 3, 2, 4)), {"batch_group_count": 2}, ValueError, "batch_group"),
        (((2, 5, 5, 2), (3, 3, 2, 3)), {"batch_group_count": 2}, ValueError, "batch_group"),
        (((2, 5, 5, 2), (3, 3, 2, 4)), {"batch_group_count": 0}, ValueError, "batch_group"),
        (((2, 5, 5, 2), (3, 3, 2, 4)), {"batch_group_count": 2.0}, TypeError, "batch_group"),
        (
            ((2, 5, 5, 4), (3, 3, 2, 4)),
            {"batch_group_count": 2, "feature_group_count": 2},
            ValueError,
            "at most one",
        ),
        (((1, 5, 5, 2), (3, 3, 2, 4)), {"backward": "fast"}, ValueError, "backward"),
        # A plain int is checked like a tuple (it used to skip the >= 1 check).
        (((1, 5, 5, 2), (3, 3, 2, 4)), {"window_strides": 0}, ValueError, "window_strides"),
        (((1, 5, 5, 2), (3, 3, 2, 4)), {"window_strides": -1}, ValueError, "window_strides"),
        (((1, 5, 5, 2), (3, 3, 2, 4)), {"rhs_dilation": 0}, ValueError, "rhs_dilation"),
        (
            ((1, 5, 5, 2), (3, 3, 2, 4)),
            {"lhs_dilation": -1, "padding": ((0, 0), (0, 0))},
            ValueError,
            "lhs_dilation",
        ),
        (((1, 5, 5, 2), (3, 3, 2, 4)), {"window_strides": True}, TypeError, "window_strides"),
        (((1, 4, 4, 2), (3, 3, 2, 4)), {"padding": ((-3, -3), (0, 0))}, ValueError, "negative"),
        (((1, 6, 6, 2), (0, 3, 2, 4)), {"padding": "SAME"}, ValueError, "kernel spatial"),
        (
            ((1, 5, 5, 2), (3, 3, 2, 4)),
            {"preferred_element_type": np.int32},
            TypeError,
            "preferred_element_type",
        ),
        (
            ((1, 5, 5, 2), (3, 3, 2, 4)),
            {"preferred_element_type": np.float16},
            TypeError,
            "preferred_element_type",
        ),
    ],
)
def test_validation_errors(args, kwargs, exc, match):
    x = np.ones(args[0], np.float32)
    w = np.ones(args[1], np.float32)
    with pytest.raises(exc, match=match):
        approx_conv(x, w, "mbm7", **kwargs)


def test_vmap_over_an_empty_design_axis():
    w = _data((3, 3, 1, 2), 7)
    fn = jax.vmap(lambda x: approx_conv(x[None], w, "mbm7", padding="SAME"))
    assert fn(jnp.ones((0, 5, 5, 1))).shape == (0, 1, 5, 5, 2)


def test_non_float_inputs_raise_type_error():
    with pytest.raises(TypeError, match="x"):
        approx_conv(np.ones((1, 5, 5, 2), np.int32), np.ones((3, 3, 2, 4), np.float32), "mbm7")
    with pytest.raises(TypeError, match="kernel"):
        approx_conv(np.ones((1, 5, 5, 2), np.float32), np.ones((3, 3, 2, 4), np.int8), "mbm7")


def _out_spatial(S, window, strides, lhs, rhs, pads):
    """Output extent per spatial dimension (the lax formula, written out independently)."""
    return tuple(
        ((s - 1) * ld + 1 + lo + hi - ((w - 1) * rd + 1)) // st + 1
        for s, w, st, ld, rd, (lo, hi) in zip(S, window, strides, lhs, rhs, pads, strict=True)
    )


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_patch_layouts_equal_one_stack_of_taps(nd):
    # The forward patches are gathered one spatial dimension at a time and
    # the kernel gradient's patches^T directly in transposed order; both must
    # hold the very values of the one-stack-per-tap form (exact copies, zeros
    # in the padding and dilation holes).
    rng = np.random.default_rng(nd)
    checked = 0
    while checked < 6:
        S = [int(rng.integers(3, 8)) for _ in range(nd)]
        window = tuple(int(rng.integers(1, 4)) for _ in range(nd))
        strides = tuple(int(rng.integers(1, 3)) for _ in range(nd))
        lhs = tuple(int(rng.integers(1, 3)) for _ in range(nd))
        rhs = tuple(int(rng.integers(1, 3)) for _ in range(nd))
        pads = tuple((int(rng.integers(0, 3)), int(rng.integers(0, 3))) for _ in range(nd))
        out = _out_spatial(S, window, strides, lhs, rhs, pads)
        if min(out) < 1:
            continue
        x = jnp.asarray(_data([2, 3, *S, 4], checked))
        geometry = (window, strides, pads, lhs, rhs, out)
        want = np.asarray(conv_lib._patches_by_tap(x, *geometry))  # [G, N, *out, taps, C]
        staged = np.asarray(conv_lib._patches_staged(x, *geometry))
        np.testing.assert_array_equal(staged.view(np.uint32), want.view(np.uint32))
        transposed = np.asarray(conv_lib._patches_transposed(x, *geometry))
        # [G, taps, C, N, *out] <- [G, N, *out, taps, C]
        want_t = np.moveaxis(np.moveaxis(want, -1, 1), -1, 1)
        np.testing.assert_array_equal(transposed.view(np.uint32), want_t.view(np.uint32))
        checked += 1


@pytest.mark.parametrize("backward", ["approx", "exact"])
@pytest.mark.parametrize("mult", ["mbm5", "mitchell4"])
def test_conv_vjp_equals_autodiff_through_the_gemm(backward, mult):
    # _conv_core's custom VJP (patches^T gathered directly, d_patches folded
    # by the per-tap transpose) must give the bits of plain autodiff through
    # ops._gemm on the one-stack-per-tap patch matrix, for strided, padded and
    # dilated geometries.
    m = approx_jax.multipliers.get(mult)
    klut = ops.kernel_lut_of(m)
    rng = np.random.default_rng(7)
    for case in range(4):
        nd = 1 + case % 3
        S = [int(rng.integers(4, 8)) for _ in range(nd)]
        window = tuple(int(rng.integers(1, 4)) for _ in range(nd))
        strides = tuple(int(rng.integers(1, 3)) for _ in range(nd))
        lhs = tuple(int(rng.integers(1, 3)) for _ in range(nd))
        rhs = (1,) * nd
        pads = tuple((int(rng.integers(0, 2)), int(rng.integers(0, 2))) for _ in range(nd))
        out = _out_spatial(S, window, strides, lhs, rhs, pads)
        geometry = (window, strides, pads, lhs, rhs, out)
        cg, og = 3, 4
        taps = int(np.prod(window))
        x = jnp.asarray(_data([2, 3, *S, cg], 20 + case))
        w4 = jnp.asarray(_data([1, 2, taps * cg, og], 30 + case))

        def autodiff(x, w4, geometry=geometry):
            p = conv_lib._patches_by_tap(x, *geometry)
            a4 = p.reshape(1, 2, -1, w4.shape[2])
            return ops._gemm(a4, w4, klut, m.mbits, backward)

        def custom(x, w4, geometry=geometry):
            return conv_lib._conv_core(
                x, w4, klut, m.mbits, ffi.FAMILY_UNKNOWN, backward, geometry, 8 << 20
            )

        y_want, vjp_want = jax.vjp(autodiff, x, w4)
        y_got, vjp_got = jax.vjp(custom, x, w4)
        np.testing.assert_array_equal(
            np.asarray(y_got).reshape(-1).view(np.uint32),
            np.asarray(y_want).reshape(-1).view(np.uint32),
        )
        ct = jnp.asarray(_data(y_got.shape, 40 + case))
        for got, want in zip(vjp_got(ct), vjp_want(ct.reshape(y_want.shape)), strict=True):
            np.testing.assert_array_equal(
                np.asarray(got).view(np.uint32), np.asarray(want).view(np.uint32)
            )


# --------------------------------------------------------------------------
# CPU forward on the patch matrix read in place (ffi.CONV_TARGET): the same
# bits as the patch-matrix GEMM, in the output and in both gradients.

IN_PLACE_CASES = {
    # name: (x shape, kernel shape (channels-last layouts), approx_conv kwargs)
    "5x5_same": ((3, 9, 9, 8), (5, 5, 8, 6), dict(padding="SAME")),
    "strided_dilated": (
        (2, 11, 10, 12),
        (3, 2, 12, 5),
        dict(window_strides=(2, 3), rhs_dilation=(1, 2), padding="VALID"),
    ),
    "lhs_dilated_negative_pad": (
        (2, 6, 7, 8),
        (3, 3, 8, 4),
        dict(padding=((2, -1), (-1, 1)), lhs_dilation=(2, 1)),
    ),
    "groups": ((2, 7, 7, 16), (3, 3, 8, 6), dict(padding="SAME", feature_group_count=2)),
    "1d": ((3, 20, 9), (4, 9, 7), dict(window_strides=2, padding="SAME")),
    "3d": ((2, 5, 6, 4, 8), (2, 3, 2, 8, 3), dict(padding="VALID", rhs_dilation=(2, 1, 1))),
    "many_channels": ((1, 5, 5, 300), (3, 3, 300, 4), dict(padding="SAME")),
}


def _conv_and_grads(x, w, m, kwargs, dy):
    y, vjp = jax.vjp(lambda x, w: approx_conv(x, w, m, **kwargs), x, w)
    return (y, *vjp(dy))


@pytest.mark.parametrize("case", sorted(IN_PLACE_CASES))
@pytest.mark.parametrize("chunked", [False, True])
def test_in_place_forward_gives_the_patch_gemm_bits(case, chunked, monkeypatch):
    if jax.default_backend() != "cpu":
        pytest.skip("the in-place forward is CPU only")
    x_shape, w_shape, kwargs = IN_PLACE_CASES[case]
    x = _data(x_shape, 11)
    x.reshape(-1)[5::97] = np.inf  # Inf / NaN inputs take the exact path per block
    x.reshape(-1)[9::131] = np.nan
    w = _data(w_shape, 12)
    m = mult_lib.mbm(6)
    dy = _data(approx_conv(x, w, "fp32", **kwargs).shape, 13)
    if chunked:  # a batch chunk per sample: the input gradient loops over chunks
        monkeypatch.setattr(conv_lib, "PATCH_CHUNK_BYTES", 1)
    f = jax.jit(lambda x, w, dy: _conv_and_grads(x, w, m, kwargs, dy))
    monkeypatch.setattr(conv_lib, "IMPLICIT_MIN_CHANNELS", 1)
    in_place = f(x, w, dy)
    hlo = f.lower(x, w, dy).as_text()
    assert re.search(r"approx_jax_conv(?!_wgrad)", hlo) and "approx_jax_conv_wgrad" in hlo
    # The reference: the patch path in one piece (the in-place kernel gradient
    # is one GEMM over the whole batch, whatever the chunks).
    monkeypatch.setattr(conv_lib, "IMPLICIT_MIN_CHANNELS", None)
    monkeypatch.setattr(conv_lib, "PATCH_CHUNK_BYTES", 1 << 30)
    f = jax.jit(lambda x, w, dy: _conv_and_grads(x, w, m, kwargs, dy))
    patches = f(x, w, dy)
    hlo = jax.jit(lambda x, w: approx_conv(x, w, m, **kwargs)).lower(x, w).as_text()
    assert "approx_jax_conv" not in hlo
    for got, want, what in zip(in_place, patches, ("y", "dx", "dw"), strict=True):
        np.testing.assert_array_equal(_bits(got), _bits(want), err_msg=what)
    # And the forward pass against the NumPy reference of SPEC (within the sum bound).
    ref, abs_sum, K = _reference_conv(x, w, m, kwargs)
    finite = np.isfinite(ref)
    _check(np.asarray(in_place[0])[finite], ref[finite], abs_sum[finite], K)


def test_in_place_forward_under_vmap_over_designs(monkeypatch):
    if jax.default_backend() != "cpu":
        pytest.skip("the in-place forward is CPU only")
    monkeypatch.setattr(conv_lib, "IMPLICIT_MIN_CHANNELS", 1)
    stack = mult_lib.stack([mult_lib.mbm(7), mult_lib.mitchell(5), mult_lib.truncate(3)])
    x = _data((3, 2, 7, 7, 8), 21)  # one input per design (a sweep)
    w = _data((3, 3, 8, 5), 22)
    f = jax.vmap(lambda x, m: approx_conv(x, w, m, window_strides=2, padding="SAME"))
    got = f(x, stack)
    for d in range(3):
        want = approx_conv(x[d], w, mult_lib.unstack(stack)[d], window_strides=2, padding="SAME")
        np.testing.assert_array_equal(_bits(got[d]), _bits(want))


def test_widened_families_in_a_vmapped_conv_step(monkeypatch):
    # A mixed-width M >= 8 stack (mbm10 and mitchell8 padded to 11) runs each
    # design's closed form at its own width in the conv targets too (LUT
    # facts): forward and both gradients bit-equal to each design alone.
    if jax.default_backend() != "cpu":
        pytest.skip("the conv targets are CPU only")
    monkeypatch.setattr(conv_lib, "IMPLICIT_MIN_CHANNELS", 1)
    designs = [
        mult_lib.mbm(10),
        mult_lib.mitchell(8),
        mult_lib.mitchell(11),
        random_multiplier(9, 3),
    ]
    stack = mult_lib.stack(designs)
    x = _data((2, 7, 7, 8), 31)
    w = _data((3, 3, 8, 5), 32)

    def f(x, w, m):
        return approx_conv(x, w, m, padding="SAME")

    def loss(x, w, m):  # (the cotangent cos(y) is elementwise: same bits)
        return jnp.sum(jnp.sin(f(x, w, m)))

    grad = jax.grad(loss, argnums=(0, 1))
    got_v = jax.jit(jax.vmap(f, in_axes=(None, None, 0)))(x, w, stack)
    got_g = jax.jit(jax.vmap(grad, in_axes=(None, None, 0)))(x, w, stack)
    for d, m in enumerate(designs):
        np.testing.assert_array_equal(_bits(got_v[d]), _bits(f(x, w, m)))
        for g, one in zip(got_g, grad(x, w, m), strict=True):
            np.testing.assert_array_equal(_bits(g[d]), _bits(one))


def _reference_conv(x, w, m, kwargs):
    nd = x.ndim - 2

    def per_dim(v):
        return (1,) * nd if v is None else (v,) * nd if isinstance(v, int) else tuple(v)

    return reference.conv_general_dilated_with_bound(
        x,
        w,
        m.lut,
        m.mbits,
        per_dim(kwargs.get("window_strides")),
        kwargs["padding"],
        per_dim(kwargs.get("lhs_dilation")),
        per_dim(kwargs.get("rhs_dilation")),
        kwargs.get("feature_group_count", 1),
        CHANNELS_LAST[nd],
    )


# --------------------------------------------------------------------------
# The LUT's closed-form family (ops.closed_form_family) rides to every conv
# GEMM as the targets' ``family`` attribute, as to approx_dot's.


def _family_attributes(fn, *args):
    text = jax.jit(fn).lower(*args).as_text()
    calls = [ln for ln in text.splitlines() if re.search(r"approx_jax_(gemm|conv)", ln)]
    return {
        (re.search(r"approx_jax_\w+", ln).group(0), ln.split("family = ")[1].split(" ")[0])
        for ln in calls
    }


@pytest.mark.parametrize("channels", [1, 8])  # patch GEMMs / in-place CPU targets
def test_family_attribute_in_the_lowered_conv(channels, monkeypatch):
    monkeypatch.setattr(conv_lib, "IMPLICIT_MIN_CHANNELS", 4)
    x = jnp.ones((2, 6, 6, channels), jnp.float32)
    w = jnp.ones((3, 3, channels, 4), jnp.float32)

    def grads(m):
        loss = lambda x, w: approx_conv(x, w, m, padding="SAME").sum()  # noqa: E731
        return jax.value_and_grad(loss, argnums=(0, 1))

    attrs = _family_attributes(grads(mult_lib.mbm(9)), x, w)
    targets = {t for t, _ in attrs}
    if jax.default_backend() != "cpu":  # patch matrices and the GEMM
        assert targets == {"approx_jax_gemm"}
    elif channels >= 4:  # the in-place targets
        assert {"approx_jax_conv", "approx_jax_conv_wgrad"} <= targets
    else:  # patch GEMMs, but the input gradient reads dy's 4 channels in place
        assert targets == {"approx_jax_gemm", "approx_jax_conv"}
    # Forward, input and kernel gradient: MBM's code on every target.
    assert {f for _, f in attrs} == {"3"}
    attrs = _family_attributes(grads(random_multiplier(9, 3)), x, w)
    assert {f for _, f in attrs} == {"0"}
    # A multiplier passed into the jitted function is traced: unknown there.
    traced = lambda x, w, m: approx_conv(x, w, m, padding="SAME")  # noqa: E731
    assert {f for _, f in _family_attributes(traced, x, w, mult_lib.mbm(9))} == {"-1"}


@pytest.mark.parametrize("M", [8, 11])
def test_conv_with_the_family_told_equals_the_kernel_checking(M, monkeypatch):
    # Closed over (family told) vs a jit argument (-1: the kernel checks):
    # the same bits for the value, both gradients and a second derivative,
    # on the in-place and the batch-chunked paths and vmapped over
    # per-design inputs (design groups); a stack is never told.
    monkeypatch.setattr(conv_lib, "IMPLICIT_MIN_CHANNELS", 4)
    monkeypatch.setattr(conv_lib, "PATCH_CHUNK_BYTES", 1 << 14)  # batch chunks
    x = jnp.asarray(_data((3, 6, 6, 8), 41))
    w = jnp.asarray(_data((3, 3, 8, 5), 42))

    def loss(x, w, m):
        return jnp.sum(approx_conv(x, w, m, padding="SAME") ** 2)

    def everything(x, w, m):
        value, (dx, dw) = jax.value_and_grad(loss, argnums=(0, 1))(x, w, m)
        ddw = jax.grad(lambda w: jnp.sum(jax.grad(loss)(x, w, m) ** 2))(w)
        per_design = jax.vmap(lambda xd: approx_conv(xd, w, m, padding="SAME"))(x[:, None])
        return value, dx, dw, ddw, per_design

    for m in (mult_lib.mbm(M), mult_lib.mitchell(M), mult_lib.truncate(M)):
        told = jax.jit(lambda x, w, m=m: everything(x, w, m))
        attrs = {f for _, f in _family_attributes(lambda x, w, m=m: everything(x, w, m), x, w)}
        assert attrs == {str(ops.closed_form_family(ops.kernel_lut_of(m), M))} != {"-1"}
        checked = jax.jit(everything)(x, w, m)
        for got, want in zip(told(x, w), checked, strict=True):
            np.testing.assert_array_equal(_bits(got), _bits(want))
    stack = mult_lib.stack([mult_lib.mbm(M), mult_lib.mitchell(M)])
    attrs = _family_attributes(lambda x, w: approx_conv(x, w, stack, padding="SAME"), x, w)
    assert {f for _, f in attrs} == {"-1"}


@pytest.mark.parametrize("M", [3, 9, 11])
def test_conv_targets_follow_the_family_attribute(M, monkeypatch):
    # As the GEMM (test_ops): told that a random LUT is Mitchell's, the conv
    # targets compute Mitchell's products; unknown (-1) or none (0) gives
    # the LUT's own. One product per output: a 1x1 window over 2^M pixels
    # of one channel (forward), and 2^M channels of one pixel (kernel gradient).
    if "cpu" not in jax.devices()[0].platform:
        pytest.skip("the conv targets are CPU only")

    monkeypatch.setenv("APPROX_JAX_CPU_FORMULA", "2")  # closed form at any shape
    rnd = random_multiplier(M, 9)
    assert ops.closed_form_family(ops.kernel_lut_of(rnd), M) == 0
    mant = (1.0 + np.arange(2**M) / 2.0**M).astype(np.float32)
    klut = jnp.asarray(ops.kernel_lut_of(rnd))
    x_fwd = jnp.asarray(mant).reshape(1, 1, 1, -1, 1)  # [Gx, G, N, S, C]
    w_fwd = jnp.asarray(mant).reshape(1, 1, 1, -1)  # [Gw, G, K = 1, O]
    x_wg = jnp.asarray(mant).reshape(1, 1, -1, 1, 1)  # [Gx, G, C, N, S]
    dy_wg = jnp.asarray(mant).reshape(1, 1, 1, 1, -1)  # [Gd, G, N, P = 1, O]
    for family, like in ((-1, rnd), (0, rnd), (1, mult_lib.mitchell(M))):
        want = reference.product(mant[:, None], mant[None, :], like.lut, M)
        fwd = partitioning.conv_call(x_fwd, w_fwd, klut, M, (1,), (1,), (1,), 2**M, family)
        np.testing.assert_array_equal(_bits(np.asarray(fwd)[0, 0, 0]), _bits(want))
        wgrad = partitioning.conv_wgrad_call(x_wg, dy_wg, klut, M, (1,), (1,), (1,), family)
        np.testing.assert_array_equal(_bits(np.asarray(wgrad)[0, 0]), _bits(want))


@pytest.mark.parametrize("family", [-2, 4])
@pytest.mark.parametrize("wgrad", [False, True])
def test_conv_targets_reject_an_unknown_family(family, wgrad):
    if "cpu" not in jax.devices()[0].platform:
        pytest.skip("the conv targets are CPU only")

    klut = jnp.asarray(ops.kernel_lut_of(mult_lib.mbm(3)))
    ones = lambda *s: jnp.ones(s, jnp.float32)  # noqa: E731
    with pytest.raises(Exception, match="family") as info:  # noqa: PT011 - XLA's error type
        if wgrad:
            out = partitioning.conv_wgrad_call(
                ones(1, 1, 2, 1, 3), ones(1, 1, 1, 3, 4), klut, 3, (1,), (1,), (1,), family
            )
        else:
            out = partitioning.conv_call(
                ones(1, 1, 1, 3, 2), ones(1, 1, 2, 4), klut, 3, (1,), (1,), (1,), 3, family
            )
        jax.block_until_ready(out)
    assert not isinstance(info.value, AssertionError)


# --------------------------------------------------------------------------
# Second derivatives (grad of grad): simulated products all the way down.


@pytest.mark.parametrize("channels", [1, 4])  # patch path / CPU in-place path
@pytest.mark.parametrize("chunked", [False, True])
def test_second_derivative_cross_term_is_a_kernel_gradient(channels, chunked, monkeypatch):
    # For h(w) = <v, grad_x <dy, conv(x, w)>>, d h / d w is the kernel
    # gradient of conv(v, .) at cotangent dy: the products P(dy, patches(v))
    # of the input gradient's own backward pass, which equal the kernel
    # gradient's P(patches(v), dy) for a symmetric LUT (Mitchell), summed
    # over the same pixels in the same order: the same bits, on every path.
    if chunked:
        monkeypatch.setattr(conv_lib, "PATCH_CHUNK_BYTES", 1)
    m = mult_lib.mitchell(5)
    x = _data((3, 6, 7, channels), 51)
    v = _data(x.shape, 52)
    w = _data((3, 2, channels, 5), 53)
    dy = _data((3, 6, 7, 5), 54)

    def conv(x, w):
        return approx_conv(x, w, m, padding="SAME")

    def grad_x(x, w):
        return jax.vjp(lambda x: conv(x, w), x)[1](dy)[0]

    cross = jax.jit(jax.grad(lambda w: jnp.sum(v * grad_x(x, w))))(w)
    want = jax.vjp(lambda w: conv(v, w), w)[1](dy)[0]
    if chunked and channels < conv_lib.IMPLICIT_MIN_CHANNELS:
        # The patch path adds per-chunk partials (in another order than the
        # first derivative's scan): equal up to float32 summation order.
        _close_up_to_sum_order(cross, want)
    else:
        np.testing.assert_array_equal(_bits(cross), _bits(want))


def _close_up_to_sum_order(got, want):
    want = np.asarray(want)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("backward", ["approx", "exact"])
@pytest.mark.parametrize("path", ["patches", "in_place", "in_place_chunked"])
def test_second_derivatives_equal_autodiff_through_the_gemm(backward, path, monkeypatch):
    # Hessian-vector products of f = sum(conv(x, w)^2) / 2 through approx_conv
    # (whose backward passes are custom: in place, chunked, design groups)
    # equal plain autodiff (to second order) through ops._gemm on the patch
    # matrix: bit for bit for the kernel (approx products), up to float32
    # summation order for the input (autodiff adds the patch matrix's two
    # cotangents before folding them onto the input; approx_conv folds each)
    # and for float32 products (XLA dots of other layouts).
    if path == "patches":
        monkeypatch.setattr(conv_lib, "IMPLICIT_MIN_CHANNELS", None)
    elif path == "in_place_chunked":
        monkeypatch.setattr(conv_lib, "PATCH_CHUNK_BYTES", 1)
    m = random_multiplier(5, 55)  # asymmetric: operand order matters
    klut = ops.kernel_lut_of(m)
    x = jnp.asarray(_data((2, 5, 6, 3), 56))
    w = jnp.asarray(_data((3, 3, 3, 4), 57))
    u, v = jnp.asarray(_data(x.shape, 58)), jnp.asarray(_data(w.shape, 59))
    geometry = ((3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), (1, 1), (5, 6))

    def by_gemm(x, w):
        p = conv_lib._patches_by_tap(x[None], *geometry).reshape(1, 1, -1, 27)
        y = ops._gemm(p, w.reshape(1, 1, 27, 4), klut, m.mbits, backward)
        return y.reshape(2, 5, 6, 4)

    def hvp(conv):
        def f(x, w):
            return 0.5 * jnp.sum(conv(x, w) ** 2)

        def h(x, w):
            gx, gw = jax.grad(f, argnums=(0, 1))(x, w)
            return jnp.sum(u * gx) + jnp.sum(v * gw)

        return jax.jit(jax.grad(h, argnums=(0, 1)))(x, w)

    got = hvp(lambda x, w: approx_conv(x, w, m, padding="SAME", backward=backward))
    want = hvp(by_gemm)
    if backward == "approx":
        np.testing.assert_array_equal(_bits(got[1]), _bits(want[1]))
    else:
        _close_up_to_sum_order(got[1], want[1])
    _close_up_to_sum_order(got[0], want[0])


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("c_in", [1, 4])  # the patch-matrix path and the in-place path
@pytest.mark.parametrize("mult_name", ["mbm7", "mitchell5"])
def test_subnormal_partial_sums_keep_their_value(c_in, mult_name, chunked, monkeypatch):
    # |x| ~ 2^-63: products within a few binades of 2^-126, so partial sums
    # cancel into the subnormal range. The kernels add in IEEE float32 (XLA's
    # threads flush denormals; a flushed partial sum misses SPEC's bound by up
    # to 2^-126 here). The input gradient is folded by XLA, so only the
    # forward pass and the kernel gradient are held to the bare bound.
    rng = np.random.default_rng(c_in)
    if chunked:  # a batch chunk per sample (the kernel gradient stays one GEMM on CPU)
        monkeypatch.setattr(conv_lib, "PATCH_CHUNK_BYTES", 1)
    m = MULTIPLIERS[mult_name]()
    x = underflow_edge_values(rng, (2, 9, 8, c_in))
    w = underflow_edge_values(rng, (3, 3, c_in, 5))
    kwargs = dict(window_strides=(1, 1), padding="SAME")
    got = approx_conv(x, w, m, **kwargs)
    _check(
        got,
        *reference.conv_general_dilated_with_bound(
            x, w, m.lut, m.mbits, (1, 1), "SAME", dimension_numbers=CHANNELS_LAST[2]
        ),
    )
    if chunked and jax.default_backend() != "cpu":
        return  # elsewhere XLA adds the chunks' kernel-gradient partials
    dy = underflow_edge_values(rng, got.shape)
    _, vjp = jax.vjp(lambda a, b: approx_conv(a, b, m, **kwargs), x, w)
    _, dw = vjp(jnp.asarray(dy))
    _, (rdw, rdw_abs) = reference.conv_vjp(
        x,
        w,
        dy,
        m.lut,
        m.mbits,
        "approx",
        (1, 1),
        "SAME",
        dimension_numbers=CHANNELS_LAST[2],
        with_bound=True,
    )
    _check(dw, rdw, rdw_abs, x.shape[0] * x.shape[1] * x.shape[2])


def test_non_integer_padding_and_mixed_dtypes():
    # Float padding is refused as lax refuses it (it was truncated: 0.99 -> 0
    # shrank the output); mixed input dtypes promote under every multiplier
    # ("fp32" forwarded them to lax, which refuses them).
    x = jnp.ones((1, 5, 5, 3), jnp.float32)
    w = jnp.ones((3, 3, 3, 2), jnp.float32)
    for padding in (((1.5, 1), (1, 1)), ((1.0, 1), (1, 1)), ((0.99, 1), (1, 1))):
        with pytest.raises(ValueError, match="pairs of ints"):
            approx_conv(x, w, "mbm7", padding=padding)
    assert approx_conv(x, w, "mbm7", padding=((np.int64(1), 1), (1, 1))).shape == (1, 5, 5, 2)
    for m in ("fp32", "mbm7"):
        got = approx_conv(x.astype(jnp.bfloat16), w, m)
        assert got.dtype == jnp.float32, m
        np.testing.assert_array_equal(got, approx_conv(x, w, m))


def test_cpu_lut_row_streaming_conv_is_bit_exact(monkeypatch):
    # M = 10, a LUT with no closed form, few output channels: on the CPU the
    # forward and the kernel gradient gather their patch matrix transposed and
    # stream LUT rows through the transposed problem (cpu_gemm.cc
    # PrefersTransposedStream); the input gradient's patch GEMM (144 columns)
    # streams directly. Only the loop order changes: the bits must equal those
    # with streaming off (APPROX_JAX_CPU_STREAM=0), forward and both gradients.
    if jax.default_backend() != "cpu":
        pytest.skip("CPU kernel paths")
    mult = random_multiplier(10, seed=5)
    x = _data((8, 32, 32, 16), 1)
    w = _data((3, 3, 16, 16), 2)
    x[3, 5, 7, 2] = np.inf  # one k-block of one panel on the exact scalar path
    cot = _data((8, 32, 32, 16), 3)

    def fwd(x, w):
        return approx_conv(
            x, w, mult, window_strides=(1, 1), padding="SAME", dimension_numbers=CHANNELS_LAST[2]
        )

    fn = jax.jit(lambda x, w: (fwd(x, w), jax.vjp(fwd, x, w)[1](cot)))
    results = {}
    for mode in ["1", "0"]:
        monkeypatch.setenv("APPROX_JAX_CPU_STREAM", mode)
        results[mode] = jax.tree.map(np.asarray, fn(x, w))
    for got, want, what in zip(
        jax.tree.leaves(results["1"]), jax.tree.leaves(results["0"]), ["y", "dx", "dw"], strict=True
    ):
        same = (_bits(got) == _bits(want)) | (np.isnan(got) & np.isnan(want))
        assert same.all(), f"{what}: {(~same).sum()} outputs differ with streaming on"
