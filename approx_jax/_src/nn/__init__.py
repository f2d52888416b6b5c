"""Flax integration: lax-compatible hooks, attention, nnx and linen layers."""

from approx_jax._src.nn.attention import (
    AttentionFn,
    dot_product_attention,
    linen_dot_product_attention,
)
from approx_jax._src.nn.hooks import (
    ConvGeneralDilated,
    DotGeneral,
    approx_dot_general,
    conv_general_dilated,
    dot_general,
)
from approx_jax._src.nn.nnx_layers import (
    Conv,
    Dense,
    Einsum,
    Linear,
    LinearGeneral,
    MultiHeadAttention,
)

__all__ = [
    "AttentionFn",
    "Conv",
    "ConvGeneralDilated",
    "Dense",
    "DotGeneral",
    "Einsum",
    "Linear",
    "LinearGeneral",
    "MultiHeadAttention",
    "approx_dot_general",
    "conv_general_dilated",
    "dot_general",
    "dot_product_attention",
    "linen_dot_product_attention",
]
