"""Layers of binary transformers: values against NumPy, binary leaves, gradients, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import binax
from binax import nn as bnn


def rngs(seed=0):
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def np_elastic(x, scale, threshold, signed=True):
    u = (x - threshold) / scale
    codes = np.where(u >= 0, 1.0, -1.0) if signed else np.where(u > 0.5, 1.0, 0.0)
    return scale * codes


def v(var):
    return np.asarray(var[...], np.float64)


def np_elastic_linear(layer, x):
    """The layer's output from its parameters, in NumPy float64."""
    if not layer.binary:
        return x @ v(layer.kernel) + v(layer.bias)
    act = layer.input_binarization
    xb = np_elastic(x, v(act.scale), v(act.threshold))
    return (xb @ np.sign(v(layer.kernel))) * v(layer.scale) + v(layer.bias)


def randomize(module, seed=1):
    """Random scales (positive), thresholds, biases and LayerNorm parameters (not kernels)."""
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        if isinstance(var, bnn.BinaryParam) or path[-1] == "kernel":
            continue
        shape = var[...].shape
        if path[-1] == "scale":
            value = rng.uniform(0.5, 1.5, shape)
            if len(path) > 1 and path[-2] == "prob_binarization":
                value = value * 0.2
        else:
            value = rng.normal(size=shape) * 0.2
        var[...] = jnp.asarray(value, jnp.float32)


X = np.random.default_rng(0).normal(size=(2, 5, 8)).astype(np.float32)


@pytest.mark.parametrize("binary", [True, False])
def test_elastic_linear_matches_numpy(binary):
    layer = bnn.ElasticLinear(8, 6, binary=binary, rngs=rngs())
    randomize(layer)
    y = layer(jnp.asarray(X))
    np.testing.assert_allclose(y, np_elastic_linear(layer, X.astype(np.float64)), rtol=1e-5)
    labels = jax.tree.leaves(bnn.binary_labels(layer))
    assert sum(labels) == (1 if binary else 0)
    if binary:
        assert set(np.unique(v(layer.kernel))) == {-1.0, 1.0}
        fresh = bnn.ElasticLinear(8, 6, rngs=rngs())  # unit-variance start
        np.testing.assert_allclose(fresh.scale[...], np.full(6, 1 / np.sqrt(8)), rtol=1e-6)
    else:
        assert layer.scale is None and layer.input_binarization is None
    # The projection's input quantizer is one-bit: binax's binary product applies.
    if binary:
        assert binax.quantizers.precision(layer.input_binarization.quantizer()) == 1


