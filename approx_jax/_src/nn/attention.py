"""Dot-product attention with simulated products in QK^T and weights x V."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen, nnx

from approx_jax._src import ops
from approx_jax._src.nn import hooks


def _attention_core(
    query,
    key,
    value,
    bias,
    mask,
    broadcast_dropout,
    dropout_rng,
    dropout_rate,
    deterministic,
    dtype,
    multiplier,
    backward,
    is_causal=False,
    sow=None,
    force_fp32_for_softmax=False,
):
    """Flax's dot-product attention with both matrix products approximated."""
    if multiplier.is_stack:  # one evaluation per design, one custom call each
        if sow is not None:
            raise ValueError("cannot sow attention weights for a stack of multipliers")
        return ops._over_stack(
            lambda one: _attention_core(
                query,
                key,
                value,
                bias,
                mask,
                broadcast_dropout,
                dropout_rng,
                dropout_rate,
                deterministic,
                dtype,
                one,
                backward,
                is_causal=is_causal,
                force_fp32_for_softmax=force_fp32_for_softmax,
            ),
            multiplier,
        )
    query, key, value, dtype = _prepared(query, key, value, dtype)
    depth = query.shape[-1]
    query = query / jnp.sqrt(depth).astype(dtype)
    # [..., q, h, d] @ [..., k, h, d]^T -> [..., h, q, k]; a = query, b = key.
    qh = jnp.swapaxes(query, -3, -2)
    kh = jnp.moveaxis(key, -3, -1)
    attn_weights = ops.approx_matmul(qh, kh, multiplier, backward)

    if bias is not None:
        attn_weights = attn_weights + bias
    if mask is not None or is_causal:
        big_neg = jnp.finfo(dtype).min
        masks = [mask] if mask is not None else []
        if is_causal:
            t_len, s_len = attn_weights.shape[-2:]
            causal = jnp.tril(jnp.ones((t_len, s_len), dtype=dtype))
            target = mask.shape if mask is not None else attn_weights.shape
            masks.append(jnp.broadcast_to(causal, target))
        combined = nnx.combine_masks(*masks, dtype=dtype)
        attn_weights = jnp.where(combined, attn_weights, big_neg)
    if force_fp32_for_softmax and dtype != jnp.float32:
        attn_weights = jax.nn.softmax(attn_weights.astype(jnp.float32))
    else:
        attn_weights = jax.nn.softmax(attn_weights).astype(dtype)
    if sow is not None:
        sow(attn_weights)
    if not deterministic and dropout_rate > 0.0:
        keep_prob = 1.0 - dropout_rate
        if broadcast_dropout:
            dropout_shape = (1,) * (key.ndim - 2) + attn_weights.shape[-2:]
        else:
            dropout_shape = attn_weights.shape
        keep = jax.random.bernoulli(dropout_rng, keep_prob, dropout_shape)
        attn_weights = attn_weights * (keep.astype(dtype) / jnp.asarray(keep_prob, dtype=dtype))
    # [..., h, q, k] @ [..., h, k, d] -> [..., h, q, d]; a = weights, b = value.
    out = ops.approx_matmul(attn_weights, jnp.swapaxes(value, -3, -2), multiplier, backward)
    out = jnp.swapaxes(out, -3, -2)
    if force_fp32_for_softmax and dtype != jnp.float32:
        return out  # float32 weights x value: float32, as linen.dot_product_attention
    return out.astype(dtype)


