"""Flax NNX layers for binary neural networks.

* `BinaryLinear`, `BinaryConv`: dense and N-d convolution layers with input and kernel quantizers,
  an optional per-channel scale, and binary (``+1``/``-1``) padding.
* `BinaryParam`: the `nnx.Param` subclass that marks binary kernels; `binary_labels` turns a model
  into the label tree for `binax.partition` / `optax.partition`.
* `binax.nn.functional`: the pure functions behind the layers (shared with `binax.linen`).
"""

from binax.nn import functional
from binax.nn.layers import BinaryConv, BinaryLinear, BinaryParam, FixedScale, binary_labels

__all__ = [
    "BinaryConv",
    "BinaryLinear",
    "BinaryParam",
    "FixedScale",
    "binary_labels",
    "functional",
]
