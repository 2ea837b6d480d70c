"""binax.deploy: deployed networks agree with the float models they come from, exactly.

The float model decides every hidden sign in float32; the deployed one with integer products
and integer thresholds. They must give the same predicted class on every input and the same
logits up to the rounding of the float layers (here they are in fact equal), including at ties
(BatchNorm inputs exactly on the threshold) and for channels that decrease (negative BatchNorm
scale), with max pooling, strides, +1 and -1 padding, and odd sizes that do not fill whole bytes.
"""

import functools
import json
import os
import struct
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import binax.deploy
from binax import data as bdata
from binax import models
from binax.deploy import program as P
from binax.nn import BinaryConv, BinaryLinear


def rbg_rngs(seed):
    """RBG keys (here and for the random inputs): random draws compile several times faster
    than with threefry, one compilation per shape."""
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


@functools.lru_cache(maxsize=1)
def digits_test():
    ds = bdata.load("digits", "test", normalized=True)
    return ds.images, ds.labels


def random_stats(model, seed, *, negative_scales=True):
    """BatchNorm statistics and affine parameters far from their initial values."""
    rng = np.random.default_rng(seed)
    for _, m in nnx.iter_modules(model):
        if isinstance(m, nnx.BatchNorm):
            c = m.mean[...].shape[0]
            m.mean[...] = jnp.asarray(rng.normal(0, 3, c), jnp.float32)
            m.var[...] = jnp.asarray(rng.uniform(0.5, 20, c), jnp.float32)
            if m.scale is not None:
                lo = -1.5 if negative_scales else 0.2
                m.scale[...] = jnp.asarray(rng.uniform(lo, 1.5, c), jnp.float32)
            if m.bias is not None:
                m.bias[...] = jnp.asarray(rng.normal(0, 1, c), jnp.float32)
    model.eval()
    return model


def float_forward(model, x):
    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x))


def assert_agree(model, x):
    ref = float_forward(model, x)
    deployed = binax.deploy.compile(model)
    out = np.asarray(deployed(x))
    np.testing.assert_array_equal(out.argmax(-1), ref.argmax(-1))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    return deployed, out, ref


REFERENCE = {
    "mlp": dict(hidden_sizes=(40, 27)),
    "binarynet": dict(width_multiplier=1 / 16),
    "resnet18": dict(width=4),
}


@pytest.mark.parametrize("name", list(REFERENCE))
def test_reference_models_agree_on_every_test_image(name):
    images, _ = digits_test()
    model = models.get(
        name, input_shape=(8, 8, 1), num_classes=10, rngs=rbg_rngs(1), **REFERENCE[name]
    )
    random_stats(model, seed=2)
    deployed, out, ref = assert_agree(model, images)
    # Integer products: every binary product is an int op, no float product of ±1 is left.
    ops = {n["op"] for n in _nodes(deployed.program)}
    assert "int_conv" in ops or "int_dense" in ops
    if name != "resnet18":  # hidden activations stay binary: every BN + sign is a threshold
        # but the one after the first (real-input, float) layer.
        assert "threshold" in ops and [n["op"] for n in deployed.program].count("sign") == 1
    # One image at a time goes through the same exact path (XOR + popcount for dense rows).
    if name != "resnet18":
        one = np.asarray(deployed(images[7:8]))
        np.testing.assert_allclose(one, ref[7:8], rtol=1e-5, atol=1e-5)


def test_resnet_with_the_imagenet_stem_agrees():
    """The 7x7 stride-2 stem and its overlapping 3x3 stride-2 max pooling (padded) deploy too."""
    images, _ = digits_test()
    model = models.get(
        "resnet18", input_shape=(8, 8, 1), num_classes=10, rngs=rbg_rngs(1), width=4,
        stem="imagenet",
    )  # fmt: skip
    random_stats(model, seed=2)
    deployed, _, _ = assert_agree(model, images)
    pools = [n for n in _nodes(deployed.program) if n["op"] == "maxpool"]
    assert [(p["window"], p["strides"], p["padding"]) for p in pools] == [([3, 3], [2, 2], "SAME")]


