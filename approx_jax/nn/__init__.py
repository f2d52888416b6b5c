"""Flax layers and hooks with simulated approximate multipliers.

nnx layers (subclasses of the Flax ones; same parameters):
  ``Linear`` (alias ``Dense``), ``Conv``, ``MultiHeadAttention``.
Functions: ``dot_product_attention``, ``approx_dot_general``.
Hook factories for any Flax layer: ``dot_general(multiplier)``,
``conv_general_dilated(multiplier)``, ``einsum(multiplier)`` (``nnx.Einsum``).
Linen layers: ``approx_jax.nn.linen`` (``Dense``, ``Conv``,
``MultiHeadDotProductAttention``, ``dot_product_attention``).

Example:
  >>> from flax import nnx
  >>> import approx_jax.nn as ann
  >>> layer = ann.Linear(784, 300, multiplier="mbm7", rngs=nnx.Rngs(0))
"""

from approx_jax._src.nn import (
    AttentionFn,
    Conv,
    ConvGeneralDilated,
    Dense,
    DotGeneral,
    Linear,
    MultiHeadAttention,
    approx_dot_general,
    conv_general_dilated,
    dot_general,
    dot_product_attention,
)
from approx_jax._src.transform import Einsum
from approx_jax._src.transform import einsum_hook as einsum
from approx_jax.nn import linen

__all__ = [
    "AttentionFn",
    "Conv",
    "ConvGeneralDilated",
    "Dense",
    "DotGeneral",
    "Einsum",
    "Linear",
    "MultiHeadAttention",
    "approx_dot_general",
    "conv_general_dilated",
    "dot_general",
    "dot_product_attention",
    "einsum",
    "linen",
]
