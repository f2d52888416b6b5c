"""Flax layers and hooks with simulated approximate multipliers.

nnx layers (subclasses of the Flax ones; same parameters):
  ``Linear`` (alias ``Dense``), ``LinearGeneral``, ``Einsum``, ``Conv``,
  ``MultiHeadAttention`` (``layer.multiplier = "mitchell5"`` switches design).
Functions: ``dot_product_attention``, ``approx_dot_general``.
Hook factories for any Flax layer: ``dot_general(multiplier)``,
``conv_general_dilated(multiplier)``, ``einsum(multiplier)`` (``nnx.Einsum``'s
``einsum_op``; an ``EinsumOp``).
Linen layers: ``approx_jax.nn.linen`` (``Dense``, ``Conv``,
``MultiHeadDotProductAttention`` / ``MultiHeadAttention``, ``dot_product_attention``).

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
    Einsum,
    Linear,
    LinearGeneral,
    MultiHeadAttention,
    approx_dot_general,
    conv_general_dilated,
    dot_general,
    dot_product_attention,
)
from approx_jax._src.transform import EinsumOp
from approx_jax._src.transform import einsum_hook as einsum
from approx_jax.nn import linen

__all__ = [
    "AttentionFn",
    "Conv",
    "ConvGeneralDilated",
    "Dense",
    "DotGeneral",
    "Einsum",
    "EinsumOp",
    "Linear",
    "LinearGeneral",
    "MultiHeadAttention",
    "approx_dot_general",
    "conv_general_dilated",
    "dot_general",
    "dot_product_attention",
    "einsum",
    "linen",
]