def _nodes(program):
    for node in program:
        yield node
        if node["op"] == "residual":
            yield from _nodes(node["body"])
            yield from _nodes(node["shortcut"])


def test_binarynet_real_first_last_and_hidden_activations_are_int8():
    model = models.get(
        "binarynet",
        input_shape=(16, 16, 3),
        num_classes=5,
        width_multiplier=1 / 16,
        real_first_last=True,
        rngs=rbg_rngs(3),
    )
    random_stats(model, seed=4)
    x = jax.random.normal(jax.random.key(0, impl="rbg"), (64, 16, 16, 3))
    deployed, _, _ = assert_agree(model, x)
    ops = [n["op"] for n in deployed.program]
    assert ops[0] == "conv" and ops[-2] == "dense"  # real first and last layers stay float
    assert ops.count("threshold") == 7  # 5 hidden convs and 2 hidden dense layers


def test_sequential_with_pooling_negative_scales_strides_and_padding():
    rngs = rbg_rngs(5)
    kw = dict(use_bias=False, rngs=rngs)
    model = nnx.Sequential(
        BinaryConv(3, 8, (3, 3), input_quantizer=None, pad_value=None, **kw),
        nnx.BatchNorm(8, rngs=rngs),
        BinaryConv(8, 13, (3, 3), pad_value=1.0, **kw),
        functools.partial(nnx.max_pool, window_shape=(2, 2), strides=(2, 2)),
        nnx.BatchNorm(13, rngs=rngs),
        BinaryConv(13, 9, (3, 3), strides=2, pad_value=-1.0, **kw),
        nnx.BatchNorm(9, rngs=rngs),
        BinaryConv(9, 6, (2, 2), padding="VALID", scale="learned", use_bias=True, rngs=rngs),
    )
    random_stats(model, seed=6)
    rng = np.random.default_rng(0)
    model.layers[-1].scale[...] = jnp.asarray(rng.uniform(0.5, 2, 6), jnp.float32)
    model.layers[-1].bias[...] = jnp.asarray(rng.normal(0, 1, 6), jnp.float32)
    x = jax.random.normal(jax.random.key(1, impl="rbg"), (32, 12, 12, 3))
    deployed, _, _ = assert_agree(model, x)
    nodes = zip(deployed.program, deployed.arrays, strict=True)
    thresholds = [a for n, a in nodes if n["op"] == "threshold"]
    assert len(thresholds) == 2  # the first BatchNorm follows a float (real-input) product
    assert any(np.any(a["s"] < 0) for a in thresholds)  # decreasing channels were exercised
    pooled = [n for n in deployed.program if n["op"] == "threshold" and "pool" in n]
    assert len(pooled) == 1 and pooled[0]["pool"]["flip"]
    # In chunks (as a large batch runs): 6 chunks of 5 images and a remainder of 2, the same.
    whole = np.asarray(deployed(x))
    assert deployed.chunk(x.shape[1:]) >= len(x)  # small images: one chunk by default
    chunked = binax.deploy.compile(model)
    chunked.batch_chunk = 5
    np.testing.assert_array_equal(np.asarray(chunked(x)), whole)
    chunked.batch_chunk = 0
    with pytest.raises(ValueError, match="batch_chunk must be a positive int"):
        chunked(x[:3])