def _attention_core_jax_order(
    query, key, value, bias, mask, dtype, multiplier, backward, is_causal
):
    """Attention in ``jax.nn.dot_product_attention``'s order, both products simulated.

    What ``nnx.dot_product_attention`` computes without dropout and without
    a module to sow into (it hands over to ``jax.nn.dot_product_attention``,
    XLA implementation): float32 logits of the *unscaled* query, then the
    scale, bias and mask (``-0.7 * float32 max``), a float32 softmax cast to
    the inputs' dtype, then the weights times the value. The scale
    ``1/sqrt(depth)`` is not a power of two for most depths, so scaling
    before or after the simulated product gives other products.
    """
    if multiplier.is_stack:  # one evaluation per design, one custom call each
        return ops._over_stack(
            lambda one: _attention_core_jax_order(
                query, key, value, bias, mask, dtype, one, backward, is_causal
            ),
            multiplier,
        )
    query, key, value, dtype = _prepared(query, key, value, dtype)
    depth = query.shape[-1]
    # [..., q, h, d] @ [..., k, h, d]^T -> [..., h, q, k]; a = query, b = key.
    # (float32 logits, as jax's preferred_element_type: the products of
    # narrower inputs are those of their float32 values.)
    qh = jnp.swapaxes(query, -3, -2).astype(jnp.float32)
    kh = jnp.moveaxis(key, -3, -1).astype(jnp.float32)
    logits = ops.approx_matmul(qh, kh, multiplier, backward)
    logits = logits * jnp.asarray(1.0 / np.sqrt(depth), jnp.float32)
    if bias is not None:
        logits = (logits + bias).astype(logits.dtype)
    if mask is not None or is_causal:
        combined = jnp.ones_like(logits, dtype=bool)
        if mask is not None:
            combined = jnp.logical_and(combined, jnp.asarray(mask).astype(bool))
        if is_causal:
            t_len, s_len = logits.shape[-2:]
            combined = jnp.logical_and(combined, jnp.tril(jnp.ones((t_len, s_len), dtype=bool)))
        large_negative = jnp.asarray(-0.7 * np.finfo(np.float32).max, jnp.float32)
        logits = jnp.where(combined, logits, large_negative)
    probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
    # [..., h, q, k] @ [..., h, k, d] -> [..., h, q, d]; a = weights, b = value.
    out = ops.approx_matmul(probs, jnp.swapaxes(value, -3, -2), multiplier, backward)
    return jnp.swapaxes(out, -3, -2).astype(dtype)


