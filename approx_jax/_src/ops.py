"""Approximate matrix products and elementwise products (SPEC sections 2 and 5).

Layering, from the inside out:

* ``_gemm_raw(mbits)`` / ``_multiply_raw(mbits)``: the FFI custom call wrapped
  in ``jax.custom_batching.custom_vmap``. Its batching rule folds a vmapped
  axis into the kernel's *design* axis (every operand, the LUT included, has a
  leading design axis of size 1 or D that the kernel broadcasts), so
  ``vmap`` over a stack of multipliers is one custom call, never a loop of
  calls and never a copy of unbatched activations.
* ``_gemm`` / ``_multiply``: ``custom_vjp`` around those, implementing SPEC
  section 5's backward products (``backward="approx"`` or ``"exact"``). Their
  forward and backward rules call ``_gemm`` / ``_multiply`` again (not the
  raw calls), so a second derivative differentiates them by the same rule.
  Because the backward pass calls the custom_vmap functions again,
  ``vmap(grad)``, ``grad(vmap)`` and nested vmaps all stay single calls.
* ``approx_dot`` / ``approx_matmul`` / ``multiply``: public entry points that
  validate, cast to float32 and reshape into the canonical rank-4 layout.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import weakref
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from approx_jax._src import ffi, partitioning
from approx_jax._src import lut as lut_lib
from approx_jax._src import multipliers as mult_lib

BACKWARD_MODES = ("approx", "exact")
_HIGHEST = jax.lax.Precision.HIGHEST


@functools.partial(jax.jit, static_argnums=0)
def approx_jax_native(fn, *operands):
    """``fn(*operands)``: float32 products that belong to an op's configuration.

    A simulated op's ``backward="exact"`` products are part of what the user
    chose for that op, like its design; as a jit named ``NATIVE_CALL`` they
    are recognisable in a traced program, and ``approximate()`` leaves them
    native (a gradient taken inside an approximated function would otherwise
    turn them into the outer design's products). ``fn`` is static: a
    module-level function, so that eager calls hit the jit cache.
    """
    return fn(*operands)


NATIVE_CALL = approx_jax_native.__name__
_matmul_highest = functools.partial(jnp.matmul, precision=_HIGHEST)


# --------------------------------------------------------------------------
# Validation helpers shared by every op.


def resolve_multiplier(multiplier: Any) -> mult_lib.Multiplier:
    """Returns a ``Multiplier`` for a multiplier object or a name like "mbm7"."""
    if isinstance(multiplier, mult_lib.Multiplier):
        return multiplier
    if isinstance(multiplier, str):
        return mult_lib.get(multiplier)
    raise TypeError(
        f"multiplier must be an approx_jax Multiplier or a name such as 'mbm7', "
        f"got {type(multiplier).__name__}"
    )


def check_backward(backward: str) -> None:
    if backward not in BACKWARD_MODES:
        raise ValueError(f"backward must be one of {BACKWARD_MODES}, got {backward!r}")


def check_float(name: str, x: Any) -> jax.Array:
    """Returns ``x`` as a JAX array, raising TypeError unless it is floating point.

    Raises NotImplementedError for a symbolic (shape-polymorphic) shape.
    """
    if isinstance(x, int) and not isinstance(x, bool):
        # A Python int is a weakly typed scalar, as in `x * 2`: it takes the
        # other operand's float dtype like a Python float (integer arrays are
        # still refused: their values need not be exact in float32).
        x = float(x)
    if not isinstance(x, jax.Array):  # (tracers are jax.Arrays; asarray of one is a no-op)
        x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating-point dtype, got {x.dtype}")
    if not all(isinstance(d, int | np.integer) for d in x.shape):
        # The kernels' shapes, split-K and conv chunk plans are fixed at trace time.
        raise NotImplementedError(
            f"{name} has the symbolic shape {x.shape}: approx_jax ops need concrete "
            "shapes; shape-polymorphic jax.export is not supported (export with "
            "concrete shapes, one per batch size)"
        )
    return x


def kernel_lut_of(m: mult_lib.Multiplier) -> jax.Array | np.ndarray:
    """Kernel-format LUT ``u32[G, 4**M]`` of a (possibly stacked) multiplier.

    Checks the LUT against ``mbits`` here, at trace time, because a
    ``Multiplier`` built by hand (or rebuilt from a pytree) skips the
    constructors' validation, and a bad LUT must never reach the kernel.
    A NumPy LUT gives a NumPy array (cached when read-only, as the
    constructors make it); a traced or JAX one, a JAX array.
    """
    lut = m.lut
    dtype = jnp.result_type(lut)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"multiplier.lut must hold integers (stored format), got dtype {dtype}")
    if np.ndim(lut) not in (1, 2):
        raise ValueError(f"multiplier.lut must have shape [4**M] or [D, 4**M], got {np.shape(lut)}")
    if np.shape(lut)[-1] != lut_lib.num_entries(m.mbits):
        raise ValueError(
            f"multiplier.lut has {np.shape(lut)[-1]} entries per design, expected "
            f"4**M = {lut_lib.num_entries(m.mbits)} for M={m.mbits}"
        )
    if isinstance(lut, np.ndarray):
        return _kernel_lut_numpy(lut, m.mbits, rows=True)  # (one array per LUT)
    klut = _kernel_lut_converter(m.mbits)(lut)
    return klut.reshape(-1, klut.shape[-1])


@functools.cache
def _kernel_lut_converter(mbits: int):
    """``lut.kernel_lut(stored, mbits)`` whose vmap rule converts a NumPy LUT in NumPy.

    ``jax.vmap`` over a stack that the program closes over (a sweep's designs,
    ``approximate(fn, stack)``) hands the ops a batched LUT whose value is
    the stack's NumPy array. Converted with jnp, those 4^M entries per design
    were constant-folded by XLA's HLO evaluator at every compile (about 3 s
    for three M = 11 designs); the rule sees the NumPy array and returns the
    cached kernel LUT instead, a ready constant. A traced LUT (a jit
    argument) or a JAX array (which may be sharded) is converted with jnp.
    """

    @jax.custom_batching.custom_vmap
    def convert(stored):
        return lut_lib.kernel_lut(stored, mbits)

    @convert.def_vmap
    def _rule(axis_size, in_batched, stored):
        del axis_size
        (batched,) = in_batched
        if isinstance(stored, np.ndarray):
            return _kernel_lut_numpy(stored, mbits), batched
        return convert(stored), batched

    return convert


def _per_array(cache: dict, array: np.ndarray, tag: Any, make: Callable[[], Any]) -> Any:
    """``make()``, computed once per read-only ``array`` (and ``tag``) and kept in ``cache``.

    Keyed by the array's identity, held by a weak reference so that the
    entry goes with the array (a writeable array may change under the same
    identity: callers do not cache those).
    """
    entry = cache.get(id(array))
    if entry is not None and entry[0]() is array and entry[1] == tag:
        return entry[2]
    value = make()
    key = id(array)
    cache[key] = (weakref.ref(array, lambda _: cache.pop(key, None)), tag, value)
    return value


# Kernel-format LUTs of the read-only NumPy LUTs that Multipliers hold (the
# LUT, and the same as [G, 4^M] rows), per stored LUT and M. The public ops
# convert the LUT before their inner jit, so a model that closes over a
# multiplier gets a ready constant: converted inside the program, the 4^M
# entries were constant-folded by XLA's HLO evaluator at every compile (about
# 0.8 s per op at M = 11). The rows are one array per LUT, so what is cached
# per kernel LUT below (its family, its device copy) is found once per LUT.
_KERNEL_LUTS: dict[int, tuple[Any, int, tuple[np.ndarray, np.ndarray]]] = {}


def _read_only_kernel_luts(stored: np.ndarray, mbits: int) -> tuple[np.ndarray, np.ndarray]:
    klut = lut_lib.kernel_lut_numpy(stored, mbits)
    as_rows = klut.reshape(-1, klut.shape[-1])
    klut.setflags(write=False)
    as_rows.setflags(write=False)
    return klut, as_rows


def _kernel_lut_numpy(stored: np.ndarray, mbits: int, rows: bool = False) -> np.ndarray:
    """``lut.kernel_lut_numpy`` (as ``[G, 4**M]`` rows if ``rows``), cached for
    a read-only array (a writeable one may change under the same id)."""
    if stored.flags.writeable:
        klut = lut_lib.kernel_lut_numpy(stored, mbits)
        return klut.reshape(-1, klut.shape[-1]) if rows else klut
    both = _per_array(_KERNEL_LUTS, stored, mbits, lambda: _read_only_kernel_luts(stored, mbits))
    return both[1] if rows else both[0]


# Device copies of the read-only kernel LUTs, per kernel LUT.
_DEVICE_LUTS: dict[int, tuple[Any, None, jax.Array]] = {}


def _concrete_jax_array(klut: np.ndarray) -> jax.Array:
    with jax.ensure_compile_time_eval():  # a concrete array, even while tracing
        return jnp.asarray(klut)


def device_lut(klut):
    """``klut`` as a JAX array made once per read-only NumPy LUT (else ``klut``).

    The public ops hand the kernel LUT to their inner jit; a NumPy argument
    is copied to a device buffer on every eager call (16 MiB at M = 11:
    about 2 ms on the CPU whenever the array is not aligned for XLA to alias
    it, a host-to-device copy on a GPU), a JAX array is not. Inside an outer
    trace it is the same constant either way.
    """
    if not isinstance(klut, np.ndarray) or klut.flags.writeable:
        return klut
    return _per_array(_DEVICE_LUTS, klut, None, lambda: _concrete_jax_array(klut))


# xla_kernels/lut_family.h's closed-form families, in the order its
# LutFamilyBy tries them: name -> (LutFamily code, smallest M). MBM's closed
# form there holds from M = 7 on (kMbmMinBits).
_FAMILIES = {"mitchell": (1, 1), "truncate": (2, 1), "mbm": (3, 7)}
_FAMILY_NONE = 0

# closed_form_family's answers, per read-only kernel LUT and M.
_KLUT_FAMILIES: dict[int, tuple[Any, int, int]] = {}


@functools.lru_cache(maxsize=3)  # (16 MiB each at M = 11)
def _family_kernel_lut(name: str, mbits: int) -> np.ndarray:
    """A family's kernel LUT ``[1, 4**mbits]`` (read-only), SPEC section 4.

    Computed from each family's closed form in a few array operations
    (tests/test_ops.py checks it against SPEC's NumPy reference,
    ``reference.<name>_lut``, at every M): the reference takes 0.3-1.3 s at
    M = 11, paid at the first trace of every closed-over M >= 9 design.
    Mitchell's and MBM's entries depend only on a sum of the two mantissa
    indices, so they are a 1-D table indexed by that sum.
    """
    side = 1 << mbits
    idx = np.arange(side, dtype=np.int64)
    if name == "truncate":
        # p * 2^(2M) = (2^M + i)(2^M + j) in [2^(2M), 2^(2M+2)); carry c = p >= 2;
        # r = the top M fraction bits of p / 2^c (truncated).
        p = np.multiply.outer(side + idx, side + idx)
        c = p >> (2 * mbits + 1)
        r = ((p >> c) - (side << mbits)) >> mbits
    else:
        if name == "mitchell":
            # t = x + y = (i + j) / 2^M: p = 1 + t (t < 1) or 2t, so the entry's
            # carry and mantissa are the bits of i + j.
            t = np.arange(2 * side - 1, dtype=np.int64)
            c, r = t >> mbits, t & (side - 1)
            total = np.add.outer(idx, idx)
        elif name == "mbm":
            # In units of 2^-(M + 7), as reference.mbm_lut: t = x' + y' from the
            # sum s = (i | 1) + (j | 1) (even, 2 .. 2^(M+1) - 2).
            scale = mbits + 7
            one = 1 << scale
            t = np.arange(2 * side, dtype=np.int64) << 7
            g = (t - one) + (5 << (scale - 7))
            g = np.where(g >= one, t - one, g)
            p = np.where(t < one, one + t + (5 << (scale - 6)), 2 * (one + g))
            c = (p >= 2 * one).astype(np.int64)
            r = ((p >> c) - one) >> (scale - mbits)
            total = np.add.outer(idx | 1, idx | 1)
        else:
            raise ValueError(f"unknown family {name!r}")
        c, r = c[total], r[total]
    klut = ((c << 23) | (r << (23 - mbits))).astype(np.uint32).reshape(1, -1)
    klut.setflags(write=False)
    return klut


def closed_form_family(klut, mbits: int, likely: str | None = None) -> int:
    """The closed-form family the GEMM kernel may trust ``klut`` to be (``ffi.gemm_call``).

    The CPU GEMM computes a built-in family's entries (Mitchell, truncate,
    MBM) instead of loading them once it knows the LUT equals them, which it
    otherwise checks on every call: a pass over 4^M entries, 0.4-0.9 ms at
    M = 11, more than a small layer's whole GEMM. For a LUT known here (a
    read-only NumPy kernel LUT of one design, as a closed-over multiplier
    gives) the answer is found once, by comparing every entry with the
    family's LUT (``_family_kernel_lut``), and passed to the kernel as a
    static attribute. (Those LUTs and the kernel's closed forms are tested
    equal to SPEC's NumPy reference at every M.)

    Args:
      klut: kernel-format LUT ``[1, 4**mbits]`` (NumPy, read-only), or
        anything else (traced, a JAX array, a stack).
      mbits: mantissa width M.
      likely: a family name to compare first (a built-in's own).

    Returns:
      The LutFamily code (1 Mitchell, 2 truncate, 3 MBM), 0 when no family's
      entries equal ``klut``'s, or ``ffi.FAMILY_UNKNOWN`` (-1) when ``klut``
      is not a read-only NumPy LUT of one design (the kernel then checks).
    """
    if (
        not isinstance(klut, np.ndarray)
        or klut.flags.writeable
        or klut.shape != (1, lut_lib.num_entries(mbits))
        or klut.dtype != np.uint32
    ):
        return ffi.FAMILY_UNKNOWN
    return _per_array(
        _KLUT_FAMILIES, klut, mbits, lambda: _family_by_comparison(klut, mbits, likely)
    )


def _family_by_comparison(klut: np.ndarray, mbits: int, likely: str | None) -> int:
    """closed_form_family's answer, by comparing every entry with each family's."""
    side = 1 << mbits
    # The likely family first, then lut_family.h's order (a LUT equal to two
    # families' closed forms may use either: both give its entries).
    for name in sorted(_FAMILIES, key=lambda n: n != likely):
        code, min_bits = _FAMILIES[name]
        if mbits < min_bits:
            continue
        ref = _family_kernel_lut(name, mbits)
        # (Row 0 first: another LUT differs there almost always.)
        if np.array_equal(ref[0, :side], klut[0, :side]) and np.array_equal(ref, klut):
            return code
    return _FAMILY_NONE


def _family_of(m: mult_lib.Multiplier, klut) -> int:
    """``closed_form_family`` of a single design's kernel LUT, its built-in family first."""
    return closed_form_family(klut, m.mbits, dict(m.metadata).get("family"))


# --------------------------------------------------------------------------
# custom_vmap layer: design-axis folding.


def _fold_design_axis(x, batched: bool, axis_size: int, designs: int):
    """Merges a vmapped axis into the leading design axis of ``x``.

    ``x`` is ``[axis_size, G, ...]`` when batched, else ``[G, ...]``, with G in
    {1, designs}. Returns ``[axis_size * designs, ...]`` or ``[1, ...]`` (the
    latter only for unbatched operands that broadcast over every design).
    """
    if batched:
        if x.shape[1] != designs:  # G == 1 < designs: nested vmap, tile it
            x = jnp.broadcast_to(x, (axis_size, designs) + x.shape[2:])
        return x.reshape((axis_size * designs,) + x.shape[2:])
    if x.shape[0] == 1:
        return x
    x = jnp.broadcast_to(x[None], (axis_size,) + x.shape)
    return x.reshape((axis_size * x.shape[1],) + x.shape[2:])


def _design_count(args, in_batched) -> int:
    return max(x.shape[1] if b else x.shape[0] for x, b in zip(args, in_batched, strict=True))


def _merged_into_batch_axis(x, outer: int, batch: int):
    """``x [L, G, Bx, ...]`` as ``[L, outer * batch, ...]``: G and Bx merged into one batch axis.

    G is 1 or ``outer`` and Bx is 1 or ``batch``; an axis of size 1 that must
    grow is broadcast (copied), nothing else is.
    """
    full = x.shape[:1] + (outer, batch) + x.shape[3:]
    if x.shape != full:
        x = jnp.broadcast_to(x, full)
    return x.reshape(x.shape[:1] + (outer * batch,) + x.shape[3:])


def _design_fold_copies(operands, in_batched, designs: int) -> bool:
    """Whether ``_fold_design_axis`` would copy an operand (tile it over an axis).

    A batched operand shared by the designs (G = 1 < designs) is copied per
    design, an unbatched one per design (G = designs > 1: a stack's LUT) per
    vmapped example. Otherwise (a plain vmap over examples of one design) the
    design fold copies nothing, and the kernel runs it as fast as any.
    """
    return any(
        (x.shape[1] == 1 < designs) if b else (x.shape[0] == designs > 1)
        for x, b in zip(operands, in_batched, strict=True)
    )


def _gemm_examples_on_batch_axis(raw, axis_size, in_batched, operands, designs):
    """The GEMM's vmap with examples on the batch axis, or None (see _make_design_batched).

    Two cases: a vmap over examples that leaves a stack's LUT alone (the
    design fold would copy), and a vmap over designs above one over examples
    (the operands' design axis holds examples of one shared LUT, which the
    design fold would tile per design). Returns the batched ``raw`` result.
    """
    # Operands: [axis_size, G, Bx, ...] when batched, else [G, Bx, ...],
    # with G in {1, designs} and Bx in {1, batch}.
    a, b, lut = operands
    batch = max(
        x.shape[2] if t else x.shape[1] for x, t in zip((a, b), in_batched[:2], strict=True)
    )
    if not in_batched[-1] and _design_fold_copies(operands, in_batched, designs):
        # The vmapped examples join each operand's batch axis: [G, axis_size * batch, ...].
        def fold(x, batched):
            if batched:
                return _merged_into_batch_axis(jnp.moveaxis(x, 0, 1), axis_size, batch)
            return x if x.shape[1] == 1 else _merged_into_batch_axis(x[:, None], axis_size, batch)

        out = raw(fold(a, in_batched[0]), fold(b, in_batched[1]), lut)
        out = out.reshape((out.shape[0], axis_size, batch) + out.shape[2:])
        return jnp.moveaxis(out, 1, 0)
    if in_batched[-1] and lut.shape[1] == 1 and designs > 1:
        # The design axis below held examples: it joins the batch axis, and
        # the vmapped designs become the design axis: [axis_size, designs * batch, ...].
        def fold(x, batched):
            if batched:
                return _merged_into_batch_axis(x, designs, batch)
            return x if x.shape[:2] == (1, 1) else _merged_into_batch_axis(x[None], designs, batch)

        out = raw(fold(a, in_batched[0]), fold(b, in_batched[1]), lut[:, 0])
        return out.reshape((axis_size, designs, batch) + out.shape[2:])
    return None


def _make_design_batched(call, batch_axis: bool = False):
    """Wraps ``call(*operands)`` (leading design axis on every operand) in custom_vmap.

    With ``batch_axis`` (the GEMM: ``a [Ga, Ba, M, K]``, ``b [Gb, Bb, K, N]``,
    LUT last), a vmap that leaves the LUT alone folds into the operands'
    batch axis instead of the design axis when the latter would copy an
    operand: in a nested vmap (designs, then examples: per-example gradients
    of a sweep) the design axis needs every design's LUT once per example
    and a shared operand once per design (512 MiB for 2 designs x 16
    examples at M = 11); the batch axis needs neither, and every (design,
    example) product is the same GEMM. (Without copies the design fold
    stays: the kernel ran some shapes' batch axis slower, e.g. a vmap of
    32 examples of 16x784 @ 784x300 at 9.4 against 5.8 ms.)
    """

    @jax.custom_batching.custom_vmap
    def raw(*operands):
        return call(*operands)

    @raw.def_vmap
    def _rule(axis_size, in_batched, *operands):
        designs = _design_count(operands, in_batched)
        if batch_axis:
            out = _gemm_examples_on_batch_axis(raw, axis_size, in_batched, operands, designs)
            if out is not None:
                return out, True
        folded = [
            _fold_design_axis(x, b, axis_size, designs)
            for x, b in zip(operands, in_batched, strict=True)
        ]
        out = raw(*folded)
        return out.reshape((axis_size, designs) + out.shape[1:]), True

    return raw


@functools.cache
def _gemm_raw(mbits: int, family: int = ffi.FAMILY_UNKNOWN):
    return _make_design_batched(
        lambda a, b, k: partitioning.gemm_call(a, b, k, mbits, family), batch_axis=True
    )


@functools.cache
def _conv_raw(mbits: int, window, strides, dilation, pixels: int, family: int = ffi.FAMILY_UNKNOWN):
    """``partitioning.conv_call`` (CPU only) with design-axis batching."""
    return _make_design_batched(
        lambda x, w, k: partitioning.conv_call(
            x, w, k, mbits, window, strides, dilation, pixels, family
        )
    )


@functools.cache
def _conv_wgrad_raw(mbits: int, window, strides, dilation, family: int = ffi.FAMILY_UNKNOWN):
    """``partitioning.conv_wgrad_call`` (CPU only) with design-axis batching."""
    return _make_design_batched(
        lambda x, dy, k: partitioning.conv_wgrad_call(
            x, dy, k, mbits, window, strides, dilation, family
        )
    )


@functools.cache
def _multiply_raw(mbits: int):
    return _make_design_batched(lambda a, b, k: partitioning.multiply_call(a, b, k, mbits))


def _sum_to_shape(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Sums the broadcast (size-1 in ``shape``) axes of ``x`` back to ``shape``."""
    axes = tuple(
        i for i, (s, t) in enumerate(zip(shape, x.shape, strict=True)) if s == 1 and t != 1
    )
    if axes:
        x = jnp.sum(x, axis=axes, keepdims=True)
    return x


def _lut_zero_cotangent(klut):
    return np.zeros(klut.shape, dtype=jax.dtypes.float0)


# --------------------------------------------------------------------------
# custom_vjp layer.


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _gemm(a, b, klut, mbits: int, backward: str, family: int = ffi.FAMILY_UNKNOWN):
    # family: closed_form_family(klut), which holds for the transposed LUT
    # of the backward pass too (every family is symmetric).
    return _gemm_raw(mbits, family)(a, b, klut)


def _gemm_fwd(a, b, klut, mbits, backward, family=ffi.FAMILY_UNKNOWN):
    # The custom_vjp function itself, not the raw call: a second derivative
    # differentiates this forward pass (and the backward pass, which calls
    # _gemm too), so every product stays simulated to any order.
    return _gemm(a, b, klut, mbits, backward, family), (a, b, klut)


def _transposed_lut(klut: jax.Array, mbits: int) -> jax.Array:
    """``klut`` with its operands swapped: entry ``(v, u)`` holds entry ``(u, v)``."""
    side = 1 << mbits
    return jnp.swapaxes(klut.reshape(klut.shape[:-1] + (side, side)), -1, -2).reshape(klut.shape)


def _dx_by_transposed_lut(m: int, k: int, n: int, mbits: int) -> bool:
    """Whether ``dx`` is cheaper as ``(w (x)_LUT^T dy^T)^T`` than as ``dy (x) w^T``.

    For ``x`` ``[m, k]`` and ``w`` ``[k, n]``. Both give the same bits: each
    product is ``P(dy, w)`` (SPEC's product is symmetric apart from the LUT
    index, and ``LUT^T[w][dy] = LUT[dy][w]``),
    summed over the same ``N`` terms in the same order, with the same split-K
    chunks (they depend on the output's size and ``K`` only). The direct form
    transposes ``w`` (``K x N``: a dense layer's whole weight matrix, 6-9 ms
    for 1568x1024 on XLA:CPU); this one transposes ``dy``, the result and the
    LUT instead, and hands the kernel the tall ``K x N`` problem it prefers.
    """
    if mbits > 8:  # a large LUT costs more to transpose than the weights
        return False
    return m * n + m * k + (1 << (2 * mbits)) < (k * n) // 2


def _backward_products(mbits: int, backward: str, a_t, b, klut, g, family=ffi.FAMILY_UNKNOWN):
    """SPEC section 5's backward products of ``a @ b`` given ``a^T``.

    ``da = P(g, b^T)`` (``a = dy``, ``b = w``; through the transposed LUT when
    that is cheaper, same bits) and ``db = P(a^T, g)``, or float32 products
    for ``backward="exact"``. ``a_t`` is taken ready-made so that callers
    holding a cheaper route to it (the conv's directly gathered
    ``patches^T``) need not transpose ``a``.

    Returns:
      ``(da, db)`` in the canonical rank-4 layout.
    """
    if backward != "approx":
        da = approx_jax_native(_matmul_highest, g, jnp.swapaxes(b, -1, -2))
        return da, approx_jax_native(_matmul_highest, a_t, g)
    da = _input_grad(mbits, a_t.shape[-1], b, klut, g, family)
    return da, _gemm(a_t, g, klut, mbits, backward, family)


def _input_grad(mbits: int, m: int, b, klut, g, family=ffi.FAMILY_UNKNOWN):
    """``da = P(g, b^T)`` of ``a @ b`` (``a`` with ``m`` rows), as ``_backward_products``."""
    if _dx_by_transposed_lut(m, b.shape[-2], b.shape[-1], mbits):
        lut_t = _transposed_lut(klut, mbits)
        da_t = _gemm(b, jnp.swapaxes(g, -1, -2), lut_t, mbits, "approx", family)
        return jnp.swapaxes(da_t, -1, -2)
    return _gemm(g, jnp.swapaxes(b, -1, -2), klut, mbits, "approx", family)


def _gemm_bwd(mbits, backward, family, residuals, g):
    a, b, klut = residuals
    da, db = _backward_products(mbits, backward, jnp.swapaxes(a, -1, -2), b, klut, g, family)
    # A cotangent must carry its primal's mesh type (shard_map axes, Explicit sharding).
    da = partitioning.match_primal_type(_sum_to_shape(da, a.shape), a)
    db = partitioning.match_primal_type(_sum_to_shape(db, b.shape), b)
    return da, db, _lut_zero_cotangent(klut)


_gemm.defvjp(_gemm_fwd, _gemm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _multiply(a, b, klut, mbits: int, backward: str):
    return _multiply_raw(mbits)(a, b, klut)


def _multiply_fwd(a, b, klut, mbits, backward):
    # (As _gemm_fwd: differentiable again, for higher derivatives.)
    return _multiply(a, b, klut, mbits, backward), (a, b, klut)


def _multiply_bwd(mbits, backward, residuals, g):
    a, b, klut = residuals
    if backward == "approx":
        da = _multiply(g, b, klut, mbits, backward)  # d(a*b)/da = b: a = g, b = b
        db = _multiply(a, g, klut, mbits, backward)  # d(a*b)/db = a: a = a, b = g
    else:
        da, db = approx_jax_native(operator.mul, g, b), approx_jax_native(operator.mul, a, g)
    # A cotangent must carry its primal's mesh type (shard_map axes, Explicit sharding).
    da = partitioning.match_primal_type(_sum_to_shape(da, a.shape), a)
    db = partitioning.match_primal_type(_sum_to_shape(db, b.shape), b)
    return da, db, _lut_zero_cotangent(klut)


_multiply.defvjp(_multiply_fwd, _multiply_bwd)


# --------------------------------------------------------------------------
# Public ops.


def _over_stack(fn, m: mult_lib.Multiplier):
    """Maps ``fn(single_multiplier)`` over a stacked multiplier's designs (one call)."""
    # A NumPy LUT stays NumPy, so that kernel_lut_of's vmap rule converts it
    # once, outside the program.
    lut = m.lut if isinstance(m.lut, np.ndarray) else jnp.asarray(m.lut)
    return jax.vmap(lambda one: fn(dataclasses.replace(m, lut=one)))(lut)


def wider_than_float32(dtype) -> bool:
    """Whether ``dtype`` (a result dtype) is wider than float32: float64 under x64.

    SPEC section 1 casts such operands to float32 first and the result back.
    The LUT paths compute in float32 anyway; ``exact()``'s native ops check
    this so that "fp32" stays float32 products and sums under x64 too.
    """
    return jnp.finfo(dtype).bits > 32


def output_dtype(promoted, preferred_element_type):
    """The result dtype: ``preferred_element_type`` if given, else ``promoted``.

    Raises:
      TypeError: If ``preferred_element_type`` is not a floating dtype at least
        as wide as ``promoted`` (as ``lax.dot_general`` / ``lax.conv``).
    """
    if preferred_element_type is None:
        return promoted
    out = jnp.dtype(preferred_element_type)
    if not jnp.issubdtype(out, jnp.floating) or jnp.finfo(out).bits < jnp.finfo(promoted).bits:
        raise TypeError(
            f"preferred_element_type must be a floating dtype at least as wide as the "
            f"inputs ({promoted}), got {out}"
        )
    return out


def approx_dot(
    x, w, multiplier, backward: str = "approx", precision=None, preferred_element_type=None
) -> jax.Array:
    """Matrix product ``x @ w`` with every product simulated (SPEC section 5).

    ``x`` is operand ``a`` and ``w`` operand ``b`` of each product; the sum
    over K is float32 in a fixed, deterministic order.

    Args:
      x: floating array ``[..., K]`` (activations).
      w: floating array ``[K, N]`` (weights), or ``[K]`` (a matrix-vector
        product, as ``jnp.dot``: the result then has no ``N`` axis).
      multiplier: a ``Multiplier`` or a name such as ``"mbm7"``. A stacked
        multiplier of D designs gives a result with a leading axis of size D
        (computed in one custom call).
      backward: ``"approx"`` (backward products use the same multiplier, as
        ApproxTrain) or ``"exact"`` (straight-through float32 backward). The
        backward products are ops with the same rule, so ``grad`` of ``grad``
        (reverse mode over reverse mode) simulates a second derivative's
        products too; forward mode (``jax.jvp``) does not apply.
      precision: precision of the native op when the multiplier is exact.
      preferred_element_type: result dtype (a float dtype at least as wide
        as the inputs, e.g. float32 for bfloat16 operands); products and sums
        are float32 either way (SPEC section 1).

    Returns:
      ``[..., N]`` (``[...]`` for a vector ``w``; ``[D, ...]`` for a stack) in
      the promoted input dtype, or ``preferred_element_type``.

    Example:
      >>> y = approx_dot(x, w, approx_jax.multipliers.mbm(7))
    """
    m = resolve_multiplier(multiplier)
    check_backward(backward)
    x = check_float("x", x)
    w = check_float("w", w)
    if x.ndim < 1:
        raise ValueError(f"x must have rank >= 1 ([..., K]), got shape {x.shape}")
    if w.ndim not in (1, 2):
        raise ValueError(f"w must have rank 1 ([K]) or 2 ([K, N]), got shape {w.shape}")
    if x.shape[-1] != w.shape[0]:
        raise ValueError(
            f"contracting dimensions differ: x has K={x.shape[-1]} (shape {x.shape}), "
            f"w has K={w.shape[0]} (shape {w.shape})"
        )
    # (arrays, not dtypes: keeps weak types)
    out_dtype = output_dtype(jnp.result_type(x, w), preferred_element_type)
    if m.is_exact:
        if wider_than_float32(out_dtype):
            f32 = jnp.float32
            out = approx_dot(x.astype(f32), w.astype(f32), m, backward, precision)
            return out.astype(out_dtype)
        return jnp.dot(
            x,
            w,
            precision=precision if precision is not None else _HIGHEST,
            preferred_element_type=preferred_element_type,
        )
    if w.ndim == 1:  # matrix-vector: the same products and sums as one column
        return approx_dot(x, w[:, None], m, backward, preferred_element_type=out_dtype)[..., 0]
    if m.is_stack:
        return _over_stack(
            lambda one: approx_dot(x, w, one, backward, preferred_element_type=out_dtype), m
        )
    if x.size == 0 or w.size == 0:  # empty sum (K = 0) or empty result: no kernel call
        return jnp.zeros(x.shape[:-1] + (w.shape[1],), out_dtype)
    klut = kernel_lut_of(m)
    family = _family_of(m, klut)
    return _dot_single(
        x, w, device_lut(klut), mbits=m.mbits, backward=backward, out_dtype=out_dtype, family=family
    )


# The single-design bodies of the public ops run under jit: called eagerly,
# an op is then one cached dispatch instead of a retrace of its custom_vjp /
# custom_vmap layers on every call (2.2 ms -> tens of microseconds for a small
# product). Inside an outer jit, grad or vmap the nested jit is inlined. They
# take the kernel LUT made outside (kernel_lut_of: once per NumPy LUT), so a
# closed-over multiplier reaches XLA as a ready constant.
@functools.partial(jax.jit, static_argnames=("mbits", "backward", "out_dtype", "family"))
def _dot_single(x, w, klut, *, mbits, backward, out_dtype, family):
    lead = x.shape[:-1]
    k = x.shape[-1]
    a4 = partitioning.reshape(x.astype(jnp.float32), (1, 1, -1, k))
    b4 = partitioning.reshape(w.astype(jnp.float32), (1, 1, k, w.shape[1]))
    out = _gemm(a4, b4, klut, mbits, backward, family)
    return partitioning.reshape(out, lead + (w.shape[1],)).astype(out_dtype)


def _flatten_batch(x: jax.Array, batch_shape: tuple[int, ...]) -> jax.Array:
    """``[..., R, C]`` -> ``[1, B or 1, R, C]`` broadcasting to ``batch_shape``."""
    own = x.shape[:-2]
    if all(s == 1 for s in own):
        return partitioning.reshape(x, (1, 1, *x.shape[-2:]))
    x = jnp.broadcast_to(x, batch_shape + x.shape[-2:])
    return partitioning.reshape(x, (1, -1, *x.shape[-2:]))


def approx_matmul(
    a, b, multiplier, backward: str = "approx", precision=None, preferred_element_type=None
) -> jax.Array:
    """Batched matrix product ``a @ b`` with simulated products (attention case).

    Broadcasts leading batch dimensions like ``jnp.matmul``; ``a`` supplies
    operand ``a`` of every product. As in ``jnp.matmul``, a 1-D ``a`` is a
    row vector and a 1-D ``b`` a column vector, whose unit axis is dropped
    from the result.

    Args:
      a: floating array ``[..., M, K]`` or ``[K]``.
      b: floating array ``[..., K, N]`` or ``[K]``.
      multiplier: a ``Multiplier`` or a name such as ``"mbm7"`` (a stack gives a
        leading design axis).
      backward: ``"approx"`` or ``"exact"`` (see ``approx_dot``).
      precision: precision of the native op when the multiplier is exact.
      preferred_element_type: result dtype (see ``approx_dot``).

    Returns:
      ``[..., M, N]`` in the promoted input dtype or ``preferred_element_type``
      (without ``M`` / ``N`` for a 1-D ``a`` / ``b``; with a leading design
      axis for a stack).
    """
    m = resolve_multiplier(multiplier)
    check_backward(backward)
    a = check_float("a", a)
    b = check_float("b", b)
    for name, operand in (("a", a), ("b", b)):
        if operand.ndim < 1:
            raise ValueError(
                f"{name} must have rank >= 1 for approx_matmul, got shape {operand.shape}"
            )
    b_k = b.shape[0] if b.ndim == 1 else b.shape[-2]
    if a.shape[-1] != b_k:
        raise ValueError(
            f"contracting dimensions differ: a {a.shape} has K={a.shape[-1]}, "
            f"b {b.shape} has K={b_k}"
        )
    if a.ndim == 1 or b.ndim == 1:  # vectors, as jnp.matmul: add a unit axis, drop it after
        out = approx_matmul(
            a[None, :] if a.ndim == 1 else a,
            b[:, None] if b.ndim == 1 else b,
            multiplier,
            backward,
            precision,
            preferred_element_type,
        )
        unit_axes = (-2,) * (a.ndim == 1) + (-1,) * (b.ndim == 1)
        return jnp.squeeze(out, unit_axes)
    try:
        batch_shape = tuple(np.broadcast_shapes(a.shape[:-2], b.shape[:-2]))
    except ValueError as err:
        raise ValueError(f"batch dimensions of {a.shape} and {b.shape} do not broadcast") from err
    # (arrays, not dtypes: keeps weak types)
    out_dtype = output_dtype(jnp.result_type(a, b), preferred_element_type)
    if m.is_exact:
        if wider_than_float32(out_dtype):
            f32 = jnp.float32
            out = approx_matmul(a.astype(f32), b.astype(f32), m, backward, precision)
            return out.astype(out_dtype)
        return jnp.matmul(
            a,
            b,
            precision=precision if precision is not None else _HIGHEST,
            preferred_element_type=preferred_element_type,
        )
    if m.is_stack:
        return _over_stack(
            lambda one: approx_matmul(a, b, one, backward, preferred_element_type=out_dtype), m
        )
    if a.size == 0 or b.size == 0:
        return jnp.zeros(batch_shape + (a.shape[-2], b.shape[-1]), out_dtype)
    klut = kernel_lut_of(m)
    return _matmul_single(
        a,
        b,
        device_lut(klut),
        mbits=m.mbits,
        backward=backward,
        out_dtype=out_dtype,
        batch_shape=batch_shape,
        family=_family_of(m, klut),
    )


@functools.partial(
    jax.jit, static_argnames=("mbits", "backward", "out_dtype", "batch_shape", "family")
)
def _matmul_single(a, b, klut, *, mbits, backward, out_dtype, batch_shape, family):
    a4 = _flatten_batch(a.astype(jnp.float32), batch_shape)
    b4 = _flatten_batch(b.astype(jnp.float32), batch_shape)
    out = _gemm(a4, b4, klut, mbits, backward, family)
    out = partitioning.reshape(out, batch_shape + (a.shape[-2], b.shape[-1]))
    return out.astype(out_dtype)


def multiply(a, b, multiplier, backward: str = "approx") -> jax.Array:
    """Elementwise simulated product ``a * b`` with NumPy broadcasting.

    Args:
      a: floating array (operand ``a``, the LUT's high address half).
      b: floating array (operand ``b``), broadcast-compatible with ``a``.
      multiplier: a ``Multiplier`` or a name such as ``"mitchell5"`` (a stack
        gives a leading design axis).
      backward: ``"approx"`` or ``"exact"`` for the gradient products.

    Returns:
      The broadcast product in the promoted input dtype.
    """
    m = resolve_multiplier(multiplier)
    check_backward(backward)
    a = check_float("a", a)
    b = check_float("b", b)
    try:
        shape = tuple(np.broadcast_shapes(a.shape, b.shape))
    except ValueError as err:
        raise ValueError(f"shapes {a.shape} and {b.shape} do not broadcast") from err
    out_dtype = jnp.result_type(a, b)  # arrays, not dtypes: keeps weak types
    if m.is_exact:
        if wider_than_float32(out_dtype):
            return (a.astype(jnp.float32) * b.astype(jnp.float32)).astype(out_dtype)
        return a * b
    if m.is_stack:
        return _over_stack(lambda one: multiply(a, b, one, backward), m)
    if int(np.prod(shape)) == 0:
        return jnp.zeros(shape, out_dtype)
    return _multiply_single(
        a,
        b,
        device_lut(kernel_lut_of(m)),
        mbits=m.mbits,
        backward=backward,
        out_dtype=out_dtype,
        shape=shape,
    )


@functools.partial(jax.jit, static_argnames=("mbits", "backward", "out_dtype", "shape"))
def _multiply_single(a, b, klut, *, mbits, backward, out_dtype, shape):
    a2 = partitioning.reshape(jnp.broadcast_to(a.astype(jnp.float32), shape), (1, -1))
    b2 = partitioning.reshape(jnp.broadcast_to(b.astype(jnp.float32), shape), (1, -1))
    out = _multiply(a2, b2, klut, mbits, backward)
    return partitioning.reshape(out, shape).astype(out_dtype)
