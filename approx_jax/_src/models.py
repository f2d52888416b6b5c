"""Reference models with a functional interface (used by the CLI and sweeps).

``create(name)`` returns a :class:`Model` whose ``init``/``apply`` are pure
functions of a params pytree, so they compose with ``jax.jit``, ``jax.grad``
and ``jax.vmap`` over ``(params, multiplier)`` (one model per design, trained
in one vmapped step). The linen module is built inside ``apply`` from the
multiplier passed in, so a LUT that is a tracer (under ``vmap``) is fine.

No model carries batch statistics: the ResNets are normalisation-free, with
residual branches scaled by a learned scalar initialised to zero (SkipInit,
De & Smith 2020), which keeps plain conv-ReLU ResNets trainable; the ViT uses
LayerNorm (per-example). Only the products of convolutions, dense layers and
attention are simulated; pooling, normalisation, bias additions and the
residual scalar are ordinary float32.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from approx_jax._src import multipliers as mult_lib
from approx_jax._src import ops
from approx_jax._src.nn import linen_layers as aln
from approx_jax._src.partitioning import reshape  # keeps Explicit batch shardings

KINDS = ("conv", "dense", "attention")


# --------------------------------------------------------------------------
# Multiplier assignment.


def resolve_kinds(multiplier) -> dict[str, mult_lib.Multiplier]:
    """Maps every layer kind to a ``Multiplier``.

    Args:
      multiplier: a ``Multiplier`` or name (used for every kind), or a dict
        from kind (``"conv"``, ``"dense"``, ``"attention"``) to a Multiplier
        or name; missing kinds get ``"fp32"``.

    Returns:
      Dict with exactly the keys of ``KINDS``.

    Raises:
      ValueError: For an unknown kind.
      TypeError: For an invalid multiplier.
    """
    if isinstance(multiplier, Mapping):
        unknown = set(multiplier) - set(KINDS)
        if unknown:
            raise ValueError(
                f"unknown layer kind(s) {sorted(unknown)} in multiplier dict; valid kinds: {KINDS}"
            )
        return {k: ops.resolve_multiplier(multiplier.get(k, "fp32")) for k in KINDS}
    m = ops.resolve_multiplier(multiplier)
    return {k: m for k in KINDS}


# --------------------------------------------------------------------------
# Pooling.


@jax.custom_vjp
def _max_pool_2x2(x):
    """2x2 max pool with stride 2 of ``[N, H, W, C]`` (H and W even)."""
    n, h, w, c = x.shape
    return reshape(x, (n, h // 2, 2, w // 2, 2, c)).max(axis=(2, 4))


def _max_pool_2x2_fwd(x):
    return _max_pool_2x2(x), x


def _max_pool_2x2_bwd(x, ct):
    # The gradient goes to the first maximum of each window in row-major
    # order: what lax.reduce_window's select_and_scatter gives (it keeps the
    # earlier element on ties), computed as a mask rather than through
    # XLA:CPU's index-tracking reduce_window, which cost a LeNet-5 step ~15 ms.
    n, h, w, c = x.shape
    windows = reshape(x, (n, h // 2, 2, w // 2, 2, c)).transpose(0, 1, 3, 5, 2, 4)
    first = jnp.argmax(reshape(windows, (n, h // 2, w // 2, c, 4)), axis=-1)
    mask = first[..., None] == jnp.arange(4)
    dx = jnp.where(mask, ct[..., None], jnp.zeros((), ct.dtype))
    dx = reshape(dx, (n, h // 2, w // 2, c, 2, 2)).transpose(0, 1, 4, 2, 5, 3)
    return (reshape(dx, x.shape),)


_max_pool_2x2.defvjp(_max_pool_2x2_fwd, _max_pool_2x2_bwd)


def max_pool(x, window, strides, padding="SAME"):
    """``flax.linen.max_pool`` with a cheaper gradient for 2x2/2 windows that tile the input.

    Same values and the same gradient (first maximum of each window) as
    ``nn.max_pool``; any other geometry calls it.
    """
    if (
        tuple(window) == (2, 2)
        and tuple(strides) == (2, 2)
        and x.ndim == 4
        and x.shape[1] % 2 == 0
        and x.shape[2] % 2 == 0
    ):
        return _max_pool_2x2(x)
    return nn.max_pool(x, tuple(window), strides=tuple(strides), padding=padding)


def _flatten(x):
    """Flattens ``[N, ...]`` to ``[N, features]``, also for an empty batch.

    The feature size is computed explicitly: ``reshape(N, -1)`` cannot infer
    ``-1`` when ``N`` is 0 (it divides by the batch size).
    """
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))


# --------------------------------------------------------------------------
# Modules.


class _Net(nn.Module):
    """Base: holds per-kind multipliers and the backward mode."""

    mults: Any  # dict kind -> Multiplier
    backward: str = "approx"
    num_classes: int = 10

    def conv(self, features, kernel_size, strides=1, padding="SAME", name=None):
        return aln.Conv(
            features,
            kernel_size,
            strides=strides,
            padding=padding,
            multiplier=self.mults["conv"],
            backward=self.backward,
            name=name,
        )

    def dense(self, features, name=None):
        return aln.Dense(
            features, multiplier=self.mults["dense"], backward=self.backward, name=name
        )


class LeNet300(_Net):
    """LeNet-300-100: flatten -> 300 ReLU -> 100 ReLU -> classes."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = _flatten(x)
        x = nn.relu(self.dense(300)(x))
        x = nn.relu(self.dense(100)(x))
        return self.dense(self.num_classes)(x)


