"""The computations of binary dense and convolution layers, as pure functions.

Both the Flax NNX layers (`binax.nn`) and the Linen layers (`binax.linen`) call these functions, so
the quantize / pad / multiply / scale logic lives in one place. A binary layer computes

    y = scale * (q_in(x) @ q_k(kernel)) + bias         (dense)
    y = scale * conv(pad(q_in(x), pad_value), q_k(kernel)) + bias   (convolution)

where ``q_in`` and ``q_k`` are the input and kernel quantizers (`binax.quantizers`), ``scale`` an
optional per-output-channel factor (XNOR-Net's alpha; Rastegari et al., ECCV 2016) and ``pad`` pads
the *quantized* input with ``+1`` or ``-1`` so that padded borders stay binary (Larq's
``pad_values``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from binax import quantizers as q

Padding = str | int | Sequence[int] | Sequence[tuple[int, int]]
SCALE_MODES = (None, "learned", "fixed")

__all__ = [
    "SCALE_MODES",
    "binary_conv",
    "binary_dense",
    "binary_init",
    "check_layer_config",
    "conv_padding",
    "ntuple",
    "pad_quantized",
]


def binary_init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    """Random signs: each element is ``+1`` or ``-1`` with probability 1/2 (Rademacher)."""
    return jax.random.rademacher(key, tuple(shape), dtype=dtype)


def check_layer_config(
    *,
    layer: str,
    binary_kernel: bool,
    kernel_quantizer: q.QuantizerLike,
    input_quantizer: q.QuantizerLike,
    scale: str | None,
    pad_value: float | None = 1.0,
) -> tuple[q.Quantizer | None, q.Quantizer | None]:
    """Checks a binary layer's arguments; returns ``(input_quantizer, kernel_quantizer)`` resolved.

    Raises:
      ValueError: naming the argument, for an unknown quantizer name, a kernel quantizer on a layer
        whose kernel is real (``binary_kernel=False``), an unknown ``scale`` mode, or a
        ``pad_value`` other than ``+1``/``-1`` (``None``, zero padding, is accepted only when the
        input is not quantized, since zeros are not binary).
    """
    in_q = q.get(input_quantizer, argname=f"{layer}: input_quantizer")
    k_q = q.get(kernel_quantizer, argname=f"{layer}: kernel_quantizer")
    if not isinstance(binary_kernel, bool):
        raise ValueError(f"{layer}: binary_kernel must be True or False, got {binary_kernel!r}")
    if not binary_kernel and k_q is not None:
        raise ValueError(
            f"{layer}: kernel_quantizer={kernel_quantizer!r} was given for a layer marked real "
            "(binary_kernel=False); a real kernel is not quantized: pass kernel_quantizer=None, "
            "or binary_kernel=True for a binary kernel"
        )
    if scale not in SCALE_MODES:
        raise ValueError(
            f"{layer}: scale must be one of {SCALE_MODES} (None: no scale; 'learned': a trained "
            f"per-channel scale; 'fixed': a constant one), got {scale!r}"
        )
    if pad_value is None:
        if in_q is not None:
            raise ValueError(
                f"{layer}: pad_value=None pads with zeros, which is not binary; with an "
                "input_quantizer use pad_value=1.0 or -1.0 (or set input_quantizer=None)"
            )
    elif (
        isinstance(pad_value, bool)
        or not isinstance(pad_value, (int, float))
        or float(pad_value) not in (1.0, -1.0)
    ):
        raise ValueError(
            f"{layer}: pad_value must be +1.0 or -1.0 (zero padding is not binary; None is "
            f"allowed only without an input_quantizer), got {pad_value!r}"
        )
    return in_q, k_q


def ntuple(value: int | Sequence[int], n: int, argname: str) -> tuple[int, ...]:
    """``value`` as ``n`` ints (an int is repeated); ValueError naming ``argname`` otherwise."""
    if isinstance(value, int):
        return (value,) * n
    value = tuple(value)
    if len(value) != n or not all(isinstance(v, int) for v in value):
        raise ValueError(f"{argname} must be an int or {n} ints, got {value!r}")
    return value


def conv_padding(
    padding: Padding,
    spatial_shape: Sequence[int],
    kernel_size: Sequence[int],
    strides: Sequence[int],
    kernel_dilation: Sequence[int],
) -> list[tuple[int, int]]:
    """Explicit ``(low, high)`` padding per spatial axis for ``padding``.

    ``'SAME'`` gives ``ceil(size / stride)`` outputs (lax's rule, with the effective kernel size
    ``(k - 1) * dilation + 1``); ``'VALID'`` pads nothing; an int ``p`` pads ``(p, p)`` on every
    axis; a sequence gives one int or one pair per axis.
    """
    n = len(kernel_size)
    if isinstance(padding, str):
        mode = padding.upper()
        if mode == "VALID":
            return [(0, 0)] * n
        if mode == "SAME":
            effective = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation, strict=True)]
            return list(lax.padtype_to_pads(tuple(spatial_shape), effective, strides, "SAME"))
        raise ValueError(
            f"padding must be 'SAME', 'VALID', an int or per-axis pairs, got {padding!r} "
            "(binary layers pad with pad_value; circular/reflect padding is not supported)"
        )
    if isinstance(padding, int):
        return [(padding, padding)] * n
    pads = list(padding)
    if len(pads) != n:
        raise ValueError(f"padding needs one entry per spatial axis ({n}), got {padding!r}")
    out = []
    for p in pads:
        if isinstance(p, int):
            out.append((p, p))
        else:
            lo, hi = p
            out.append((int(lo), int(hi)))
    return out


def pad_quantized(
    x: jax.Array, pads: Sequence[tuple[int, int]], pad_value: float | None
) -> jax.Array:
    """Pads the spatial axes of a channels-last ``x`` (``(batch, *spatial, channels)``).

    The constant is ``pad_value`` (``+1``/``-1`` keeps a binary input binary), or ``0`` if ``None``.
    """
    if all(lo == 0 and hi == 0 for lo, hi in pads):
        return x
    value = 0 if pad_value is None else pad_value
    widths = [(0, 0), *pads, (0, 0)]
    return jnp.pad(x, widths, mode="constant", constant_values=jnp.asarray(value, x.dtype))


def _promote(dtype: Any, *arrays: jax.Array | None) -> list[jax.Array | None]:
    if dtype is None:
        dtype = jnp.result_type(*(a for a in arrays if a is not None))
    return [None if a is None else jnp.asarray(a, dtype) for a in arrays]


def _scale_and_bias(y, scale, bias):
    if scale is not None:
        y = y * scale
    if bias is not None:
        y = y + bias
    return y


def binary_dense(
    x: jax.Array,
    kernel: jax.Array,
    *,
    input_quantizer: q.Quantizer | None = q.ste_sign,
    kernel_quantizer: q.Quantizer | None = q.ste_sign,
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    dtype: Any = None,
    precision: Any = None,
) -> jax.Array:
    """``scale * (input_quantizer(x) @ kernel_quantizer(kernel)) + bias``.

    Args:
      x: ``(..., in_features)``.
      kernel: ``(in_features, out_features)``.
      input_quantizer, kernel_quantizer: callables or ``None`` (no quantization).
      scale: ``(out_features,)`` per-output-channel factor, or ``None``.
      bias: ``(out_features,)`` or ``None``.
      dtype: computation dtype; by default the promoted dtype of the inputs.
      precision: passed to `jax.lax.dot_general`.
    """
    if input_quantizer is not None:
        x = input_quantizer(x)
    if kernel_quantizer is not None:
        kernel = kernel_quantizer(kernel)
    x, kernel, scale, bias = _promote(dtype, x, kernel, scale, bias)
    y = lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)
    return _scale_and_bias(y, scale, bias)


def _dimension_numbers(ndim: int) -> lax.ConvDimensionNumbers:
    """Channels-last input/output (``N, *spatial, C``) and ``(*spatial, I, O)`` kernels."""
    lhs = (0, ndim - 1, *range(1, ndim - 1))
    rhs = (ndim - 1, ndim - 2, *range(0, ndim - 2))
    return lax.ConvDimensionNumbers(lhs, rhs, lhs)


def binary_conv(
    x: jax.Array,
    kernel: jax.Array,
    *,
    strides: int | Sequence[int] = 1,
    padding: Padding = "SAME",
    kernel_dilation: int | Sequence[int] = 1,
    feature_group_count: int = 1,
    input_quantizer: q.Quantizer | None = q.ste_sign,
    kernel_quantizer: q.Quantizer | None = q.ste_sign,
    pad_value: float | None = 1.0,
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    dtype: Any = None,
    precision: Any = None,
) -> jax.Array:
    """N-d channels-last convolution of the quantized input with the quantized kernel.

    The input is quantized first, then padded explicitly with ``pad_value`` (so a binary input
    stays binary at the borders), then convolved without further padding::

        y = scale * conv(pad(input_quantizer(x), pad_value), kernel_quantizer(kernel)) + bias

    Args:
      x: ``(batch, *spatial, in_features)``; extra leading batch axes are flattened and restored,
        and an unbatched ``(*spatial, in_features)`` input is accepted.
      kernel: ``(*kernel_size, in_features // feature_group_count, out_features)``.
      strides, kernel_dilation: an int or one int per spatial axis.
      padding: ``'SAME'``, ``'VALID'``, an int, or one int or ``(low, high)`` pair per axis.
      feature_group_count: grouped convolution (``in_features`` for depthwise).
      input_quantizer, kernel_quantizer: callables or ``None``.
      pad_value: ``+1.0``/``-1.0``, or ``None`` for zeros (real inputs only; not checked here,
        see `check_layer_config`).
      scale, bias: ``(out_features,)`` or ``None``.
      dtype, precision: computation dtype and `jax.lax.conv_general_dilated` precision.
    """
    kernel_size = kernel.shape[:-2]
    n = len(kernel_size)
    strides = ntuple(strides, n, "strides")
    dilation = ntuple(kernel_dilation, n, "kernel_dilation")
    if x.ndim == n + 1:
        return binary_conv(
            x[None],
            kernel,
            strides=strides,
            padding=padding,
            kernel_dilation=dilation,
            feature_group_count=feature_group_count,
            input_quantizer=input_quantizer,
            kernel_quantizer=kernel_quantizer,
            pad_value=pad_value,
            scale=scale,
            bias=bias,
            dtype=dtype,
            precision=precision,
        )[0]
    if x.ndim < n + 1:
        raise ValueError(
            f"a {n}-d convolution needs inputs of shape (batch, *{n} spatial, channels), "
            f"got shape {x.shape}"
        )
    batch_shape = x.shape[: x.ndim - n - 1]
    x = x.reshape((math.prod(batch_shape), *x.shape[-n - 1 :]))

    if input_quantizer is not None:
        x = input_quantizer(x)
    if kernel_quantizer is not None:
        kernel = kernel_quantizer(kernel)
    pads = conv_padding(padding, x.shape[1:-1], kernel_size, strides, dilation)
    x = pad_quantized(x, pads, pad_value)
    x, kernel, scale, bias = _promote(dtype, x, kernel, scale, bias)
    y = lax.conv_general_dilated(
        x,
        kernel,
        window_strides=strides,
        padding="VALID",
        rhs_dilation=dilation,
        dimension_numbers=_dimension_numbers(x.ndim),
        feature_group_count=feature_group_count,
        precision=precision,
    )
    y = _scale_and_bias(y, scale, bias)
    return y.reshape((*batch_shape, *y.shape[1:]))
