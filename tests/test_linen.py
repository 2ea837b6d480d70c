"""Flax Linen binary layers: same numbers as the NNX layers, labels by parameter name."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import binax
from binax import linen as bl
from binax import nn as bnn


def key(seed=0):
    """RBG keys: random draws compile several times faster than with threefry."""
    return jax.random.key(seed, impl="rbg")


def rngs(seed=0):
    return nnx.Rngs(key(seed))


def rand(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = bl.BinaryConv(4, (3, 3), input_quantizer=None, pad_value=None, use_bias=False)(x)
        x = nn.BatchNorm(use_running_average=True)(x)
        x = bl.BinaryConv(4, (3, 3), strides=2, pad_value=-1.0, name="second")(x)
        x = x.reshape((x.shape[0], -1))
        x = bl.BinaryDense(8, scale="learned")(x)
        return bl.BinaryDense(3, binary_kernel=False, kernel_quantizer=None)(x)


def test_params_names_and_labels():
    x = rand((2, 6, 6, 1))
    variables = jax.jit(Net().init)(key(0), x)
    params = variables["params"]
    labels = bl.binary_labels(params)
    flat = {
        "/".join(str(k.key) for k in path): v
        for path, v in jax.tree_util.tree_leaves_with_path(labels)
    }
    assert {k for k, v in flat.items() if v} == {
        "BinaryConv_0/binary_kernel",
        "second/binary_kernel",
        "BinaryDense_0/binary_kernel",
    }
    assert jax.tree.structure(labels) == jax.tree.structure(params)
    for path, v in flat.items():
        if v:
            leaf = params
            for k in path.split("/"):
                leaf = leaf[k]
            assert set(np.unique(np.asarray(leaf))) == {-1.0, 1.0}
    assert params["BinaryDense_1"]["kernel"].shape == (8, 3)  # real kernel keeps Flax's name
    assert bl.is_binary_path(("a", "binary_kernel")) and not bl.is_binary_path(("kernel",))
    assert not bl.is_binary_path(())
    # Labels work on the whole variables dict too.
    assert not any(jax.tree.leaves(bl.binary_labels(variables)["batch_stats"]))


@pytest.mark.parametrize(
    "kernel_size,pad_value,strides,scale",
    [((3, 3), 1.0, 1, None), ((3, 3), -1.0, 2, "learned"), (3, -1.0, 1, None)],
)
def test_linen_matches_nnx(kernel_size, pad_value, strides, scale):
    x = rand((2, 7, 5, 3)) if isinstance(kernel_size, tuple) else rand((2, 7, 3))
    layer = bnn.BinaryConv(
        3, 4, kernel_size, strides=strides, pad_value=pad_value, scale=scale, rngs=rngs(0)
    )
    if scale:
        layer.scale[...] = jnp.arange(1.0, 5.0)
    layer.bias[...] = jnp.arange(4.0) / 10
    params = {"binary_kernel": layer.kernel[...], "bias": layer.bias[...]}
    if scale:
        params["scale"] = layer.scale[...]
    module = bl.BinaryConv(4, kernel_size, strides=strides, pad_value=pad_value, scale=scale)
    np.testing.assert_array_equal(module.apply({"params": params}, x), layer(x))

    dense = bnn.BinaryLinear(3, 4, rngs=rngs(1))
    y = bl.BinaryDense(4).apply(
        {"params": {"binary_kernel": dense.kernel[...], "bias": dense.bias[...]}}, x
    )
    np.testing.assert_array_equal(y, dense(x))


@pytest.mark.parametrize(
    "how",
    [
        dict(arithmetic="float", kernel_grad="xla"),
        dict(arithmetic="integer", kernel_grad="patches", backward_dtype=jnp.bfloat16),
    ],
)
def test_linen_passes_the_computation_options(how):
    """The Linen twins forward arithmetic, kernel_grad and backward_dtype to the same functions:
    values and gradients equal the NNX layer's with the same options."""
    x = rand((2, 6, 6, 3))
    layer = bnn.BinaryConv(3, 4, (3, 3), use_bias=False, rngs=rngs(0), **how)
    module = bl.BinaryConv(4, (3, 3), use_bias=False, **how)
    k = layer.kernel[...]
    y, vjp = jax.vjp(lambda x, k: module.apply({"params": {"binary_kernel": k}}, x), x, k)
    y_ref, vjp_ref = jax.vjp(lambda x, k: bnn.functional.binary_conv(x, k, **how), x, k)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(y, layer(x))
    g = rand(y.shape, 1)
    for a, b in zip(vjp(g), vjp_ref(g), strict=True):
        np.testing.assert_array_equal(a, b)
    dense_how = {k: v for k, v in how.items() if k != "kernel_grad"}
    d = bl.BinaryDense(2, use_bias=False, **dense_how)
    variables = d.init(key(0), x[:, 0, 0])
    np.testing.assert_array_equal(
        d.apply(variables, x[:, 0, 0]),
        bnn.functional.binary_dense(x[:, 0, 0], variables["params"]["binary_kernel"], **dense_how),
    )
    with pytest.raises(ValueError, match="BinaryConv: kernel_grad"):
        bl.BinaryConv(4, (3, 3), kernel_grad="fast").init(key(0), x)
    with pytest.raises(ValueError, match="BinaryDense: arithmetic"):
        bl.BinaryDense(2, arithmetic="int").init(key(0), x)