class LeNet5(_Net):
    """ApproxTrain's MNIST CNN: 2 x (conv5x5x32 SAME ReLU, maxpool 2) -> 1024 -> classes."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(self.conv(32, (5, 5))(x))
        x = max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
        x = nn.relu(self.conv(32, (5, 5))(x))
        x = max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
        x = _flatten(x)
        x = nn.relu(self.dense(1024)(x))
        return self.dense(self.num_classes)(x)


class BasicBlock(nn.Module):
    """Normalisation-free residual block: relu(shortcut + s * conv(relu(conv(x))))."""

    features: int
    strides: int
    mults: Any
    backward: str = "approx"

    def conv(self, features, kernel_size, strides, name):
        return aln.Conv(
            features,
            kernel_size,
            strides=strides,
            padding="SAME",
            multiplier=self.mults["conv"],
            backward=self.backward,
            name=name,
        )

    @nn.compact
    def __call__(self, x):
        y = nn.relu(self.conv(self.features, (3, 3), self.strides, "conv1")(x))
        y = self.conv(self.features, (3, 3), 1, "conv2")(y)
        scale = self.param("skip_scale", nn.initializers.zeros, (), jnp.float32)
        if self.strides != 1 or x.shape[-1] != self.features:
            x = self.conv(self.features, (1, 1), self.strides, "shortcut")(x)
        return nn.relu(x + scale * y)


class ResNet(_Net):
    """Normalisation-free ResNet (SkipInit residual scaling)."""

    stem_features: int = 16
    stem_kernel: Sequence[int] = (3, 3)
    stem_strides: int = 1
    stem_pool: bool = False
    stages: Sequence[tuple[int, int, int]] = ((16, 1, 1), (32, 1, 2), (64, 1, 2))

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(
            self.conv(self.stem_features, tuple(self.stem_kernel), self.stem_strides, name="stem")(
                x
            )
        )
        if self.stem_pool:
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        for s, (features, blocks, strides) in enumerate(self.stages):
            for b in range(blocks):
                x = BasicBlock(
                    features,
                    strides if b == 0 else 1,
                    self.mults,
                    self.backward,
                    name=f"stage{s}_block{b}",
                )(x)
        x = jnp.mean(x, axis=(1, 2))
        return self.dense(self.num_classes, name="head")(x)


class ViT(_Net):
    """A small Vision Transformer (pre-LayerNorm, mean-pooled tokens).

    Patch embedding is a strided convolution (``"conv"`` multiplier); the
    attention blocks (query/key/value/output projections, ``QK^T`` and
    ``weights @ V``) use the ``"attention"`` multiplier; the MLPs and the head
    the ``"dense"`` multiplier. LayerNorm, GELU and softmax are float32.
    """

    patch: int = 7
    dim: int = 64
    depth: int = 2
    heads: int = 4
    mlp_dim: int = 128

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = self.conv(self.dim, (self.patch, self.patch), self.patch, "VALID", name="embed")(x)
        b, h, w, c = x.shape
        x = x.reshape(b, h * w, c)
        pos = self.param("pos_embedding", nn.initializers.normal(0.02), (1, h * w, c))
        x = x + pos
        for i in range(self.depth):
            y = nn.LayerNorm(name=f"block{i}_ln1")(x)
            y = aln.MultiHeadDotProductAttention(
                self.heads,
                multiplier=self.mults["attention"],
                backward=self.backward,
                name=f"block{i}_attention",
            )(y)
            x = x + y
            y = nn.LayerNorm(name=f"block{i}_ln2")(x)
            y = nn.gelu(self.dense(self.mlp_dim, name=f"block{i}_mlp1")(y))
            x = x + self.dense(self.dim, name=f"block{i}_mlp2")(y)
        x = nn.LayerNorm(name="final_ln")(jnp.mean(x, axis=1))
        return self.dense(self.num_classes, name="head")(x)


def _lenet300(mults, backward, num_classes):
    return LeNet300(mults, backward, num_classes)


def _lenet5(mults, backward, num_classes):
    return LeNet5(mults, backward, num_classes)


def _resnet8(mults, backward, num_classes):
    # stem + 3 blocks x 2 convs + head = 8 layers with weights (plus 1x1 shortcuts).
    return ResNet(mults, backward, num_classes)


def _resnet18(mults, backward, num_classes):
    return ResNet(
        mults,
        backward,
        num_classes,
        stem_features=64,
        stem_kernel=(7, 7),
        stem_strides=2,
        stem_pool=True,
        stages=((64, 2, 1), (128, 2, 2), (256, 2, 2), (512, 2, 2)),
    )


def _vit_tiny(mults, backward, num_classes):
    return ViT(mults, backward, num_classes)


_REGISTRY: dict[str, tuple[Callable, tuple[int, ...], tuple[str, ...]]] = {
    # name: (module builder, default sample shape, kinds used)
    "lenet300": (_lenet300, (28, 28, 1), ("dense",)),
    "lenet5": (_lenet5, (28, 28, 1), ("conv", "dense")),
    "resnet8": (_resnet8, (28, 28, 1), ("conv", "dense")),
    "resnet18": (_resnet18, (224, 224, 3), ("conv", "dense")),
    "vit_tiny": (_vit_tiny, (28, 28, 1), ("conv", "dense", "attention")),
}


# --------------------------------------------------------------------------
# Functional interface.


@dataclasses.dataclass(frozen=True)
class Model:
    """A model as a pair of pure functions ``init`` / ``apply``.

    Attributes:
      name: registry name (``"lenet300"``, ``"lenet5"``, ``"resnet8"``,
        ``"resnet18"``, ``"vit_tiny"``).
      num_classes: number of output logits.
      input_shape: default per-example input shape (NHWC without the batch).
      kinds: the layer kinds whose products the model simulates.
    """

    name: str
    num_classes: int
    input_shape: tuple[int, ...]
    kinds: tuple[str, ...]
    _builder: Callable = dataclasses.field(repr=False, compare=False, default=None)

    def module(self, multiplier="fp32", backward: str = "approx") -> nn.Module:
        """The linen module for a given multiplier assignment.

        Args:
          multiplier: Multiplier, name, or dict kind -> Multiplier/name.
          backward: ``"approx"`` or ``"exact"``.

        Returns:
          A linen module (call ``.apply({"params": params}, x)``).
        """
        ops.check_backward(backward)
        return self._builder(self.assignment(multiplier), backward, self.num_classes)

    def assignment(self, multiplier) -> dict[str, mult_lib.Multiplier]:
        """The multiplier of each layer kind, checked against this model.

        Args:
          multiplier: a Multiplier or name (every kind), or a dict from kind
            to Multiplier or name (missing kinds: ``"fp32"``).

        Returns:
          Dict from every kind in ``KINDS`` to a Multiplier.

        Raises:
          ValueError: For an unknown kind.

        Warns:
          UserWarning: For a dict giving a design to a kind this model does
            not have (``{"conv": "mbm7"}`` on an MLP runs in fp32).
        """
        mults = resolve_kinds(multiplier)
        if not isinstance(multiplier, Mapping):
            return mults  # one design for every kind the model has
        absent = sorted(k for k in multiplier if k not in self.kinds and not mults[k].is_exact)
        if absent:
            # A warning, not an error: one per-layer spec may serve several
            # models (a sweep script), but it must not pass silently.
            warnings.warn(
                f"model {self.name!r} has no {'/'.join(absent)} layers (its layer kinds: "
                f"{', '.join(self.kinds)}): the multiplier given for them changes nothing",
                UserWarning,
                stacklevel=3,
            )
        return mults

    def init(self, rng, sample_x) -> Any:
        """Initialises parameters.

        Args:
          rng: a PRNG key.
          sample_x: an input batch ``[B, *input_shape]`` (only its shape and
            dtype matter).

        Returns:
          The params pytree (a dict; independent of the multiplier).
        """
        sample_x = jnp.asarray(sample_x)
        return self.module("fp32").init(rng, sample_x)["params"]

    def apply(self, params, x, multiplier="fp32", backward: str = "approx", train: bool = False):
        """Computes logits with every conv/dense product simulated.

        Args:
          params: params pytree from :meth:`init` (under ``jax.vmap`` one
            slice of a stack).
          x: input batch, NHWC float (``[B, 28, 28, 1]`` for the MNIST models).
          multiplier: a ``Multiplier`` (its LUT may be a tracer, e.g. under
            ``jax.vmap`` over a stack), a name, or a dict mapping layer kind
            (``"conv"``, ``"dense"``, ``"attention"``) to a Multiplier or
            name; missing kinds use ``"fp32"``. A *stacked* multiplier
            evaluates every design with the same params and returns
            ``[D, B, num_classes]``.
          backward: ``"approx"`` (default) or ``"exact"`` gradient products.
          train: training mode (these models have no dropout or batch
            statistics, so it does not change the result; kept for the API).

        Returns:
          Logits ``[B, num_classes]`` (``[D, B, num_classes]`` for a stack).
        """
        del train
        return self._apply_kinds(params, x, self.assignment(multiplier), backward)

    def _apply_kinds(self, params, x, mults, backward):
        stacked = {k: m for k, m in mults.items() if m.is_stack}
        if stacked:
            sizes = {m.num_designs for m in stacked.values()}
            if len(sizes) != 1:
                raise ValueError(f"stacked multipliers have different design counts: {sizes}")
            luts = {k: m.lut for k, m in stacked.items()}

            def one(lut_slices):
                per = dict(mults)
                for k, lut in lut_slices.items():
                    per[k] = _with_lut(stacked[k], lut)
                return self._apply_kinds(params, x, per, backward)

            return jax.vmap(one)(jax.tree.map(jnp.asarray, luts))
        module = self._builder(mults, backward, self.num_classes)
        return module.apply({"params": params}, jnp.asarray(x))


def _with_lut(m: mult_lib.Multiplier, lut) -> mult_lib.Multiplier:
    leaves, treedef = jax.tree.flatten(m)
    del leaves
    return jax.tree.unflatten(treedef, [lut])


def names() -> tuple[str, ...]:
    """Names accepted by :func:`create`.

    Returns:
      The registered model names, e.g. ``("lenet300", "lenet5", ...)``.
    """
    return tuple(_REGISTRY)


def create(name: str, num_classes: int = 10) -> Model:
    """Creates a model by name.

    Args:
      name: ``"lenet300"`` (LeNet-300-100 on flattened 28x28 input),
        ``"lenet5"`` (ApproxTrain's MNIST CNN), ``"resnet8"`` (small
        normalisation-free ResNet for 28x28x1), ``"resnet18"``
        (ImageNet-style ResNet-18, any HxWx3 input) or ``"vit_tiny"`` (a
        2-block Vision Transformer with 7x7 patches for 28x28 input; the
        only model using the ``"attention"`` multiplier kind).
      num_classes: number of logits.

    Returns:
      A :class:`Model`.

    Raises:
      ValueError: For an unknown name or a non-positive ``num_classes``.

    Example:
      >>> model = create("lenet5")
      >>> params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
      >>> logits = model.apply(params, x, approx_jax.multipliers.mbm(7))
    """
    key = str(name).lower()
    if key not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {names()}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    builder, shape, kinds = _REGISTRY[key]
    return Model(key, num_classes, shape, kinds, builder)


# --------------------------------------------------------------------------
# Parameter files.


def save_params(params, path) -> None:
    """Writes a params pytree to ``path`` (Flax msgpack, as ``flax.serialization``).

    Trained under any multiplier, the parameters are ordinary float32 arrays:
    a file written here loads into the same model for evaluation under other
    designs, or as the start of an approximation-aware fine-tuning run
    (``approx-jax train --init-params``).

    Args:
      params: the params pytree (e.g. from ``Model.init`` or training).
      path: file to write.

    Example:
      >>> models.save_params(params, "lenet5_fp32.msgpack")
    """
    from flax import serialization

    with open(path, "wb") as f:
        f.write(serialization.to_bytes(jax.device_get(params)))


def load_params(model: Model, path, sample_x=None):
    """Reads params written by :func:`save_params` for ``model``.

    Args:
      model: the :class:`Model` the params belong to (its ``init`` gives
        the expected structure and shapes).
      path: file written by :func:`save_params`.
      sample_x: an input batch for ``model.init`` (default: one example of
        ``model.input_shape``).

    Returns:
      The params pytree.

    Raises:
      ValueError: If the file is not a params file of this model (missing or
        extra layers, other shapes; the values take the model's dtypes).

    Example:
      >>> params = models.load_params(models.create("lenet5"), "lenet5_fp32.msgpack")
    """
    from flax import serialization, traverse_util

    if sample_x is None:
        sample_x = jnp.zeros((1, *model.input_shape), jnp.float32)
    template = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), sample_x))
    with open(path, "rb") as f:
        raw = f.read()
    try:
        state = serialization.msgpack_restore(raw)
    except Exception as err:  # msgpack's own error types
        raise ValueError(f"{path} is not a params file (msgpack): {err}") from err
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a params file: it holds a {type(state).__name__}")
    not_ours = f"{path} does not hold params of model {model.name!r}"
    want = traverse_util.flatten_dict(serialization.to_state_dict(template))
    try:
        got = traverse_util.flatten_dict(state)
    except (AttributeError, TypeError) as err:
        raise ValueError(f"{not_ours}: {err}") from err
    missing = [k for k in want if k not in got]
    extra = [k for k in got if k not in want]
    if missing or extra:

        def listed(keys):
            shown = ", ".join("/".join(map(str, k)) for k in keys[:3])
            return shown + (", ..." if len(keys) > 3 else "")

        parts = ([f"missing {listed(missing)}"] if missing else []) + (
            [f"unexpected {listed(extra)}"] if extra else []
        )
        raise ValueError(f"{not_ours}: {'; '.join(parts)}")
    for key, w in want.items():
        if tuple(np.shape(got[key])) != tuple(w.shape):
            raise ValueError(
                f"{not_ours}: {'/'.join(map(str, key))} has shape {np.shape(got[key])}, "
                f"expected {tuple(w.shape)}"
            )
    # (Values take the model's dtypes.)
    flat = {key: jnp.asarray(got[key], w.dtype) for key, w in want.items()}
    return serialization.from_state_dict(template, traverse_util.unflatten_dict(flat))