@pytest.mark.parametrize("channels", [1, 31, 32, 33, 70])
def test_pack_unpack_roundtrip(channels):
    x = jnp.asarray(np.random.default_rng(channels).choice([-1, 1], (3, 5, channels)), jnp.int8)
    p = P.pack(x > 0)
    assert p.words.shape == (3, 5, -(-channels // 32)) and p.words.dtype == jnp.uint32
    np.testing.assert_array_equal(np.asarray(P.unpack(p)), np.asarray(x))
    used = channels % 32
    if used:  # the bits past the last channel are set (+1), as in the kernels' words
        np.testing.assert_array_equal(np.asarray(p.words[..., -1]) >> used, (1 << 32 - used) - 1)


@pytest.mark.parametrize(
    "channels, pad_value, padding, strides, dilation, pool",
    [
        ((40, 70, 33), 1.0, "SAME", 1, 1, ((2, 2), None, "VALID")),
        ((32, 64, 5), -1.0, "SAME", 2, 1, ((3, 3), (2, 2), "SAME")),
        ((13, 36, 9), -1.0, [[2, 0], [1, 1]], 1, 2, ((2, 2), (2, 2), "VALID")),
        ((7, 96, 32), 1.0, "VALID", (2, 1), 1, ((3, 2), (2, 1), [[1, 1], [0, 1]])),
    ],
)
def test_packed_convolutions_equal_the_int8_path(
    channels, pad_value, padding, strides, dilation, pool
):
    """Binary convolutions followed by a threshold run as XOR + popcount on words of 32
    channels on the CPU: the same logits as the int8 path and the float model, bit for bit,
    for channel counts that do not fill whole words and span several, every padding constant,
    strides, dilation, and max pooling (overlapping, padded) of decreasing channels."""
    c1, c2, c3 = channels
    rngs = rbg_rngs(3)
    kw = dict(use_bias=False, padding=padding, pad_value=pad_value, rngs=rngs)
    window, pool_strides, pool_padding = pool
    model = nnx.Sequential(
        BinaryConv(3, c1, (3, 3), input_quantizer=None, pad_value=None, use_bias=False, rngs=rngs),
        nnx.BatchNorm(c1, rngs=rngs),
        BinaryConv(c1, c2, (3, 3), strides=strides, kernel_dilation=dilation, **kw),
        functools.partial(
            nnx.max_pool, window_shape=window, strides=pool_strides, padding=pool_padding
        ),
        nnx.BatchNorm(c2, rngs=rngs),
        BinaryConv(c2, c3, (3, 3), **kw),
        nnx.BatchNorm(c3, rngs=rngs),
        BinaryConv(c3, 4, (3, 3), padding="VALID", rngs=rngs),
    )
    random_stats(model, seed=4)
    x = jax.random.normal(jax.random.key(3, impl="rbg"), (9, 15, 14, 3))
    deployed, out, ref = assert_agree(model, x)
    np.testing.assert_array_equal(out, ref)
    program, arrays = deployed.program, deployed.arrays
    pairs = [
        i
        for i, n in enumerate(program[:-1])
        if n["op"] == "int_conv" and program[i + 1]["op"] == "threshold"
    ]
    assert len(pairs) == 2 and program[pairs[0] + 1]["pool"]["flip"]  # decreasing channels too
    packed = [i for i in range(len(program)) if P._packed_applies(program, i, arrays)]
    assert packed == (pairs if jax.default_backend() == "cpu" else [])  # on the CPU only
    deployed.packed = False  # int8 products instead
    np.testing.assert_array_equal(np.asarray(deployed(x)), out)
    deployed.batch_chunk = 4  # in chunks, the remainder chunk too (packed again)
    deployed.packed = True
    np.testing.assert_array_equal(np.asarray(deployed(x)), out)


@pytest.mark.parametrize(
    "window, strides, dilation, padding, image",
    [
        ((3, 3), (1, 1), (1, 1), "SAME", (28, 28)),
        ((3, 3), (2, 2), (1, 1), "SAME", (13, 11)),
        ((2, 2), (1, 2), (2, 1), "VALID", (9, 11)),
        ((5, 5), (1, 1), (1, 1), [[2, 1], [0, 3]], (7, 12)),
        ((3, 1), (2, 1), (1, 1), "SAME", (7, 5)),
        ((1, 1), (1, 1), (1, 1), "VALID", (4, 3)),
    ],
)
def test_one_channel_float_conv_as_shifted_sum_is_bit_identical(
    window, strides, dilation, padding, image
):
    """A real-input, one-channel convolution with a ±1 kernel (BinaryNet's first layer on
    grayscale images) runs as a sum of shifted inputs on the CPU, with XLA's convolution's bits."""
    node = {
        "op": "conv",
        "kernel_shape": [*window, 1, 24],
        "strides": list(strides),
        "dilation": list(dilation),
        "padding": padding,
        "groups": 1,
        "pad_value": None,
    }
    rng = np.random.default_rng(0)
    magnitude = rng.choice([1e-3, 1.0, 1e3], size=(64, 1, 1, 1))  # rounding at every scale
    x = jnp.asarray(rng.normal(size=(64, *image, 1)) * magnitude, jnp.float32)
    w = jnp.asarray(rng.choice([-1.0, 1.0], size=(*window, 1, 24)), jnp.float32)
    spec = P._spec(node, x, integer=False)
    assert P._shifted_sum_applies(node, {"bits": P.pack_kernel(w)}, spec, len(x))
    got = np.asarray(jax.jit(lambda x, w: P._shifted_sum(x, w, spec))(x, w))
    want = np.asarray(jax.jit(lambda x, w: binax.nn.functional._conv(x, w, spec))(x, w))
    assert got.shape == want.shape
    np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32))


