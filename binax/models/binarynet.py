"""BinaryNet for CIFAR-10-sized images, as trained with Bop."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx

from binax import quantizers as q
from binax.models import _common
from binax.nn import BinaryConv, BinaryLinear
from binax.nn import functional as F

# Conv widths ('P' = 2x2 max pooling), then dense widths, before the output layer.
CONV_PLAN = (128, 128, "P", 256, 256, "P", 512, 512, "P")
DENSE_PLAN = (1024, 1024)


class BinaryNet(nnx.Module):
    """The BinaryNet CNN: 128-128-P-256-256-P-512-512-P-1024-1024-``num_classes``.

    Each 3x3 convolution (``'SAME'``, no bias) is followed by 2x2 max pooling where the plan says
    ``P``, then BatchNorm without scale; each dense layer by BatchNorm without scale; the output
    is the last BatchNorm's output (logits). Every kernel is binary, the first and last included,
    and every layer but the first binarizes its input (sign activations except on the network
    input), as in the Bop paper (Helwegen et al., NeurIPS 2019) and Hubara et al. (NeurIPS 2016).
    With ``real_first_last=True`` the first convolution and the last dense layer have real-valued
    kernels, as in the SGDAT paper (Gu et al., Neurocomputing 2023).

    Args:
      input_shape: ``(height, width, channels)`` of one image, e.g. ``(32, 32, 3)`` or
        ``(28, 28, 1)``; at least 8x8 (three poolings).
      num_classes: output size.
      width_multiplier: scales every width (e.g. ``1/16`` for a tiny test model).
      real_first_last: real-valued first conv and last dense kernels.
      input_quantizer, kernel_quantizer: activation and binary-kernel quantizers.
      pad_value: border value of the binarized inputs of convolutions 2-6 (+1 or -1); the first
        convolution's real input is padded with zeros.
      bn_momentum: BatchNorm momentum.
      arithmetic, kernel_grad, backward_dtype: how the binary layers compute (see
        `binax.nn.functional.binary_conv`): by default exact integer products on the CPU and the
        patch-product kernel gradient; ``backward_dtype=jnp.bfloat16`` for bfloat16 backward
        products.
      rngs: `nnx.Rngs`.
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (32, 32, 3),
        num_classes: int = 10,
        *,
        width_multiplier: float = 1.0,
        real_first_last: bool = False,
        input_quantizer: q.QuantizerLike = "ste_sign",
        kernel_quantizer: q.QuantizerLike = "ste_sign",
        pad_value: float = 1.0,
        bn_momentum: float = 0.9,
        arithmetic: str = "auto",
        kernel_grad: str = "auto",
        backward_dtype: Any = None,
        rngs: nnx.Rngs,
    ):
        height, width, channels = _common.image_shape(input_shape, "BinaryNet")
        if not width_multiplier > 0:
            raise ValueError(f"BinaryNet: width_multiplier must be > 0, got {width_multiplier}")
        pools_count = CONV_PLAN.count("P")
        if height >> pools_count < 1 or width >> pools_count < 1:
            raise ValueError(
                f"BinaryNet: input_shape {tuple(input_shape)} is too small for {pools_count} "
                "2x2 poolings (at least 8x8)"
            )
        bn = dict(use_scale=False, momentum=bn_momentum, rngs=rngs)

        convs, conv_norms, pools = [], [], []
        features = channels
        for i, item in enumerate(CONV_PLAN):
            if item == "P":
                pools[-1] = True
                height, width = height // 2, width // 2
                continue
            out = _common.scaled(item, width_multiplier)
            if i == 0 and real_first_last:
                conv = nnx.Conv(features, out, (3, 3), padding="SAME", use_bias=False, rngs=rngs)
            else:
                conv = BinaryConv(
                    features,
                    out,
                    (3, 3),
                    padding="SAME",
                    use_bias=False,
                    input_quantizer=None if i == 0 else input_quantizer,
                    kernel_quantizer=kernel_quantizer,
                    pad_value=None if i == 0 else pad_value,
                    kernel_grad=kernel_grad,
                    arithmetic=_common.float_if_integer(arithmetic) if i == 0 else arithmetic,
                    backward_dtype=backward_dtype,
                    rngs=rngs,
                )
            convs.append(conv)
            conv_norms.append(_common.batch_norm(out, **bn))
            pools.append(False)
            features = out

        dense, dense_norms = [], []
        features = height * width * features
        sizes = [_common.scaled(d, width_multiplier) for d in DENSE_PLAN] + [num_classes]
        for j, out in enumerate(sizes):
            last = j == len(sizes) - 1
            dense.append(
                BinaryLinear(
                    features,
                    out,
                    use_bias=False,
                    input_quantizer=input_quantizer,
                    kernel_quantizer=None if (last and real_first_last) else kernel_quantizer,
                    binary_kernel=not (last and real_first_last),
                    arithmetic=_common.float_if_integer(arithmetic)
                    if last and real_first_last
                    else arithmetic,
                    backward_dtype=backward_dtype,
                    rngs=rngs,
                )
            )
            dense_norms.append(_common.batch_norm(out, **bn))
            features = out

        self.convs = nnx.List(convs)
        self.conv_norms = nnx.List(conv_norms)
        self.pools = tuple(pools)
        self.dense = nnx.List(dense)
        self.dense_norms = nnx.List(dense_norms)

    def __call__(self, x: jax.Array) -> jax.Array:
        for conv, norm, pool in zip(self.convs, self.conv_norms, self.pools, strict=True):
            x = conv(x)
            if pool:
                x = F.max_pool(x, (2, 2))
            x = norm(x)
        x = x.reshape((x.shape[0], -1))
        for layer, norm in zip(self.dense, self.dense_norms, strict=True):
            x = norm(layer(x))
        return x
