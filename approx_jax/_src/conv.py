"""Approximate convolution lowered onto the canonical gemm (SPEC section 5).

``approx_conv`` has the semantics of ``jax.lax.conv_general_dilated`` with
every product replaced by the simulated product ``P(input, weight)`` of SPEC
section 2 (``a`` = input activation, ``b`` = kernel weight).

Lowering (``_conv_core``):

1. The input is brought to channels-last ``[N, *spatial, C]`` and the kernel
   to ``[*window, I, O]`` (HWIO-like).
2. Feature groups are moved in front of the batch: ``[G, N, *spatial, Cg]``.
3. The input is padded (``lax.pad``; interior padding realises the lhs
   dilation) and strided ``lax.slice``s extract the patches, stacked as
   ``[G, N, *out, taps, Cg]`` (one spatial dimension at a time in the
   forward pass; the backward pass is the transpose of one slice per tap). Slicing (rather than
   ``conv_general_dilated_patches``, whose one-hot convolution multiplies
   every value by 0 and 1 and so turns an Inf into NaNs across its window,
   and which on GPU runs at TF32 unless told otherwise) copies values
   bit-exactly; its transpose (pad + add) is exact too.
4. ``ops._gemm`` computes ``[1, G, N*P, taps*Cg] @ [1, G, taps*Cg, Og]`` in
   one custom call, with the group axis as the canonical batch axis ``B``.

Gradients (``_conv_core``'s custom VJP) are SPEC section 5's convolution
backward pass. The kernel gradient is ``dW = approx(patches^T, dy)`` (``a =
input``, ``b = dy``), with ``patches^T`` gathered directly in that layout
from a channels-first copy of the input rather than transposed from the
patch matrix. The input gradient (``a = dy``, ``b = kernel``) is itself
made of convolutions: of ``dy``, padded by the window, with the flipped,
I/O-swapped kernel, one per phase of the stride (the taps that reach every
``s``-th input position; :func:`_input_grad_phases`), run on the forward
pass's own targets. Only where a dimension has both a stride and an lhs
dilation is it ``d_patches = approx(dy, W^T)`` folded back onto the input by
the transpose of the patch extraction (ordinary float32 additions), the
products of ``ops._gemm``'s VJP.

On CPU the forward pass skips steps 3-4's patch matrix for inputs of at
least ``IMPLICIT_MIN_CHANNELS`` channels per group: the padded input goes to
``ffi.CONV_TARGET``, whose kernel copies each strip of patch rows it packs out
of the input (``xla_kernels/implicit_a.h``), so the forward pass of the whole
batch needs no patches and no batch chunks (``_conv_in_place``). The products
and sums are the GEMM's on the same matrix: the same bits. Its kernel
gradient likewise reads ``patches^T`` in place from a channels-first copy of
the input (``ffi.CONV_WGRAD_TARGET``), one GEMM over the whole batch.

Memory: the patch matrix is ``prod(window)`` times the (strided) input. When
it would exceed ``chunk_limit_bytes()`` (8 MiB on CPU, 256 MiB on GPU;
override with ``PATCH_CHUNK_BYTES``) the batch is processed in chunks with
``lax.map`` over a ``jax.checkpoint``-ed body, so at most one chunk's patches
(and its backward temporaries) are alive at a time and the saved residuals are
just the input chunks (with the in-place forward pass, only the backward pass
runs in chunks). Under ``vmap`` with a per-design input (a design sweep)
the designs run in groups that fit the same budget (:func:`_designs_in_groups`).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from approx_jax._src import ffi, ops, partitioning

# Largest patch matrix (bytes, float32) built in one piece; above it the batch
# is processed in chunks. ``None`` picks a per-backend default
# (``DEFAULT_CHUNK_BYTES``). Module-level so that users (and tests) can tune it.
PATCH_CHUNK_BYTES: int | None = None
# Measured on XLA:CPU (benchmarks/bench_conv_memory.py): small chunks keep the
# patches in cache and were *faster* than one big patch matrix as well as
# leaner. GPUs want large gemms, so they get a larger chunk (not yet tuned).
DEFAULT_CHUNK_BYTES = {"cpu": 8 << 20}
DEFAULT_CHUNK_BYTES_ACCELERATOR = 256 << 20


# CPU forward pass: channels per group from which the convolution's GEMM reads
# the patch matrix in place (``ffi.CONV_TARGET``: rows of the patch matrix are
# copied out of the input strip by strip as the kernel packs them) instead of
# XLA building it. 2 cores, mbm7, ms in place vs patches: C = 1 (LeNet-5 conv
# 1) 2.28 vs 1.50 (runs of one float are too short); C = 3 (7x7 stride-2
# stem) 2.92 vs 3.03; C = 8 1.78 vs 2.55; 5x5x32 (LeNet-5 conv 2) 6.5 vs
# 10.2; 3x3x64 (batch 32, 32x32) 20.6 vs 33.0. ``None`` disables it.
# Module-level so that users and tests can tune it; the same products and
# sums either way, so the same bits.
IMPLICIT_MIN_CHANNELS: int | None = 3


def chunk_limit_bytes() -> int:
    """The patch-matrix size above which ``approx_conv`` processes the batch in chunks."""
    if PATCH_CHUNK_BYTES is not None:
        return int(PATCH_CHUNK_BYTES)
    return DEFAULT_CHUNK_BYTES.get(jax.default_backend(), DEFAULT_CHUNK_BYTES_ACCELERATOR)


_PADDING_STRINGS = ("SAME", "VALID", "SAME_LOWER")


# --------------------------------------------------------------------------
# Argument handling.


def _default_dimension_numbers(nd: int) -> lax.ConvDimensionNumbers:
    """Flax-style channels-last numbers: NHWC input/output, HWIO kernel."""
    spatial = tuple(range(1, nd + 1))
    return lax.ConvDimensionNumbers(
        lhs_spec=(0, nd + 1) + spatial,
        rhs_spec=(nd + 1, nd) + tuple(range(nd)),
        out_spec=(0, nd + 1) + spatial,
    )


def _is_int(v) -> bool:
    """An int (Python or NumPy), not a bool: lax refuses 1.0 where it wants 1."""
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def _as_int_tuple(name: str, value, nd: int, default: int = 1) -> tuple[int, ...]:
    if value is None:
        return (default,) * nd
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a sequence of {nd} ints, got {value!r}")
    if isinstance(value, int | np.integer):
        value = (int(value),) * nd
    try:
        items = tuple(value)
    except TypeError as err:
        raise TypeError(f"{name} must be an int or a sequence of {nd} ints, got {value!r}") from err
    if not all(_is_int(v) for v in items):
        raise TypeError(f"{name} must be an int or a sequence of {nd} ints, got {value!r}")
    out = tuple(int(v) for v in items)
    if len(out) != nd:
        raise ValueError(f"{name} must have one entry per spatial dimension ({nd}), got {value!r}")
    if any(v < 1 for v in out):
        raise ValueError(f"{name} entries must be >= 1, got {value!r}")
    return out


def _dimension_numbers(dimension_numbers, lhs_shape, rhs_shape) -> lax.ConvDimensionNumbers:
    nd = len(lhs_shape) - 2
    if dimension_numbers is None:
        return _default_dimension_numbers(nd)
    try:
        dn = lax.conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"invalid dimension_numbers {dimension_numbers!r} for input shape {lhs_shape} "
            f"and kernel shape {rhs_shape}: {err}"
        ) from err
    if len(dn.lhs_spec) != len(lhs_shape) or len(dn.rhs_spec) != len(rhs_shape):
        raise ValueError(
            f"dimension_numbers {dimension_numbers!r} do not match the rank of the input "
            f"({len(lhs_shape)}) and kernel ({len(rhs_shape)})"
        )
    return dn


def _explicit_padding(padding, in_spatial, window, window_strides, lhs_dilation, rhs_dilation):
    """Resolves a padding spec to explicit ``(lo, hi)`` pairs as lax does."""
    nd = len(in_spatial)
    if isinstance(padding, str):
        key = padding.upper()
        if key not in _PADDING_STRINGS:
            raise ValueError(
                f"padding must be one of {_PADDING_STRINGS} or a sequence of {nd} (low, high) "
                f"pairs, got {padding!r}"
            )
        if any(d != 1 for d in lhs_dilation):
            raise ValueError(
                f"string padding ({padding!r}) is not supported with lhs_dilation "
                f"{tuple(lhs_dilation)} (as in lax.conv_general_dilated); give explicit "
                "(low, high) pairs"
            )
        # Same computation as lax.conv_general_dilated: the undilated input
        # extent against the dilated window.
        eff_window = [(k - 1) * d + 1 for k, d in zip(window, rhs_dilation, strict=True)]
        return tuple(
            tuple(int(p) for p in pair)
            for pair in lax.padtype_to_pads(in_spatial, eff_window, window_strides, key)
        )
    message = (
        f"padding must be one of {_PADDING_STRINGS} or a sequence of {nd} (low, high) "
        f"pairs of ints, got {padding!r}"
    )
    try:
        pairs = tuple((lo, hi) for lo, hi in padding)
    except (TypeError, ValueError) as err:
        raise ValueError(message) from err
    # As lax: 1.5 (or 1.0) is refused, not truncated to 1.
    if not all(_is_int(p) for pair in pairs for p in pair):
        raise ValueError(message)
    pairs = tuple((int(lo), int(hi)) for lo, hi in pairs)
    if len(pairs) != nd:
        raise ValueError(
            f"padding must have one (low, high) pair per spatial dimension ({nd}), got {padding!r}"
        )
    return pairs


def _padded_extents(in_spatial, pads, lhs_dilation) -> tuple[int, ...]:
    """Spatial sizes of the input after lhs dilation and (possibly negative) padding."""
    return tuple(
        ((size - 1) * d + 1 if size else 0) + lo + hi
        for size, (lo, hi), d in zip(in_spatial, pads, lhs_dilation, strict=True)
    )


# --------------------------------------------------------------------------
# Lowering.


def _pad_input(xg, pads, lhs_dilation, first_spatial=2, spatial_axes=None):
    """Edge padding, and interior padding for the lhs dilation, of the spatial axes.

    The spatial axes are ``spatial_axes`` if given, else ``first_spatial,
    first_spatial + 1, ...`` (``[G, N, *S, Cg]`` by default); every other axis
    is left alone. ``lax.pad`` dilates before it pads (negative padding
    crops), as ``lax.conv_general_dilated`` does.
    """
    if spatial_axes is None:
        spatial_axes = range(first_spatial, first_spatial + len(pads))
    config = [(0, 0, 0)] * xg.ndim
    for axis, (lo, hi), d in zip(spatial_axes, pads, lhs_dilation, strict=True):
        config[axis] = (lo, hi, d - 1)
    return lax.pad(xg, jnp.zeros((), xg.dtype), config)


def _patches_by_tap(xg, window, strides, pads, lhs_dilation, rhs_dilation, out_spatial):
    """The patches as one stack of ``prod(window)`` strided slices (one per tap).

    Used for the backward pass of :func:`_conv_core` (its transpose, pad + add
    per tap, was measured ~3x faster than that of the staged form).
    """
    xp = _pad_input(xg, pads, lhs_dilation)
    slices = []
    for tap in np.ndindex(*window):
        start = [0, 0] + [t * d for t, d in zip(tap, rhs_dilation, strict=True)] + [0]
        limit = (
            list(xp.shape[:2])
            + [
                s + (o - 1) * st + 1
                for s, o, st in zip(start[2:-1], out_spatial, strides, strict=True)
            ]
            + [xp.shape[-1]]
        )
        step = [1, 1] + list(strides) + [1]
        slices.append(lax.slice(xp, start, limit, step))
    return jnp.stack(slices, axis=-2)


def _stage_taps(y, axis, size, stride, dilation, out):
    """The ``size`` strided slices of ``y`` along ``axis`` (one per tap of that dimension)."""
    slices = []
    for t in range(size):
        start = t * dilation
        limit = start + (out - 1) * stride + 1
        slices.append(lax.slice_in_dim(y, start, limit, stride=stride, axis=axis))
    return slices


def _patches_staged(xg, window, strides, pads, lhs_dilation, rhs_dilation, out_spatial):
    """``[G, N, *S, Cg]`` -> ``[G, N, *out, taps, Cg]``, one spatial dimension at a time.

    Tap order is row-major over the window, matching a ``[*window, Cg, ...]``
    kernel reshaped to ``[taps * Cg, ...]``; values are copied exactly (the
    same values as :func:`_patches_by_tap`). Each stage stacks ``window[d]``
    strided slices along dimension ``d``, so XLA emits concatenations of
    ``window[d]`` operands rather than one of ``prod(window)``, whose
    per-element operand selection made a 5x5 patch matrix 1.6x slower to build
    on CPU (0.94 vs 1.49 ms for 13x14x14x32).
    """
    nd = len(window)
    y = _pad_input(xg, pads, lhs_dilation)
    for d in reversed(range(nd)):
        slices = _stage_taps(y, 2 + d, window[d], strides[d], rhs_dilation[d], out_spatial[d])
        # New tap axes go right after the spatial ones, ahead of the taps of
        # the later dimensions: [..., *out, tap_0, ..., tap_{nd-1}, Cg].
        y = jnp.stack(slices, axis=2 + nd)
    return y.reshape(y.shape[: 2 + nd] + (math.prod(window), y.shape[-1]))


def _patches_transposed(xg, window, strides, pads, lhs_dilation, rhs_dilation, out_spatial):
    """``[G, N, *S, Cg]`` -> ``[G, taps, Cg, N, *out]``: the patch matrix transposed.

    The kernel gradient's product needs ``patches^T`` (``[taps * Cg, N * P]``).
    Transposing the patch matrix itself (``prod(window)`` times the input) was
    the largest non-GEMM cost of a CPU train step (LeNet-5: 15 of 116 ms);
    here only the input is transposed (channels first) and the taps are then
    gathered as in :func:`_patches_staged`, so the same values land directly
    in transposed order.
    """
    nd = len(window)
    y = _pad_input(jnp.moveaxis(xg, -1, 1), pads, lhs_dilation, first_spatial=3)  # [G, Cg, N, *S]
    for d in reversed(range(nd)):
        # nd - 1 - d tap axes were inserted at axis 1 so far.
        axis = 3 + (nd - 1 - d) + d
        slices = _stage_taps(y, axis, window[d], strides[d], rhs_dilation[d], out_spatial[d])
        y = jnp.stack(slices, axis=1)  # [G, tap_d, ..., tap_{nd-1}, Cg, N, *out]
    return y.reshape((y.shape[0], math.prod(window)) + y.shape[1 + nd :])


def _patch_matrix(xg, geometry):
    """``[G, N, *S, Cg]`` -> ``[1, G, N * P, taps * Cg]`` (the gemm's ``a``)."""
    window, _, _, _, _, out_spatial = geometry
    g, n = xg.shape[:2]
    patches = _patches_staged(xg, *geometry)
    return partitioning.reshape(
        patches, (1, g, n * math.prod(out_spatial), math.prod(window) * xg.shape[-1])
    )


def _patch_matrix_t(xg, geometry):
    """``[G, N, *S, Cg]`` -> ``[1, G, taps * Cg, N * P]``: ``_patch_matrix`` transposed."""
    window, _, _, _, _, out_spatial = geometry
    g, n = xg.shape[:2]
    patches_t = _patches_transposed(xg, *geometry)
    return partitioning.reshape(
        patches_t, (1, g, math.prod(window) * xg.shape[-1], n * math.prod(out_spatial))
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _conv_core(xg, w4, klut, mbits, family, backward, geometry, budget):
    """Approximate conv of grouped channels-last input on the canonical gemm.

    The backward pass is SPEC section 5's (as ``ops._gemm``'s VJP gives it):
    ``d_patches = approx(dy, W^T)`` folded back onto the input by the
    transpose of the patch extraction, and ``dW = approx(patches^T, dy)``
    with ``patches^T`` gathered directly in that layout
    (:func:`_patches_transposed`): the same matrices, so the same bits, as
    autodiff through ``ops._gemm``, without transposing the patch matrix.

    Args:
      xg: float32 ``[G, N, *S, Cg]``.
      w4: float32 ``[1, G, taps * Cg, Og]``.
      klut: kernel-format LUT ``[1, 4**mbits]``.
      mbits: mantissa width.
      family: ``ops.closed_form_family(klut)`` (``ffi.FAMILY_UNKNOWN`` when not
        known), passed to every GEMM of the forward and backward passes (every
        family is symmetric, so it holds for the transposed LUT too).
      backward: backward mode.
      geometry: ``(window, strides, pads, lhs_dilation, rhs_dilation, out_spatial)``.
      budget: patch-matrix bytes that a vmapped call may hold (``chunk_limit_bytes()``
        when traced; see :func:`_designs_in_groups`).

    Returns:
      float32 ``[G, N, *out, Og]``.
    """
    del backward
    return _core_forward(mbits, family, geometry, budget)(xg, w4, klut)


def _patch_bytes(samples: int, channels: int, geometry) -> int:
    """Bytes of the float32 patch matrix of ``samples`` inputs of ``channels`` channels."""
    window, out_spatial = geometry[0], geometry[-1]
    return 4 * samples * math.prod(out_spatial) * math.prod(window) * channels


def _designs_per_call(designs: int, per_design_bytes: int, budget: int) -> int:
    """How many of ``designs`` vmapped designs one patch matrix may hold.

    The largest divisor of ``designs`` whose patch matrices together stay
    within ``budget`` (at least 1), so the groups are equal and none is padded.
    """
    if designs <= 1:
        return designs  # vmap over an empty or single-design axis: one call
    fit = max(1, budget // max(per_design_bytes, 1))
    return max(d for d in range(1, min(designs, fit) + 1) if designs % d == 0)


def _designs_in_groups(fn, geometry, budget):
    """``fn(xg, *rest)`` whose ``vmap`` over per-design inputs keeps the chunk budget.

    A vmapped conv whose *input* is batched too (a sweep: one set of
    activations per design) would otherwise build every design's patch matrix
    (and, backward, ``patches^T`` and ``d_patches``) at once: D times the
    chunk budget, so D times the memory and, on CPU, intermediates that no
    longer stay in cache (an 8-design LeNet-5 train step took 1.14x the time
    of 8 single steps; 1.05x with this rule). When D patch matrices exceed
    ``budget`` (``chunk_limit_bytes()`` when ``approx_conv`` was traced; a
    static argument because traced batching rules are cached), the rule maps
    groups of designs with ``lax.map`` (one design per call if need be): the
    same products and sums, so the same bits. A shared input (``xg`` not
    batched: a first layer, or a sweep over LUTs only) keeps ``ops``'
    one-call batching, whose patches are built once for all designs.
    """

    @jax.custom_batching.custom_vmap
    def wrapped(xg, *rest):
        return fn(xg, *rest)

    @wrapped.def_vmap
    def _rule(axis_size, in_batched, xg, *rest):
        args = (xg, *rest)
        in_axes = tuple(0 if b else None for b in in_batched)
        group = axis_size
        if in_batched[0]:  # xg: [D, G, N, *S, Cg]
            per_design = _patch_bytes(xg.shape[2], xg.shape[1] * xg.shape[-1], geometry)
            group = _designs_per_call(axis_size, per_design, budget)
        if group == axis_size:
            out = jax.vmap(fn, in_axes=in_axes)(*args)
        else:
            stacked = [
                a.reshape((axis_size // group, group) + a.shape[1:])
                for a, b in zip(args, in_batched, strict=True)
                if b
            ]

            def one_group(items):
                it = iter(items)
                full = [next(it) if b else a for a, b in zip(args, in_batched, strict=True)]
                return jax.vmap(fn, in_axes=in_axes)(*full)

            out = lax.map(one_group, stacked)
            out = jax.tree_util.tree_map(lambda o: o.reshape((axis_size,) + o.shape[2:]), out)
        return out, jax.tree_util.tree_map(lambda _: True, out)

    return wrapped


# The design-group budget of the in-place computations, which build no
# patches: every vmapped design in one call.
_NO_PATCH_BUDGET = 1 << 62


def _in_place_targets_apply(geometry) -> bool:
    """Whether the CPU in-place conv targets serve this convolution."""
    return (
        1 <= len(geometry[0]) <= 3
        and jax.default_backend() == "cpu"
        and "cpu" in ffi.registered_platforms()
    )


def _implicit_forward_applies(channels: int, geometry) -> bool:
    """Whether the forward pass reads the patch matrix in place (see IMPLICIT_MIN_CHANNELS)."""
    return (
        IMPLICIT_MIN_CHANNELS is not None
        and channels >= IMPLICIT_MIN_CHANNELS
        and _in_place_targets_apply(geometry)
    )


@functools.cache
def _core_forward(mbits, family, geometry, budget, implicit: bool = False):
    window, strides, pads, lhs_dil, rhs_dil, out_spatial = geometry

    def patch_forward(xg, w4, klut):
        out = ops._gemm_raw(mbits, family)(_patch_matrix(xg, geometry), w4, klut)
        return _as_output(out, xg, geometry)

    def implicit_forward(xg, w4, klut):
        # The padded input (as _patches_staged pads it) read in place by the
        # CPU kernel: the same patch matrix, never built.
        xp = _pad_input(xg, pads, lhs_dil)
        conv = ops._conv_raw(mbits, window, strides, rhs_dil, math.prod(out_spatial), family)
        return _as_output(conv(xp[None], w4, klut), xg, geometry)

    def forward(xg, w4, klut):
        if not implicit:
            return patch_forward(xg, w4, klut)
        # The in-place target exists on CPU only (a program compiled for
        # another device builds the patches).
        return lax.platform_dependent(xg, w4, klut, cpu=implicit_forward, default=patch_forward)

    # The in-place forward pass builds no patches: a vmap over per-design
    # inputs needs no groups of designs (one call for all of them).
    return _designs_in_groups(forward, geometry, _NO_PATCH_BUDGET if implicit else budget)


def _fold(d_patches, xg, geometry):
    """``d_patches`` ``[G, N, *out, taps, Cg]`` added back onto the input's shape (d_x)."""
    window, strides, pads, lhs_dil, rhs_dil, out_spatial = geometry
    fold = jax.linear_transpose(
        functools.partial(
            _patches_by_tap,
            window=window,
            strides=strides,
            pads=pads,
            lhs_dilation=lhs_dil,
            rhs_dilation=rhs_dil,
            out_spatial=out_spatial,
        ),
        # xg itself, not a ShapeDtypeStruct: only its type is used, and that
        # carries its explicit sharding and, inside shard_map, its varying
        # mesh axes (which the cotangent has too).
        xg,
    )
    (d_x,) = fold(d_patches)
    return d_x


def _as_output(out, xg, geometry):
    """A gemm / conv-target result (``N * P`` rows of ``Og``) as ``[G, N, *out, Og]``.

    (``partitioning.reshape``, as :func:`_as_rows`: keeps an explicitly sharded batch axis.)
    """
    return partitioning.reshape(out, xg.shape[:2] + tuple(geometry[-1]) + (out.shape[-1],))


def _as_rows(ct):
    """A conv output (or its cotangent) ``[G, N, *out, Og]`` as the gemm's ``[1, G, N * P, Og]``."""
    return partitioning.reshape(ct, (1, ct.shape[0], -1, ct.shape[-1]))


def _d_patches_shape(xg, geometry):
    window, out_spatial = geometry[0], geometry[-1]
    return xg.shape[:2] + tuple(out_spatial) + (math.prod(window), xg.shape[-1])


def _input_grad_is_a_conv(geometry, in_spatial) -> bool:
    """Whether the input gradient runs as forward convs of ``dy`` (:func:`_input_grad_phases`).

    The input gradient ``dx[i] = sum_{t, o} P(dy[p], W[t, c, o])`` over the
    pairs with ``p * s + t * rd = i * ld + lo`` is, along a dimension of
    stride 1, a convolution of ``dy`` (padded by the window) with the
    flipped kernel and stride ``ld``; along a dimension of stride ``s > 1``
    (and no lhs dilation), ``s`` such convolutions, one per phase ``(i +
    lo) mod s``, each with the taps that reach that phase. Each is one GEMM
    with ``K = taps * Og`` on the forward pass's targets (in place on CPU)
    over exactly the products that exist, plus those with ``dy``'s padding.
    The ``d_patches`` path instead runs a GEMM with ``K = Og`` (LeNet-5's
    5x5x32 conv: 1.5x the forward pass's time for as many products), writes
    ``prod(window)`` times the input, folds it, and under ``vmap`` over
    per-design inputs needs design groups (a ``while`` loop). It stays for
    dimensions with both a stride and an lhs dilation.
    """
    _, strides, _, lhs_dil = geometry[:4]
    return all(s == 1 or ld == 1 for s, ld in zip(strides, lhs_dil, strict=True)) and all(
        size >= 1 for size in in_spatial
    )


class _Phase(NamedTuple):
    """One phase of the input gradient along one dimension (:func:`_input_grad_phases`).

    Input positions ``first, first + step, ...`` (``count`` of them) are the
    outputs of a forward conv of ``dy`` padded by ``pads``, with stride
    ``stride`` and kernel dilation ``dilation``, whose window is the
    kernel's taps ``tap0, tap0 + tap_step, ...`` (``taps`` of them) in
    reverse order.
    """

    first: int
    count: int
    step: int
    tap0: int
    taps: int
    tap_step: int
    pads: tuple[int, int]
    stride: int
    dilation: int


def _input_grad_phases(geometry, in_spatial) -> list[list[_Phase]]:
    """Per spatial dimension, the phases of the input gradient as forward convs of ``dy``.

    Input position ``i`` sits at ``q = lo + i * ld`` of the (dilated,
    padded) input; tap ``t`` of output ``p`` reads ``q = p * s + t * rd``.

    * Stride 1: one phase. Padding ``dy`` by ``(k - 1) * rd - lo`` below
      puts ``dy[q - t * rd]`` at ``i * ld + (k - 1 - t) * rd``: a conv with
      stride ``ld`` (the lhs dilation's holes get no gradient), dilation
      ``rd`` and the window flipped.
    * Stride ``s > 1`` (``ld = 1``): phase ``phi = q mod s`` gets the taps
      with ``t * rd = phi (mod s)``, ``t = t0 + m * dt``, which read
      ``dy[j - u0 - m * delta]`` at ``q = s * j + phi`` (``u0 = (t0 * rd -
      phi) / s``, ``delta = dt * rd / s``): a stride-1 conv of ``dy`` with
      dilation ``delta`` and those taps flipped. A phase that no tap reaches
      (a 1x1 conv's odd positions) has no entry: its gradient is zero.

    Negative padding crops ``dy`` positions whose taps all fell in the
    forward padding.
    """
    window, strides, pads, lhs_dil, rhs_dil, out_spatial = geometry
    dims = []
    for k, s, (lo, _), ld, rd, size, out in zip(
        window, strides, pads, lhs_dil, rhs_dil, in_spatial, out_spatial, strict=True
    ):
        if s == 1:
            pad_lo = (k - 1) * rd - lo
            extent = (size - 1) * ld + (k - 1) * rd + 1
            dims.append([_Phase(0, size, 1, 0, k, 1, (pad_lo, extent - pad_lo - out), ld, rd)])
            continue
        phases = []
        for phi in range(s):
            taps = [t for t in range(k) if (t * rd - phi) % s == 0]
            first = (phi - lo) % s
            count = len(range(first, size, s))
            if not taps or not count:
                continue
            # (One tap: any step and dilation; the conv targets want them >= 1.)
            tap_step = taps[1] - taps[0] if len(taps) > 1 else 1
            delta = tap_step * rd // s if len(taps) > 1 else 1
            j0 = (first + lo - phi) // s
            pad_lo = (taps[0] * rd - phi) // s + (len(taps) - 1) * delta - j0
            extent = (count - 1) + (len(taps) - 1) * delta + 1
            phases.append(
                _Phase(
                    first, count, s, taps[0], len(taps), tap_step,
                    (pad_lo, extent - pad_lo - out), 1, delta,
                )
            )  # fmt: skip
        dims.append(phases)
    return dims


def _input_grad_by_phases(xg, w4, ct, geometry, conv_of_dy):
    """The input gradient ``[G, N, *S, Cg]`` as :func:`_input_grad_phases`' convs of ``dy``.

    ``conv_of_dy(ct, kernel, geometry)`` runs one forward conv (``kernel``
    ``[1, G, taps * Og, Cg]``). Every input position belongs to one phase,
    whose conv sums all its products (one float32 sum over taps and
    channels); the phases are interleaved by padding each onto the input's
    shape and adding (the other phases add zeros: the same values).
    """
    window = geometry[0]
    nd, cg = len(window), xg.shape[-1]
    g, og = w4.shape[1], w4.shape[-1]
    w = partitioning.reshape(w4, (g, *window, cg, og))
    d_x = None
    for phase in itertools.product(*_input_grad_phases(geometry, xg.shape[2:-1])):
        kernel = w
        for d, p in enumerate(phase):
            limit = p.tap0 + (p.taps - 1) * p.tap_step + 1
            kernel = lax.slice_in_dim(kernel, p.tap0, limit, p.tap_step, axis=1 + d)
        kernel = jnp.swapaxes(jnp.flip(kernel, axis=tuple(range(1, 1 + nd))), -1, -2)
        taps = tuple(p.taps for p in phase)
        kernel = partitioning.reshape(kernel, (1, g, math.prod(taps) * og, cg))
        geometry_p = (
            taps,
            tuple(p.stride for p in phase),
            tuple(p.pads for p in phase),
            (1,) * nd,
            tuple(p.dilation for p in phase),
            tuple(p.count for p in phase),
        )
        part = conv_of_dy(ct, kernel, geometry_p)
        if any(p.step > 1 for p in phase):
            config = [(0, 0, 0)] * 2 + [
                (p.first, size - p.first - (p.count - 1) * p.step - 1, p.step - 1)
                for p, size in zip(phase, xg.shape[2:-1], strict=True)
            ]
            part = lax.pad(part, jnp.zeros((), part.dtype), config + [(0, 0, 0)])
        d_x = part if d_x is None else d_x + part
    return jnp.zeros_like(xg) if d_x is None else d_x


def _input_grad_conv(mbits, family, geometry, budget, xg, w4, klut, ct):
    """SPEC 5's input gradient (a = dy, b = kernel) as forward convs of ``dy``.

    ``ct`` ``[G, N, *out, Og]`` -> ``[G, N, *S, Cg]`` (``xg``'s shape). On CPU
    (``Og >= IMPLICIT_MIN_CHANNELS``) the conv target reads the padded ``dy``
    in place; elsewhere the patches of ``dy`` meet the GEMM (the same bits).
    The zeros padded around ``dy`` go through the multiplier as the forward
    pass's padding does (``P(0, w)`` is a signed zero; ``P(0, inf)`` is NaN,
    as in XLA's own transposed convolution).
    """

    def conv_of_dy(ct, kernel, geometry_p):
        implicit = _implicit_forward_applies(ct.shape[-1], geometry_p)
        return _core_forward(mbits, family, geometry_p, budget, implicit)(ct, kernel, klut)

    return _input_grad_by_phases(xg, w4, ct, geometry, conv_of_dy)


def _input_grad_builds_no_patches(geometry, xg, ct) -> bool:
    """Whether the input gradient reads ``dy`` in place (no patches: no batch chunks needed)."""
    return _input_grad_is_a_conv(geometry, xg.shape[2:-1]) and _implicit_forward_applies(
        ct.shape[-1], geometry
    )


@functools.cache
def _core_backward(mbits, family, backward, geometry, budget):
    def backward_products(xg, w4, klut, ct):
        ct4 = _as_rows(ct)
        patches_t = _patch_matrix_t(xg, geometry)
        if backward == "approx" and _input_grad_is_a_conv(geometry, xg.shape[2:-1]):
            d_w = ops._gemm(patches_t, ct4, klut, mbits, backward, family)
            return _input_grad_conv(mbits, family, geometry, budget, xg, w4, klut, ct), d_w
        # SPEC 5: d_patches = approx(dy, W^T) (a = dy, b = W); dW = approx(patches^T, dy).
        d_a, d_w = ops._backward_products(mbits, backward, patches_t, w4, klut, ct4, family)
        d_patches = partitioning.reshape(d_a, _d_patches_shape(xg, geometry))
        return _fold(d_patches, xg, geometry), d_w

    return _designs_in_groups(backward_products, geometry, budget)


@functools.cache
def _core_input_grad(mbits, family, geometry, budget):
    """``_core_backward``'s input gradient alone (``backward="approx"``)."""

    def by_fold(xg, w4, klut, ct):
        ct4 = _as_rows(ct)
        d_a = ops._input_grad(mbits, ct4.shape[-2], w4, klut, ct4, family)
        d_patches = partitioning.reshape(d_a, _d_patches_shape(xg, geometry))
        return _fold(d_patches, xg, geometry)

    by_fold = _designs_in_groups(by_fold, geometry, budget)

    def input_grad(xg, w4, klut, ct):
        if _input_grad_is_a_conv(geometry, xg.shape[2:-1]):
            # (Its own design groups, by the patches of dy, where it builds them.)
            return _input_grad_conv(mbits, family, geometry, budget, xg, w4, klut, ct)
        return by_fold(xg, w4, klut, ct)

    return input_grad


@functools.cache
def _core_wgrad_in_place(mbits, family, geometry):
    """The kernel gradient ``approx(patches^T, dy)`` with ``patches^T`` read in place."""
    window, strides, pads, lhs_dil, rhs_dil, out_spatial = geometry
    pixels = math.prod(out_spatial)

    def patches(xg, ct, klut):
        ct4 = _as_rows(ct)
        return ops._gemm_raw(mbits, family)(_patch_matrix_t(xg, geometry), ct4, klut)

    def in_place(xg, ct, klut):
        # The channels-first padded input (as _patches_transposed pads it).
        xc = _pad_input(jnp.moveaxis(xg, -1, 1), pads, lhs_dil, first_spatial=3)
        g, n = xg.shape[:2]
        ct5 = partitioning.reshape(ct, (1, g, n, pixels, ct.shape[-1]))
        return ops._conv_wgrad_raw(mbits, window, strides, rhs_dil, family)(xc[None], ct5, klut)

    def wgrad(xg, ct, klut):
        # (A program compiled for another platform builds patches^T.)
        return lax.platform_dependent(xg, ct, klut, cpu=in_place, default=patches)

    # No patches: a vmap over per-design inputs needs no groups of designs.
    return _designs_in_groups(wgrad, geometry, _NO_PATCH_BUDGET)


@functools.cache
def _reference_backward(mbits, family, backward, geometry):
    """The conv's backward pass as autodiff through the patch path on ``ops._gemm``.

    The same products as the fast backward passes (``_core_backward``,
    ``_in_place_backward``), summed as the unchunked patch path sums them,
    built only of pieces that can be differentiated again (``ops._gemm``'s
    custom VJP and XLA's per-tap patch extraction, whose transpose is the
    fast passes' fold), with no design groups, batch chunks or in-place
    reads: the kernel gradient by autodiff, and the input gradient either so
    or, where the fast passes run it as convs of ``dy``
    (:func:`_input_grad_is_a_conv`), as those convs' GEMMs on the patches of
    ``dy``. Higher derivatives of the conv differentiate this function.
    """

    def patch_forward(xg, w4, klut):
        # The per-tap patches: their transpose is the fast passes' fold.
        patches = _patches_by_tap(xg, *geometry)
        a = partitioning.reshape(patches, (1, xg.shape[0], -1, w4.shape[-2]))
        out = ops._gemm(a, w4, klut, mbits, backward, family)
        return _as_output(out, xg, geometry)

    def input_grad_conv(xg, w4, klut, ct):
        # _input_grad_conv's GEMMs on the per-tap patches of dy.
        def conv_of_dy(ct, kernel, geometry_p):
            patches = _patches_by_tap(ct, *geometry_p)
            a = partitioning.reshape(patches, (1, ct.shape[0], -1, kernel.shape[-2]))
            out = ops._gemm(a, kernel, klut, mbits, backward, family)
            return _as_output(out, ct, geometry_p)

        return _input_grad_by_phases(xg, w4, ct, geometry, conv_of_dy)

    def reference(xg, w4, klut, ct):
        if backward == "approx" and _input_grad_is_a_conv(geometry, xg.shape[2:-1]):
            _, vjp_w = jax.vjp(lambda w: patch_forward(xg, w, klut), w4)
            return input_grad_conv(xg, w4, klut, ct), vjp_w(ct)[0]
        _, vjp = jax.vjp(lambda x, w: patch_forward(x, w, klut), xg, w4)
        return vjp(ct)

    return reference


def _differentiable(fast, reference):
    """``fast(*args)`` whose derivatives are ``reference``'s (same values).

    The fast backward passes call custom_vmap'ed in-place and design-group
    computations, which JAX cannot differentiate; a second derivative (``grad``
    of ``grad``) goes through ``reference`` instead.
    """

    @jax.custom_vjp
    def wrapped(*args):
        return fast(*args)

    def wrapped_fwd(*args):
        return wrapped(*args), args

    def wrapped_bwd(args, ct):
        _, vjp = jax.vjp(reference, *args)
        return vjp(ct)

    wrapped.defvjp(wrapped_fwd, wrapped_bwd)
    return wrapped


@functools.cache
def _core_backward_differentiable(mbits, family, backward, geometry, budget):
    return _differentiable(
        _core_backward(mbits, family, backward, geometry, budget),
        _reference_backward(mbits, family, backward, geometry),
    )


def _conv_core_fwd(xg, w4, klut, mbits, family, backward, geometry, budget):
    # The custom_vjp function itself, so that a second derivative
    # differentiates it by its own rule. Residuals: the input only (the
    # patches are cheap to gather again).
    return _conv_core(xg, w4, klut, mbits, family, backward, geometry, budget), (xg, w4, klut)


def _conv_core_bwd(mbits, family, backward, geometry, budget, residuals, ct):
    xg, w4, klut = residuals
    bwd = _core_backward_differentiable(mbits, family, backward, geometry, budget)
    d_x, d_w = bwd(xg, w4, klut, ct)
    # A cotangent must carry its primal's mesh type (shard_map axes, Explicit sharding).
    d_x = partitioning.match_primal_type(d_x, xg)
    d_w = partitioning.match_primal_type(d_w, w4)
    return d_x, d_w, ops._lut_zero_cotangent(klut)


_conv_core.defvjp(_conv_core_fwd, _conv_core_bwd)


def _chunk_size(n: int, per_sample_bytes: int, limit: int, devices: int = 1) -> int:
    """Batch chunk size whose patch matrix fits in ``limit`` bytes (>= 1).

    With ``devices`` > 1 (a batch that may be sharded across them; the most
    devices, a divisor of the count, that divide ``n``): the largest multiple
    of that count dividing ``n`` that fits, at least that many samples even
    over the limit. Every chunk then holds the same number of samples of each
    device's block, so the batch stays sharded (a chunk of 10 from a batch of
    20 on 4 devices failed to partition; 7 of 28 all-gathered the
    activations). An input gradient's bits do not depend on the chunking
    (each sample's is its own).

    The chunk count is the smallest divisor of ``n`` that fits, unless that is
    more than twice the smallest count that fits (a batch of prime size):
    then the smallest count, with chunks as even as possible so that padding
    the batch to a multiple wastes little work. Without padding, a batch
    sharded across devices stays sharded in :func:`_chunks_of`'s interleaved
    chunks when the count also divides the per-device batch (batch 64 on 4
    devices, 5 chunks of 13: the padded batch no longer split along the
    devices' blocks, and XLA all-gathered the activations; 8 chunks of 8 do).
    """
    if n * per_sample_bytes <= limit:
        return n
    largest = max(1, min(n, limit // max(per_sample_bytes, 1)))
    # The most devices (a divisor of the count: a mesh may use some) that
    # divide the batch.
    devices = max((d for d in range(1, devices + 1) if devices % d == 0 and n % d == 0), default=1)
    if devices > 1:
        per_device = n // devices
        fits = [q for q in range(1, per_device + 1) if per_device % q == 0]
        return devices * max((q for q in fits if q * devices <= largest), default=1)
    num = -(-n // largest)
    divisor = next((d for d in range(num, 2 * num + 1) if n % d == 0), None)
    if divisor is not None:
        return n // divisor
    return -(-n // num)


def _chunks_of(v, chunk: int):
    """``[G, N, ...]`` -> ``[num, G, chunk, ...]``: the batch in interleaved chunks.

    Chunk ``j`` holds samples ``i * num + j`` (zero-padded to ``num * chunk``),
    so that a batch axis sharded across devices stays sharded on the chunk's
    own batch axis; contiguous chunks would put the sharding on the scanned
    axis, which XLA's partitioner cannot keep local.
    """
    g, n = v.shape[:2]
    num = -(-n // chunk)
    pad = num * chunk - n
    if pad:
        v = jnp.pad(v, [(0, 0), (0, pad)] + [(0, 0)] * (v.ndim - 2))
    return jnp.moveaxis(v.reshape((g, chunk, num) + v.shape[2:]), 2, 0)


def _unchunk(vs, n: int):
    """``[num, G, chunk, ...]`` -> ``[G, n, ...]``: the inverse of :func:`_chunks_of`."""
    v = jnp.moveaxis(vs, 0, 2)  # [G, chunk, num, ...]
    v = v.reshape((v.shape[0], -1) + v.shape[3:])
    return v[:, :n] if v.shape[1] != n else v


def _conv_chunked(xg, w4, klut, mbits, family, backward, geometry, budget, chunk: int):
    """``_conv_core`` over batch chunks (:func:`_chunks_of`) with a rematerialised body."""

    @jax.checkpoint
    def body(x_chunk):
        return _conv_core(x_chunk, w4, klut, mbits, family, backward, geometry, budget)

    ys = lax.map(body, _chunks_of(xg, chunk))  # [num, G, chunk, *out, Og]
    return _unchunk(ys, xg.shape[1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7, 8, 9))
def _conv_in_place(
    xg, w4, klut, mbits, family, backward, geometry, budget, chunk, forward_in_place
):
    """CPU: the convolution with the kernel gradient read in place.

    With ``forward_in_place`` (3 or more channels per group) the forward pass
    reads its patch matrix in place too, whole batch at once: it builds no
    patches, so it needs no batch chunks (the chunks' loop and their smaller
    GEMMs cost 20-40% of a forward pass); otherwise it runs over the batch
    chunks of ``_conv_chunked``. With ``backward="approx"`` the kernel
    gradient reads ``patches^T`` in place, as one GEMM over the whole batch:
    the bits of the unchunked patch path (``_conv_core``) whatever ``chunk``
    is, every partial sum in the kernel (chunk partials added by XLA would be
    flushed where they are subnormal); the input gradient reads ``dy`` in
    place too where it is made of convs of ``dy`` (3 or more output
    channels), else it (its patches, or ``d_patches`` and its fold) runs over
    the batch chunks, with the same bits. (``backward="exact"`` runs
    ``_conv_core``'s backward over the chunks, adding the kernel-gradient
    partials as ``_conv_chunked``'s transpose does.) Arguments as
    ``_conv_core``, plus the batch chunk and whether the forward pass reads
    its patches in place.
    """
    del backward
    if forward_in_place:
        return _core_forward(mbits, family, geometry, budget, True)(xg, w4, klut)
    forward = _core_forward(mbits, family, geometry, budget)
    if chunk >= xg.shape[1]:
        return forward(xg, w4, klut)
    ys = lax.map(lambda x_chunk: forward(x_chunk, w4, klut), _chunks_of(xg, chunk))
    return _unchunk(ys, xg.shape[1])


def _conv_in_place_fwd(
    xg, w4, klut, mbits, family, backward, geometry, budget, chunk, forward_in_place
):
    # (As _conv_core_fwd: the custom_vjp function itself.)
    out = _conv_in_place(
        xg, w4, klut, mbits, family, backward, geometry, budget, chunk, forward_in_place
    )
    return out, (xg, w4, klut)


@functools.cache
def _in_place_backward(mbits, family, backward, geometry, budget, chunk):
    """``_conv_in_place``'s backward pass ``(xg, w4, klut, ct) -> (d_x, d_w)``."""
    return _differentiable(
        functools.partial(
            _in_place_backward_fast, mbits, family, backward, geometry, budget, chunk
        ),
        _reference_backward(mbits, family, backward, geometry),
    )


def _in_place_backward_fast(mbits, family, backward, geometry, budget, chunk, xg, w4, klut, ct):
    n = xg.shape[1]
    # An approximate input gradient that reads dy in place needs no chunks.
    whole = chunk >= n or (backward == "approx" and _input_grad_builds_no_patches(geometry, xg, ct))
    chunks = None if whole else (_chunks_of(xg, chunk), _chunks_of(ct, chunk))
    if backward == "approx":
        # The kernel gradient in place, whole batch at once: one GEMM over all
        # N * P pixels, the bits of the unchunked patch path (and of the GPU's).
        d_w = _core_wgrad_in_place(mbits, family, geometry)(xg, ct, klut)
        input_grad = _core_input_grad(mbits, family, geometry, budget)
        if chunks is None:
            d_x = input_grad(xg, w4, klut, ct)
        else:
            d_x = _unchunk(lax.map(lambda c: input_grad(c[0], w4, klut, c[1]), chunks), n)
    else:
        core_bwd = _core_backward(mbits, family, backward, geometry, budget)
        if chunks is None:
            d_x, d_w = core_bwd(xg, w4, klut, ct)
        else:

            def step(d_w, c):
                d_x_chunk, d_w_chunk = core_bwd(c[0], w4, klut, c[1])
                return d_w + d_w_chunk, d_x_chunk

            # Last chunk first, as the transpose of _conv_chunked's lax.map
            # adds them: the same bits.
            d_w, d_xs = lax.scan(step, jnp.zeros(w4.shape, w4.dtype), chunks, reverse=True)
            d_x = _unchunk(d_xs, n)
    return d_x, d_w


def _conv_in_place_bwd(
    mbits, family, backward, geometry, budget, chunk, forward_in_place, residuals, ct
):
    del forward_in_place
    xg, w4, klut = residuals
    d_x, d_w = _in_place_backward(mbits, family, backward, geometry, budget, chunk)(
        xg, w4, klut, ct
    )
    d_x = partitioning.match_primal_type(d_x, xg)
    d_w = partitioning.match_primal_type(d_w, w4)
    return d_x, d_w, ops._lut_zero_cotangent(klut)


_conv_in_place.defvjp(_conv_in_place_fwd, _conv_in_place_bwd)


# --------------------------------------------------------------------------
# Public op.


def approx_conv(
    x,
    kernel,
    multiplier,
    window_strides: Sequence[int] | int | None = None,
    padding: str | Sequence[tuple[int, int]] = "SAME",
    lhs_dilation: Sequence[int] | int | None = None,
    rhs_dilation: Sequence[int] | int | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
    *,
    backward: str = "approx",
) -> jax.Array:
    """N-d convolution with every product simulated (SPEC sections 2 and 5).

    Semantics of ``jax.lax.conv_general_dilated`` (cross-correlation, no
    kernel flip) where each product is ``P(input, weight)`` under
    ``multiplier`` (input = operand ``a``, kernel weight = operand ``b``); the
    sums are float32 in a fixed order. 1-D, 2-D and 3-D (any N-d) convolutions,
    strides, SAME/VALID/explicit padding, input and kernel dilation, feature
    groups (including depthwise) and batch groups are supported. The
    arguments after ``multiplier`` are ``lax.conv_general_dilated``'s, in its
    order, so a positional lax call carries over by inserting the multiplier,
    with one difference: without ``dimension_numbers`` the layout is channels-last
    (``NHWC``/``HWIO``, as Flax), not lax's ``NCHW``/``OIHW``; pass
    ``dimension_numbers=("NCHW", "OIHW", "NCHW")`` for lax's default.

    Gradients follow SPEC section 5: with ``backward="approx"`` the input
    gradient uses products ``P(dy, weight)`` and the kernel gradient
    ``P(input, dy)``; ``backward="exact"`` uses float32 products
    (straight-through). No gradient flows into the LUT. Second derivatives
    (``grad`` of ``grad``) apply the same rule to the backward products.

    The exact multiplier (``"fp32"``) calls ``lax.conv_general_dilated``.
    Otherwise the convolution is lowered onto the approximate gemm kernel via
    patch extraction, which needs ``prod(window)`` times the input memory for
    the patches; batches whose patch matrix exceeds ``chunk_limit_bytes()``
    (8 MiB on CPU, 256 MiB on GPU) are processed in rematerialised chunks. On
    CPU the forward pass reads the patch matrix in place instead (from 3
    channels per group; ``IMPLICIT_MIN_CHANNELS``): no patches, no chunks,
    the same bits, and so does the kernel gradient (``patches^T``), as one
    GEMM over the whole batch. Peak memory of forward + backward measured with
    ``benchmarks/bench_conv_memory.py`` (batch 32, 32x32x64 -> 64, 3x3, SAME,
    XLA:CPU), relative to the native convolution: 1.22x with the CPU default
    (8 MiB chunks), 1.25x with 4 MiB chunks, 1.6x with 64 MiB chunks and 2.4x
    without chunking.

    Padding and ``lhs_dilation`` holes are zero-valued inputs that go through
    the multiplier like any other operand (as ApproxTrain's im2col does): they
    contribute ``P(0, w) = +-0``, or NaN where the kernel weight is Inf/NaN.

    Args:
      x: Input (``lhs`` of lax), floating point. Layout per ``dimension_numbers``; with the
        default ``None`` channels-last (``NWC``/``NHWC``/``NDHWC``).
      kernel: Kernel (``rhs`` of lax), floating point; default layout ``WIO``/``HWIO``/``DHWIO``
        with ``I = C / feature_group_count``.
      multiplier: a ``Multiplier`` or a name such as ``"mbm7"``. A stack of D
        designs gives a result with a leading design axis of size D (one
        custom call).
      window_strides: Strides, an int or one per spatial dimension (default 1).
      padding: ``"SAME"`` (default), ``"VALID"``, ``"SAME_LOWER"`` or one
        ``(low, high)`` pair per spatial dimension (explicit pairs are needed
        with ``lhs_dilation``, as in lax).
      lhs_dilation: Input (base) dilation (default 1).
      rhs_dilation: Kernel (window, atrous) dilation (default 1).
      feature_group_count: Number of feature groups (``C`` for depthwise).
      batch_group_count: Number of batch groups, as in lax (the form XLA gives
        the kernel gradient of a grouped convolution): input samples
        ``b * N/B .. (b + 1) * N/B - 1`` meet output-feature group ``b``.
        At most one of the two group counts may exceed 1.
      dimension_numbers: As accepted by ``lax.conv_general_dilated`` (e.g.
        ``("NCHW", "OIHW", "NCHW")``); ``None`` means channels-last
        ``("NHWC", "HWIO", "NHWC")`` like Flax (not lax's NCHW default).
      backward: ``"approx"`` (default) or ``"exact"``.
      precision: Precision of the native convolution for the exact multiplier
        (default ``HIGHEST``, i.e. true float32 also on GPU); ignored
        otherwise (simulated products are exact by construction).
      preferred_element_type: Output dtype (default: promoted input dtype).

    Returns:
      The convolution output in the ``dimension_numbers`` output layout
      (``[D, ...]`` for a stack of multipliers).

    Raises:
      TypeError: For non-floating inputs or an invalid multiplier.
      ValueError: For inconsistent ranks, shapes, feature or batch group
        counts, or padding.

    Example:
      >>> x = jnp.ones((8, 28, 28, 1))
      >>> w = jnp.ones((5, 5, 1, 32)) * 0.1
      >>> y = approx_conv(x, w, "mbm7", padding="SAME")  # [8, 28, 28, 32]
      >>> y = approx_conv(x, w, "mbm7", (2, 2), "VALID")  # lax order: [8, 12, 12, 32]
    """
    lhs, rhs = x, kernel
    m = ops.resolve_multiplier(multiplier)
    ops.check_backward(backward)
    lhs = ops.check_float("x", lhs)
    rhs = ops.check_float("kernel", rhs)
    if lhs.ndim < 3:
        raise ValueError(
            f"x must have rank >= 3 (batch, spatial..., feature), got shape {lhs.shape}"
        )
    if rhs.ndim != lhs.ndim:
        raise ValueError(
            f"x and kernel must have the same rank, got x shape {lhs.shape} (rank {lhs.ndim}) "
            f"and kernel shape {rhs.shape} (rank {rhs.ndim})"
        )
    if isinstance(feature_group_count, bool) or not isinstance(
        feature_group_count, int | np.integer
    ):
        raise TypeError(f"feature_group_count must be an int, got {feature_group_count!r}")
    groups = int(feature_group_count)
    if groups < 1:
        raise ValueError(f"feature_group_count must be >= 1, got {groups}")
    if isinstance(batch_group_count, bool) or not isinstance(batch_group_count, int | np.integer):
        raise TypeError(f"batch_group_count must be an int, got {batch_group_count!r}")
    batch_groups = int(batch_group_count)
    if batch_groups < 1:
        raise ValueError(f"batch_group_count must be >= 1, got {batch_groups}")
    if batch_groups > 1 and groups > 1:
        raise ValueError(
            "at most one of feature_group_count and batch_group_count may exceed 1, got "
            f"{groups} and {batch_groups}"
        )
    nd = lhs.ndim - 2
    dn = _dimension_numbers(dimension_numbers, lhs.shape, rhs.shape)
    strides = _as_int_tuple("window_strides", window_strides, nd)
    lhs_dil = _as_int_tuple("lhs_dilation", lhs_dilation, nd)
    rhs_dil = _as_int_tuple("rhs_dilation", rhs_dilation, nd)

    lhs_perm = tuple(dn.lhs_spec)  # (batch, feature, spatial...)
    rhs_perm = tuple(dn.rhs_spec)  # (out feature, in feature, spatial...)
    out_spec = tuple(dn.out_spec)
    c_in = lhs.shape[lhs_perm[1]]
    c_out = rhs.shape[rhs_perm[0]]
    i_kernel = rhs.shape[rhs_perm[1]]
    in_spatial = tuple(lhs.shape[d] for d in lhs_perm[2:])
    window = tuple(rhs.shape[d] for d in rhs_perm[2:])
    if c_in % groups:
        raise ValueError(
            f"x feature dimension ({c_in}) must be divisible by feature_group_count ({groups})"
        )
    if c_in // groups != i_kernel:
        raise ValueError(
            f"kernel input-feature dimension ({i_kernel}) must equal x features ({c_in}) / "
            f"feature_group_count ({groups}) = {c_in // groups}; lhs shape {lhs.shape}, "
            f"kernel shape {rhs.shape}"
        )
    if c_out % groups:
        raise ValueError(
            f"kernel output-feature dimension ({c_out}) must be divisible by "
            f"feature_group_count ({groups})"
        )
    if lhs.shape[lhs_perm[0]] % batch_groups or c_out % batch_groups:
        raise ValueError(
            f"x batch dimension ({lhs.shape[lhs_perm[0]]}) and kernel output-feature "
            f"dimension ({c_out}) must be divisible by batch_group_count ({batch_groups})"
        )
    if any(k < 1 for k in window):
        raise ValueError(f"kernel spatial dimensions must be >= 1, got kernel shape {rhs.shape}")
    pads = _explicit_padding(padding, in_spatial, window, strides, lhs_dil, rhs_dil)
    extents = _padded_extents(in_spatial, pads, lhs_dil)
    if any(e < 0 for e in extents):
        raise ValueError(
            f"negative padding {tuple(pads)} is larger than the (dilated) input spatial "
            f"shape {in_spatial}"
        )
    promoted = jnp.result_type(lhs, rhs)  # arrays, not dtypes: keeps weak types
    out_dtype = ops.output_dtype(promoted, preferred_element_type)

    if m.is_exact:
        # Promoted as on the simulated path (lax refuses mixed dtypes), so that
        # switching a model between "fp32" and a LUT design never changes that.
        # Under x64, float32 products and sums cast back (SPEC section 1).
        wide = ops.wider_than_float32(out_dtype)
        compute = jnp.float32 if wide else promoted
        lhs, rhs = lhs.astype(compute), rhs.astype(compute)
        if any(lo < 0 or hi < 0 for lo, hi in pads):
            # XLA:CPU's native convolution gives wrong values for negative low
            # padding (openxla/xla#48713): pad and dilate the input here instead.
            lhs = _pad_input(lhs, pads, lhs_dil, spatial_axes=lhs_perm[2:])
            pads, lhs_dil = ((0, 0),) * nd, (1,) * nd
        out = lax.conv_general_dilated(
            lhs,
            rhs,
            strides,
            pads,
            lhs_dilation=lhs_dil,
            rhs_dilation=rhs_dil,
            dimension_numbers=dn,
            feature_group_count=groups,
            batch_group_count=batch_groups,
            precision=precision if precision is not None else lax.Precision.HIGHEST,
            preferred_element_type=jnp.float32 if wide else preferred_element_type,
        )
        return out.astype(out_dtype) if wide else out
    if m.is_stack:
        return ops._over_stack(
            lambda one: approx_conv(
                lhs,
                rhs,
                one,
                window_strides=strides,
                padding=pads,
                lhs_dilation=lhs_dil,
                rhs_dilation=rhs_dil,
                feature_group_count=groups,
                batch_group_count=batch_groups,
                dimension_numbers=dn,
                backward=backward,
                preferred_element_type=preferred_element_type,
            ),
            m,
        )
    if batch_groups > 1:
        # XLA's batch groups (the kernel gradient of a grouped convolution):
        # samples b * n .. b * n + n - 1 of the input meet output-feature group
        # b. That is a feature-grouped convolution of the input with its batch
        # groups moved into the feature axis, [B * n, *S, C] -> [n, *S, B * C]
        # (group-major): the same products P(input, kernel), summed alike.
        nb = lhs.shape[lhs_perm[0]] // batch_groups
        x_last = jnp.transpose(lhs, (lhs_perm[0], *lhs_perm[2:], lhs_perm[1]))
        x_last = jnp.moveaxis(x_last.reshape((batch_groups, nb) + x_last.shape[1:]), 0, -2)
        x_last = x_last.reshape(x_last.shape[:-2] + (batch_groups * c_in,))
        spatial = tuple(range(1, nd + 1))
        return approx_conv(
            x_last,
            rhs,
            m,
            window_strides=strides,
            padding=pads,
            lhs_dilation=lhs_dil,
            rhs_dilation=rhs_dil,
            dimension_numbers=lax.ConvDimensionNumbers(
                lhs_spec=(0, nd + 1) + spatial, rhs_spec=dn.rhs_spec, out_spec=dn.out_spec
            ),
            feature_group_count=batch_groups,
            backward=backward,
            preferred_element_type=preferred_element_type,
        )

    out_spatial = []
    for extent, k, st, rd in zip(extents, window, strides, rhs_dil, strict=True):
        eff_k = (k - 1) * rd + 1
        out_spatial.append(max(0, (extent - eff_k) // st + 1) if extent >= eff_k else 0)
    out_spatial = tuple(out_spatial)
    n = lhs.shape[lhs_perm[0]]
    cg = c_in // groups

    out_canon_shape = (n,) + out_spatial + (c_out,)
    if n == 0 or c_out == 0 or any(o == 0 for o in out_spatial) or cg == 0:
        zeros = jnp.zeros(out_canon_shape, out_dtype)
        return _from_channels_last(zeros, out_spec)

    geometry = (window, strides, pads, lhs_dil, rhs_dil, out_spatial)
    klut = ops.kernel_lut_of(m)
    budget = chunk_limit_bytes()
    chunk = _chunk_size(n, _patch_bytes(1, c_in, geometry), budget, jax.device_count())
    return _lowered(
        lhs,
        rhs,
        ops.device_lut(klut),
        mbits=m.mbits,
        family=ops._family_of(m, klut),
        backward=backward,
        perms=(lhs_perm, rhs_perm, out_spec),
        groups=groups,
        geometry=geometry,
        chunk=chunk,
        budget=budget,
        in_place=_implicit_forward_applies(cg, geometry),
        out_dtype=jnp.dtype(out_dtype),
    )


@functools.partial(
    jax.jit,
    static_argnames=(
        "mbits",
        "family",
        "backward",
        "perms",
        "groups",
        "geometry",
        "chunk",
        "budget",
        "in_place",
        "out_dtype",
    ),
)
def _lowered(
    lhs,
    rhs,
    klut,
    *,
    mbits,
    family,
    backward,
    perms,
    groups,
    geometry,
    chunk,
    budget,
    in_place,
    out_dtype,
):
    """The layout changes and gemm of ``approx_conv`` as one jitted program.

    Jitting keeps eager calls to one compiled program per configuration
    (instead of one per small op); under an outer jit it is inlined. ``klut``
    is ``ops.kernel_lut_of(multiplier)``, made outside (see ops._dot_single).
    """
    lhs_perm, rhs_perm, out_spec = perms
    window, _, _, _, _, out_spatial = geometry
    n = lhs.shape[lhs_perm[0]]
    c_in = lhs.shape[lhs_perm[1]]
    c_out = rhs.shape[rhs_perm[0]]
    cg, og = c_in // groups, c_out // groups
    # Input -> [G, N, *S, Cg]; kernel -> [1, G, taps * Cg, Og].
    x = jnp.transpose(lhs.astype(jnp.float32), (lhs_perm[0],) + lhs_perm[2:] + (lhs_perm[1],))
    # (partitioning.reshape: keeps Explicit-axis shardings, e.g. of out channels.)
    xg = jnp.moveaxis(partitioning.reshape(x, x.shape[:-1] + (groups, cg)), -2, 0)
    w = jnp.transpose(rhs.astype(jnp.float32), rhs_perm[2:] + (rhs_perm[1], rhs_perm[0]))
    w = partitioning.reshape(w, window + (cg, groups, og))
    w = partitioning.reshape(jnp.moveaxis(w, -2, 0), (1, groups, math.prod(window) * cg, og))
    if in_place:
        y = _conv_in_place(xg, w, klut, mbits, family, backward, geometry, budget, chunk, True)
    elif chunk < n and backward == "approx" and _in_place_targets_apply(geometry):
        # Batch chunks for the patches, but the kernel gradient in one GEMM.
        y = _conv_in_place(xg, w, klut, mbits, family, backward, geometry, budget, chunk, False)
    elif chunk >= n:
        y = _conv_core(xg, w, klut, mbits, family, backward, geometry, budget)
    else:
        y = _conv_chunked(xg, w, klut, mbits, family, backward, geometry, budget, chunk)
    # [G, N, *out, Og] -> [N, *out, G * Og]
    y = jnp.moveaxis(y, 0, -2).reshape((n,) + tuple(out_spatial) + (c_out,))
    return _from_channels_last(y.astype(out_dtype), out_spec)


def _from_channels_last(y, out_spec):
    """``[N, *spatial, C]`` -> the layout described by ``out_spec``."""
    nd = y.ndim - 2
    # Canonical position of every output dimension: batch 0, feature nd+1, spatial 1..nd.
    canon_of = {out_spec[0]: 0, out_spec[1]: nd + 1}
    for i, d in enumerate(out_spec[2:]):
        canon_of[d] = 1 + i
    return jnp.transpose(y, tuple(canon_of[d] for d in range(y.ndim)))


__all__ = ["approx_conv", "chunk_limit_bytes", "PATCH_CHUNK_BYTES"]
