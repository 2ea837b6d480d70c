"""Flax NNX layers for binary neural networks.

* `BinaryLinear`, `BinaryConv`: dense and N-d convolution layers with input and kernel quantizers,
  an optional per-channel scale, and binary (``+1``/``-1``) padding.
* `BinaryParam`: the `nnx.Param` subclass that marks binary kernels; `binary_labels` turns a model
  into the label tree for `binax.partition` / `optax.partition`.
* `BinaryMultiHeadAttention`, `BinaryTransformerBlock`, `ElasticLinear`, `ElasticBinarization`,
  `BinaryEmbed`: layers of binary transformers in the style of BiT (`binax.nn.attention`).
* `binax.nn.functional`: the pure functions behind the layers (shared with `binax.linen`).
"""

from binax.nn import functional
from binax.nn.attention import (
    Attention,
    BinaryEmbed,
    BinaryMultiHeadAttention,
    BinaryTransformerBlock,
    ElasticBinarization,
    ElasticLinear,
)
from binax.nn.layers import BinaryConv, BinaryLinear, BinaryParam, FixedScale, binary_labels

__all__ = [
    "Attention",
    "BinaryEmbed",
    "BinaryMultiHeadAttention",
    "BinaryTransformerBlock",
    "ElasticBinarization",
    "ElasticLinear",
    "BinaryConv",
    "BinaryLinear",
    "BinaryParam",
    "FixedScale",
    "binary_labels",
    "functional",
]