def test_one_channel_first_layer_deploys_exactly_in_chunks():
    """The shifted-sum first layer in a deployed network: stride, odd sizes, +1 padding after
    it, a remainder chunk; logits equal to the float model's, bit for bit."""
    rngs = rbg_rngs(7)
    kw = dict(use_bias=False, rngs=rngs)
    model = nnx.Sequential(
        BinaryConv(1, 8, (3, 3), strides=2, input_quantizer=None, pad_value=None, **kw),
        nnx.BatchNorm(8, rngs=rngs),
        BinaryConv(8, 6, (3, 3), pad_value=1.0, **kw),
        nnx.BatchNorm(6, rngs=rngs),
    )
    random_stats(model, seed=8)
    x = jax.random.normal(jax.random.key(2, impl="rbg"), (23, 13, 11, 1))
    deployed, out, ref = assert_agree(model, x)
    first = deployed.program[0]
    assert first["op"] == "conv"
    spec = P._spec(first, x, integer=False)
    bits = deployed.arrays[0]
    assert P._shifted_sum_applies(first, bits, spec, len(x))
    np.testing.assert_array_equal(out, ref)
    chunked = binax.deploy.compile(model)
    chunked.batch_chunk = 4  # 5 chunks of 4 and a remainder of 3 (that one by XLA's conv)
    assert not P._shifted_sum_applies(first, bits, spec, 3)
    np.testing.assert_array_equal(np.asarray(chunked(x)), out)
    # A real-valued kernel or several input channels keep XLA's convolution.
    real = {"kernel": np.ones((3, 3, 1, 8), np.float32)}
    assert not P._shifted_sum_applies(first, real, spec, len(x))
    three = {**first, "kernel_shape": [3, 3, 3, 8]}
    assert not P._shifted_sum_applies(three, bits, spec, len(x))


