"""A binary multilayer perceptron."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx

from binax import quantizers as q
from binax.models import _common
from binax.nn import BinaryLinear


class BinaryMLP(nnx.Module):
    """Dense → BatchNorm blocks with binary weights and sign activations.

    Every layer is a `binax.nn.BinaryLinear` (no bias) followed by BatchNorm without scale, as in
    the BinaryNet MLP of Hubara et al. ("Binarized Neural Networks", NeurIPS 2016). The network
    input (flattened) is not quantized; every later layer binarizes its input with
    ``input_quantizer``, so activations are signs of the BatchNorm outputs. The output is the last
    BatchNorm's output (logits).

    Args:
      input_shape: shape of one example (e.g. ``(28, 28, 1)``) or an int; inputs are flattened.
      num_classes: output size.
      hidden_sizes: widths of the hidden layers.
      real_first: make the first layer's kernel real-valued (`nnx.Linear`).
      real_last: make the last layer's kernel real-valued (its input is still binarized).
      input_quantizer: activation quantizer of every layer but the first.
      kernel_quantizer: quantizer of the binary kernels (`binax.nn.BinaryParam`).
      bn_momentum: BatchNorm momentum.
      arithmetic, backward_dtype: how the binary layers compute (see
        `binax.nn.functional.binary_dense`): by default exact integer products on the CPU;
        ``backward_dtype=jnp.bfloat16`` for bfloat16 backward products.
      rngs: `nnx.Rngs` for the parameters.
    """

    def __init__(
        self,
        input_shape: int | Sequence[int] = (28, 28, 1),
        num_classes: int = 10,
        hidden_sizes: Sequence[int] = (512, 512),
        *,
        real_first: bool = False,
        real_last: bool = False,
        input_quantizer: q.QuantizerLike = "ste_sign",
        kernel_quantizer: q.QuantizerLike = "ste_sign",
        bn_momentum: float = 0.9,
        arithmetic: str = "auto",
        backward_dtype: Any = None,
        rngs: nnx.Rngs,
    ):
        in_features = (
            input_shape if isinstance(input_shape, int) else _common.flat_size(input_shape)
        )
        hidden_sizes = tuple(hidden_sizes)
        if not all(isinstance(h, int) and h > 0 for h in hidden_sizes):
            raise ValueError(f"BinaryMLP: hidden_sizes must be positive ints, got {hidden_sizes}")
        real = dict(arithmetic=_common.float_if_integer(arithmetic), backward_dtype=backward_dtype)
        how = dict(arithmetic=arithmetic, backward_dtype=backward_dtype)
        sizes = (in_features, *hidden_sizes, num_classes)
        n = len(sizes) - 1
        layers, norms = [], []
        for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            first, last = i == 0, i == n - 1
            if first and real_first:
                layer = nnx.Linear(d_in, d_out, use_bias=False, rngs=rngs)
            elif last and real_last and not first:
                layer = BinaryLinear(
                    d_in,
                    d_out,
                    use_bias=False,
                    input_quantizer=input_quantizer,
                    kernel_quantizer=None,
                    binary_kernel=False,
                    **real,
                    rngs=rngs,
                )
            else:
                layer = BinaryLinear(
                    d_in,
                    d_out,
                    use_bias=False,
                    input_quantizer=None if first else input_quantizer,
                    kernel_quantizer=kernel_quantizer,
                    **(real if first else how),
                    rngs=rngs,
                )
            layers.append(layer)
            norms.append(
                _common.batch_norm(d_out, use_scale=False, momentum=bn_momentum, rngs=rngs)
            )
        self.layers = nnx.List(layers)
        self.norms = nnx.List(norms)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape((x.shape[0], -1))
        for layer, norm in zip(self.layers, self.norms, strict=True):
            x = norm(layer(x))
        return x
