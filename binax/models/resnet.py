"""A Bi-Real Net / ReActNet-style binary ResNet-18."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from binax import quantizers as q
from binax.models import _common
from binax.nn import BinaryConv
from binax.nn import functional as F

STAGES = (1, 2, 4, 8)  # stage widths, in units of ``width``
# The real-valued convolutions (stem, shortcuts) take binax's gradients: on the CPU a kernel
# gradient by patch products instead of XLA:CPU's slower kernel-gradient convolution.
_REAL_CONV = dict(conv_general_dilated=F.conv_general_dilated)
BLOCKS_PER_STAGE = 2


class BiRealBlock(nnx.Module):
    """Two binary 3x3 convolutions, each with its own real-valued shortcut (Bi-Real Net).

    ``x = BN(bconv1(x)) + shortcut(x)`` then ``x = BN(bconv2(x)) + x``. When the block changes
    resolution or width, the shortcut is 2x2 average pooling (if strided) followed by a real 1x1
    convolution and BatchNorm (Liu et al., ECCV 2018; Liu et al., ReActNet, ECCV 2020).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        stride: int,
        *,
        input_quantizer: q.QuantizerLike,
        kernel_quantizer: q.QuantizerLike,
        pad_value: float,
        bn_momentum: float,
        arithmetic: str = "auto",
        kernel_grad: str = "auto",
        backward_dtype: Any = None,
        rngs: nnx.Rngs,
    ):
        conv = dict(
            use_bias=False,
            input_quantizer=input_quantizer,
            kernel_quantizer=kernel_quantizer,
            pad_value=pad_value,
            arithmetic=arithmetic,
            kernel_grad=kernel_grad,
            backward_dtype=backward_dtype,
            rngs=rngs,
        )
        bn = dict(use_scale=True, momentum=bn_momentum, rngs=rngs)
        self.stride = stride
        self.conv1 = BinaryConv(in_features, out_features, (3, 3), strides=stride, **conv)
        self.bn1 = _common.batch_norm(out_features, **bn)
        self.conv2 = BinaryConv(out_features, out_features, (3, 3), **conv)
        self.bn2 = _common.batch_norm(out_features, **bn)
        if stride != 1 or in_features != out_features:
            self.downsample = nnx.Conv(
                in_features, out_features, (1, 1), use_bias=False, rngs=rngs, **_REAL_CONV
            )
            self.downsample_bn = _common.batch_norm(out_features, **bn)
        else:
            self.downsample = None
            self.downsample_bn = None

    def __call__(self, x: jax.Array) -> jax.Array:
        shortcut = x
        if self.downsample is not None:
            if self.stride != 1:
                s = (self.stride, self.stride)
                shortcut = nnx.avg_pool(
                    shortcut, s, strides=s, padding="SAME", count_include_pad=False
                )
            shortcut = self.downsample_bn(self.downsample(shortcut))
        x = self.bn1(self.conv1(x)) + shortcut
        return self.bn2(self.conv2(x)) + x


class BinaryResNet18(nnx.Module):
    """Binary ResNet-18 in the style of Bi-Real Net and ReActNet.

    Real-valued: the stem convolution, the 1x1 shortcut convolutions of the downsampling blocks
    and the final dense layer (as in XNOR-Net and Bi-Real Net). Binary: the 16 3x3 convolutions
    of the four stages (`binax.nn.BinaryConv`, inputs binarized by ``input_quantizer``, borders
    padded with ``pad_value``), each with a real-valued shortcut addition (`BiRealBlock`).
    Stages have widths ``width * (1, 2, 4, 8)`` and strides 1, 2, 2, 2; global average pooling
    then the dense classifier.

    Stems: ``'imagenet'``, a 7x7 stride-2 convolution, BatchNorm and 3x3 stride-2 max pooling
    (for 224x224 inputs); ``'small'``, a 3x3 stride-1 convolution and BatchNorm (for 28x28 and
    32x32 inputs, as CIFAR ResNets do). ``'auto'`` picks ``'small'`` below 64 pixels.

    References:
      Liu, Wu, Luo, Yang, Liu, Cheng, "Bi-Real Net", ECCV 2018;
      Liu, Shen, Savvides, Cheng, "ReActNet", ECCV 2020.

    Args:
      input_shape: ``(height, width, channels)``, e.g. ``(224, 224, 3)``, ``(32, 32, 3)`` or
        ``(28, 28, 1)``.
      num_classes: output size.
      width: width of the first stage (64 in ResNet-18; small values make tiny test models).
      stem: ``'auto'``, ``'imagenet'`` or ``'small'``.
      input_quantizer: activation quantizer of the binary convolutions (Bi-Real Net's
        ``'approx_sign'`` by default).
      kernel_quantizer: quantizer of the binary kernels.
      pad_value: +1 or -1, the border value of binarized activations.
      bn_momentum: BatchNorm momentum.
      arithmetic, kernel_grad, backward_dtype: how the binary layers compute (see
        `binax.nn.functional.binary_conv`): by default exact integer products on the CPU and the
        patch-product kernel gradient; ``backward_dtype=jnp.bfloat16`` for bfloat16 backward
        products.
      rngs: `nnx.Rngs`.
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (224, 224, 3),
        num_classes: int = 1000,
        *,
        width: int = 64,
        stem: str = "auto",
        input_quantizer: q.QuantizerLike = "approx_sign",
        kernel_quantizer: q.QuantizerLike = "ste_sign",
        pad_value: float = 1.0,
        bn_momentum: float = 0.9,
        arithmetic: str = "auto",
        kernel_grad: str = "auto",
        backward_dtype: Any = None,
        rngs: nnx.Rngs,
    ):
        height, w, channels = _common.image_shape(input_shape, "BinaryResNet18")
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"BinaryResNet18: width must be a positive int, got {width!r}")
        if stem == "auto":
            stem = "small" if min(height, w) < 64 else "imagenet"
        if stem not in ("imagenet", "small"):
            raise ValueError(
                f"BinaryResNet18: stem must be 'auto', 'imagenet' or 'small', got {stem!r}"
            )
        self.stem_type = stem
        if stem == "imagenet":
            self.stem = nnx.Conv(
                channels, width, (7, 7), strides=2, use_bias=False, rngs=rngs, **_REAL_CONV
            )
        else:
            self.stem = nnx.Conv(channels, width, (3, 3), use_bias=False, rngs=rngs, **_REAL_CONV)
        self.stem_bn = _common.batch_norm(width, use_scale=True, momentum=bn_momentum, rngs=rngs)

        blocks = []
        features = width
        for i, mult in enumerate(STAGES):
            out = width * mult
            for j in range(BLOCKS_PER_STAGE):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(
                    BiRealBlock(
                        features,
                        out,
                        stride,
                        input_quantizer=input_quantizer,
                        kernel_quantizer=kernel_quantizer,
                        pad_value=pad_value,
                        bn_momentum=bn_momentum,
                        arithmetic=arithmetic,
                        kernel_grad=kernel_grad,
                        backward_dtype=backward_dtype,
                        rngs=rngs,
                    )
                )
                features = out
        self.blocks = nnx.List(blocks)
        self.head = nnx.Linear(features, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.stem_bn(self.stem(x))
        if self.stem_type == "imagenet":
            x = F.max_pool(x, 3, strides=2, padding="SAME")
        for block in self.blocks:
            x = block(x)
        x = jnp.mean(x, axis=(1, 2))
        return self.head(x)
