"""Flax nnx layers whose products are simulated by an approximate multiplier.

Each layer subclasses its Flax counterpart and only installs the hooks
(``dot_general``, ``conv_general_dilated``, ``attention_fn``), so parameter
names, shapes and initialisation are Flax's: state can be moved between a
Flax layer and the approximate one with ``nnx.state`` / ``nnx.update``. With
``multiplier="fp32"`` the hooks call the same lax functions with the same
arguments as Flax, so outputs are bit-identical.
"""

from __future__ import annotations

from flax import nnx

from approx_jax._src import ops
from approx_jax._src.nn import attention as attention_lib
from approx_jax._src.nn import hooks


class _ApproxMixin:
    """``multiplier`` / ``backward`` read from the hook the layer calls.

    Assigning ``layer.multiplier = "mitchell5"`` installs new hooks (same
    backward mode); the parameters stay.
    """

    _hook_attr = "dot_general"
    # Builds the hook __init__ passes to Flax under `_hook_attr`, and
    # _install for a new multiplier.
    _make_hook = staticmethod(hooks.dot_general)

    def _hook(self):
        return getattr(self, self._hook_attr)

    def _install(self, multiplier, backward) -> None:
        setattr(self, self._hook_attr, self._make_hook(multiplier, backward))

    @property
    def multiplier(self):
        """The layer's ``Multiplier`` (assignable: a Multiplier or a name)."""
        return self._hook().multiplier

    @multiplier.setter
    def multiplier(self, multiplier):
        self._install(ops.resolve_multiplier(multiplier), self.backward)

    @property
    def backward(self) -> str:
        """The layer's backward mode (``"approx"`` or ``"exact"``)."""
        return self._hook().backward

    def __setattr__(self, name, value):
        if name == "multiplier":
            # Straight to the property: nnx.Module.__setattr__ rejects array
            # data (a Multiplier's LUT) on an attribute it takes for static
            # before any property setter runs.
            _ApproxMixin.multiplier.fset(self, value)
            return
        super().__setattr__(name, value)


class Linear(_ApproxMixin, nnx.Linear):
    """``nnx.Linear`` with simulated products (``x`` = operand ``a``, kernel = ``b``).

    Args:
      in_features: number of input features.
      out_features: number of output features.
      multiplier: a ``Multiplier`` or a name such as ``"mbm7"`` (default
        ``"fp32"``: native products, identical to ``nnx.Linear``).
      backward: ``"approx"`` (default; gradient products use the multiplier,
        as ApproxTrain) or ``"exact"`` (float32 gradient products).
      **kwargs: every other ``nnx.Linear`` argument (``use_bias``,
        ``kernel_init``, ``rngs``, ...). ``dot_general`` must not be given.

    Returns:
      A module; calling it on ``[..., in_features]`` returns ``[..., out_features]``.

    Example:
      >>> layer = approx_jax.nn.Linear(784, 300, multiplier="mbm7", rngs=nnx.Rngs(0))
      >>> y = layer(jnp.ones((8, 784)))  # (8, 300)
    """

    def __init__(
        self, in_features, out_features, *, multiplier="fp32", backward="approx", **kwargs
    ):
        _reject(kwargs, "dot_general", "dot_general_cls")
        super().__init__(
            in_features, out_features, dot_general=self._make_hook(multiplier, backward), **kwargs
        )


Dense = Linear


class LinearGeneral(_ApproxMixin, nnx.LinearGeneral):
    """``nnx.LinearGeneral`` with simulated products (input = operand ``a``).

    Args:
      in_features: input feature size(s) (contracted axes).
      out_features: output feature size(s).
      multiplier: a ``Multiplier`` or a name (default ``"fp32"``: identical
        to ``nnx.LinearGeneral``).
      backward: ``"approx"`` (default) or ``"exact"``.
      **kwargs: every other ``nnx.LinearGeneral`` argument (``axis``,
        ``batch_axis``, ``use_bias``, ``rngs``, ...). ``dot_general`` must
        not be given.

    Returns:
      A module contracting the ``axis`` dimensions of its input.

    Example:
      >>> proj = approx_jax.nn.LinearGeneral(64, (4, 16), multiplier="mbm7", rngs=nnx.Rngs(0))
      >>> y = proj(jnp.ones((2, 10, 64)))  # (2, 10, 4, 16)
    """

    def __init__(
        self, in_features, out_features, *, multiplier="fp32", backward="approx", **kwargs
    ):
        _reject(kwargs, "dot_general", "dot_general_cls")
        super().__init__(
            in_features, out_features, dot_general=self._make_hook(multiplier, backward), **kwargs
        )


def _einsum_hook(multiplier, backward):
    from approx_jax._src.transform import einsum_hook  # noqa: PLC0415 (import cycle)

    return einsum_hook(multiplier, backward)


