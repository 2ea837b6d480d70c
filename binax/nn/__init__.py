"""Flax NNX layers for binary neural networks.

* `BinaryLinear`, `BinaryConv`: dense and N-d convolution layers with input and kernel quantizers,
  an optional per-channel scale, and binary (``+1``/``-1``) padding.
* `BinaryParam`: the `nnx.Param` subclass that marks binary kernels; `binary_labels` turns a model
  into the label tree for `binax.partition` / `optax.partition`.
* `BinaryMultiHeadAttention`, `BinaryTransformerBlock`, `ElasticLinear`, `ElasticBinarization`,
  `BinaryEmbed`: layers of binary transformers in the style of BiT (`binax.nn.attention`).
* `binax.nn.functional`: the pure functions behind the layers (shared with `binax.linen`).
"""

import inspect

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


def _show_init_signature(cls):
    """Makes ``help(cls)`` and ``inspect.signature(cls)`` show ``cls.__init__``'s arguments.

    Flax's module metaclass defines ``__call__(*args, **kwargs)``, which is what they would show.
    """
    sig = inspect.signature(cls.__init__)
    cls.__signature__ = sig.replace(parameters=list(sig.parameters.values())[1:])
    return cls


for _cls in (
    BinaryConv,
    BinaryLinear,
    FixedScale,
    BinaryEmbed,
    BinaryMultiHeadAttention,
    BinaryTransformerBlock,
    ElasticBinarization,
    ElasticLinear,
):
    _show_init_signature(_cls)

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
