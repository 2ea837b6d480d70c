"""Flax Linen binary layers: thin wrappers over `binax.nn.functional`.

Linen has no typed variables, so binary kernels are marked by their name: a binary layer stores
its kernel as the parameter ``"binary_kernel"`` (a real kernel, ``binary_kernel=False``, is stored
as ``"kernel"`` as in `flax.linen.Dense`). `binary_labels` and `is_binary_path` read that name, so
labels do not depend on how modules are named::

    variables = model.init(key, x)
    tx = binax.partition(binary=binax.bop(), real=optax.adam(1e-3),
                         is_binary=binax.linen.binary_labels(variables["params"]))

A ``scale='fixed'`` scale lives in the ``"constants"`` collection (not trained); a
``scale='learned'`` one is the real parameter ``"scale"``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from binax import quantizers as q
from binax.nn import functional as F

__all__ = [
    "BINARY_KERNEL",
    "BinaryConv",
    "BinaryDense",
    "binary_labels",
    "is_binary_path",
]

BINARY_KERNEL = "binary_kernel"
CONSTANTS = "constants"

Initializer = Callable[..., jax.Array]


def _key_name(key: Any) -> Any:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return getattr(key, attr)
    return key


def is_binary_path(path: Sequence[Any]) -> bool:
    """True when the last key of ``path`` is ``"binary_kernel"``.

    ``path`` may be a tuple of plain keys (``('Dense_0', 'binary_kernel')``) or a JAX key path
    (from `jax.tree_util.tree_map_with_path`).
    """
    return len(path) > 0 and _key_name(path[-1]) == BINARY_KERNEL


def binary_labels(params: Any) -> Any:
    """A tree of bools with the structure of ``params``: ``True`` at binary kernels.

    Works on the ``"params"`` collection or on the whole variables dict.
    """
    return jax.tree_util.tree_map_with_path(lambda path, _: is_binary_path(path), params)


class _BinaryMixin:
    """Creates the kernel, bias and scale shared by the Linen layers."""

    def _check(self, layer: str, pad_value: float | None = 1.0):
        return F.check_layer_config(
            layer=layer,
            binary_kernel=self.binary_kernel,
            kernel_quantizer=self.kernel_quantizer,
            input_quantizer=self.input_quantizer,
            scale=self.scale,
            pad_value=pad_value,
            arithmetic=self.arithmetic,
            backward_dtype=self.backward_dtype,
        )

    def _variables(self, kernel_shape, features):
        init = self.kernel_init
        if init is None:
            init = F.binary_init if self.binary_kernel else nn.initializers.lecun_normal()
        name = BINARY_KERNEL if self.binary_kernel else "kernel"
        kernel = self.param(name, init, kernel_shape, self.param_dtype)
        bias = (
            self.param("bias", self.bias_init, (features,), self.param_dtype)
            if self.use_bias
            else None
        )
        if self.scale == "learned":
            scale = self.param("scale", self.scale_init, (features,), self.param_dtype)
        elif self.scale == "fixed":
            scale = self.variable(
                CONSTANTS,
                "scale",
                lambda: self.scale_init(self.make_rng("params"), (features,), self.param_dtype),
            ).value
        else:
            scale = None
        return kernel, bias, scale


class BinaryDense(_BinaryMixin, nn.Module):
    """Linen dense layer with quantized input and kernel (see `binax.nn.BinaryLinear`).

    ``y = scale * (input_quantizer(x) @ kernel_quantizer(kernel)) + bias``; the binary kernel is the
    parameter ``"binary_kernel"``, initialised to random ``+1``/``-1``. Computed by
    `binax.nn.functional.binary_dense` (``arithmetic``, ``backward_dtype``: see there).
    """

    features: int
    use_bias: bool = True
    input_quantizer: q.QuantizerLike = "ste_sign"
    kernel_quantizer: q.QuantizerLike = "ste_sign"
    binary_kernel: bool = True
    scale: str | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    arithmetic: str = "auto"
    backward_dtype: Any = None
    kernel_init: Initializer | None = None
    bias_init: Initializer = nn.initializers.zeros
    scale_init: Initializer = nn.initializers.ones

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_q, k_q = self._check("BinaryDense")
        kernel, bias, scale = self._variables((jnp.shape(x)[-1], self.features), self.features)
        return F.binary_dense(
            x,
            kernel,
            input_quantizer=in_q,
            kernel_quantizer=k_q,
            scale=scale,
            bias=bias,
            dtype=self.dtype,
            precision=self.precision,
            arithmetic=self.arithmetic,
            backward_dtype=self.backward_dtype,
        )


class BinaryConv(_BinaryMixin, nn.Module):
    """Linen N-d channels-last convolution with quantized input and kernel.

    See `binax.nn.BinaryConv`: the quantized input is padded with ``pad_value`` (``+1``/``-1``) so
    that ``'SAME'`` padding keeps it binary. The binary kernel is the parameter
    ``"binary_kernel"`` of shape ``(*kernel_size, in_features // feature_group_count, features)``.
    Computed by `binax.nn.functional.binary_conv` (``arithmetic``, ``kernel_grad``,
    ``backward_dtype``: see there).
    """

    features: int
    kernel_size: int | Sequence[int]
    strides: int | Sequence[int] = 1
    padding: F.Padding = "SAME"
    kernel_dilation: int | Sequence[int] = 1
    feature_group_count: int = 1
    use_bias: bool = True
    input_quantizer: q.QuantizerLike = "ste_sign"
    kernel_quantizer: q.QuantizerLike = "ste_sign"
    binary_kernel: bool = True
    pad_value: float | None = 1.0
    scale: str | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    arithmetic: str = "auto"
    kernel_grad: str = "auto"
    backward_dtype: Any = None
    kernel_init: Initializer | None = None
    bias_init: Initializer = nn.initializers.zeros
    scale_init: Initializer = nn.initializers.ones

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_q, k_q = self._check("BinaryConv", self.pad_value)
        F.check_kernel_grad(self.kernel_grad, "BinaryConv: kernel_grad")
        ks = (self.kernel_size,) if isinstance(self.kernel_size, int) else tuple(self.kernel_size)
        in_features = jnp.shape(x)[-1]
        if in_features % self.feature_group_count:
            raise ValueError(
                f"BinaryConv: feature_group_count ({self.feature_group_count}) must divide the "
                f"input channels ({in_features})"
            )
        kernel_shape = (*ks, in_features // self.feature_group_count, self.features)
        kernel, bias, scale = self._variables(kernel_shape, self.features)
        return F.binary_conv(
            x,
            kernel,
            strides=self.strides,
            padding=self.padding,
            kernel_dilation=self.kernel_dilation,
            feature_group_count=self.feature_group_count,
            input_quantizer=in_q,
            kernel_quantizer=k_q,
            pad_value=self.pad_value,
            scale=scale,
            bias=bias,
            dtype=self.dtype,
            precision=self.precision,
            arithmetic=self.arithmetic,
            kernel_grad=self.kernel_grad,
            backward_dtype=self.backward_dtype,
        )