class Einsum(_ApproxMixin, nnx.Einsum):
    """``nnx.Einsum`` with simulated products (the input = operand ``a``).

    Args:
      einsum_str: the equation, input first, kernel second (``"bd,dh->bh"``).
      kernel_shape: the kernel's shape.
      bias_shape: the bias's shape, or ``None`` for no bias.
      multiplier: a ``Multiplier`` or a name (default ``"fp32"``: identical
        to ``nnx.Einsum``).
      backward: ``"approx"`` (default) or ``"exact"``.
      **kwargs: every other ``nnx.Einsum`` argument (``rngs``, ``dtype``,
        ...). ``einsum_op`` must not be given (``approx_jax.nn.einsum(m)`` is
        that hook, for a plain ``nnx.Einsum``).

    Returns:
      A module computing ``einsum(einsum_str, inputs, kernel) + bias``.

    Example:
      >>> layer = approx_jax.nn.Einsum("bd,dh->bh", (784, 300), multiplier="mbm7",
      ...                              rngs=nnx.Rngs(0))
      >>> y = layer(jnp.ones((8, 784)))  # (8, 300)
    """

    _hook_attr = "einsum_op"
    _make_hook = staticmethod(_einsum_hook)

    def __init__(
        self,
        einsum_str,
        kernel_shape,
        bias_shape=None,
        *,
        multiplier="fp32",
        backward="approx",
        **kwargs,
    ):
        _reject(kwargs, "einsum_op")
        super().__init__(
            einsum_str,
            kernel_shape,
            bias_shape,
            einsum_op=self._make_hook(multiplier, backward),
            **kwargs,
        )


class Conv(_ApproxMixin, nnx.Conv):
    """``nnx.Conv`` with simulated products (input = operand ``a``, kernel = ``b``).

    Args:
      in_features: number of input channels.
      out_features: number of output channels.
      kernel_size: window shape (an int for 1-D).
      strides: strides (int or sequence), as ``nnx.Conv``.
      multiplier: a ``Multiplier`` or a name (default ``"fp32"``: identical
        to ``nnx.Conv``).
      backward: ``"approx"`` (default) or ``"exact"``.
      **kwargs: every other ``nnx.Conv`` argument (``padding``,
        ``input_dilation``, ``kernel_dilation``, ``feature_group_count``,
        ``use_bias``, ``rngs``, ...). ``conv_general_dilated`` must not be given.

    Returns:
      A module mapping ``[batch, *spatial, in_features]`` (channels-last) to
      ``[batch, *out_spatial, out_features]``.

    Example:
      >>> conv = approx_jax.nn.Conv(1, 32, (5, 5), multiplier="mitchell5", rngs=nnx.Rngs(0))
      >>> y = conv(jnp.ones((8, 28, 28, 1)))  # (8, 28, 28, 32)
    """

    _hook_attr = "conv_general_dilated"
    _make_hook = staticmethod(hooks.conv_general_dilated)

    def __init__(
        self,
        in_features,
        out_features,
        kernel_size,
        strides=1,
        *,
        multiplier="fp32",
        backward="approx",
        **kwargs,
    ):
        _reject(kwargs, "conv_general_dilated")
        super().__init__(
            in_features,
            out_features,
            kernel_size,
            strides,
            conv_general_dilated=self._make_hook(multiplier, backward),
            **kwargs,
        )


class MultiHeadAttention(_ApproxMixin, nnx.MultiHeadAttention):
    """``nnx.MultiHeadAttention`` with every product simulated.

    The query/key/value and output projections use the :func:`dot_general`
    hook and the attention itself :func:`dot_product_attention` (both
    ``QK^T`` and ``weights @ V`` simulated); all with the same multiplier.

    Args:
      num_heads: number of attention heads.
      in_features: input feature size.
      *args: further positional ``nnx.MultiHeadAttention`` arguments
        (``qkv_features``, ``out_features``, ...).
      multiplier: a ``Multiplier`` or a name (default ``"fp32"``: identical
        to ``nnx.MultiHeadAttention``).
      backward: ``"approx"`` (default) or ``"exact"``.
      **kwargs: every other ``nnx.MultiHeadAttention`` argument (``rngs``,
        ``decode``, ``dropout_rate``, ...); ``attention_fn`` and the
        ``*_dot_general*`` hooks must not be given.

    Returns:
      A module; ``mha(inputs_q)`` returns ``[batch..., length, out_features]``.

    Example:
      >>> mha = approx_jax.nn.MultiHeadAttention(4, 64, multiplier="mbm7",
      ...                                        decode=False, rngs=nnx.Rngs(0))
      >>> y = mha(jnp.ones((2, 16, 64)))  # (2, 16, 64)
    """

    def _hook(self):
        # The hook the output projection calls (the out_dot_general attribute
        # is only the configuration it was built from).
        return self.out.dot_general

    def _install(self, multiplier, backward) -> None:
        hook = self._make_hook(multiplier, backward)
        for projection in (self.query, self.key, self.value, self.out):
            projection.dot_general = hook
        self.qkv_dot_general = self.out_dot_general = hook
        self.attention_fn = attention_lib.AttentionFn(multiplier, backward, flavor="nnx")

    def __init__(
        self, num_heads, in_features, *args, multiplier="fp32", backward="approx", **kwargs
    ):
        _reject(
            kwargs,
            "attention_fn",
            "qkv_dot_general",
            "out_dot_general",
            "qkv_dot_general_cls",
            "out_dot_general_cls",
        )
        m = ops.resolve_multiplier(multiplier)
        super().__init__(
            num_heads,
            in_features,
            *args,
            attention_fn=attention_lib.AttentionFn(m, backward, flavor="nnx"),
            qkv_dot_general=self._make_hook(m, backward),
            out_dot_general=self._make_hook(m, backward),
            **kwargs,
        )


def _reject(kwargs, *names):
    for name in names:
        if name in kwargs:
            raise TypeError(
                f"{name!r} is set by approx_jax layers from `multiplier`; use the Flax "
                "layer directly to install a custom hook"
            )
