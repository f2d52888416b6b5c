"""SPMD partitioning of the approx_jax FFI custom calls.

An ``ffi_call`` is opaque to XLA's partitioner: under plain ``jax.jit`` with a
batch-sharded operand XLA all-gathers every operand and runs the custom call
replicated. This module wraps ``ffi.gemm_call`` / ``ffi.multiply_call`` in
``jax.experimental.custom_partitioning`` so that the sharded dimensions stay
sharded and each device runs the kernel on its own shard.

Canonical gemm (docs/DESIGN.md): ``a f32[Ga, Ba, M, K]``, ``b f32[Gb, Bb, K,
N]``, ``lut u32[Gl, L]``, ``lut_facts s32[Gl]`` -> ``out f32[D, B, M, N]``. Its
factors are

* ``d`` (design axis), ``t`` (batch axis), ``m`` (rows), ``n`` (columns):
  pass-through; a shard of the output needs the matching shards only;
* ``k`` (contraction): a *reduction* factor; when it is sharded every device
  computes a partial product over its slice of ``k`` and the partial results
  are summed with ``psum`` (the data-parallel weight-gradient all-reduce);
* ``l`` (LUT entries): never split (need-replication factor);
* size-1 broadcast axes (``Ga == 1 < D`` etc.) get their own factor so that
  they do not tie a size-1 axis to a size-D one.

The elementwise multiply ``a f32[Ga, n]``, ``b f32[Gb, n]``, ``lut u32[Gl,
L]`` -> ``f32[D, n]`` has pass-through factors ``d`` and ``n``; the LUT facts
``lut u32[G, L]`` -> ``s32[G]``, ``d``.

Whatever sharding the partitioner proposes, ``partition`` keeps the sharding
of each factor that is consistent (same mesh axes on every operand that has
the factor, each mesh axis used by one factor only, dimension divisible by
the number of shards) and replicates every other factor, so unsupported
layouts fall back to an all-gather: correct but slower.

Summation order: with ``k`` unsharded each output element is produced by one
kernel invocation over the full ``k`` range, so results are bit-identical to
the single-device run. A sharded ``k`` (weight gradients in data-parallel
training) sums per-shard partial sums, which changes float32 rounding.

Inside ``shard_map`` (all mesh axes manual) ``custom_partitioning`` lowers
the wrapped call directly, so the kernel runs on the per-device blocks.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from approx_jax._src import ffi

# Factor names per canonical operand dimension (see module docstring).
_GEMM_DIMS = (("d", "t", "m", "k"), ("d", "t", "k", "n"), ("d", "l"), ("d",))
_GEMM_OUT = ("d", "t", "m", "n")
_MUL_DIMS = (("d", "n"), ("d", "n"), ("d", "l"))
_MUL_OUT = ("d", "n")
_FACTS_DIMS = (("d", "l"),)
_FACTS_OUT = ("d",)
# Operand dimensions that may be size-1 broadcasts of a larger output axis.
_BROADCASTABLE = ("d", "t")


def _shape_of(t) -> tuple[int, ...]:
    """Shape of an MLIR ranked tensor type or of an object with ``.shape``."""
    if hasattr(t, "shape"):
        return tuple(t.shape)
    from jax._src.lib.mlir import ir  # noqa: PLC0415 - only for rule callbacks

    return tuple(ir.RankedTensorType(t).shape)


def _factor_names(dims, out_dims, shapes, out_shape):
    """Per-operand factor names, renaming size-1 broadcast axes.

    Returns:
      ``(operand_factor_lists, extra_replicated_factors)``.
    """
    out_size = dict(zip(out_dims, out_shape, strict=True))
    names = []
    extra = []
    for i, (fdims, shape) in enumerate(zip(dims, shapes, strict=True)):
        row = []
        for f, size in zip(fdims, shape, strict=True):
            if f in _BROADCASTABLE and size == 1 and out_size[f] != 1:
                f = f"{f}bcast{i}"
                extra.append(f)
            row.append(f)
        names.append(row)
    return names, extra


def _rule(dims, out_dims, reduction, replicated_factors=("l",)):
    """Builds the Shardy ``sharding_rule`` callback for one op."""

    def rule(mesh, operand_types, result_types):
        del mesh
        shapes = [_shape_of(t) for t in operand_types]
        out_shape = _shape_of(result_types[0])
        names, extra = _factor_names(dims, out_dims, shapes, out_shape)
        text = ", ".join(" ".join(r) for r in names) + " -> " + " ".join(out_dims)
        # Shardy wants special factors in order of first appearance.
        order = list(dict.fromkeys(f for row in names for f in row))
        order += [f for f in out_dims if f not in order]
        replicated = tuple(sorted({*replicated_factors, *extra}, key=order.index))
        return text, {
            "reduction_factors": reduction,
            "need_replication_factors": replicated,
        }

    return rule


def _spec_axes(sharding, ndim: int) -> list[tuple[str, ...]]:
    """Mesh axes per dimension of a NamedSharding (``()`` when unsharded)."""
    spec = tuple(getattr(sharding, "spec", ())) if sharding is not None else ()
    spec = spec + (None,) * (ndim - len(spec))
    out = []
    for entry in spec[:ndim]:
        if entry is None:
            out.append(())
        elif isinstance(entry, str):
            out.append((entry,))
        else:
            out.append(tuple(entry))
    return out


def _assign_factors(mesh, dims, out_dims, reduction, arg_shapes, fixed=None):
    """Chooses one consistent set of mesh axes per factor.

    Operands are scanned in order (``a`` first); a factor keeps the axes of the
    first operand that shards it when those axes are free and divide every
    dimension carrying the factor, and is replicated otherwise. ``l`` is never
    sharded.

    Returns:
      A dict factor -> tuple of mesh axis names.
    """
    shapes = [tuple(s.shape) for s in arg_shapes]
    out_shape = _out_shape(dims, out_dims, shapes, fixed)
    names, _ = _factor_names(dims, out_dims, shapes, out_shape)
    sizes: dict[str, set[int]] = {}
    for row, shape in zip(names, shapes, strict=True):
        for f, size in zip(row, shape, strict=True):
            sizes.setdefault(f, set()).add(size)
    axis_size = dict(mesh.shape)
    used: set[str] = set()
    chosen: dict[str, tuple[str, ...]] = {}
    for row, s in zip(names, arg_shapes, strict=True):
        for f, axes in zip(row, _spec_axes(s.sharding, len(row)), strict=True):
            if f in chosen or not axes or (f not in out_dims and f not in reduction):
                continue
            if any(a in used or a not in axis_size for a in axes):
                continue
            shards = math.prod(axis_size[a] for a in axes)
            if any(size % shards for size in sizes[f]):
                continue
            chosen[f] = axes
            used.update(axes)
    return chosen, names


def _out_shape(dims, out_dims, shapes, fixed=None):
    """The result shape; ``fixed`` gives the sizes of result-only factors."""
    size: dict[str, int] = dict(fixed or {})
    for fdims, shape in zip(dims, shapes, strict=True):
        for f, s in zip(fdims, shape, strict=True):
            if s != 1 or f not in size:  # size-1 axes broadcast; 0 stays 0
                size[f] = s
    return tuple(size[f] for f in out_dims)


def _auto_typed(mesh):
    """A context in which traced values carry ``mesh``'s axes as Auto.

    The body of a partitioned op that sums over a sharded contraction is
    traced with it: under Explicit axes jax 0.11 gives the ``add`` of
    ``psum``'s reduction body a sharding annotation, and XLA:CPU rejects that
    all-reduce ("Unsupported reduction computation"). The per-device body
    needs no sharding types: its operands are plain blocks.
    """
    try:
        names = mesh.abstract_mesh.axis_names
        auto = mesh.abstract_mesh.update_axis_types({n: jax.sharding.AxisType.Auto for n in names})
        return jax.sharding.use_abstract_mesh(auto)
    except (AttributeError, TypeError, ValueError):  # a jax without these APIs
        return contextlib.nullcontext()


def _named_spec(factors, chosen) -> P:
    spec = []
    for f in factors:
        axes = chosen.get(f, ())
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*spec)


def _named(mesh, factors, chosen) -> NamedSharding:
    return NamedSharding(mesh, _named_spec(factors, chosen))


def _result_type(
    dims, out_dims, reduction, operands, fixed=None, dtype=jnp.float32
) -> jax.ShapeDtypeStruct:
    """Result type of the op for the given (traced) operands.

    * Under ``jit`` with Explicit mesh axes operand types carry their
      sharding; the result type describes where the partitioned op leaves the
      result (see ``_assign_factors``); copying ``a``'s sharding would be wrong
      whenever ``a`` and the result are laid out differently (weight
      gradients: ``a = x^T`` is sharded on its last axis, the result is not).
    * Inside ``shard_map`` (Manual axes) the result varies over the union of
      the axes its operands vary over, else the custom_vjp backward pass
      rejects the cotangent types ("manual axis types do not match").
    * With Auto axes the specs are empty and the result spec is empty too.
    """
    shape = _out_shape(dims, out_dims, [tuple(x.shape) for x in operands], fixed)
    try:
        types = [jax.typeof(x) for x in operands]
        # The first operand typed on a mesh: a closed-over constant (no mesh)
        # may come first, next to a design-sharded kernel.
        sharding = next((t.sharding for t in types if not t.sharding.mesh.empty), types[0].sharding)
        mesh = sharding.mesh
    except Exception:  # noqa: BLE001 - concrete arrays without a mesh type
        return jax.ShapeDtypeStruct(shape, dtype)
    if mesh.empty:
        if len(sharding.spec) > len(shape):  # a result of lower rank than `a` (conv)
            sharding = sharding.update(spec=P())
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    chosen, _ = _assign_factors(mesh, dims, out_dims, reduction, types, fixed)
    sharding = sharding.update(spec=_named_spec(out_dims, chosen))
    varying = frozenset().union(*(_varying(t) for t in types))
    mat = jax.sharding.ManualAxisType(varying=varying) if varying else None
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding, manual_axis_type=mat)


def _varying(aval) -> frozenset:
    mat = getattr(aval, "manual_axis_type", None)
    return frozenset(getattr(mat, "varying", ()) or ())


def _make_partitioned(
    target,
    dims,
    out_dims,
    reduction,
    mbits: int,
    replicated=("l",),
    fixed=None,
    attrs=None,
    dtype=jnp.float32,
):
    """custom_partitioning wrapper of the FFI target with the given factors.

    ``dims``: factor names per operand; ``replicated``: factors never split;
    ``fixed``: sizes of result-only factors; ``attrs``: the target's other
    attributes; ``dtype``: the result's.
    """
    attrs = dict(attrs or {})

    def call(*operands):
        result = _result_type(dims, out_dims, reduction, operands, fixed, dtype)
        return ffi.call_target(target, result, *operands, mbits=mbits, **attrs)

    @custom_partitioning
    def op(*operands):
        return call(*operands)

    def infer(mesh, arg_shapes, result_shape):
        del result_shape
        chosen, _ = _assign_factors(mesh, dims, out_dims, reduction, arg_shapes, fixed)
        return _named(mesh, out_dims, chosen)

    def partition(mesh, arg_shapes, result_shape):
        del result_shape
        chosen, names = _assign_factors(mesh, dims, out_dims, reduction, arg_shapes, fixed)
        arg_shardings = tuple(_named(mesh, row, chosen) for row in names)
        out_sharding = _named(mesh, out_dims, chosen)
        reduce_axes = tuple(a for f in reduction for a in chosen.get(f, ()))

        def lower(*operands):
            if not reduce_axes:
                return call(*operands)
            with _auto_typed(mesh):
                shape = _out_shape(dims, out_dims, [tuple(x.shape) for x in operands], fixed)
                result = jax.ShapeDtypeStruct(shape, dtype)
                out = ffi.call_target(target, result, *operands, mbits=mbits, **attrs)
                return jax.lax.psum(out, reduce_axes)

        return mesh, lower, out_sharding, arg_shardings

    op.def_partition(
        partition=partition,
        infer_sharding_from_operands=infer,
        sharding_rule=_rule(dims, out_dims, reduction, replicated),
    )
    return op


@functools.cache
def _gemm_op(mbits: int, family: int):
    return _make_partitioned(
        ffi.GEMM_TARGET,
        _GEMM_DIMS,
        _GEMM_OUT,
        ("k",),
        mbits,
        attrs={"family": np.int32(family)},
    )


@functools.cache
def _multiply_op(mbits: int):
    return _make_partitioned(ffi.MULTIPLY_TARGET, _MUL_DIMS, _MUL_OUT, (), mbits)


@functools.cache
def _lut_facts_op(mbits: int):
    return _make_partitioned(
        ffi.LUT_FACTS_TARGET, _FACTS_DIMS, _FACTS_OUT, (), mbits, dtype=jnp.int32
    )


def lut_facts(klut: jax.Array, mbits: int, family: int) -> jax.Array:
    """The ``lut_facts`` operand of a GEMM or conv call on ``klut``.

    The LUT facts target's answer when the kernels would otherwise check a
    large LUT per call (``family`` unknown: a traced LUT, a stack; M >=
    ``ffi.LUT_FACTS_MIN_BITS``), a constant otherwise: ``family`` and the
    kernel-format flags when the family is known (``klut`` then comes from
    ``ops.kernel_lut_of``), else "unknown". Every call of a step on the same
    LUT makes the same custom call, which XLA's common-subexpression
    elimination runs once.

    Args:
      klut: uint32 kernel-format LUTs ``[Gl, 4**mbits]``.
      mbits: mantissa width M.
      family: the ``family`` attribute of the call.

    Returns:
      int32 ``[Gl]``.
    """
    if family != ffi.FAMILY_UNKNOWN:
        # ops.kernel_lut_of's LUTs are in kernel format with clear low bits
        # by construction: the flags spare the kernel its scan of them.
        return jnp.full((klut.shape[0],), family | ffi.LUT_FACTS_FLAGS, jnp.int32)
    if mbits < ffi.LUT_FACTS_MIN_BITS or klut.shape[0] == 0:
        return ffi.unknown_lut_facts(klut)
    return _lut_facts_op(int(mbits))(klut)


def gemm_call(
    a: jax.Array, b: jax.Array, klut: jax.Array, mbits: int, family: int = ffi.FAMILY_UNKNOWN
) -> jax.Array:
    """``ffi.gemm_call`` with SPMD partitioning rules (same contract).

    Args:
      a: float32 ``[Ga, Ba, M, K]``.
      b: float32 ``[Gb, Bb, K, N]``.
      klut: uint32 kernel-format LUTs ``[Gl, 4**mbits]`` (always replicated).
      mbits: mantissa width M.
      family: as for ``ffi.gemm_call``.

    Returns:
      float32 ``[D, B, M, N]``.
    """
    facts = lut_facts(klut, mbits, family)
    return _gemm_op(int(mbits), int(family))(a, b, klut, facts)


@functools.cache
def _conv_op(mbits: int, window, strides, dilation, size: int, wgrad: bool, family: int):
    """The partitioned ``CONV_TARGET`` (``size``: P) or ``CONV_WGRAD_TARGET`` (K)."""
    spatial = tuple(f"s{i}" for i in range(len(window)))
    attrs = {
        name: np.asarray(v, np.int64)
        for name, v in (("window", window), ("strides", strides), ("dilation", dilation))
    }
    attrs["family"] = np.int32(family)
    if wgrad:
        # x [d, t, c, n, *s], dy [d, t, n, p, o], lut [d, l] -> [d, t, k, o]: the
        # samples (n) are the contraction (a sharded batch gives local partial
        # gradients and a psum, as the GEMM's k); k (taps * C) is result-only.
        target, reduction, fixed = ffi.CONV_WGRAD_TARGET, ("n",), {"k": size}
        dims = (("d", "t", "c", "n", *spatial), ("d", "t", "n", "p", "o"), ("d", "l"), ("d",))
        out_dims = ("d", "t", "k", "o")
    else:
        # x [d, t, n, *s, c], w [d, t, k, o], lut [d, l] -> [d, t, n, p, o]:
        # samples (n), groups (t), designs (d) and output channels (o) may
        # stay sharded; p (output pixels) is result-only.
        target, reduction, fixed = ffi.CONV_TARGET, (), {"p": size}
        dims = (("d", "t", "n", *spatial, "c"), ("d", "t", "k", "o"), ("d", "l"), ("d",))
        out_dims = ("d", "t", "n", "p", "o")
    # The spatial, channel, K and pixel factors are never split.
    replicated = ("l", "c", *spatial, "p", "k")
    return _make_partitioned(
        target, dims, out_dims, reduction, mbits, replicated=replicated, fixed=fixed, attrs=attrs
    )


def conv_call(
    x: jax.Array,
    w: jax.Array,
    klut: jax.Array,
    mbits: int,
    window,
    strides,
    dilation,
    pixels,
    family: int = ffi.FAMILY_UNKNOWN,
) -> jax.Array:
    """A convolution's GEMM on its patch matrix read in place (CPU only).

    Args:
      x: float32 ``[Gx, G, N, *S, C]``: padded, lhs-dilated channels-last input.
      w: float32 ``[Gw, G, prod(window) * C, O]`` (tap-major, channel-minor rows).
      klut: uint32 kernel-format LUTs ``[Gl, 4**mbits]`` (always replicated).
      mbits: mantissa width M.
      window: window extents (one per spatial dimension, 1 to 3 of them).
      strides: window strides.
      dilation: window (rhs) dilation.
      pixels: ``P``, the output pixels per sample (the kernel checks it).
      family: as for ``ffi.gemm_call``.

    Returns:
      float32 ``[D, G, N, P, O]``: the gemm of
      the patch matrix ``[D, G, N * P, prod(window) * C]`` with ``w``, the same
      bits as building it.
    """
    window, strides, dilation = (tuple(int(v) for v in t) for t in (window, strides, dilation))
    facts = lut_facts(klut, mbits, family)
    return _conv_op(int(mbits), window, strides, dilation, int(pixels), False, int(family))(
        x, w, klut, facts
    )


def conv_wgrad_call(
    x: jax.Array,
    dy: jax.Array,
    klut: jax.Array,
    mbits: int,
    window,
    strides,
    dilation,
    family: int = ffi.FAMILY_UNKNOWN,
) -> jax.Array:
    """A convolution's kernel gradient on its transposed patch matrix read in place (CPU only).

    Args:
      x: float32 ``[Gx, G, C, N, *S]``: padded, lhs-dilated, channels-first input.
      dy: float32 ``[Gd, G, N, P, O]``: the output cotangent (``P`` output pixels).
      klut, mbits, window, strides, dilation, family: as for :func:`conv_call`.

    Returns:
      float32 ``[D, G, prod(window) * C, O]``: the gemm of ``patches^T`` with
      ``dy`` (``a`` = input, ``b`` = dy), the same bits as building
      ``patches^T``.
    """
    window, strides, dilation = (tuple(int(v) for v in t) for t in (window, strides, dilation))
    rows = math.prod(window) * x.shape[2]
    facts = lut_facts(klut, mbits, family)
    return _conv_op(int(mbits), window, strides, dilation, rows, True, int(family))(
        x, dy, klut, facts
    )


def multiply_call(a: jax.Array, b: jax.Array, klut: jax.Array, mbits: int) -> jax.Array:
    """``ffi.multiply_call`` with SPMD partitioning rules (same contract).

    Args:
      a: float32 ``[Ga, n]``.
      b: float32 ``[Gb, n]``.
      klut: uint32 kernel-format LUTs ``[Gl, 4**mbits]`` (always replicated).
      mbits: mantissa width M.

    Returns:
      float32 ``[D, n]``.
    """
    return _multiply_op(int(mbits))(a, b, klut)


def match_primal_type(cotangent: jax.Array, primal: jax.Array) -> jax.Array:
    """Gives a cotangent its primal's mesh type: varying axes and Explicit sharding.

    A ``custom_vjp`` backward rule must return each cotangent with exactly
    its primal input's type.

    * Inside ``shard_map``: the varying manual axes. When a replicated
      (invariant) weight multiplies sharded (varying) activations, the
      per-device weight cotangent varies; the gradient of the invariant
      weight is its sum over those axes (what JAX's own ``pvary`` transposes
      to), so this ``psum``s the extra axes, and ``pcast``s to varying over
      axes the primal varies over but the cotangent does not.
    * With Explicit mesh axes: the sharding. A replicated operand broadcast
      against a batch-sharded one (a bias-like ``[K]`` factor of
      ``multiply``, a ``[1, H, K, N]`` ``approx_matmul`` operand) reaches the
      op replicated, but its cotangent is computed from the sharded one and
      comes out sharded like it; it is resharded to the primal's layout (the
      broadcast's transpose then sums it, as for native ops).

    Elsewhere this is the identity.

    Args:
      cotangent: The cotangent computed by a backward rule.
      primal: The primal input it belongs to (a residual).

    Returns:
      ``cotangent`` with ``primal``'s varying manual axes and sharding.
    """
    try:
        have_type, want_type = jax.typeof(cotangent), jax.typeof(primal)
    except Exception:  # noqa: BLE001 - no mesh type information
        return cotangent
    have, want = _varying(have_type), _varying(want_type)
    extra = tuple(sorted(have - want))
    if extra:
        cotangent = jax.lax.psum(cotangent, extra)
    missing = tuple(sorted(want - have))
    if missing:
        cotangent = jax.lax.pcast(cotangent, missing, to="varying")
    try:
        want_sharding = want_type.sharding
        differs = _spec_axes(have_type.sharding, cotangent.ndim) != _spec_axes(
            want_sharding, primal.ndim
        )
    except Exception:  # noqa: BLE001 - no sharding type
        return cotangent
    if differs and not want_sharding.mesh.empty and _has_explicit_axes(want_sharding.mesh):
        cotangent = jax.sharding.reshard(cotangent, want_sharding)
    return cotangent


def _has_explicit_axes(mesh) -> bool:
    types = getattr(mesh, "axis_types", ()) or ()
    return any(t == jax.sharding.AxisType.Explicit for t in types)


def _reshape_groups(in_shape, out_shape):
    """Pairs minimal runs of input and output dims with equal element counts."""
    groups = []
    i = j = 0
    while i < len(in_shape) or j < len(out_shape):
        gi, gj, pi, pj = [], [], 1, 1
        if i < len(in_shape):
            gi.append(i)
            pi *= in_shape[i]
            i += 1
        if j < len(out_shape):
            gj.append(j)
            pj *= out_shape[j]
            j += 1
        while pi != pj:
            if pi < pj and i < len(in_shape):
                gi.append(i)
                pi *= in_shape[i]
                i += 1
            elif j < len(out_shape):
                gj.append(j)
                pj *= out_shape[j]
                j += 1
            else:  # pragma: no cover - sizes always match for a valid reshape
                raise ValueError(f"cannot reshape {in_shape} into {out_shape}")
        groups.append((gi, gj))
    return groups


def reshape(x: jax.Array, shape) -> jax.Array:
    """``jnp.reshape`` that keeps Explicit-axis shardings when it can.

    With Explicit mesh axes ``jnp.reshape`` refuses to merge or split a
    sharded dimension ("This reshape is not supported"). This helper works
    out the result sharding when the sharded input dimension is the major
    (first non-unit) dimension of the run of dimensions being merged or split,
    which covers flattening a batch-sharded ``[B, T, K]`` into ``[1, 1, B*T,
    K]`` and back; any other sharded run is first made replicated (correct,
    but it all-gathers). Without Explicit axes this is ``x.reshape(shape)``.

    Args:
      x: Array to reshape.
      shape: New shape; may contain one ``-1``.

    Returns:
      ``x`` reshaped to ``shape``.
    """
    shape = tuple(int(s) for s in shape)
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        shape = tuple(x.size // max(known, 1) if s == -1 else s for s in shape)
    try:
        sharding = jax.typeof(x).sharding
        spec_axes = _spec_axes(sharding, x.ndim)
    except Exception:  # noqa: BLE001 - concrete array or no mesh
        return x.reshape(shape)
    if sharding.mesh.empty or not any(spec_axes) or 0 in x.shape:
        return x.reshape(shape)
    axis_size = dict(sharding.mesh.shape)
    out_spec: list[Any] = [None] * len(shape)
    drop = []
    for gi, gj in _reshape_groups(tuple(x.shape), shape):
        sharded = [d for d in gi if spec_axes[d]]
        if not sharded:
            continue
        major_in = next((d for d in gi if x.shape[d] != 1), None)
        major_out = next((d for d in gj if shape[d] != 1), None)
        axes = spec_axes[sharded[0]]
        shards = math.prod(axis_size[a] for a in axes)
        if sharded == [major_in] and major_out is not None and shape[major_out] % shards == 0:
            out_spec[major_out] = axes[0] if len(axes) == 1 else axes
        else:
            drop.extend(sharded)
    if drop:
        in_spec = [
            None if (d in drop or not a) else (a[0] if len(a) == 1 else a)
            for d, a in enumerate(spec_axes)
        ]
        # Shardings on x's own mesh: a bare PartitionSpec needs `jax.set_mesh`,
        # and arrays placed on an Explicit mesh (`jax.make_mesh`'s default) work
        # with jnp ops without one.
        x = jax.sharding.reshard(x, sharding.update(spec=P(*in_spec)))
    return jax.lax.reshape(x, shape, out_sharding=sharding.update(spec=P(*out_spec)))


__all__: list[Any] = ["gemm_call", "match_primal_type", "multiply_call", "reshape"]
