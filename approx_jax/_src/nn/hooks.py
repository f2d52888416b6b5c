"""Drop-in replacements for ``lax.dot_general`` / ``lax.conv_general_dilated``.

Flax layers accept the primitive they use as a hook (``nnx.Linear(
dot_general=...)``, ``nnx.Conv(conv_general_dilated=...)``, the linen
equivalents, and the attention projections). The callables built here have
the ``lax`` signatures and simulate every product with a multiplier; with the
exact multiplier they forward every argument unchanged to the ``lax``
function, so results are bit-identical to Flax's defaults.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from approx_jax._src import conv as conv_lib
from approx_jax._src import ops, partitioning


def _normalize_axes(axes, ndim: int, what: str) -> tuple[int, ...]:
    # lax.dot_general accepts a bare int for a single axis; wrap it so the
    # same dimension_numbers work here.
    if isinstance(axes, int | np.integer):
        axes = (axes,)
    out = []
    for a in tuple(axes):
        a = int(a)
        if not -ndim <= a < ndim:
            raise ValueError(f"{what} axis {a} is out of range for rank {ndim}")
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"{what} axes {tuple(axes)} contain duplicates")
    return tuple(out)


def approx_dot_general(
    lhs,
    rhs,
    dimension_numbers,
    multiplier,
    backward: str = "approx",
    precision: Any = None,
    preferred_element_type: Any = None,
) -> jax.Array:
    """``lax.dot_general`` with simulated products (``lhs`` = operand ``a``).

    General dimension numbers are reduced to a batched matrix product: the
    batch dimensions of both operands are flattened into one axis, ``lhs``'s
    free dimensions into rows, the contracting dimensions into ``K`` and
    ``rhs``'s free dimensions into columns; the result is reshaped to
    ``lax.dot_general``'s output layout (batch, lhs free, rhs free).

    Args:
      lhs: floating array (activations; operand ``a`` of every product).
      rhs: floating array (weights; operand ``b``).
      dimension_numbers: ``((lhs_contract, rhs_contract), (lhs_batch, rhs_batch))``.
      multiplier: a ``Multiplier`` or a name (a stack adds a leading design axis).
      backward: ``"approx"`` or ``"exact"``.
      precision: precision of the native op for the exact multiplier.
      preferred_element_type: output dtype (default: promoted input dtype).

    Returns:
      The product in ``lax.dot_general``'s output layout.
    """
    m = ops.resolve_multiplier(multiplier)
    ops.check_backward(backward)
    lhs = ops.check_float("lhs", lhs)
    rhs = ops.check_float("rhs", rhs)
    if m.is_exact:
        return lax.dot_general(
            lhs,
            rhs,
            dimension_numbers,
            precision=precision,
            preferred_element_type=preferred_element_type,
        )
    if m.is_stack:
        return ops._over_stack(
            lambda one: approx_dot_general(
                lhs,
                rhs,
                dimension_numbers,
                one,
                backward,
                preferred_element_type=preferred_element_type,
            ),
            m,
        )
    try:
        (lc, rc), (lb, rb) = dimension_numbers
    except (TypeError, ValueError) as err:
        raise ValueError(
            "dimension_numbers must be ((lhs_contracting, rhs_contracting), "
            f"(lhs_batch, rhs_batch)), got {dimension_numbers!r}"
        ) from err
    lc = _normalize_axes(lc, lhs.ndim, "lhs contracting")
    rc = _normalize_axes(rc, rhs.ndim, "rhs contracting")
    lb = _normalize_axes(lb, lhs.ndim, "lhs batch")
    rb = _normalize_axes(rb, rhs.ndim, "rhs batch")
    if len(lc) != len(rc) or len(lb) != len(rb):
        raise ValueError(f"mismatched dimension_numbers {dimension_numbers!r}")
    if set(lc) & set(lb) or set(rc) & set(rb):
        raise ValueError(f"an axis is both batch and contracting in {dimension_numbers!r}")
    for a, b in zip(lc + lb, rc + rb, strict=True):
        if lhs.shape[a] != rhs.shape[b]:
            raise ValueError(
                f"lhs axis {a} (size {lhs.shape[a]}) and rhs axis {b} (size {rhs.shape[b]}) "
                f"are paired by dimension_numbers {dimension_numbers!r} but differ in size"
            )
    lf = tuple(d for d in range(lhs.ndim) if d not in lc and d not in lb)
    rf = tuple(d for d in range(rhs.ndim) if d not in rc and d not in rb)
    batch_shape = tuple(lhs.shape[d] for d in lb)
    lf_shape = tuple(lhs.shape[d] for d in lf)
    rf_shape = tuple(rhs.shape[d] for d in rf)
    k = math.prod(lhs.shape[d] for d in lc)
    b = math.prod(batch_shape)
    # partitioning.reshape: keeps a sharded batch (Explicit mesh axes) sharded.
    a3 = partitioning.reshape(jnp.transpose(lhs, lb + lf + lc), (b, math.prod(lf_shape), k))
    b3 = partitioning.reshape(jnp.transpose(rhs, rb + rc + rf), (b, k, math.prod(rf_shape)))
    if preferred_element_type is not None:
        # The kernel sums in float32: hand the result over in float32 rather
        # than rounding it to the (maybe narrower) input dtype first. (The
        # casts are exact: the kernel sees float32 operands either way.)
        a3, b3 = a3.astype(jnp.float32), b3.astype(jnp.float32)
    if not lb:
        out = ops.approx_matmul(a3[0], b3[0], m, backward)
    else:
        out = ops.approx_matmul(a3, b3, m, backward)
    out = partitioning.reshape(out, batch_shape + lf_shape + rf_shape)
    if preferred_element_type is not None:
        out = out.astype(preferred_element_type)
    return out


class Hook:
    """Base of the layer hooks: a single multiplier and a backward mode.

    The multiplier and backward mode are fixed at construction; a hook is a
    plain callable (not a pytree), so Flax treats it as static.

    Attributes:
      multiplier: the resolved ``Multiplier``.
      backward: ``"approx"`` or ``"exact"``.
    """

    def __init__(self, multiplier="fp32", backward: str = "approx"):
        self.multiplier = ops.resolve_multiplier(multiplier)
        ops.check_backward(backward)
        check_not_stack(self.multiplier)
        self.backward = backward

    def __repr__(self):
        return f"{type(self).__name__}({self.multiplier!r}, backward={self.backward!r})"

    # Equal hooks compute the same function: a Flax graph definition (nnx) or
    # a linen module holding one then keys jit caches by value, so a freshly
    # built layer with the same design does not retrace.
    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return (self.multiplier, self.backward) == (other.multiplier, other.backward)

    def __hash__(self):
        return hash((type(self), self.multiplier, self.backward))


class DotGeneral(Hook):
    """A ``lax.dot_general``-compatible callable simulating a multiplier.

    Built by :func:`dot_general`.

    Example:
      >>> dense = nn.Dense(10, dot_general=approx_jax.nn.dot_general("mbm7"))
    """

    def __call__(
        self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs
    ):
        if self.multiplier.is_exact:
            # Exactly the call Flax makes by default (bit-identical results).
            return lax.dot_general(
                lhs,
                rhs,
                dimension_numbers,
                precision=precision,
                preferred_element_type=preferred_element_type,
                **kwargs,
            )
        check_not_stack(self.multiplier)
        return approx_dot_general(
            lhs,
            rhs,
            dimension_numbers,
            self.multiplier,
            self.backward,
            preferred_element_type=preferred_element_type,
        )


class ConvGeneralDilated(Hook):
    """A ``lax.conv_general_dilated``-compatible callable simulating a multiplier.

    Built by :func:`conv_general_dilated`. ``dimension_numbers=None`` keeps
    lax's meaning (NCHW/OIHW), unlike :func:`approx_conv`'s channels-last
    default.

    Example:
      >>> conv = nn.Conv(32, (5, 5),
      ...                conv_general_dilated=approx_jax.nn.conv_general_dilated("mbm7"))
    """

    def __call__(
        self,
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=None,
        rhs_dilation=None,
        dimension_numbers=None,
        feature_group_count=1,
        batch_group_count=1,
        precision=None,
        preferred_element_type=None,
        **kwargs,
    ):
        if self.multiplier.is_exact:
            return lax.conv_general_dilated(
                lhs,
                rhs,
                window_strides,
                padding,
                lhs_dilation=lhs_dilation,
                rhs_dilation=rhs_dilation,
                dimension_numbers=dimension_numbers,
                feature_group_count=feature_group_count,
                batch_group_count=batch_group_count,
                precision=precision,
                preferred_element_type=preferred_element_type,
                **kwargs,
            )
        check_not_stack(self.multiplier)
        if dimension_numbers is None:  # lax's default, not approx_conv's
            dimension_numbers = lax.conv_dimension_numbers(jnp.shape(lhs), jnp.shape(rhs), None)
        return conv_lib.approx_conv(
            lhs,
            rhs,
            self.multiplier,
            window_strides=window_strides,
            padding=padding,
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            feature_group_count=feature_group_count,
            batch_group_count=batch_group_count,
            dimension_numbers=dimension_numbers,
            backward=self.backward,
            preferred_element_type=preferred_element_type,
        )


def check_not_stack(m) -> None:
    if m.is_stack:
        raise ValueError(
            "a layer hook needs a single multiplier, got a stack of "
            f"{m.num_designs} designs; jax.vmap over the stack instead "
            "(e.g. jax.vmap(lambda m: model.apply(params, x, m))(stack))"
        )


def dot_general(multiplier="fp32", backward: str = "approx") -> DotGeneral:
    """Returns a ``lax.dot_general`` replacement that simulates ``multiplier``.

    The returned function accepts ``(lhs, rhs, dimension_numbers,
    precision=None, preferred_element_type=None, **kwargs)`` (``out_sharding``
    and other keywords Flax passes are forwarded to lax for the exact
    multiplier and ignored otherwise). ``lhs`` supplies operand ``a`` of each
    product (the activation in a Dense layer), ``rhs`` operand ``b``.

    Args:
      multiplier: a ``Multiplier`` or a name such as ``"mbm7"`` (default
        ``"fp32"``, which calls ``lax.dot_general`` unchanged).
      backward: ``"approx"`` (default) or ``"exact"`` gradient products.

    Returns:
      A :class:`DotGeneral` callable.

    Example:
      >>> layer = nnx.Linear(784, 300, dot_general=approx_jax.nn.dot_general("mbm7"),
      ...                    rngs=nnx.Rngs(0))
    """
    return DotGeneral(multiplier, backward)


def conv_general_dilated(multiplier="fp32", backward: str = "approx") -> ConvGeneralDilated:
    """Returns a ``lax.conv_general_dilated`` replacement simulating ``multiplier``.

    Same signature as ``lax.conv_general_dilated`` (plus ``**kwargs`` such as
    ``out_sharding``); input activation = operand ``a``, kernel = operand ``b``.

    Args:
      multiplier: a ``Multiplier`` or a name (default ``"fp32"``: the lax op).
      backward: ``"approx"`` (default) or ``"exact"``.

    Returns:
      A :class:`ConvGeneralDilated` callable.

    Example:
      >>> conv = nnx.Conv(1, 32, (5, 5), rngs=nnx.Rngs(0),
      ...                 conv_general_dilated=approx_jax.nn.conv_general_dilated("mbm7"))
    """
    return ConvGeneralDilated(multiplier, backward)
