"""binax.summary: parameters by precision, deployable memory, binary vs real MACs."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from binax import models
from binax import nn as bnn
from binax.summary import summary


def rngs():
    return nnx.Rngs(jax.random.key(0, impl="rbg"))


class Small(nnx.Module):
    def __init__(self, rngs):
        self.conv0 = bnn.BinaryConv(
            1, 4, (3, 3), input_quantizer=None, pad_value=None, use_bias=False, rngs=rngs
        )
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.conv1 = bnn.BinaryConv(4, 4, (3, 3), scale="fixed", rngs=rngs)
        self.head = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        x = self.conv1(self.bn(self.conv0(x)))
        return self.head(x.mean(axis=(1, 2)))


def test_small_model_by_hand():
    s = summary(Small(rngs()), input_shape=(1, 6, 6, 1), print_fn=None)
    rows = {r["path"]: r for r in s.layers}
    assert [r["path"] for r in s.layers] == ["conv0", "bn", "conv1", "head"]  # execution order
    assert rows["conv0"] == {
        "path": "conv0",
        "type": "BinaryConv",
        "input_precision": 32,
        "output_shape": (1, 6, 6, 4),
        "params_1bit": 36,
        "params_32bit": 0,
        "non_trainable": 0,
        "memory_bits": 36,
        "memory_kb": 36 / 8192,
        "binary_macs": 0,
        "real_macs": 6 * 6 * 4 * 9,  # real input: real MACs
    }
    assert rows["bn"]["params_32bit"] == 8 and rows["bn"]["non_trainable"] == 8
    assert rows["bn"]["memory_bits"] == 2 * 4 * 32  # folded scale and shift
    c1 = rows["conv1"]
    assert (c1["params_1bit"], c1["params_32bit"], c1["non_trainable"]) == (144, 4, 4)
    assert c1["input_precision"] == 1
    assert (c1["binary_macs"], c1["real_macs"]) == (6 * 6 * 4 * 36, 0)
    assert c1["memory_bits"] == 144 + 32 * 8
    assert (rows["head"]["real_macs"], rows["head"]["params_32bit"]) == (12, 15)
    assert rows["head"]["output_shape"] == (1, 3)
    t = s.totals
    assert (t["params_1bit"], t["params_32bit"], t["non_trainable"]) == (180, 27, 12)
    assert (t["trainable"], t["total_params"]) == (207, 219)
    assert t["memory_bits"] == 180 + 32 * (8 + 8 + 15)
    assert t["float32_bits"] == 32 * (180 + 8 + 8 + 15)
    assert t["compression_ratio"] == pytest.approx(t["float32_bits"] / t["memory_bits"])
    assert (t["binary_macs"], t["real_macs"]) == (5184, 1296 + 12)
    assert t["binary_mac_ratio"] == pytest.approx(5184 / (5184 + 1308))


def test_macs_scale_with_batch_and_are_optional():
    model = Small(rngs())
    one = summary(model, input_shape=(1, 6, 6, 1), print_fn=None).totals
    four = summary(model, input_shape=(4, 6, 6, 1), print_fn=None).totals
    assert four["binary_macs"] == 4 * one["binary_macs"]
    none = summary(model, print_fn=None)
    assert none.totals["binary_macs"] is None and none.layers[0]["binary_macs"] is None
    assert none.totals["memory_bits"] == one["memory_bits"]


def test_published_sizes_of_full_architectures():
    """Shape-only (nnx.eval_shape) full-size models against published numbers."""
    resnet = nnx.eval_shape(lambda: models.BinaryResNet18(rngs=nnx.Rngs(0)))
    t = summary(resnet, input_shape=(1, 224, 224, 3), print_fn=None).totals
    # ResNet-18: 1.814e9 MACs; Bi-Real Net-18: 1.68e9 binary operations, ~1.4e8 real ones
    # (Liu et al., ECCV 2018, Table 4). 16 binary 3x3 convs, computed layer by layer:
    binary = 4 * 56 * 56 * 64 * 64 * 9 + 3 * (57_802_752 + 3 * 115_605_504)
    assert t["binary_macs"] == binary == 1_676_279_808
    assert t["real_macs"] == 112 * 112 * 3 * 64 * 49 + 3 * 6_422_528 + 512 * 1000
    assert t["total_macs"] == 1_814_073_344
    net = nnx.eval_shape(lambda: models.BinaryNet(rngs=nnx.Rngs(0)))
    t = summary(net, input_shape=(1, 32, 32, 3), print_fn=None).totals
    convs = 9 * (3 * 128 + 128 * 128 + 128 * 256 + 256 * 256 + 256 * 512 + 512 * 512)
    dense = 4 * 4 * 512 * 1024 + 1024 * 1024 + 1024 * 10
    assert t["params_1bit"] == convs + dense == 14_022_016  # BinaryNet's 14M binary weights
    assert t["params_32bit"] == 2 * 1024 + 2 * 512 + 2 * 256 + 2 * 128 + 10  # BN offsets
    assert t["compression_ratio"] > 31


def test_printed_table(capsys):
    s = summary(Small(rngs()), input_shape=(1, 6, 6, 1))
    out = capsys.readouterr().out
    assert out.strip() == str(s).strip()
    for text in (
        "conv1",
        "BinaryConv",
        "1-bit MACs",
        "Compression ratio of memory",
        "Ratio of MACs that are binarized",
        "5,184",
    ):
        assert text in out
    lines = []
    summary(Small(rngs()), print_fn=lines.append)
    assert len(lines) == 1 and "Number of MACs" not in lines[0]


def test_bad_model():
    with pytest.raises(ValueError, match="model"):
        summary({"kernel": jnp.ones((2, 2))})