def np_attention(att, x, mask=None):
    b, t, d = x.shape
    h = att.num_heads
    qkv = np_elastic_linear(att.qkv, x)
    q, k, val = np.split(qkv, 3, axis=-1)
    if att.binary:
        acts = (att.query_binarization, att.key_binarization, att.value_binarization)
        q, k, val = (
            np_elastic(t_, v(a.scale), v(a.threshold))
            for t_, a in zip((q, k, val), acts, strict=True)
        )
    split = lambda t_: t_.reshape(b, t, h, d // h)
    scores = np.einsum("bqhd,bkhd->bhqk", split(q), split(k)) / np.sqrt(d // h)
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    attend = probs
    if att.binary:
        p = att.prob_binarization
        attend = np_elastic(probs, v(p.scale), v(p.threshold), signed=False)
        if mask is not None:
            attend = np.where(mask, attend, 0.0)
    context = np.einsum("bhqk,bkhd->bqhd", attend, split(val)).reshape(b, t, d)
    return np_elastic_linear(att.out, context), scores, probs


@pytest.mark.parametrize("binary", [True, False])
def test_attention_matches_numpy_with_mask(binary):
    att = bnn.BinaryMultiHeadAttention(8, 2, binary=binary, rngs=rngs())
    randomize(att)
    if binary:  # a threshold below 0: masked keys (probability 0) would get the code 1
        att.prob_binarization.scale[...] = jnp.asarray(0.1)
        att.prob_binarization.threshold[...] = jnp.asarray(-0.06)
    valid = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    mask = valid[:, None, None, :]
    y, attention = jax.jit(lambda m, x, k: m(x, k, return_attention=True))(
        att, jnp.asarray(X), jnp.asarray(mask)
    )
    want, scores, probs = np_attention(att, X.astype(np.float64), mask)
    np.testing.assert_allclose(y, want, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(attention.probs, probs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        np.where(mask, attention.scores, 0.0), np.where(mask, scores, 0.0), rtol=1e-5, atol=1e-5
    )
    # Masked keys change nothing.
    x2 = X.copy()
    x2[0, 3:] = 9.0
    y2 = att(jnp.asarray(x2), jnp.asarray(mask))
    np.testing.assert_allclose(y2[0, :3], y[0, :3], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pre_norm", [False, True])
def test_block_gradients_reach_every_parameter(pre_norm):
    block = bnn.BinaryTransformerBlock(8, 2, mlp_features=16, pre_norm=pre_norm, rngs=rngs())
    graphdef, params, rest = nnx.split(block, nnx.Param, ...)
    target = jnp.asarray(np.random.default_rng(3).normal(size=X.shape), jnp.float32)

    def loss(p):
        y = nnx.merge(graphdef, p, rest)(jnp.asarray(X))
        return jnp.mean((y - target) ** 2)

    grads = jax.jit(jax.grad(loss))(nnx.as_pure(params))
    flat = {"/".join(map(str, k)): np.asarray(g) for k, g in nnx.to_flat_state(grads)}
    scales = [k for k in flat if k.endswith("binarization/scale")]
    thresholds = [k for k in flat if k.endswith("binarization/threshold")]
    assert len(scales) == len(thresholds) == 8  # 4 projections' inputs, q, k, v, probabilities
    for k, g in flat.items():
        assert np.all(np.isfinite(g)), k
        assert np.count_nonzero(g) > 0, k  # scales, thresholds and kernels all get gradients
    labels = {"/".join(map(str, k)) for k, b in nnx.to_flat_state(bnn.binary_labels(block)) if b}
    assert labels == {
        "attention/qkv/kernel",
        "attention/out/kernel",
        "mlp_in/kernel",
        "mlp_out/kernel",
    }


def test_full_precision_block_has_no_binary_parameters():
    block = bnn.BinaryTransformerBlock(8, 2, binary=False, rngs=rngs())
    assert not any(jax.tree.leaves(bnn.binary_labels(block)))
    assert not any(
        "binarization" in "/".join(map(str, k)) for k, _ in nnx.to_flat_state(nnx.state(block))
    )
    y = block(jnp.asarray(X))
    assert y.shape == X.shape and np.all(np.isfinite(y))


def test_binary_embed():
    embed = bnn.BinaryEmbed(10, 4, rngs=rngs())
    embed.scale[...] = jnp.arange(1.0, 5.0)
    ids = jnp.array([[0, 3, 9]])
    table = v(embed.embedding)
    np.testing.assert_array_equal(embed(ids), table[np.asarray(ids)] * np.arange(1.0, 5.0))
    assert sum(jax.tree.leaves(bnn.binary_labels(embed))) == 1


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"features \(10\) must be divisible by num_heads \(4\)"):
        bnn.BinaryMultiHeadAttention(10, 4, rngs=rngs())
    with pytest.raises(ValueError, match="scale_init and min_scale must be positive"):
        bnn.ElasticBinarization(4, scale_init=0.0)
    with pytest.raises(ValueError, match="ElasticLinear: in_features must be a positive int"):
        bnn.ElasticLinear(0, 3, rngs=rngs())
    with pytest.raises(ValueError, match="BinaryEmbed: kernel_quantizer: unknown quantizer"):
        bnn.BinaryEmbed(3, 2, kernel_quantizer="nope", rngs=rngs())
    att = bnn.BinaryMultiHeadAttention(8, 2, rngs=rngs())
    with pytest.raises(ValueError, match=r"x must be \(batch, length, 8\)"):
        att(jnp.ones((2, 8)))
