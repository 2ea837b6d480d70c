"""Flax NNX binary layers and the Variable type that marks binary kernels."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from binax import quantizers as q
from binax.nn import functional as F

__all__ = [
    "BinaryConv",
    "BinaryLinear",
    "BinaryParam",
    "FixedScale",
    "binary_labels",
]

Initializer = Callable[..., jax.Array]
_DEFAULT_REAL_INIT = nnx.initializers.lecun_normal()


class BinaryParam(nnx.Param):
    """A trainable parameter whose values are binary (``+1``/``-1``): a binary kernel.

    A subclass of `nnx.Param`, so ``wrt=nnx.Param`` (optimizers, `nnx.grad`) still includes it,
    while ``nnx.state(model, BinaryParam)`` and `binary_labels` pick out exactly the binary leaves,
    for `binax.partition`. It plays the part of Larq's ``NoOp(precision=1)`` marker.
    """


class FixedScale(nnx.Variable):
    """A constant (untrained) per-channel output scale of a binary layer (``scale='fixed'``).

    Not an `nnx.Param`: optimizers built with ``wrt=nnx.Param`` leave it alone. Set it directly,
    e.g. ``layer.scale[...] = alphas``.
    """


def binary_labels(model_or_state: nnx.Module | nnx.State, wrt: Any = nnx.Param, *, graph=None):
    """A tree of bools, ``True`` at the binary (`BinaryParam`) leaves.

    The tree has exactly the structure of the parameters that ``nnx.Optimizer(model, tx, wrt=wrt)``
    passes to ``tx.update`` (``nnx.as_pure(nnx.state(model, wrt))``, the same structure as the
    gradients from ``nnx.grad``), so it can be used as labels for `optax.partition` or
    `binax.partition`.

    Args:
      model_or_state: an NNX module, or an `nnx.State` that still holds Variables (not one passed
        through `nnx.as_pure`, which no longer says which leaves are binary). A State of bools
        (labels already) is returned unchanged.
      wrt: the filter the optimizer is built with (default `nnx.Param`).
      graph: passed to `nnx.state`.

    Returns:
      An `nnx.State` of Python bools.

    Raises:
      ValueError: ``model_or_state`` is neither a module nor a State, or the State holds plain
        arrays instead of Variables.
    """
    if not isinstance(model_or_state, (nnx.Module, nnx.State)):
        raise ValueError(
            "binary_labels: model_or_state must be an nnx.Module or nnx.State, got "
            f"{type(model_or_state).__name__}"
        )
    if isinstance(model_or_state, nnx.State):
        leaves = jax.tree.leaves(model_or_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
        if leaves and all(isinstance(x, bool) for x in leaves):
            return model_or_state  # already labels: binary_labels is idempotent
        if not all(isinstance(x, nnx.Variable) for x in leaves):
            raise ValueError(
                "binary_labels: model_or_state holds plain arrays, not Variables (was it passed "
                "through nnx.as_pure?); pass the model or nnx.state(model) instead"
            )
    state = nnx.state(model_or_state, wrt, graph=graph)

    return jax.tree.map(
        lambda v: isinstance(v, BinaryParam), state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


class _BinaryLayer(nnx.Module):
    """Shared construction: quantizers, the kernel Variable, bias and scale."""

    def _setup(
        self,
        *,
        layer: str,
        kernel_shape: tuple[int, ...],
        out_features: int,
        use_bias: bool,
        input_quantizer: q.QuantizerLike,
        kernel_quantizer: q.QuantizerLike,
        binary_kernel: bool,
        scale: str | None,
        pad_value: float | None,
        dtype: Any,
        param_dtype: Any,
        precision: Any,
        arithmetic: str,
        backward_dtype: Any,
        kernel_init: Initializer | None,
        bias_init: Initializer,
        scale_init: Initializer,
        rngs: nnx.Rngs,
    ) -> None:
        in_q, k_q = F.check_layer_config(
            layer=layer,
            binary_kernel=binary_kernel,
            kernel_quantizer=kernel_quantizer,
            input_quantizer=input_quantizer,
            scale=scale,
            pad_value=pad_value,
            arithmetic=arithmetic,
            backward_dtype=backward_dtype,
        )
        self.input_quantizer = in_q
        self.kernel_quantizer = k_q
        self.binary_kernel = binary_kernel
        self.scale_mode = scale
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.precision = precision
        self.arithmetic = arithmetic
        self.backward_dtype = backward_dtype

        if kernel_init is None:
            kernel_init = F.binary_init if binary_kernel else _DEFAULT_REAL_INIT
        kernel_type = BinaryParam if binary_kernel else nnx.Param
        self.kernel = kernel_type(kernel_init(rngs.params(), kernel_shape, param_dtype))
        self.bias = (
            nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype)) if use_bias else None
        )
        if scale is None:
            self.scale = None
        else:
            scale_type = nnx.Param if scale == "learned" else FixedScale
            self.scale = scale_type(scale_init(rngs.params(), (out_features,), param_dtype))

    @property
    def input_precision(self) -> int | None:
        """Bits per input element after the input quantizer (32 without one, None if unknown)."""
        return q.precision(self.input_quantizer)

    def _value(self, var):
        return None if var is None else var[...]


class BinaryLinear(_BinaryLayer):
    """A dense layer with quantized input and kernel: ``y = s * (q_in(x) @ q_k(W)) + b``.

    By default both the input and the kernel are binarized with `binax.quantizers.ste_sign`, and
    the kernel is a `BinaryParam` initialised to random ``+1``/``-1``. With ``binary_kernel=False``
    the kernel is a real `nnx.Param` (and ``kernel_quantizer`` must be ``None``), for a real layer
    fed with binary activations.

    The input is binarized too: ``ste_sign`` maps every ``x >= 0`` to ``+1``, so raw pixels (all
    non-negative) become a constant and the network cannot learn. For the first layer of a
    network pass ``input_quantizer=None`` (a binary kernel on the real input, as the
    `binax.models` do) or use a real layer; binarized inputs carry information once they are
    centred, e.g. after BatchNorm. Thresholds of the flip rules depend on the gradient scale:
    choose them from the flip rate (`binax.flip_metrics`; ``docs/optimizers.md``).

    References:
      Hubara et al., "Binarized Neural Networks", NeurIPS 2016 (binary dense layers);
      Rastegari et al., "XNOR-Net", ECCV 2016 (per-channel scale).

    Args:
      in_features, out_features: sizes of the last axis of the input and output.
      use_bias: add a real bias (binary layers followed by BatchNorm usually pass False).
      input_quantizer: quantizer name, callable, or None (real input). Default ``"ste_sign"``.
      kernel_quantizer: quantizer name, callable, or None. Default ``"ste_sign"``. With
        kernel values already ``+1``/``-1`` (latent-free optimizers such as Bop) ``ste_sign`` is
        the identity forward and passes the gradient (its clip is inclusive).
      binary_kernel: whether the kernel is a `BinaryParam` (True) or a real `nnx.Param`.
      scale: None, ``'learned'`` (a trained per-output `nnx.Param`) or ``'fixed'`` (a constant
        `FixedScale`), initialised by ``scale_init`` (ones).
      dtype: computation dtype (default: promoted from inputs and parameters).
      param_dtype: parameter dtype.
      precision: `jax.lax` precision of the matrix product.
      arithmetic: ``'auto'`` (default: exact int8 products with int32 accumulation on the CPU
        when both quantizers are integer-valued, float otherwise), ``'integer'`` or
        ``'float'``; see `binax.nn.functional.resolve_arithmetic`. The values are the same.
      backward_dtype: ``None`` (the computation dtype) or e.g. ``jnp.bfloat16`` for the
        products of the backward pass (faster where bfloat16 is, not exact).
      kernel_init: default random signs (binary) or LeCun normal (real).
      bias_init, scale_init: initialisers (zeros, ones).
      rngs: `nnx.Rngs` with a ``params`` stream.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = True,
        input_quantizer: q.QuantizerLike = "ste_sign",
        kernel_quantizer: q.QuantizerLike = "ste_sign",
        binary_kernel: bool = True,
        scale: str | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        arithmetic: str = "auto",
        backward_dtype: Any = None,
        kernel_init: Initializer | None = None,
        bias_init: Initializer = nnx.initializers.zeros,
        scale_init: Initializer = nnx.initializers.ones,
        rngs: nnx.Rngs,
    ):
        self.in_features = in_features
        self.out_features = out_features
        self._setup(
            layer="BinaryLinear",
            kernel_shape=(in_features, out_features),
            out_features=out_features,
            use_bias=use_bias,
            input_quantizer=input_quantizer,
            kernel_quantizer=kernel_quantizer,
            binary_kernel=binary_kernel,
            scale=scale,
            pad_value=1.0,
            dtype=dtype,
            param_dtype=param_dtype,
            precision=precision,
            arithmetic=arithmetic,
            backward_dtype=backward_dtype,
            kernel_init=kernel_init,
            bias_init=bias_init,
            scale_init=scale_init,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return F.binary_dense(
            x,
            self.kernel[...],
            input_quantizer=self.input_quantizer,
            kernel_quantizer=self.kernel_quantizer,
            scale=self._value(self.scale),
            bias=self._value(self.bias),
            dtype=self.dtype,
            precision=self.precision,
            arithmetic=self.arithmetic,
            backward_dtype=self.backward_dtype,
        )


class BinaryConv(_BinaryLayer):
    """An N-d channels-last convolution with quantized input and kernel.

    ``y = s * conv(pad(q_in(x), pad_value), q_k(W)) + b``. The quantized input is padded with
    ``pad_value`` (``+1`` or ``-1``), so ``'SAME'`` padding keeps the input binary (zero padding
    would make it ternary); the border's contribution is computed once, not per example.
    ``kernel_size`` of length 1, 2 or 3 gives a 1-, 2- or 3-d convolution (an int means 1-d, as
    in `flax.nnx.Conv`).

    As in `BinaryLinear`, the input is binarized by default: for the first layer on raw images
    pass ``input_quantizer=None`` (and ``pad_value=None`` for zero padding of the real input),
    or the network sees ``+1`` everywhere.

    References:
      Hubara et al., "Binarized Neural Networks", NeurIPS 2016; Larq ``QuantConv2D``
      (``pad_values``); Rastegari et al., "XNOR-Net", ECCV 2016 (per-channel scale).

    Args:
      in_features, out_features: input and output channels.
      kernel_size: an int (1-d) or one int per spatial axis.
      strides, kernel_dilation: an int or one per spatial axis.
      padding: ``'SAME'`` (default), ``'VALID'``, an int, or one int or pair per axis; all
        padding uses ``pad_value``.
      feature_group_count: grouped convolution; ``in_features`` must be divisible by it.
      pad_value: ``+1.0`` (default) or ``-1.0``; ``None`` pads with zeros and is allowed only
        with ``input_quantizer=None`` (a real input, e.g. the first layer of a network).
      kernel_grad: ``'auto'`` (default: ``'direct'`` on the CPU, ``'xla'`` elsewhere),
        ``'direct'`` (binax's CPU kernel), ``'patches'`` (matrix products of the input's
        patches) or ``'xla'`` (XLA's kernel-gradient convolution); see
        `binax.nn.functional.resolve_kernel_grad`.
      Other arguments: as `BinaryLinear`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | Sequence[int],
        *,
        strides: int | Sequence[int] = 1,
        padding: F.Padding = "SAME",
        kernel_dilation: int | Sequence[int] = 1,
        feature_group_count: int = 1,
        use_bias: bool = True,
        input_quantizer: q.QuantizerLike = "ste_sign",
        kernel_quantizer: q.QuantizerLike = "ste_sign",
        binary_kernel: bool = True,
        pad_value: float | None = 1.0,
        scale: str | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        arithmetic: str = "auto",
        kernel_grad: str = "auto",
        backward_dtype: Any = None,
        kernel_init: Initializer | None = None,
        bias_init: Initializer = nnx.initializers.zeros,
        scale_init: Initializer = nnx.initializers.ones,
        rngs: nnx.Rngs,
    ):
        kernel_size = (kernel_size,) if isinstance(kernel_size, int) else tuple(kernel_size)
        if not kernel_size or not all(isinstance(k, int) and k > 0 for k in kernel_size):
            raise ValueError(
                f"BinaryConv: kernel_size must be a positive int or ints, got {kernel_size!r}"
            )
        if (
            not isinstance(feature_group_count, int)
            or feature_group_count < 1
            or in_features % feature_group_count
            or out_features % feature_group_count
        ):
            raise ValueError(
                "BinaryConv: feature_group_count must be a positive int dividing in_features "
                f"({in_features}) and out_features ({out_features}), got {feature_group_count!r}"
            )
        n = len(kernel_size)
        # Validate now, not at the first call.
        strides = F.ntuple(strides, n, "BinaryConv: strides")
        kernel_dilation = F.ntuple(kernel_dilation, n, "BinaryConv: kernel_dilation")
        F.conv_padding(padding, (1,) * n, kernel_size, strides, kernel_dilation)

        self.in_features = in_features
        self.out_features = out_features
        self.kernel_size = kernel_size
        self.strides = strides
        if not isinstance(padding, (str, int)):  # hashable, as NNX keeps it as static data
            padding = tuple(p if isinstance(p, int) else tuple(p) for p in padding)
        self.padding = padding
        self.kernel_dilation = kernel_dilation
        self.feature_group_count = feature_group_count
        self.pad_value = None if pad_value is None else float(pad_value)
        self.kernel_grad = F.check_kernel_grad(kernel_grad, "BinaryConv: kernel_grad")
        self._setup(
            layer="BinaryConv",
            kernel_shape=(*kernel_size, in_features // feature_group_count, out_features),
            out_features=out_features,
            use_bias=use_bias,
            input_quantizer=input_quantizer,
            kernel_quantizer=kernel_quantizer,
            binary_kernel=binary_kernel,
            scale=scale,
            pad_value=pad_value,
            dtype=dtype,
            param_dtype=param_dtype,
            precision=precision,
            arithmetic=arithmetic,
            backward_dtype=backward_dtype,
            kernel_init=kernel_init,
            bias_init=bias_init,
            scale_init=scale_init,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return F.binary_conv(
            x,
            self.kernel[...],
            strides=self.strides,
            padding=self.padding,
            kernel_dilation=self.kernel_dilation,
            feature_group_count=self.feature_group_count,
            input_quantizer=self.input_quantizer,
            kernel_quantizer=self.kernel_quantizer,
            pad_value=self.pad_value,
            scale=self._value(self.scale),
            bias=self._value(self.bias),
            dtype=self.dtype,
            precision=self.precision,
            arithmetic=self.arithmetic,
            kernel_grad=self.kernel_grad,
            backward_dtype=self.backward_dtype,
        )