def test_thresholds_exact_at_ties():
    """BatchNorm inputs exactly on the threshold go the way float BatchNorm + sign sends them."""
    fan_in = 6
    rngs = rbg_rngs(0)
    first = BinaryLinear(fan_in, 16, use_bias=False, input_quantizer="ste_sign", rngs=rngs)
    norm = nnx.BatchNorm(16, rngs=rngs)
    last = BinaryLinear(16, 3, use_bias=False, rngs=rngs)
    model = nnx.Sequential(first, norm, last)
    # y = x . w takes the values -6, -4, ..., 6. Put the BatchNorm's zero exactly on reachable
    # integers (mean), with positive, negative and zero scales, and biases that move the
    # crossing by less than one step or exactly onto an integer after rounding.
    mean = np.array([0, 2, -2, 4, 6, -6, 2, 0, 1, 3, 0, 0, 2, -4, 2, 0], np.float32)
    scale = np.array([1, 1, 1, -1, -1, 1, 0.5, -2, 1, 1, 0, 0, 3, -1, 1e-8, -1e-8], np.float32)
    bias = np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, -1, -3e-7, 0, 0, 0], np.float32)
    norm.mean[...], norm.scale[...], norm.bias[...] = map(jnp.asarray, (mean, scale, bias))
    norm.var[...] = jnp.full((16,), 1 - 1e-5, jnp.float32)  # rsqrt(var + eps) == 1
    model.eval()
    x = jax.random.normal(jax.random.key(0, impl="rbg"), (512, fan_in))
    y = np.asarray(jnp.where(x >= 0, 1.0, -1.0) @ jnp.where(first.kernel[...] >= 0, 1.0, -1.0))
    assert np.any(y == mean)  # ties do happen in this batch
    deployed, _, _ = assert_agree(model, x)
    hidden_float = np.asarray(norm(jnp.asarray(y))) >= 0
    s, t = (deployed.arrays[2][k] for k in ("s", "t"))
    np.testing.assert_array_equal(s * y >= t, hidden_float)
    # sign0(0.0) and sign0(-0.0) are +1: a channel centred on a reachable y is on there.
    assert t[0] == 0 and s[0] == 1 and t[1] == 2 and t[3] == -4 and s[3] == -1
    assert s[10] == 0 and s[11] == 0 and (t[10] <= 0) and (t[11] > 0)  # constant channels


def test_threshold_from_decisions():
    ys = np.arange(-3, 4)
    d = np.stack(
        [ys >= 1, ys <= -2, np.ones(7, bool), np.zeros(7, bool), ys >= -3, ys <= 3], axis=1
    )
    s, t = P.threshold_from_decisions(ys, d)
    np.testing.assert_array_equal(s[:, None] * ys[None] >= t[:, None], d.T)
    np.testing.assert_array_equal(s, [1, -1, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="switch sign more than once"):
        P.threshold_from_decisions(ys, (ys % 2 == 0)[:, None])


@pytest.mark.parametrize("shape", [(3, 3, 5, 7), (13, 4), (1, 1, 1, 1), (2, 9, 3)])
def test_kernels_are_packed_one_bit_per_weight_along_the_reduction_axis(shape):
    w = np.where(np.random.default_rng(0).normal(size=shape) >= 0, 1.0, -1.0)
    bits = P.pack_kernel(w)
    fan_in = int(np.prod(shape[:-1]))
    assert bits.dtype == np.uint8 and bits.shape == (-(-fan_in // 8), shape[-1])
    np.testing.assert_array_equal(np.asarray(P.unpack_kernel(bits, shape, jnp.int8)), w)
    # Consecutive bits of a byte are consecutive weights along the reduction axis.
    np.testing.assert_array_equal(
        np.unpackbits(bits, axis=0)[:fan_in], (w.reshape(fan_in, -1) > 0).astype(np.uint8)
    )


def test_save_load_roundtrip_and_size(tmp_path):
    model = random_stats(
        models.get("binarynet", input_shape=(8, 8, 1), width_multiplier=1 / 8, rngs=rbg_rngs(0)),
        seed=1,
    )
    deployed = binax.deploy.compile(model, meta={"note": "test"})
    path = tmp_path / "m.bnx"
    size = deployed.save(path)
    assert size == os.path.getsize(path) and deployed.nbytes < size < deployed.nbytes + 16384
    loaded = binax.deploy.load(path)
    assert loaded.meta == {"note": "test"}
    x = digits_test()[0][:50]
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(deployed(x)))
    binary = sum(
        int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, binax.nn.BinaryParam))
    )
    packed = sum(a["bits"].nbytes for a in deployed.arrays if isinstance(a, dict) and "bits" in a)
    assert packed <= binary / 8 + 8 * 64  # 1 bit per weight (plus byte padding per column)


