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

from approx_jax._src.nn import attention as attention_lib
from approx_jax._src.nn import hooks


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
        if self.dot_general is None and self.dot_general_cls is None:
            object.__setattr__(
                self, "dot_general", hooks.dot_general(self.multiplier, self.backward)
            )
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
        if self.conv_general_dilated is None and self.conv_general_dilated_cls is None:
            object.__setattr__(
                self,
                "conv_general_dilated",
                hooks.conv_general_dilated(self.multiplier, self.backward),
            )
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
        if self.attention_fn is linen.dot_product_attention:
            object.__setattr__(
                self,
                "attention_fn",
                attention_lib.AttentionFn(self.multiplier, self.backward, flavor="linen"),
            )
        if self.qkv_dot_general is None and self.qkv_dot_general_cls is None:
            object.__setattr__(
                self, "qkv_dot_general", hooks.dot_general(self.multiplier, self.backward)
            )
        if self.out_dot_general is None and self.out_dot_general_cls is None:
            object.__setattr__(
                self, "out_dot_general", hooks.dot_general(self.multiplier, self.backward)
            )
        super().__post_init__()
