"""Flax linen layers whose products are simulated by an approximate multiplier.

Each layer subclasses its linen counterpart (same class name, so automatic
submodule names such as ``Dense_0`` match) and adds two fields,
``multiplier`` and ``backward``; ``__post_init__`` installs the hooks. Params
are therefore Flax's, and with ``multiplier="fp32"`` outputs are bit-identical.
Multiplier fields may hold traced LUTs when the module is built inside a
transformed function (``jax.vmap`` over designs).
"""

from __future__ import annotations

from typing import Any

from flax import linen

from approx_jax._src import ops
from approx_jax._src.nn import attention as attention_lib
from approx_jax._src.nn import hooks

# Marks the hooks a layer installs for its own multiplier: a copy of the layer
# (``clone``, ``dataclasses.replace``) carries them over and must replace them
# with hooks for its (maybe changed) multiplier and backward mode.
_OWN_HOOK = "_approx_jax_layer_hook"


def _hook_field(module, field: str, factory) -> dict:
    """``{field: (factory, is_unset)}`` for a hook field with a ``<field>_cls`` twin."""
    unset = getattr(module, field + "_cls") is None
    return {
        field: (
            lambda: factory(module.multiplier, module.backward),
            lambda hook: hook is None and unset,
        )
    }


def _install_hooks(module, hooks_by_field: dict) -> None:
    """Sets each ``field -> (factory, is_unset)`` hook of a linen layer.

    A field the user left unset gets ``factory()``; a field holding a hook
    installed for an earlier configuration (a copy) gets a fresh one; a hook
    the user passed is kept, unless the layer is also given an approximate
    multiplier, which that hook would silently ignore: that is an error.
    """
    approximate = not ops.resolve_multiplier(module.multiplier).is_exact
    for field, (factory, is_unset) in hooks_by_field.items():
        current = getattr(module, field)
        if is_unset(current) or getattr(current, _OWN_HOOK, False):
            hook = factory()
            setattr(hook, _OWN_HOOK, True)
            object.__setattr__(module, field, hook)
        elif approximate:
            raise ValueError(
                f"{type(module).__name__}: pass either multiplier= or {field}=, not both "
                f"(the {field} hook given would compute every product instead of the "
                "multiplier)"
            )


class Dense(linen.Dense):
    """``linen.Dense`` with simulated products (inputs = operand ``a``).

    Attributes:
      features: number of output features.
      multiplier: a ``Multiplier`` or a name (default ``"fp32"``: identical to
        ``linen.Dense``).
      backward: ``"approx"`` (default) or ``"exact"``.
      (all other ``linen.Dense`` attributes.)

    Example:
      >>> model = approx_jax.nn.linen.Dense(10, multiplier="mbm7")
      >>> params = model.init(jax.random.key(0), jnp.ones((1, 784)))
      >>> y = model.apply(params, jnp.ones((8, 784)))  # (8, 10)
    """

    multiplier: Any = "fp32"
    backward: str = "approx"

    def __post_init__(self):
        _install_hooks(self, _hook_field(self, "dot_general", hooks.dot_general))
        super().__post_init__()


class Conv(linen.Conv):
    """``linen.Conv`` with simulated products (input = operand ``a``, kernel = ``b``).

    Attributes:
      features: number of output channels.
      kernel_size: window shape.
      multiplier: a ``Multiplier`` or a name (default ``"fp32"``: identical to
        ``linen.Conv``).
      backward: ``"approx"`` (default) or ``"exact"``.
      (all other ``linen.Conv`` attributes: ``strides``, ``padding``, ...)

    Example:
      >>> conv = approx_jax.nn.linen.Conv(32, (5, 5), multiplier="mitchell5")
      >>> params = conv.init(jax.random.key(0), jnp.ones((1, 28, 28, 1)))
      >>> y = conv.apply(params, jnp.ones((8, 28, 28, 1)))  # (8, 28, 28, 32)
    """

    multiplier: Any = "fp32"
    backward: str = "approx"

    def __post_init__(self):
        _install_hooks(self, _hook_field(self, "conv_general_dilated", hooks.conv_general_dilated))
        super().__post_init__()


class MultiHeadDotProductAttention(linen.MultiHeadDotProductAttention):
    """``linen.MultiHeadDotProductAttention`` with every product simulated.

    Projections use the :func:`dot_general` hook; the attention uses
    :func:`approx_jax.nn.linen.dot_product_attention` (``QK^T`` and ``weights @ V``).

    Attributes:
      num_heads: number of heads.
      multiplier: a ``Multiplier`` or a name (default ``"fp32"``: identical to
        the linen layer).
      backward: ``"approx"`` (default) or ``"exact"``.
      (all other ``linen.MultiHeadDotProductAttention`` attributes.)

    Example:
      >>> mha = approx_jax.nn.linen.MultiHeadDotProductAttention(4, multiplier="mbm7")
      >>> params = mha.init(jax.random.key(0), jnp.ones((2, 16, 64)))
      >>> y = mha.apply(params, jnp.ones((2, 16, 64)))  # (2, 16, 64)
    """

    multiplier: Any = "fp32"
    backward: str = "approx"

    def __post_init__(self):
        _install_hooks(
            self,
            {
                "attention_fn": (
                    lambda: attention_lib.AttentionFn(
                        self.multiplier, self.backward, flavor="linen"
                    ),
                    lambda fn: fn is linen.dot_product_attention,
                ),
                **_hook_field(self, "qkv_dot_general", hooks.dot_general),
                **_hook_field(self, "out_dot_general", hooks.dot_general),
            },
        )
        if not ops.resolve_multiplier(self.multiplier).is_exact:
            for field in ("qk_attn_weights_einsum_cls", "attn_weights_value_einsum_cls"):
                if getattr(self, field, None) is not None:
                    raise ValueError(
                        f"{type(self).__name__}: pass either multiplier= or {field}=, not both "
                        "(the attention products are the simulated ones)"
                    )
        super().__post_init__()


class MultiHeadAttention(MultiHeadDotProductAttention, linen.MultiHeadAttention):
    """:class:`MultiHeadDotProductAttention` under linen's other name.

    As ``linen.MultiHeadAttention``: the same layer, whose automatic name in
    a compact module is ``MultiHeadAttention_<i>`` (so a Flax checkpoint of a
    ``linen.MultiHeadAttention`` loads as it is), and an instance of it (code
    that checks ``isinstance(m, linen.MultiHeadAttention)`` finds it).

    Example:
      >>> mha = approx_jax.nn.linen.MultiHeadAttention(4, multiplier="mbm7")
      >>> params = mha.init(jax.random.key(0), jnp.ones((2, 16, 64)))
    """
