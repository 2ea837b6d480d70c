"""binax.export: bit packing, int8, per-model export and import, lossless round trips."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from binax import export as E
from binax import models
from binax import nn as bnn
from binax import quantizers as q


def signs(shape, seed=0, dtype=np.float32):
    return np.where(np.random.default_rng(seed).random(shape) < 0.5, -1, 1).astype(dtype)


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (9,), (3, 3, 5, 13), (2, 64), (16, 3, 1)])
def test_pack_unpack_round_trip(shape):
    w = signs(shape)
    p = E.pack_bits(jnp.asarray(w))
    assert p.bits.dtype == jnp.uint8
    assert p.bits.shape == (*shape[:-1], -(-shape[-1] // 8))
    assert p.shape == shape and p.scale is None
    assert p.nbytes == int(np.prod(shape[:-1])) * -(-shape[-1] // 8)
    np.testing.assert_array_equal(E.unpack_bits(p), w)
    np.testing.assert_array_equal(E.unpack_bits(p, jnp.bfloat16).astype(np.float32), w)
    # The layout is numpy's packbits of (w >= 0) along the last axis.
    np.testing.assert_array_equal(p.bits, np.packbits(w >= 0, axis=-1))


def test_pack_binarizes_latent_weights_like_the_forward_pass():
    w = jnp.array([[0.3, -0.0, 0.0, -2.0, 1e-9, -1e-9, 5.0, -0.5, 0.7]])
    np.testing.assert_array_equal(E.unpack_bits(E.pack_bits(w)), q.ste_sign(w))
    np.testing.assert_array_equal(E.to_int8(w), np.asarray(q.ste_sign(w), np.int8))
    # Works under jit.
    packed = jax.jit(E.pack_bits)(w)
    np.testing.assert_array_equal(jax.jit(E.unpack_bits)(packed), q.sign0(w))
    with pytest.raises(ValueError, match="w"):
        E.pack_bits(jnp.float32(1.0))


def test_int8_round_trip_and_scales():
    w = signs((4, 6), seed=1)
    i8 = E.to_int8(w)
    assert i8.dtype == jnp.int8 and set(np.unique(np.asarray(i8))) == {-1, 1}
    np.testing.assert_array_equal(E.from_int8(i8), w)
    scale = jnp.arange(1.0, 7.0)
    p = E.pack_bits(w, scale)
    np.testing.assert_array_equal(E.unpack_bits(p, apply_scale=True), w * np.arange(1.0, 7.0))
    with pytest.raises(ValueError, match="scale"):
        E.unpack_bits(E.pack_bits(w), apply_scale=True)


class Scaled(nnx.Module):
    def __init__(self, rngs):
        self.a = bnn.BinaryConv(2, 3, (3, 3), scale="learned", rngs=rngs)
        self.b = bnn.BinaryLinear(3, 4, kernel_quantizer="magnitude_aware_sign", rngs=rngs)
        self.c = bnn.BinaryLinear(
            3,
            4,
            kernel_quantizer=functools.partial(q.magnitude_aware_sign, clip_value=2.0),
            scale="fixed",
            rngs=rngs,
        )
        self.real = nnx.Linear(4, 2, rngs=rngs)


def test_export_model_and_effective_scales():
    m = Scaled(nnx.Rngs(jax.random.key(0, impl="rbg")))
    m.a.scale[...] = jnp.array([0.5, 2.0, 3.0])
    m.b.kernel[...] = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4)), jnp.float32)
    m.c.kernel[...] = m.b.kernel[...]
    m.c.scale[...] = jnp.array([1.0, -1.0, 2.0, 0.5])
    ex = E.export_binary_kernels(m)
    assert sorted(ex) == ["a/kernel", "b/kernel", "c/kernel"]
    np.testing.assert_array_equal(ex["a/kernel"].scale, [0.5, 2.0, 3.0])
    # The effective kernel is what the layer multiplies the (binarized) input with.
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3)), jnp.float32)
    for name, layer in (("b", m.b), ("c", m.c)):
        k = E.unpack_bits(ex[f"{name}/kernel"], apply_scale=True)
        np.testing.assert_allclose(q.sign0(x) @ k, layer(x) - layer.bias[...], rtol=1e-5)
    no_scale = E.export_binary_kernels(m, include_scale=False)
    assert all(p.scale is None for p in no_scale.values())
    as_int8 = E.export_binary_kernels(m, format="int8")
    assert as_int8["a/kernel"]["int8"].dtype == jnp.int8
    with pytest.raises(ValueError, match="format"):
        E.export_binary_kernels(m, format="npz")
    with pytest.raises(ValueError, match="no binary kernel"):
        E.export_binary_kernels(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("fmt", ["packed", "int8"])
def test_model_round_trip(fmt):
    kw = dict(input_shape=(6, 6, 1), hidden_sizes=(13, 8))
    model = models.get("mlp", rngs=nnx.Rngs(jax.random.key(0, impl="rbg")), **kw)
    other = models.get("mlp", rngs=nnx.Rngs(jax.random.key(1, impl="rbg")), **kw)
    ex = E.export_binary_kernels(model, format=fmt)
    assert len(ex) == 3
    if fmt == "packed":
        bits = sum(p.nbytes for p in ex.values()) * 8
        n = sum(int(np.prod(p.shape)) for p in ex.values())
        rows = sum(int(np.prod(p.shape[:-1])) for p in ex.values())
        assert n <= bits < n + 8 * rows  # 1 bit per weight, under a byte of padding per row
    E.import_binary_kernels(other, ex)
    want = nnx.to_flat_state(nnx.state(model, bnn.BinaryParam))
    got = dict(nnx.to_flat_state(nnx.state(other, bnn.BinaryParam)))
    for path, var in want:
        np.testing.assert_array_equal(got[path].get_value(), var.get_value())
    with pytest.raises(ValueError, match="not a binary kernel"):
        E.import_binary_kernels(other, {"norms/0/bias": next(iter(ex.values()))})
    with pytest.raises(ValueError, match="shape"):
        E.import_binary_kernels(other, {"layers/1/kernel": ex["layers/2/kernel"]})