def test_malformed_and_truncated_files_are_clear_errors(tmp_path):
    model = random_stats(models.get("mlp", input_shape=10, hidden_sizes=(9,), rngs=rbg_rngs(0)), 1)
    data = binax.deploy.to_bytes(binax.deploy.compile(model))
    assert binax.deploy.from_bytes(data).program
    err = binax.deploy.DeployFileError
    for cut in (3, 20, 30, len(data) // 2, len(data) - 1):
        with pytest.raises(err, match="truncated|not a binax|corrupt"):
            binax.deploy.from_bytes(data[:cut])
    with pytest.raises(err, match="truncated"):
        binax.deploy.from_bytes(data[:-1])
    with pytest.raises(err, match="not a binax deployed-model file"):
        binax.deploy.from_bytes(b"PK\x03\x04" + data[4:])
    flipped = bytearray(data)
    flipped[-5] ^= 0x10
    with pytest.raises(err, match="arrays fail the CRC-32"):
        binax.deploy.from_bytes(bytes(flipped))
    flipped = bytearray(data)
    flipped[40] ^= 0x01
    with pytest.raises(err, match="header fails the CRC-32"):
        binax.deploy.from_bytes(bytes(flipped))
    newer = bytearray(data)
    newer[8] = 99
    with pytest.raises(err, match="format version 99"):
        binax.deploy.from_bytes(bytes(newer))
    with pytest.raises(err, match="longer|corrupt"):
        binax.deploy.from_bytes(data + b"\0")
    # A well-formed file (checksums right) whose program names an op this binax does not know.
    prefix = struct.Struct("<8sIQI")
    magic, version, head_len, _ = prefix.unpack_from(data)
    header = json.loads(data[prefix.size : prefix.size + head_len])
    header["program"][0]["op"] = "lut_conv"
    head = json.dumps(header).encode()
    unknown = prefix.pack(magic, version, len(head), zlib.crc32(head)) + head
    with pytest.raises(err, match="not a known op .'lut_conv'."):
        binax.deploy.from_bytes(unknown + data[prefix.size + head_len :])
    path = tmp_path / "cut.bnx"
    path.write_bytes(data[:-7])
    with pytest.raises(err, match=str(path)):
        binax.deploy.load(path)


def test_undeployable_models_are_clear_errors():
    class Custom(nnx.Module):
        def __init__(self):
            self.layer = BinaryLinear(4, 2, rngs=rbg_rngs(0))

        def __call__(self, x):
            return self.layer(x)

    with pytest.raises(ValueError, match="register"):
        binax.deploy.compile(Custom())
    tanh = BinaryLinear(4, 2, input_quantizer=lambda x: jnp.clip(x, -1, 1), rngs=rbg_rngs(0))
    with pytest.raises(ValueError, match="input_quantizer"):
        binax.deploy.compile(tanh)
    with pytest.raises(ValueError, match="model must be a Flax NNX module"):
        binax.deploy.compile(lambda x: x)
    rngs = rbg_rngs(0)
    conv = BinaryConv(3, 40, (3, 3), use_bias=False, rngs=rngs)
    with pytest.raises(ValueError, match="by keyword"):  # a partial binds max_pool's inputs first
        binax.deploy.compile(nnx.Sequential(conv, functools.partial(nnx.max_pool, (2, 2))))
    # Pooling windows that hold only padding have no binary value (the float model sees -inf).
    pool = functools.partial(
        nnx.max_pool, window_shape=(2, 2), strides=(2, 2), padding=[(2, 0)] * 2
    )
    norm = nnx.BatchNorm(40, rngs=rngs)
    empty = binax.deploy.compile(
        nnx.Sequential(conv, pool, norm, BinaryConv(40, 4, (1, 1), rngs=rngs))
    )
    x = jnp.ones((2, 6, 6, 3))
    for packed in (True, False):
        empty.packed = packed
        with pytest.raises(ValueError, match="only padding"):
            empty(x)
    # register teaches compile a class of one's own.
    binax.deploy.register(Custom, lambda m: binax.deploy.lower_layer(m.layer))
    model = Custom()
    x = jax.random.normal(jax.random.key(0, impl="rbg"), (8, 4))
    np.testing.assert_array_equal(np.asarray(binax.deploy.compile(model)(x)), np.asarray(model(x)))


def test_binax_deploy_command_on_a_trained_run(tmp_path, capsys):
    from binax.deploy.cli import main
    from binax.train import Config, train

    run_dir = str(tmp_path / "run")
    result = train(
        Config(
            model="binarynet",
            model_kwargs={"width_multiplier": 1 / 16},
            dataset="digits",
            optimizer="bop",
            epochs=1,
            steps_per_epoch=3,
            batch_size=64,
            run_dir=run_dir,
            progress=False,
            plots=False,
        )
    )
    out = str(tmp_path / "model.bnx")
    assert main([run_dir, out]) == 0
    text = capsys.readouterr().out
    assert "predictions equal to the float model's" in text
    images, _ = digits_test()
    deployed = binax.deploy.load(out)
    assert deployed.meta["config"]["model"] == "binarynet"
    ref = float_forward(result.model(), images)  # the state of the last checkpoint
    got = np.asarray(deployed(images))
    np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1))  # every test image
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert main([str(tmp_path / "nowhere"), out]) == 2
    assert "config.json does not exist" in capsys.readouterr().err