def _prepared(query, key, value, dtype):
    """Checked ``query``, ``key``, ``value`` in the computation dtype (key and
    value heads repeated for grouped-query attention), and that dtype."""
    query = ops.check_float("query", query)
    key = ops.check_float("key", key)
    value = ops.check_float("value", value)
    if dtype is None:
        dtype = jnp.result_type(query.dtype, key.dtype, value.dtype)
    query, key, value = (jnp.asarray(t, dtype) for t in (query, key, value))
    if not query.ndim == key.ndim == value.ndim or query.ndim < 3:
        raise ValueError(
            "query, key and value must have the same rank >= 3 ([batch..., length, heads, "
            f"depth]), got shapes {query.shape}, {key.shape}, {value.shape}"
        )
    if not query.shape[:-3] == key.shape[:-3] == value.shape[:-3]:
        raise ValueError(
            f"query, key, value batch dims must match, got {query.shape}, {key.shape}, "
            f"{value.shape}"
        )
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(f"q, k depths must match, but got {query.shape[-1]} and {key.shape[-1]}.")
    if key.shape[-3] != value.shape[-3]:
        raise ValueError(f"k, v lengths must match, but got {key.shape[-3]} and {value.shape[-3]}.")
    q_heads = query.shape[-2]
    for name, t in (("key", key), ("value", value)):
        if q_heads % t.shape[-2]:
            raise ValueError(
                f"query heads ({q_heads}) must be a multiple of {name} heads ({t.shape[-2]})"
            )
    # Grouped-query attention: query head h uses kv head h // n_rep, as in Flax.
    if key.shape[-2] != q_heads:
        key = jnp.repeat(key, q_heads // key.shape[-2], axis=-2)
    if value.shape[-2] != q_heads:
        value = jnp.repeat(value, q_heads // value.shape[-2], axis=-2)
    return query, key, value, dtype


def dot_product_attention(
    query,
    key,
    value,
    bias=None,
    mask=None,
    broadcast_dropout: bool = True,
    dropout_rng=None,
    dropout_rate: float = 0.0,
    deterministic: bool = False,
    dtype=None,
    precision: Any = None,
    module=None,
    promote_dtype=None,
    is_causal: bool = False,
    *,
    multiplier="fp32",
    backward: str = "approx",
):
    """Dot-product attention with simulated products (``nnx.dot_product_attention``).

    Both matrix products are simulated, in the order
    ``nnx.dot_product_attention`` computes them: without dropout
    (``dropout_rate == 0``) and without a ``module`` it hands over to
    ``jax.nn.dot_product_attention``, whose logits are ``query @ key^T``
    (operand ``a`` = query, ``b`` = key) in float32, scaled by
    ``1/sqrt(depth)`` afterwards, with a float32 softmax; otherwise the
    logits are ``(query / sqrt(depth)) @ key^T`` (``a`` = scaled query), as
    in ``linen``. The two differ where ``1/sqrt(depth)`` is not a power of
    two. The output is ``weights @ value`` (``a`` = attention weight, ``b`` =
    value). Masking, bias, softmax and dropout are Flax's. Grouped-query
    attention (fewer key / value heads) is supported. With the exact
    multiplier the call is forwarded to ``flax.nnx.dot_product_attention``
    unchanged (bit-identical results).

    Args:
      query: ``[batch..., q_length, num_heads, depth]``.
      key: ``[batch..., kv_length, num_kv_heads, depth]``.
      value: ``[batch..., kv_length, num_kv_heads, v_depth]`` (Flax's own
        function, which the exact multiplier calls, needs ``v_depth ==
        depth``).
      bias: optional bias broadcastable to ``[batch..., heads, q_length, kv_length]``.
      mask: optional boolean mask of that shape (False = masked out).
      broadcast_dropout: broadcast dropout over batch and heads.
      dropout_rng: PRNG key for dropout.
      dropout_rate: dropout rate.
      deterministic: disable dropout.
      dtype: computation dtype (default: promoted input dtype).
      precision: forwarded for the exact multiplier only.
      module: an nnx Module to sow the attention weights into
        (``nnx.Intermediate``, name ``attention_weights``).
      promote_dtype: ``promote_dtype((query, key, value), dtype=dtype)``
        applied first, as in Flax (default: promotion to ``dtype`` or the
        inputs' common dtype).
      is_causal: apply a causal mask.
      multiplier: a ``Multiplier`` or a name (default ``"fp32"``); a stack of
        D designs gives a leading design axis.
      backward: ``"approx"`` (default) or ``"exact"`` gradient products.

    Returns:
      ``[batch..., q_length, num_heads, v_depth]`` (``[D, ...]`` for a stack).

    Example:
      >>> out = approx_jax.nn.dot_product_attention(q, k, v, multiplier="mbm7")
    """
    m = ops.resolve_multiplier(multiplier)
    ops.check_backward(backward)
    if m.is_exact:
        kwargs = {} if promote_dtype is None else {"promote_dtype": promote_dtype}
        return nnx.dot_product_attention(
            query,
            key,
            value,
            bias,
            mask,
            broadcast_dropout,
            dropout_rng,
            dropout_rate,
            deterministic,
            dtype,
            precision,
            module,
            is_causal=is_causal,
            **kwargs,
        )
    if promote_dtype is not None:
        # A caller's promotion (mixed precision) runs first, as in Flax, which
        # then computes in the promoted query's dtype.
        query, key, value = promote_dtype((query, key, value), dtype=dtype)
        dtype = jnp.result_type(query)
    if dropout_rate == 0.0 and module is None:
        # Flax's own condition for handing over to jax.nn.dot_product_attention.
        return _attention_core_jax_order(
            query, key, value, bias, mask, dtype, m, backward, is_causal
        )
    sow = None
    if module is not None:

        def sow(w):
            module.sow(nnx.Intermediate, "attention_weights", w)

    return _attention_core(
        query,
        key,
        value,
        bias,
        mask,
        broadcast_dropout,
        dropout_rng,
        dropout_rate,
        deterministic,
        dtype,
        m,
        backward,
        is_causal=is_causal,
        sow=sow,
    )


def linen_dot_product_attention(
    query,
    key,
    value,
    bias=None,
    mask=None,
    broadcast_dropout: bool = True,
    dropout_rng=None,
    dropout_rate: float = 0.0,
    deterministic: bool = False,
    dtype=None,
    precision: Any = None,
    module=None,
    force_fp32_for_softmax: bool = False,
    einsum_dot_general=None,
    qk_attn_weights_einsum=None,
    attn_weights_value_einsum=None,
    *,
    multiplier="fp32",
    backward: str = "approx",
):
    """Linen flavour of :func:`dot_product_attention` (``linen.dot_product_attention``).

    Same products as :func:`dot_product_attention`; attention weights are sown
    into linen's ``intermediates`` collection when ``module`` is given. With
    the exact multiplier the call goes to ``flax.linen.dot_product_attention``.

    Args:
      query: ``[batch..., q_length, num_heads, depth]``.
      key: ``[batch..., kv_length, num_heads, depth]``.
      value: ``[batch..., kv_length, num_heads, v_depth]``.
      bias: optional attention bias.
      mask: optional boolean mask.
      broadcast_dropout: broadcast dropout over batch and heads.
      dropout_rng: PRNG key for dropout.
      dropout_rate: dropout rate.
      deterministic: disable dropout.
      dtype: computation dtype.
      precision: forwarded for the exact multiplier only.
      module: linen Module to sow the weights into.
      force_fp32_for_softmax: compute the softmax in float32.
      einsum_dot_general: exact multiplier only (as Flax; an error otherwise).
      qk_attn_weights_einsum: exact multiplier only (as Flax; an error otherwise).
      attn_weights_value_einsum: exact multiplier only (as Flax; an error
        otherwise).
      multiplier: a ``Multiplier`` or a name (default ``"fp32"``).
      backward: ``"approx"`` (default) or ``"exact"``.

    Returns:
      ``[batch..., q_length, num_heads, v_depth]``.

    Example:
      >>> from approx_jax.nn import linen as aln
      >>> out = aln.dot_product_attention(q, k, v, multiplier="mitchell5")
    """
    m = ops.resolve_multiplier(multiplier)
    ops.check_backward(backward)
    if not m.is_exact:
        given = {
            "einsum_dot_general": einsum_dot_general,
            "qk_attn_weights_einsum": qk_attn_weights_einsum,
            "attn_weights_value_einsum": attn_weights_value_einsum,
        }
        given = [name for name, hook in given.items() if hook is not None]
        if given:
            # The simulated products would silently replace these hooks.
            raise ValueError(
                f"{', '.join(given)}: for the exact multiplier only; with multiplier "
                f"{m.name!r} every attention product is the simulated one"
            )
    if m.is_exact:
        return linen.dot_product_attention(
            query,
            key,
            value,
            bias,
            mask,
            broadcast_dropout,
            dropout_rng,
            dropout_rate,
            deterministic,
            dtype,
            precision,
            module,
            force_fp32_for_softmax=force_fp32_for_softmax,
            einsum_dot_general=einsum_dot_general,
            qk_attn_weights_einsum=qk_attn_weights_einsum,
            attn_weights_value_einsum=attn_weights_value_einsum,
        )
    sow = None
    if module is not None:

        def sow(w):
            module.sow("intermediates", "attention_weights", w)

    return _attention_core(
        query,
        key,
        value,
        bias,
        mask,
        broadcast_dropout,
        dropout_rng,
        dropout_rate,
        deterministic,
        dtype,
        m,
        backward,
        sow=sow,
        force_fp32_for_softmax=force_fp32_for_softmax,
    )


class AttentionFn:
    """An attention function with a fixed multiplier (a static Flax hook).

    Calls :func:`dot_product_attention` (``flavor="nnx"``) or
    ``approx_jax.nn.linen.dot_product_attention`` (``flavor="linen"``). Its
    ``__signature__`` is that of the underlying function minus the keyword-only
    multiplier arguments, because linen filters keyword arguments by signature.

    Example:
      >>> attn = nnx.MultiHeadAttention(
      ...     num_heads=4, in_features=64, decode=False, rngs=nnx.Rngs(0),
      ...     attention_fn=approx_jax.nn.AttentionFn("mbm7"))
    """

    def __init__(self, multiplier="fp32", backward: str = "approx", flavor: str = "nnx"):
        import inspect

        self.multiplier = ops.resolve_multiplier(multiplier)
        ops.check_backward(backward)
        hooks.check_not_stack(self.multiplier)
        self.backward = backward
        if flavor not in ("nnx", "linen"):
            raise ValueError(f"flavor must be 'nnx' or 'linen', got {flavor!r}")
        self._fn = dot_product_attention if flavor == "nnx" else linen_dot_product_attention
        sig = inspect.signature(self._fn)
        self.__signature__ = sig.replace(
            parameters=[p for p in sig.parameters.values() if p.kind != p.KEYWORD_ONLY]
        )

    def __call__(self, *args, **kwargs):
        return self._fn(*args, multiplier=self.multiplier, backward=self.backward, **kwargs)

    def __repr__(self):
        return f"AttentionFn({self.multiplier!r}, backward={self.backward!r})"

    # By value, as hooks.Hook: identical layers share one trace.
    def __eq__(self, other):
        if not isinstance(other, AttentionFn):
            return NotImplemented
        mine = (self.multiplier, self.backward, self._fn)
        return mine == (other.multiplier, other.backward, other._fn)

    def __hash__(self):
        return hash((AttentionFn, self.multiplier, self.backward, self._fn))
