"""Flax linen layers with simulated approximate multipliers.

``Dense``, ``Conv``, ``MultiHeadDotProductAttention`` (and
``MultiHeadAttention``, its other name, as in linen; subclasses of the linen
layers with extra ``multiplier`` / ``backward`` fields) and
``dot_product_attention`` (linen flavour).

Example:
  >>> import approx_jax.nn.linen as aln
  >>> model = aln.Dense(10, multiplier="mbm7")
"""

from approx_jax._src.nn.attention import linen_dot_product_attention as dot_product_attention
from approx_jax._src.nn.hooks import conv_general_dilated, dot_general
from approx_jax._src.nn.linen_layers import (
    Conv,
    Dense,
    MultiHeadAttention,
    MultiHeadDotProductAttention,
)

__all__ = [
    "Conv",
    "Dense",
    "MultiHeadAttention",
    "MultiHeadDotProductAttention",
    "conv_general_dilated",
    "dot_general",
    "dot_product_attention",
]
