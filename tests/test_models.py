"""approx_jax.models: functional init/apply, jit/grad/vmap, a short training run."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import approx_jax.models as models
from approx_jax._src import multipliers as mult_lib
from approx_jax._src import train as train_lib


def _mnist_like(n, seed=0):
    x = jax.random.uniform(jax.random.key(seed), (n, 28, 28, 1), jnp.float32)
    y = jax.random.randint(jax.random.key(seed + 1), (n,), 0, 10)
    return x, y


def test_registry_and_errors():
    assert set(models.names()) >= {"lenet300", "lenet5", "resnet8", "resnet18", "vit_tiny"}
    with pytest.raises(ValueError, match="unknown model"):
        models.create("vgg99")
    with pytest.raises(ValueError, match="num_classes"):
        models.create("lenet5", num_classes=0)
    with pytest.raises(ValueError, match="unknown layer kind"):
        models.resolve_kinds({"convolution": "mbm7"})
    kinds = models.resolve_kinds({"dense": "mbm7"})
    assert kinds["conv"].is_exact and kinds["attention"].is_exact
    assert kinds["dense"].name == "mbm7"


def test_a_design_for_a_kind_the_model_lacks_warns():
    # lenet300 has only dense layers: {"conv": "mbm7"} runs in fp32; it used to
    # be reported (and trained, and labelled) as an mbm7 run without a word.
    model = models.create("lenet300")
    params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    x = jnp.ones((2, 28, 28, 1))
    with pytest.warns(UserWarning, match="has no conv layers"):
        got = model.apply(params, x, {"conv": "mbm7"})
    np.testing.assert_array_equal(got, model.apply(params, x, "fp32"))
    with pytest.warns(UserWarning, match="has no attention/conv layers"):
        model.module({"conv": "mbm7", "attention": "mbm3", "dense": "mbm7"})
    # fp32 for an absent kind, and one design for all kinds, are silent.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(
            model.apply(params, x, {"conv": "fp32", "dense": "mbm7"}),
            model.apply(params, x, "mbm7"),
        )
    with pytest.warns(UserWarning, match="has no conv layers"):
        data = (x, jnp.zeros(2, jnp.int32)) * 2
        train_lib.train(model, "conv=mbm7", data, epochs=1, batch_size=2, progress=False)


LENET300 = 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
LENET5 = 5 * 5 * 32 + 32 + 5 * 5 * 32 * 32 + 32 + 7 * 7 * 32 * 1024 + 1024 + 1024 * 10 + 10


@pytest.mark.parametrize(
    "name,shape,n_params",
    [
        ("lenet300", (3, 28, 28, 1), LENET300),
        ("lenet5", (3, 28, 28, 1), LENET5),
        ("resnet8", (3, 28, 28, 1), None),
        ("resnet18", (2, 64, 64, 3), None),
        ("vit_tiny", (3, 28, 28, 1), None),
    ],
)
def test_init_and_apply_shapes(name, shape, n_params):
    model = models.create(name)
    x = jnp.zeros(shape)
    params = jax.eval_shape(model.init, jax.random.key(0), x)
    count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    if n_params is not None:
        assert count == n_params
    if name == "resnet18":
        assert 11_000_000 < count < 11_300_000  # ResNet-18 (no BN) ~11.2M weights
    out = jax.eval_shape(lambda p, x: model.apply(p, x, "mbm7"), params, x)
    assert out.shape == (shape[0], 10)
    assert out.dtype == jnp.float32
    model7 = models.create(name, num_classes=7)
    out7 = jax.eval_shape(lambda x: model7.apply(model7.init(jax.random.key(0), x), x), x)
    assert out7.shape == (shape[0], 7)


def test_fp32_apply_equals_plain_flax_lenet5():
    from flax import linen as nn

    class Plain(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(32, (5, 5))(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
            x = nn.relu(nn.Conv(32, (5, 5))(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
            x = x.reshape(x.shape[0], -1)
            x = nn.relu(nn.Dense(1024)(x))
            return nn.Dense(10)(x)

    model = models.create("lenet5")
    x, _ = _mnist_like(2)
    params = model.init(jax.random.key(0), x)
    plain = Plain().init(jax.random.key(0), x)["params"]
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, plain)
    np.testing.assert_array_equal(
        model.apply(params, x, "fp32"), Plain().apply({"params": params}, x)
    )


def test_jit_grad_and_kind_dict():
    model = models.create("lenet5")
    x, y = _mnist_like(4)
    params = model.init(jax.random.key(0), x)
    m = mult_lib.mitchell(5)

    def loss(p, mult):
        logits = model.apply(p, x, mult, backward="approx", train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    grads = jax.jit(jax.grad(loss))(params, {"conv": m, "dense": m})
    assert jax.tree.map(jnp.shape, grads) == jax.tree.map(jnp.shape, params)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    # Only the dense layers approximate: conv outputs are native.
    only_dense = model.apply(params, x, {"dense": m})
    everything = model.apply(params, x, m)
    exact = model.apply(params, x, "fp32")
    assert not np.array_equal(only_dense, exact)
    assert not np.array_equal(only_dense, everything)


def test_vmap_over_stacked_params_and_multipliers():
    model = models.create("lenet300")
    x, y = _mnist_like(8)
    designs = [mult_lib.mbm(7), mult_lib.mitchell(5)]
    stacked = mult_lib.stack(designs)
    params = jax.vmap(lambda k: model.init(k, x))(jax.random.split(jax.random.key(0), 2))

    def loss(p, mult):
        logits = model.apply(p, x, mult)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    losses, grads = jax.jit(jax.vmap(jax.value_and_grad(loss)))(params, stacked)
    assert losses.shape == (2,)
    single = jax.jit(jax.value_and_grad(loss))
    for d, m in enumerate(designs):
        p_d = jax.tree.map(lambda a, d=d: a[d], params)
        l_d, g_d = single(p_d, m)
        np.testing.assert_allclose(losses[d], l_d, rtol=1e-6)
        jax.tree.map(
            lambda a, b, d=d: np.testing.assert_allclose(a[d], b, rtol=1e-5, atol=1e-7),
            grads,
            g_d,
        )
    # A stacked multiplier with shared params gives a leading design axis.
    p0 = jax.tree.map(lambda a: a[0], params)
    out = model.apply(p0, x, stacked)
    assert out.shape == (2, 8, 10)
    np.testing.assert_array_equal(out[1], model.apply(p0, x, designs[1]))


def test_resnet8_vmap_grad_traces():
    model = models.create("resnet8")
    x, y = _mnist_like(2)
    stacked = mult_lib.stack(["mbm7", "truncate3"])
    keys = jax.random.split(jax.random.key(0), 2)
    params = jax.eval_shape(jax.vmap(lambda k: model.init(k, x)), keys)

    def loss(p, mult):
        logits = model.apply(p, x, {"conv": mult, "dense": mult})
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    # Tracing only (compiling 9 convolutions' forward and backward takes ~10 s
    # on CPU); the batched-conv path itself runs in tests/test_conv.py and
    # lenet5's convolutions run in test_jit_grad_and_kind_dict.
    grads = jax.eval_shape(jax.vmap(jax.grad(loss)), params, stacked)
    assert jax.tree.map(jnp.shape, grads) == jax.tree.map(jnp.shape, params)


def test_short_training_run_decreases_loss():
    model = models.create("lenet300")
    x, y = _mnist_like(200, seed=3)
    params = model.init(jax.random.key(0), x)
    m = mult_lib.mbm(7)
    tx = optax.adam(1e-3)
    opt_state = tx.init(params)

    def loss(p):
        logits = model.apply(p, x, m, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(p, s):
        value, grads = jax.value_and_grad(loss)(p)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, value

    losses = []
    for _ in range(15):
        params, opt_state, value = step(params, opt_state)
        losses.append(float(value))
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0], losses


def test_vit_attention_kind_is_used():
    model = models.create("vit_tiny")
    assert "attention" in model.kinds
    x, _ = _mnist_like(2)
    params = model.init(jax.random.key(0), x)
    apply = jax.jit(model.apply)
    only_attention = apply(params, x, {"attention": mult_lib.mbm(7)})
    exact = model.apply(params, x, "fp32")
    assert only_attention.shape == (2, 10)
    assert 0 < np.max(np.abs(np.asarray(only_attention) - np.asarray(exact))) < 1.0


@pytest.mark.parametrize("shape", [(2, 8, 6, 3), (1, 28, 28, 4), (3, 7, 8, 2)])
def test_max_pool_equals_flax_values_and_gradient(shape):
    # models.max_pool's 2x2/2 fast path must give nn.max_pool's values and
    # gradient bit for bit, ties included (quantised inputs: many equal
    # maxima, zeros after a ReLU); odd sizes fall back to nn.max_pool.
    from flax import linen as nn

    from approx_jax._src import models as models_src

    rng = np.random.default_rng(sum(shape))
    x = jnp.asarray(np.maximum(rng.integers(-2, 3, size=shape), 0).astype(np.float32))
    x = x * jnp.asarray(rng.choice([1.0, -1.0], size=shape).astype(np.float32))
    ct = jnp.asarray(
        rng.standard_normal((shape[0], -(-shape[1] // 2), -(-shape[2] // 2), shape[3]))
    )
    ct = ct.astype(jnp.float32)

    def ours(x):
        return models_src.max_pool(x, (2, 2), (2, 2), "SAME")

    def flax(x):
        return nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")

    y, vjp = jax.vjp(ours, x)
    y_want, vjp_want = jax.vjp(flax, x)
    np.testing.assert_array_equal(np.asarray(y).view(np.uint32), np.asarray(y_want).view(np.uint32))
    np.testing.assert_array_equal(
        np.asarray(vjp(ct)[0]).view(np.uint32), np.asarray(vjp_want(ct)[0]).view(np.uint32)
    )
    # The batched (vmapped) form too: one pooled model per design.
    xs = jnp.stack([x, -x])
    got = jax.vmap(lambda x: jax.vjp(ours, x)[1](ct)[0])(xs)
    want = jax.vmap(lambda x: jax.vjp(flax, x)[1](ct)[0])(xs)
    np.testing.assert_array_equal(np.asarray(got).view(np.uint32), np.asarray(want).view(np.uint32))


@pytest.mark.parametrize("name", ["lenet300", "lenet5", "resnet8", "vit_tiny"])
@pytest.mark.parametrize("mult", ["fp32", "mbm7"])
def test_empty_batch_gives_empty_logits(name, mult):
    # reshape(0, -1) cannot infer -1 (it divided by the batch size).
    model = models.create(name)
    params = model.init(jax.random.key(0), jnp.zeros((1, *model.input_shape)))
    logits = model.apply(params, jnp.ones((0, *model.input_shape)), mult)
    assert logits.shape == (0, 10)


def test_params_files_round_trip_and_belong_to_their_model(tmp_path):
    model = models.create("lenet5")
    params = model.init(jax.random.PRNGKey(3), jnp.zeros((1, 28, 28, 1)))
    path = tmp_path / "p.msgpack"
    models.save_params(params, path)
    back = models.load_params(model, path)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="does not hold params of model 'lenet300'"):
        models.load_params(models.create("lenet300"), path)
    with pytest.raises(ValueError, match=r"Dense_1/bias has shape \(10,\), expected \(7,\)"):
        models.load_params(models.create("lenet5", num_classes=7), path)
    junk = tmp_path / "junk"
    junk.write_bytes(b"not msgpack at all")
    with pytest.raises(ValueError, match="is not a params file"):
        models.load_params(model, junk)
    from flax import serialization

    listed = tmp_path / "list"
    listed.write_bytes(serialization.msgpack_serialize([1, 2]))
    with pytest.raises(ValueError, match="is not a params file: it holds a list"):
        models.load_params(model, listed)
    # An extra layer is not this model's either.
    extra = tmp_path / "extra"
    models.save_params({**params, "Extra": {"kernel": np.ones(3, np.float32)}}, extra)
    with pytest.raises(ValueError, match="unexpected Extra/kernel"):
        models.load_params(model, extra)