def test_fixed_scale_is_a_constant():
    module = bl.BinaryDense(3, scale="fixed", use_bias=False)
    variables = module.init(key(0), jnp.ones((1, 4)))
    assert "scale" not in variables["params"]
    assert variables["constants"]["scale"].shape == (3,)
    y0 = module.apply(variables, jnp.ones((1, 4)))
    doubled = {**variables, "constants": {"scale": 2 * variables["constants"]["scale"]}}
    np.testing.assert_allclose(module.apply(doubled, jnp.ones((1, 4))), 2 * y0)


def test_linen_gradients_and_partition_step():
    x, y = rand((4, 6, 6, 1)), jnp.array([0, 1, 2, 0])
    model = Net()
    variables = jax.jit(model.init)(key(0), x)
    params, batch_stats = variables["params"], variables["batch_stats"]

    def loss(p):
        logits = model.apply({"params": p, "batch_stats": batch_stats}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    tx = binax.partition(
        binary=binax.bop(threshold=0.0, gamma=1.0),
        real=optax.adam(1e-2),
        is_binary=bl.is_binary_path,
    )
    # The label-tree form must give the same partition.
    tx2 = binax.partition(
        binary=binax.bop(threshold=0.0, gamma=1.0),
        real=optax.adam(1e-2),
        is_binary=bl.binary_labels(params),
    )

    @jax.jit
    def step(p):
        g = jax.grad(loss)(p)
        u, _ = tx.update(g, tx.init(p), p)
        u2, _ = tx2.update(g, tx2.init(p), p)
        return g, optax.apply_updates(p, u), u, u2

    grads, new, u1, u2 = step(params)
    jax.tree.map(np.testing.assert_array_equal, u1, u2)
    flips = 0
    for name in ("BinaryConv_0", "second", "BinaryDense_0"):
        assert np.count_nonzero(grads[name]["binary_kernel"]) > 0, name
        k = np.asarray(new[name]["binary_kernel"])
        assert set(np.unique(k)) <= {-1.0, 1.0}
        flips += np.sum(k != np.asarray(params[name]["binary_kernel"]))
    assert flips > 0
    assert not np.array_equal(new["BinaryDense_1"]["kernel"], params["BinaryDense_1"]["kernel"])


@pytest.mark.parametrize(
    "module,match",
    [
        (bl.BinaryConv(2, (3, 3), pad_value=0.0), "pad_value"),
        (bl.BinaryConv(2, (3, 3), pad_value=None), "pad_value"),
        (bl.BinaryConv(2, (3, 3), binary_kernel=False), "kernel_quantizer"),
        (bl.BinaryDense(2, binary_kernel=False), "kernel_quantizer"),
        (bl.BinaryDense(2, input_quantizer="nope"), "input_quantizer"),
        (bl.BinaryDense(2, scale="xnor"), "scale"),
        (bl.BinaryConv(2, (3, 3), feature_group_count=2), "feature_group_count"),
    ],
)
def test_configuration_errors(module, match):
    x = jnp.ones((1, 4, 4, 3))
    with pytest.raises(ValueError, match=match):
        module.init(key(0), x)
