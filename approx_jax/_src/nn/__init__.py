"""Flax integration: lax-compatible hooks, attention, nnx and linen layers."""

from approx_jax._src.nn.attention import AttentionFn
from approx_jax._src.nn.attention import dot_product_attention
from approx_jax._src.nn.attention import linen_dot_product_attention
from approx_jax._src.nn.hooks import ConvGeneralDilated
from approx_jax._src.nn.hooks import DotGeneral
from approx_jax._src.nn.hooks import approx_dot_general
from approx_jax._src.nn.hooks import conv_general_dilated
from approx_jax._src.nn.hooks import dot_general
from approx_jax._src.nn.nnx_layers import Conv
from approx_jax._src.nn.nnx_layers import Dense
from approx_jax._src.nn.nnx_layers import Linear
from approx_jax._src.nn.nnx_layers import MultiHeadAttention