def test_linen_sequential_through_its_nnx_twin():
    import flax.linen as nn

    from binax import linen as bl

    model = nn.Sequential(
        [
            bl.BinaryConv(8, (3, 3), input_quantizer=None, pad_value=None, use_bias=False),
            nn.BatchNorm(use_running_average=True),
            bl.BinaryConv(6, (3, 3), use_bias=False),
            functools.partial(nn.max_pool, window_shape=(2, 2), strides=(2, 2)),
            nn.BatchNorm(use_running_average=True),
            bl.BinaryConv(5, (3, 3), pad_value=-1.0, scale="learned"),
        ]
    )
    x = jax.random.normal(jax.random.key(0, impl="rbg"), (16, 10, 10, 3))
    variables = model.init(jax.random.key(1, impl="rbg"), x)
    rng = np.random.default_rng(0)
    variables = jax.tree.map(
        lambda v: jnp.asarray(v + rng.normal(0, 2, v.shape), jnp.float32) if v.ndim == 1 else v,
        variables,
    )
    variables["batch_stats"] = jax.tree.map(jnp.abs, variables["batch_stats"])  # var > 0
    ref = np.asarray(model.apply(variables, x))
    deployed = binax.deploy.compile(model, variables)
    out = np.asarray(deployed(x))
    np.testing.assert_array_equal(out.argmax(-1), ref.argmax(-1))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert "threshold" in {n["op"] for n in deployed.program}
    with pytest.raises(ValueError, match="variables"):
        binax.deploy.compile(model)


def test_pallas_packed_dot_is_the_int8_product_in_interpret_mode():
    from binax.deploy.pallas import packed_dot

    rng = np.random.default_rng(0)
    for m, k, n in [(5, 13, 7), (33, 300, 130)]:  # partial bytes, words and tiles
        x = np.where(rng.normal(size=(m, k)) >= 0, 1, -1).astype(np.int8)
        w = np.where(rng.normal(size=(k, n)) >= 0, 1, -1).astype(np.int8)
        x_bits = jnp.packbits(jnp.asarray(x) > 0, axis=-1)
        got = packed_dot(x_bits, jnp.asarray(P.pack_kernel(w)), k, interpret=True)
        np.testing.assert_array_equal(np.asarray(got), x.astype(np.int32) @ w.astype(np.int32))
    with pytest.raises(ValueError, match=r"w_bits \(2, N\) for fan_in=13"):
        packed_dot(x_bits[:, :2], jnp.zeros((3, 4), jnp.uint8), 13, interpret=True)
