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

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jax.interpreters import ad, batching, mlir

from binax import quantizers as q
from binax.nn import _native

Padding = str | int | Sequence[int] | Sequence[tuple[int, int]]
SCALE_MODES = (None, "learned", "fixed")
ARITHMETICS = ("auto", "integer", "float")
KERNEL_GRADS = ("auto", "direct", "patches", "xla")

__all__ = [
    "ARITHMETICS",
    "KERNEL_GRADS",
    "EIGEN_INPUT_GRADIENT",
    "PATCH_CHUNK_ROWS",
    "SCALE_MODES",
    "SMALL_CONV_WIDTH",
    "binary_conv",
    "binary_dense",
    "binary_init",
    "check_kernel_grad",
    "check_layer_config",
    "conv_general_dilated",
    "conv_padding",
    "integer_valued",
    "map_chunks",
    "max_pool",
    "ntuple",
    "pad_quantized",
    "patch_chunk_size",
    "resolve_arithmetic",
    "resolve_kernel_grad",
    "shifted_windows",
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
    arithmetic: str = "auto",
    backward_dtype: Any = None,
) -> tuple[q.Quantizer | None, q.Quantizer | None]:
    """Checks a binary layer's arguments; returns ``(input_quantizer, kernel_quantizer)`` resolved.

    Raises:
      ValueError: naming the argument, for an unknown quantizer name, a kernel quantizer on a layer
        whose kernel is real (``binary_kernel=False``), an unknown ``scale`` mode, or a
        ``pad_value`` other than ``+1``/``-1`` (``None``, zero padding, is accepted only when the
        input is not quantized, since zeros are not binary), an unknown ``arithmetic`` (or
        ``'integer'`` with quantizers that are not integer-valued), or a ``backward_dtype`` that
        is not a floating dtype.
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
    resolve_arithmetic(arithmetic, in_q, k_q, f"{layer}: arithmetic")
    _check_backward_dtype(backward_dtype, f"{layer}: backward_dtype")
    return in_q, k_q


def ntuple(value: int | Sequence[int], n: int, argname: str) -> tuple[int, ...]:
    """``value`` as ``n`` ints (an int is repeated; NumPy integers are taken as ints);
    ValueError naming ``argname`` otherwise."""
    if isinstance(value, (int, np.integer)):
        return (int(value),) * n
    value = tuple(value)
    if len(value) != n or not all(isinstance(v, (int, np.integer)) for v in value):
        raise ValueError(f"{argname} must be an int or {n} ints, got {value!r}")
    return tuple(int(v) for v in value)


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


# --- how the product is computed ----------------------------------------------------------------

# Quantizers whose forward values are small integers (sign0: +1/-1; ste_heaviside: 0/1).
_SIGN_QUANTIZERS = frozenset({q.ste_sign, q.approx_sign, q.swish_sign})
_INTEGER_QUANTIZERS = _SIGN_QUANTIZERS | {q.ste_heaviside}


def integer_valued(quantizer: q.QuantizerLike) -> bool:
    """Whether ``quantizer``'s outputs are always small integers (``+1``/``-1`` or ``0``/``1``).

    True for `binax.quantizers`' ``ste_sign``, ``approx_sign``, ``swish_sign`` and
    ``ste_heaviside`` (and `functools.partial` objects over them), and for a callable with the
    attribute ``integer_valued = True``. False for ``None`` (no quantization) and for
    ``magnitude_aware_sign`` (a real scale times a sign). The product of two integer-valued
    operands is computed exactly in integer arithmetic (``arithmetic='auto'``).
    """
    f = _unwrapped(quantizer)
    if f is None:
        return False
    return f in _INTEGER_QUANTIZERS or getattr(f, "integer_valued", False) is True


def _unwrapped(quantizer: q.QuantizerLike) -> Any:
    """The function behind ``quantizer`` (a name, a callable, or `functools.partial` over one)."""
    f: Any = q.get(quantizer)
    while isinstance(f, functools.partial):
        f = f.func
    return f


def _check_choice(value, choices, argname):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{argname} must be one of {choices}, got {value!r}")
    return value


def _check_backward_dtype(backward_dtype, argname):
    if backward_dtype is None:
        return None
    try:
        dt = jnp.dtype(backward_dtype)
    except TypeError:
        dt = None
    if dt is None or not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(
            f"{argname} must be None (the computation dtype) or a floating dtype such as "
            f"jnp.bfloat16, got {backward_dtype!r}"
        )
    return dt


def resolve_arithmetic(
    arithmetic: str,
    input_quantizer: q.QuantizerLike,
    kernel_quantizer: q.QuantizerLike,
    argname: str = "arithmetic",
) -> bool:
    """Whether a layer multiplies in integers: ``True`` for the integer path, ``False`` for float.

    ``'auto'`` takes the integer path when both quantizers are `integer_valued` and JAX's default
    backend is the CPU (where XLA runs int8 products with int32 accumulation several times
    faster than float32); ``'integer'`` requires it (ValueError if an operand is not known to be
    integer-valued); ``'float'`` always multiplies in the computation dtype. A
    ``magnitude_aware_sign`` kernel counts as integer-valued: its per-channel scale multiplies
    the integer product (`_quantize_kernel`; equal to the float product up to float rounding).
    """
    _check_choice(arithmetic, ARITHMETICS, argname)
    exact = integer_valued(input_quantizer) and (
        integer_valued(kernel_quantizer) or _channel_scaled(kernel_quantizer)
    )
    if arithmetic == "integer" and not exact:
        raise ValueError(
            f"{argname}='integer' needs integer-valued input and kernel quantizers (ste_sign, "
            f"approx_sign, swish_sign, ste_heaviside; magnitude_aware_sign for the kernel), got "
            f"input_quantizer={input_quantizer!r}, "
            f"kernel_quantizer={kernel_quantizer!r}; use 'auto' or 'float'"
        )
    if arithmetic == "auto":
        return exact and jax.default_backend() == "cpu"
    return arithmetic == "integer"


def _signs(input_quantizer: q.QuantizerLike, kernel_quantizer: q.QuantizerLike) -> bool:
    """Whether the quantized input is +-1 and the (integer-path) kernel -1, 0 or +1."""
    kernel = _unwrapped(kernel_quantizer)
    return _unwrapped(input_quantizer) in _SIGN_QUANTIZERS and (
        kernel in _INTEGER_QUANTIZERS or _channel_scaled(kernel_quantizer)
    )


def _channel_scaled(quantizer: q.QuantizerLike) -> bool:
    """Whether ``quantizer`` is `binax.quantizers.magnitude_aware_sign` (or a partial of it): a
    per-output-channel scale, not differentiated, times a sign."""
    return _unwrapped(quantizer) is q.magnitude_aware_sign


def _quantize_kernel(kernel, kernel_quantizer, integer: bool):
    """``(quantized kernel, factor)``. On the integer path a `magnitude_aware_sign` kernel is
    split into its sign (exactly ``+-1``) and its per-channel scale ``s``,
    the ``factor`` that multiplies the product: ``conv(x, s * sign(W)) = s * conv(x, sign(W))``,
    so the product itself is int8. Otherwise ``factor`` is None."""
    if kernel_quantizer is None:
        return kernel, None
    quantized = kernel_quantizer(kernel)
    if not (integer and _channel_scaled(kernel_quantizer)):
        return quantized, None
    factor = q.magnitude_scale(kernel)
    ratio = quantized / jnp.where(factor == 0, 1, factor)
    # XLA may sum the two means in different orders: round the sign to exactly +-1 (or 0 for an
    # all-zero channel), keeping the gradient of the ratio.
    return ratio + lax.stop_gradient(jnp.round(ratio) - ratio), factor


class _Spec(NamedTuple):
    """Static description of one product (hashable: the non-differentiated argument)."""

    integer: bool
    backward_dtype: Any
    precision: Any
    strides: tuple[int, ...] = ()
    pads: tuple[tuple[int, int], ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    pad_value: float = 0.0
    kernel_grad: str = "xla"
    signs: bool = False  # a +-1 input and -1/0/+1 kernel for `_binary_conv` (`BINARY_POPCOUNT`)


def _bwd(a: jax.Array, spec: _Spec) -> jax.Array:
    return a if spec.backward_dtype is None else a.astype(spec.backward_dtype)


def _is_zero(t) -> bool:
    return isinstance(t, SymbolicZero)


# --- dense ----------------------------------------------------------------------------------------


def _dot(x, w, spec: _Spec, out_dtype=None):
    dims = (((x.ndim - 1,), (0,)), ((), ()))
    precision = None if jnp.issubdtype(x.dtype, jnp.integer) else spec.precision
    return lax.dot_general(x, w, dims, precision=precision, preferred_element_type=out_dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _dense(x, w, spec: _Spec):
    if spec.integer:
        y = _dot(x.astype(jnp.int8), w.astype(jnp.int8), spec, jnp.int32)
        return y.astype(x.dtype)
    return _dot(x, w, spec)


def _dense_jvp(spec, primals, tangents):
    x, w = primals
    x_dot, w_dot = tangents
    y = _dense(x, w, spec)
    t = jnp.zeros_like(y)
    if not _is_zero(x_dot):
        t = t + _dot(_bwd(x_dot, spec), _bwd(w, spec), spec).astype(y.dtype)
    if not _is_zero(w_dot):
        t = t + _dot(_bwd(x, spec), _bwd(w_dot, spec), spec).astype(y.dtype)
    return y, t


_dense.defjvp(_dense_jvp, symbolic_zeros=True)


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
    arithmetic: str = "auto",
    backward_dtype: Any = None,
) -> jax.Array:
    """``scale * (input_quantizer(x) @ kernel_quantizer(kernel)) + bias``.

    With integer arithmetic (see `resolve_arithmetic`) the quantized operands are multiplied as
    int8 with int32 accumulation, which gives exactly the float product (every partial sum is an
    integer below ``2**24``); the gradients are those of the float product either way (the
    straight-through estimators of the quantizers, then the transposed products in the
    computation dtype, or in ``backward_dtype``). Forward- and reverse-mode differentiation
    both work (the product is a `jax.custom_jvp` whose tangent is linear).

    Args:
      x: ``(..., in_features)``.
      kernel: ``(in_features, out_features)``.
      input_quantizer, kernel_quantizer: callables or ``None`` (no quantization).
      scale: ``(out_features,)`` per-output-channel factor, or ``None``.
      bias: ``(out_features,)`` or ``None``.
      dtype: computation dtype; by default the promoted dtype of the inputs.
      precision: passed to `jax.lax.dot_general` (float products).
      arithmetic: ``'auto'`` (default), ``'integer'`` or ``'float'``; see `resolve_arithmetic`.
      backward_dtype: ``None`` (the computation dtype) or e.g. ``jnp.bfloat16``: the dtype of
        the operands of the backward products (faster on CPUs with bfloat16 units, inexact).
    """
    integer = resolve_arithmetic(arithmetic, input_quantizer, kernel_quantizer)
    spec = _Spec(integer, _check_backward_dtype(backward_dtype, "backward_dtype"), precision)
    if input_quantizer is not None:
        x = input_quantizer(x)
    kernel, factor = _quantize_kernel(kernel, kernel_quantizer, integer)
    x, kernel, scale, bias, factor = _promote(dtype, x, kernel, scale, bias, factor)
    y = _dense(x, kernel, spec)
    return _scale_and_bias(y if factor is None else y * factor, scale, bias)


# --- convolution --------------------------------------------------------------------------------


def _dimension_numbers(ndim: int) -> lax.ConvDimensionNumbers:
    """Channels-last input/output (``N, *spatial, C``) and ``(*spatial, I, O)`` kernels."""
    lhs = (0, ndim - 1, *range(1, ndim - 1))
    rhs = (ndim - 1, ndim - 2, *range(0, ndim - 2))
    return lax.ConvDimensionNumbers(lhs, rhs, lhs)


#: A convolution whose input or output is at most this wide in every spatial axis is computed
#: on the CPU as one matrix product of the input's patches (`_small_conv`): XLA:CPU's own
#: convolution takes 10-50x longer than its FLOPs warrant there (3x3 kernel, 128-256 channels,
#: batch 256, on a 2-core Xeon: a 2x2 input 68 ms, the input gradient of a 2x2 output 60-140 ms,
#: against 1-10 ms for 3x3-6x6; BENCHMARKS.md section 7), as in ResNets' last stages on small
#: images.
SMALL_CONV_WIDTH = 2


def _out_shape(spatial: Sequence[int], kernel_size: Sequence[int], spec: _Spec) -> list[int]:
    """The spatial shape of a convolution's (or pooling's) output, 0 where it is empty."""
    geometry = zip(spatial, spec.pads, kernel_size, spec.dilation, spec.strides, strict=True)
    return [max(0, (n + lo + hi - (k - 1) * d - 1) // s + 1) for n, (lo, hi), k, d, s in geometry]


def _small_conv(x, w, spec: _Spec, pads) -> bool:
    """Whether `_conv_op` computes this convolution as a patch product (see `SMALL_CONV_WIDTH`)."""
    if spec.groups != 1 or jax.default_backend() != "cpu":
        return False
    spatial = x.shape[1:-1]
    out = _out_shape(spatial, w.shape[:-2], spec._replace(pads=pads))
    if min(out) < 1:  # an empty output: lax's
        return False
    return max(spatial) <= SMALL_CONV_WIDTH or max(out) <= SMALL_CONV_WIDTH


def _conv_op(x, w, spec: _Spec, padding, out_dtype=None):
    """``conv(pad(x, 0), w)`` with ``padding`` ``'VALID'`` or ``(low, high)`` pairs."""
    integer = jnp.issubdtype(x.dtype, jnp.integer)
    pads = tuple((0, 0) for _ in x.shape[1:-1]) if padding == "VALID" else tuple(padding)
    if _small_conv(x, w, spec, pads):
        # Channels last: the patches are (batch, *out, taps * C), the kernel (taps * C, O).
        pieces, _ = shifted_windows(x, w.shape[:-2], spec._replace(pads=pads), 0, axis=1)
        patches = jnp.concatenate(pieces, axis=-1)
        return _dot(patches, w.reshape(-1, w.shape[-1]), spec, out_dtype)
    return lax.conv_general_dilated(
        x,
        w,
        window_strides=spec.strides,
        padding=padding,
        rhs_dilation=spec.dilation,
        dimension_numbers=_dimension_numbers(x.ndim),
        feature_group_count=spec.groups,
        precision=None if integer else spec.precision,
        preferred_element_type=out_dtype,
    )


def _has_border(spec: _Spec) -> bool:
    return spec.pad_value != 0 and any(lo or hi for lo, hi in spec.pads)


def _border(x, spec: _Spec):
    """``B``: ``pad_value`` on the padded border and ``0`` inside, for one example."""
    inside = jnp.zeros((1, *x.shape[1:]), x.dtype)
    return pad_quantized(inside, spec.pads, spec.pad_value)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _conv(x, w, spec: _Spec):
    """``conv(pad(x, pad_value), w)``, as ``conv(pad(x, 0), w) + conv(B, w)``.

    ``B`` (see `_border`) does not depend on the batch, so its convolution is computed for one
    example and broadcast: a ``+1`` border costs nothing per example.
    """
    if spec.integer:
        x8, w8 = x.astype(jnp.int8), w.astype(jnp.int8)
        if _binary_applies(x8, spec):
            return _binary_conv(x8, w8, spec).astype(x.dtype)
        y = _conv_op(x8, w8, spec, spec.pads, jnp.int32)
        if _has_border(spec):
            y = y + _conv_op(_border(x8, spec), w8, spec, "VALID", jnp.int32)
        return y.astype(x.dtype)
    y = _conv_op(x, w, spec, spec.pads)
    if _has_border(spec):
        y = y + _conv_op(_border(x, spec), w, spec, "VALID")
    return y


#: Whether a convolution of a +-1 input with a -1/0/+1 kernel is computed on the CPU by
#: `_binary_conv` (bits and popcounts) rather than as an int8 convolution. Read by
#: `binary_conv` at each call (the benchmarks compare both).
BINARY_POPCOUNT = True


def _binary_applies(x8, spec: _Spec) -> bool:
    """Whether `_conv` computes this integer product with `_binary_conv`: on the CPU with
    binax's kernels, a 1-d or 2-d ungrouped convolution of signs (``spec.signs``) padded with
    +1 or -1 (or not padded), its batch not split by explicit sharding."""
    padded = any(lo or hi for lo, hi in spec.pads)
    return (
        spec.signs
        and not _explicitly_sharded(x8)
        and x8.ndim in (3, 4)
        and spec.groups == 1
        and (spec.pad_value in (1.0, -1.0) or not padded)
        and jax.default_backend() == "cpu"
        and _native.available()
    )


def _explicitly_sharded(x: jax.Array) -> bool:
    """Whether an axis of ``x`` is split over devices by explicit sharding (a custom call's
    result would not carry the sharding; under automatic sharding XLA places it)."""
    return any(axis is not None for axis in jax.typeof(x).sharding.spec)


def _binary_conv(x8, w8, spec: _Spec):
    """``conv(pad(x8, pad_value), w8)`` in float32, exactly, for an int8 input of +-1 and kernel
    of -1, 0 or +1: binax's CPU kernel (`binax.nn._native`, ``_cpu_kernels.cc``) packs the
    signs into bits and counts the products with popcounts (the input's C signs 32 to a word:
    ``y = nonzero - 2 * popcount((x ^ sign) & nonzero)`` summed over words and kernel positions).
    A 1-d convolution is one row of a 2-d one."""
    strides, dilation, pads = _as_2d(spec)
    squeeze = x8.ndim == 3
    if squeeze:
        x8, w8 = x8[:, None], w8[None]
    out = _out_shape(
        x8.shape[1:-1], w8.shape[:-2], spec._replace(strides=strides, dilation=dilation, pads=pads)
    )
    y = jax.ffi.ffi_call(
        _native.BINARY_CONV,
        jax.ShapeDtypeStruct((x8.shape[0], *out, w8.shape[-1]), jnp.float32),
        vmap_method="sequential",
    )(x8, w8, **_geometry(strides, dilation, pads, spec.pad_value))
    return y[:, 0] if squeeze else y


def _as_2d(spec: _Spec):
    """Strides, dilation and padding of ``spec`` for a 2-d kernel (a 1-d one is one row)."""
    if len(spec.strides) == 2:
        return spec.strides, spec.dilation, spec.pads
    return (1, *spec.strides), (1, *spec.dilation), ((0, 0), *spec.pads)


def _geometry(strides, dilation, pads, pad_value) -> dict:
    """The attributes binax's CPU kernels take."""
    return dict(
        stride_h=strides[0],
        stride_w=strides[1],
        dilation_h=dilation[0],
        dilation_w=dilation[1],
        pad_top=pads[0][0],
        pad_left=pads[1][0],
        pad_value=np.float32(pad_value),
    )


#: Output positions (examples times spatial positions) whose patches the patch-product kernel
#: gradient builds at once (`_patch_product`). On the development CPU (2-core Xeon) a chunk of
#: about 2,000 positions (2 examples at 28x28, 8 at 14x14, 32 at 7x7) made BinaryNet's training
#: step as fast as or faster than the 2, 4 and 8 MiB byte budgets used before, at widths 0.25,
#: 0.5 and 1, where the best byte budget differed with the width (BENCHMARKS.md section 7).
PATCH_CHUNK_ROWS = 2048


def _patches_dot(xt, w_dot, spec: _Spec):
    """``conv(pad(x, pad_value), w_dot)`` as one matrix product of the input's patches.

    ``xt`` is the input channels first, ``(C, batch, *spatial)``. The patches are the shifted
    (strided, dilated) copies of the padded input, one per kernel position, stacked along the
    first axis: ``(prod(kernel_size) * C, batch * out_spatial)``, so that the transposed
    product, the kernel gradient ``patches @ output_gradient``, is a plain row-major matrix
    product (which XLA:CPU hands to YNNPACK; with the patches as ``(rows, features)`` it
    would contract their first axis and fall back to a slower generic kernel).
    """
    kernel_size, c, o = w_dot.shape[:-2], w_dot.shape[-2], w_dot.shape[-1]
    # Converted before the copies, not after: the slices and their concatenation write the
    # float patches directly (3-16% faster per layer than int8 copies and a conversion of the
    # patches; the whole BinaryNet step 2-5%, BENCHMARKS.md section 7).
    xt = xt.astype(w_dot.dtype)
    pieces, out = shifted_windows(xt, kernel_size, spec, spec.pad_value, axis=2)
    patches = jnp.concatenate(pieces, axis=0).reshape(len(pieces) * c, -1)
    y = lax.dot_general(
        patches,
        w_dot.reshape(-1, o),
        (((0,), (0,)), ((), ())),
        precision=spec.precision,
    )
    return y.reshape((xt.shape[1], *out, o))


def shifted_windows(
    x: jax.Array, kernel_size: Sequence[int], spec: _Spec, value: float, axis: int
) -> tuple[list[jax.Array], list[int]]:
    """The copies of ``x``, padded with ``value`` by ``spec.pads``, that a convolution's kernel
    positions see, in row-major order of the positions (shifted, strided and dilated as
    ``spec`` says), and the output's spatial shape. The spatial axes of ``x`` start at
    ``axis``; each copy has the output's spatial shape there and ``x``'s other axes."""
    cfg = [(0, 0, 0)] * x.ndim
    for i, (lo, hi) in enumerate(spec.pads):
        cfg[axis + i] = (lo, hi, 0)
    xp = lax.pad(x, jnp.asarray(value, x.dtype), cfg)
    geometry = list(zip(kernel_size, spec.dilation, spec.strides, strict=True))
    out = _out_shape(x.shape[axis : axis + len(kernel_size)], kernel_size, spec)
    pieces = []
    for kidx in np.ndindex(*kernel_size):
        start, limit, step = [0] * x.ndim, list(xp.shape), [1] * x.ndim
        for i, (k, (_, d, s)) in enumerate(zip(kidx, geometry, strict=True)):
            first = k * d if out[i] else 0  # no output along this axis: an empty slice
            start[axis + i], step[axis + i] = first, s
            limit[axis + i] = first + (out[i] - 1) * s + 1 if out[i] else 0
        pieces.append(lax.slice(xp, start, limit, step))
    return pieces, out


def _rows_per_device(x: jax.Array) -> int:
    """How many rows of ``x`` each device holds under explicit sharding (all if unsharded)."""
    return jax.typeof(x).sharding.shard_shape(x.shape)[0]


def map_chunks(f: Any, x: jax.Array, chunk: int) -> jax.Array:
    """``f(x)`` computed on ``chunk`` rows of ``x`` at a time (`jax.lax.map`), then on the rest.

    For an ``f`` that treats rows independently (a network in eval mode), the same values as
    ``f(x)``; a batch of at most ``2 * chunk - 1`` rows is one call.

    Under explicit sharding (`jax.sharding.AxisType.Explicit`) with the rows split over ``s``
    devices, `jax.lax.map` needs its mapped axis unsharded: then each of the ``m`` calls takes
    every ``m``-th row, ``chunk`` rows per device (at most; a divisor of the rows each device
    holds), so that the rows of a call keep the batch's sharding.
    """
    n = x.shape[0]
    local = _rows_per_device(x)
    if 0 < local < n:
        if local <= chunk:
            return f(x)
        per_device = _largest_divisor(local, chunk)
        m = local // per_device
        xs = jnp.moveaxis(x.reshape(n // m, m, *x.shape[1:]), 1, 0)
        y = lax.map(f, xs)
        return jnp.moveaxis(y, 0, 1).reshape(n, *y.shape[2:])
    full = n - n % chunk
    if full <= chunk:
        return f(x)
    y = lax.map(f, x[:full].reshape(full // chunk, chunk, *x.shape[1:]))
    y = y.reshape(full, *y.shape[2:])
    return y if full == n else jnp.concatenate([y, f(x[full:])])


def patch_chunk_size(batch: int, rows_per_example: int, budget: int | None = None) -> int:
    """How many examples the patch-product kernel gradient takes at once.

    The largest divisor of ``batch`` whose examples hold at most ``budget`` rows of patches
    (output positions; default `PATCH_CHUNK_ROWS`), at least 1.
    """
    budget = PATCH_CHUNK_ROWS if budget is None else budget
    return _largest_divisor(batch, budget // max(1, rows_per_example))


def _largest_divisor(n: int, most: int) -> int:
    """The largest divisor of ``n`` that is at most ``most``; 1 if there is none (``n`` 0)."""
    return max((d for d in range(1, min(n, most) + 1) if n % d == 0), default=1)


def _patch_product(x, w_dot, spec: _Spec):
    """``conv(pad(x, pad_value), w_dot)`` by matrix products of the input's patches, by chunks.

    Its transpose, the kernel gradient, is the sum over chunks of ``patches @
    output_gradient``. The batch is cut into chunks of `patch_chunk_size` examples
    (`map_chunks`: a `lax.map`, whose transpose accumulates the kernel gradient chunk by chunk),
    each chunk's patches built under `jax.checkpoint` from the saved input (int8 on the integer
    path, each chunk transposed channels-first): the patches of a chunk stay in the CPU's cache
    instead of being written out for the whole batch, which made building them about half of
    BinaryNet's training step (BENCHMARKS.md section 7). Only for ``feature_group_count == 1``.
    """
    rows = math.prod(_out_shape(x.shape[1:-1], w_dot.shape[:-2], spec))
    size = patch_chunk_size(x.shape[0], rows)
    product = jax.checkpoint(_patches_dot, static_argnums=(2,))
    # Channels first: a transposition of the (int8) input chunk, not of its patches.
    return map_chunks(lambda xc: product(jnp.moveaxis(xc, -1, 0), w_dot, spec), x, size)


#: Whether `binary_conv` computes the input gradient of a 2-d stride-1 convolution on the CPU as
#: a convolution one row larger (`_input_tangent`); ``False`` leaves it to lax's transpose.
#: Read while tracing (the benchmarks compare both).
EIGEN_INPUT_GRADIENT = True


def _input_tangent(x_dot, w, spec: _Spec):
    """``conv(pad(x_dot, 0), w)``: the tangent of the input, whose transpose is the input gradient.

    XLA:CPU hands a convolution to YNNPACK only when its output is no larger than its input; the
    input gradient of an ungrouped 2-d stride-1 convolution whose output is at least as large as
    its input (as with ``'SAME'`` padding) is such a convolution, and YNNPACK ran those on one
    core. Here, when the output is as large as the input along the first spatial axis and the
    high padding there is at least 1, ``x_dot`` is extended by one zero row there and that
    padding cut by one: the same values, but the transposed convolution (the input gradient,
    whose output is the extended input) is one row larger than its input, and XLA:CPU computes
    it with Eigen's convolution instead, on all cores (BENCHMARKS.md section 7). The extra row
    is sliced off by the transposed padding.
    """
    pads = spec.pads
    if not _extends_input(x_dot, w, spec):
        return _conv_op(x_dot, w, spec, pads)
    cfg = [(0, 0)] * x_dot.ndim
    cfg[1] = (0, 1)
    extended = jnp.pad(x_dot, cfg)
    return _conv_op(extended, w, spec, ((pads[0][0], pads[0][1] - 1), *pads[1:]))


def _extends_input(x_dot, w, spec: _Spec) -> bool:
    """Whether `_input_tangent` extends ``x_dot``: on the CPU, for an ungrouped 2-d stride-1
    convolution (1-d ones measured faster or slower) that is not a patch product, whose plain
    transpose YNNPACK takes (the output at least as large as the input in every axis) and whose
    extended one it does not (as large along the first axis, high padding at least 1)."""
    pads, spatial = spec.pads, x_dot.shape[1:-1]
    if (
        not EIGEN_INPUT_GRADIENT
        or jax.default_backend() != "cpu"
        or spec.groups != 1
        or any(s != 1 for s in spec.strides)
        or len(pads) != 2
        or pads[0][1] < 1
        or _small_conv(x_dot, w, spec, pads)
    ):
        return False
    out = _out_shape(spatial, w.shape[:-2], spec)
    return out[0] == spatial[0] and all(o >= i for o, i in zip(out, spatial, strict=True))


def _conv_jvp(spec, primals, tangents):
    x, w = primals
    x_dot, w_dot = tangents
    y = _conv(x, w, spec)
    t = jnp.zeros_like(y)
    if not _is_zero(x_dot):
        # pad(x_dot, 0): the border is a constant.
        t = t + _input_tangent(_bwd(x_dot, spec), _bwd(w, spec), spec).astype(y.dtype)
    if not _is_zero(w_dot):
        # The backward pass reads x (saved as int8 on the integer path).
        saved = x.astype(jnp.int8) if spec.integer else _bwd(x, spec)
        if spec.kernel_grad == "direct" and _direct_applies(x, w_dot, spec):
            kt = _direct_p.bind(saved, w_dot, spec=spec)
        elif spec.kernel_grad in ("direct", "patches"):
            kt = _patch_product(saved, _bwd(w_dot, spec), spec)
        else:
            kt = _direct_tangent(_bwd(x, spec), _bwd(w_dot, spec), spec=spec)
        t = t + kt.astype(y.dtype)
    return y, t


_conv.defjvp(_conv_jvp, symbolic_zeros=True)


def _direct_applies(x, w_dot, spec: _Spec) -> bool:
    """Whether binax's kernel (`_direct_p`) computes this kernel gradient: a 1-d or 2-d
    ungrouped convolution with float32 gradients (no ``backward_dtype``), a float32 or integer
    input, and more than one output position per example. With one (a ResNet's last stage on
    small images), the patches of `_patch_product` are one matrix product that YNNPACK computes
    faster: 5 ms against 10 for Bi-Real Net's 1x1x512 layers at batch 256 on the 2-core Xeon
    (BENCHMARKS.md, section 7)."""
    out = _out_shape(x.shape[1:-1], w_dot.shape[:-2], spec)
    return (
        x.ndim in (3, 4)
        and math.prod(out) > 1
        and spec.groups == 1
        and spec.backward_dtype is None
        and w_dot.dtype == jnp.float32
        and (spec.integer or x.dtype == jnp.float32)
    )


def _direct_tangent(saved, w_dot, *, spec: _Spec):
    """``conv(pad(saved, pad_value), w_dot)`` with XLA's convolution: the kernel's tangent (its
    transpose is ``kernel_grad='xla'``'s kernel gradient)."""
    xp = pad_quantized(saved.astype(w_dot.dtype), spec.pads, spec.pad_value)
    return _conv_op(xp, w_dot, spec, "VALID")


def _direct_kernel_grad(saved, g, kernel_shape: tuple[int, ...], spec: _Spec):
    """The kernel gradient ``dw`` of ``conv(pad(saved, pad_value), w)`` for the output gradient
    ``g``: binax's CPU kernel (`binax.nn._native`, ``_cpu_kernels.cc``). A 1-d convolution is
    computed as one row of a 2-d one."""
    strides, dilation, pads = _as_2d(spec)
    if saved.ndim == 3:
        saved, g = saved[:, None], g[:, None]
    dk = jax.ffi.ffi_call(
        _native.KERNEL_GRAD,
        jax.ShapeDtypeStruct((1,) * (4 - len(kernel_shape)) + kernel_shape, jnp.float32),
        vmap_method="sequential",
    )(saved, g.astype(jnp.float32), **_geometry(strides, dilation, pads, spec.pad_value))
    return dk.reshape(kernel_shape)


def _xla_kernel_grad(saved, ct, *, spec: _Spec, kernel_shape: tuple[int, ...]):
    """What `_direct_kernel_grad` computes, as JAX's transpose of `_direct_tangent` (XLA's
    operations, differentiable to any order)."""
    w = jnp.zeros(kernel_shape, ct.dtype)
    return jax.vjp(lambda w: _direct_tangent(saved, w, spec=spec), w)[1](ct)[0]


def _shaped(f):
    """An abstract-evaluation rule: the shape and dtype ``f`` gives."""

    def rule(*avals, **params):
        out = jax.eval_shape(functools.partial(f, **params), *avals)
        return jax.core.ShapedArray(out.shape, out.dtype)

    return rule


#: Two primitives, transposes of each other in their second argument, so that the kernel
#: gradient can be binax's custom call and still be batched and differentiated again:
#:
#: - `_direct_p` (``saved, w_dot``): ``conv(pad(saved, pad_value), w_dot)`` (`_direct_tangent`,
#:   XLA's convolution), the kernel's tangent in `_conv_jvp`;
#: - `_direct_grad_p` (``saved, ct``): its transpose in ``w_dot``, the kernel gradient, binax's
#:   CPU kernel (`_direct_kernel_grad`).
#:
#: Batched, either becomes XLA's operations (`_direct_tangent`, `_xla_kernel_grad`); the
#: tangent of the kernel gradient (second-order differentiation) is `_xla_kernel_grad`'s.
_direct_p = jax.extend.core.Primitive("binax_conv_direct")
_direct_p.def_impl(_direct_tangent)
_direct_p.def_abstract_eval(_shaped(_direct_tangent))
mlir.register_lowering(_direct_p, mlir.lower_fun(_direct_tangent, multiple_results=False))

_direct_grad_p = jax.extend.core.Primitive("binax_conv_direct_grad")


def _direct_grad(saved, ct, *, spec: _Spec, kernel_shape: tuple[int, ...]):
    return _direct_kernel_grad(saved, ct, kernel_shape, spec).astype(ct.dtype)


_direct_grad_p.def_impl(_direct_grad)
_direct_grad_p.def_abstract_eval(
    lambda saved, ct, *, spec, kernel_shape: jax.core.ShapedArray(kernel_shape, ct.dtype)
)
mlir.register_lowering(_direct_grad_p, mlir.lower_fun(_direct_grad, multiple_results=False))


def _direct_jvp(primals, tangents, *, spec: _Spec):
    (saved, w_dot), (saved_dot, w_dot_dot) = primals, tangents
    y = _direct_p.bind(saved, w_dot, spec=spec)
    t = ad.instantiate_zeros(ad.Zero.from_primal_value(y))
    if type(w_dot_dot) is not ad.Zero:
        t = t + _direct_p.bind(saved, w_dot_dot, spec=spec)
    if type(saved_dot) is not ad.Zero and jnp.issubdtype(saved.dtype, jnp.floating):
        # Affine in saved (the border is pad_value): its tangent has a zero border.
        t = t + _conv_op(saved_dot.astype(w_dot.dtype), w_dot, spec, spec.pads)
    return y, t


def _direct_transpose(ct, saved, w_dot, *, spec: _Spec):
    if ad.is_undefined_primal(saved):
        raise NotImplementedError("binax_conv_direct is linear in its kernel tangent only")
    if type(ct) is ad.Zero:
        return None, ad.Zero(w_dot.aval)
    shape = w_dot.aval.shape
    return None, _direct_grad_p.bind(saved, ct, spec=spec, kernel_shape=shape).astype(
        w_dot.aval.dtype
    )


def _direct_grad_jvp(primals, tangents, *, spec: _Spec, kernel_shape):
    saved, ct = primals
    y = _direct_grad_p.bind(saved, ct, spec=spec, kernel_shape=kernel_shape)
    zeros = [ad.instantiate_zeros(t) for t in tangents]
    if not jnp.issubdtype(saved.dtype, jnp.floating):  # an integer input has no tangent
        f = functools.partial(_xla_kernel_grad, saved, spec=spec, kernel_shape=kernel_shape)
        return y, jax.jvp(f, (ct,), (zeros[1],))[1]
    f = functools.partial(_xla_kernel_grad, spec=spec, kernel_shape=kernel_shape)
    return y, jax.jvp(f, primals, tuple(zeros))[1]


def _direct_grad_transpose(w_ct, saved, ct, *, spec: _Spec, kernel_shape):
    if ad.is_undefined_primal(saved):
        raise NotImplementedError("binax_conv_direct_grad is linear in its output gradient only")
    if type(w_ct) is ad.Zero:
        return None, ad.Zero(ct.aval)
    return None, _direct_p.bind(saved, w_ct.astype(ct.aval.dtype), spec=spec)


def _batched(f):
    def rule(args, dims, **params):
        return jax.vmap(functools.partial(f, **params), in_axes=dims)(*args), 0

    return rule


ad.primitive_jvps[_direct_p] = _direct_jvp
ad.primitive_transposes[_direct_p] = _direct_transpose
batching.primitive_batchers[_direct_p] = _batched(_direct_tangent)
ad.primitive_jvps[_direct_grad_p] = _direct_grad_jvp
ad.primitive_transposes[_direct_grad_p] = _direct_grad_transpose
batching.primitive_batchers[_direct_grad_p] = _batched(_xla_kernel_grad)


def check_kernel_grad(kernel_grad: str, argname: str = "kernel_grad") -> str:
    """``kernel_grad`` if it is one of `KERNEL_GRADS`; ValueError naming ``argname`` otherwise."""
    return _check_choice(kernel_grad, KERNEL_GRADS, argname)


def resolve_kernel_grad(kernel_grad: str, feature_group_count: int = 1) -> str:
    """``'direct'``, ``'patches'`` or ``'xla'``: how a convolution's kernel gradient is computed.

    ``'direct'``: binax's CPU kernel (`binax.nn._native`): for each kernel position, the input
    it sees times the output gradient, summed over output positions in registers, without
    patches in memory (1-d and 2-d convolutions with float32 gradients; others take
    ``'patches'``); ``'patches'``: matrix products of the input's patches with the output
    gradient, chunk by chunk of the batch (see `_patch_product`); ``'xla'``: XLA's own
    kernel-gradient convolution. ``'auto'`` takes ``'direct'`` on the CPU backend where the
    kernel could be built (else ``'patches'``) and ``'xla'`` elsewhere (GPU and TPU have fast
    kernel-gradient convolutions of their own). Grouped convolutions always take ``'xla'``.
    ``'direct'`` on another backend, or without the kernel, is a ValueError.

    On a batch split over several CPU devices by automatic sharding, XLA gathers the batch to
    run the kernel on each device (the same values, not data-parallel work).
    """
    check_kernel_grad(kernel_grad)
    cpu = jax.default_backend() == "cpu"
    if kernel_grad == "auto":
        kernel_grad = ("direct" if _native.available() else "patches") if cpu else "xla"
    elif kernel_grad == "direct" and not (cpu and _native.available()):
        raise ValueError(
            "kernel_grad='direct' needs the CPU backend and binax's CPU kernel "
            f"(binax.nn._native); the backend is {jax.default_backend()!r} and the kernel is "
            f"{'available' if _native.available() else 'not available'}"
        )
    if feature_group_count != 1:
        return "xla"
    return kernel_grad


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
    arithmetic: str = "auto",
    kernel_grad: str = "auto",
    backward_dtype: Any = None,
) -> jax.Array:
    """N-d channels-last convolution of the quantized input with the quantized kernel.

    The input is quantized, padded with ``pad_value`` (so a binary input stays binary at the
    borders) and convolved::

        y = scale * conv(pad(input_quantizer(x), pad_value), kernel_quantizer(kernel)) + bias

    How it is computed (the values are those of the formula; see the tests):

    - the padding is not materialized: ``conv(pad(a, v), W) = conv(pad(a, 0), W) + conv(B, W)``
      with ``B`` equal to ``v`` on the border and ``0`` inside, which does not depend on the
      batch and is convolved for one example;
    - with integer arithmetic (`resolve_arithmetic`; the default on CPU when both quantizers
      are integer-valued) the product is int8 with int32 accumulation, exactly the float
      product;
    - gradients: the quantizers' straight-through estimators, then the transposed products in
      the computation dtype (or ``backward_dtype``); the kernel gradient by binax's CPU
      kernel (``kernel_grad='direct'``, the default on CPU where it can be built, see
      `binax.nn._native`; 1-d and 2-d ungrouped convolutions with float32 gradients, others
      take the patches), as matrix products of the input's patches with the output gradient,
      chunk by chunk of the batch (``'patches'``) or as XLA's kernel-gradient convolution
      (``'xla'``). They differ only in the order of the float summation. On the CPU the
      input gradient of an ungrouped 2-d stride-1 ``'SAME'``-like convolution is a
      convolution one row larger than needed (see `_input_tangent`: XLA:CPU then runs it on
      all cores), equal to the plain formula's up to the order of the float summation.
      Forward-mode differentiation works too;
    - on the CPU, a convolution whose input or output is at most `SMALL_CONV_WIDTH` wide in
      every spatial axis (and its input gradient) is one matrix product of the input's patches,
      where XLA:CPU's convolution is 10-50x slower (the same values; gradients up to the order
      of the float summation).

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
      arithmetic: ``'auto'``, ``'integer'`` or ``'float'`` (`resolve_arithmetic`).
      kernel_grad: ``'auto'``, ``'direct'``, ``'patches'`` or ``'xla'``
        (`resolve_kernel_grad`).
      backward_dtype: ``None`` or a float dtype such as ``jnp.bfloat16`` for the backward
        products (inexact; see BENCHMARKS.md for its measured accuracy cost).
    """
    kernel_size = kernel.shape[:-2]
    n = len(kernel_size)
    strides = ntuple(strides, n, "strides")
    dilation = ntuple(kernel_dilation, n, "kernel_dilation")
    kwargs = dict(
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
        arithmetic=arithmetic,
        kernel_grad=kernel_grad,
        backward_dtype=backward_dtype,
    )
    if x.ndim == n + 1:
        return binary_conv(x[None], kernel, **kwargs)[0]
    if x.ndim < n + 1:
        raise ValueError(
            f"a {n}-d convolution needs inputs of shape (batch, *{n} spatial, channels), "
            f"got shape {x.shape}"
        )
    batch_shape = x.shape[: x.ndim - n - 1]
    x = x.reshape((math.prod(batch_shape), *x.shape[-n - 1 :]))

    spec = _Spec(
        integer=resolve_arithmetic(arithmetic, input_quantizer, kernel_quantizer),
        backward_dtype=_check_backward_dtype(backward_dtype, "backward_dtype"),
        precision=precision,
        strides=strides,
        pads=tuple(conv_padding(padding, x.shape[1:-1], kernel_size, strides, dilation)),
        dilation=dilation,
        groups=feature_group_count,
        pad_value=0.0 if pad_value is None else float(pad_value),
        kernel_grad=resolve_kernel_grad(kernel_grad, feature_group_count),
    )
    signs = BINARY_POPCOUNT and spec.integer and _signs(input_quantizer, kernel_quantizer)
    spec = spec._replace(signs=signs)
    if input_quantizer is not None:
        x = input_quantizer(x)
    kernel, factor = _quantize_kernel(kernel, kernel_quantizer, spec.integer)
    x, kernel, scale, bias, factor = _promote(dtype, x, kernel, scale, bias, factor)
    y = _conv(x, kernel, spec)
    y = _scale_and_bias(y if factor is None else y * factor, scale, bias)
    return y.reshape((*batch_shape, *y.shape[1:]))


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
    out_sharding: Any = None,
) -> jax.Array:
    """`jax.lax.conv_general_dilated` with `binary_conv`'s gradients, for real-valued layers.

    A drop-in for Flax's ``Conv(conv_general_dilated=...)``: a channels-last convolution of float
    operands (Flax's layout) is `binary_conv` without quantizers, zero-padded, so on the CPU its
    kernel gradient is the patch product instead of XLA:CPU's kernel-gradient convolution
    (several times slower: BENCHMARKS.md section 7), and a convolution at most
    `SMALL_CONV_WIDTH` wide is one matrix product. The values are lax's (up to the order of the
    float summation where a patch product replaces XLA's convolution). Anything else (input
    dilation, batch groups, another layout, integer or mixed operands, ``preferred_element_type``,
    ``out_sharding``, padding other than ``'SAME'``/``'VALID'``/pairs) goes to lax unchanged.
    """
    n = rhs.ndim - 2
    args = (lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers)
    kwargs = dict(
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    layout = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    plain = (
        layout == _dimension_numbers(lhs.ndim)
        and all(d == 1 for d in lhs_dilation or ())
        and batch_group_count == 1
        and preferred_element_type is None
        and out_sharding is None
        and jnp.issubdtype(lhs.dtype, jnp.floating)
        and lhs.dtype == rhs.dtype
        and (not isinstance(padding, str) or padding.upper() in ("SAME", "VALID"))
    )
    if not plain:
        if out_sharding is not None:
            kwargs["out_sharding"] = out_sharding
        return lax.conv_general_dilated(*args, **kwargs)
    return binary_conv(
        lhs,
        rhs,
        strides=tuple(window_strides),
        padding=padding if isinstance(padding, str) else [tuple(p) for p in padding],
        kernel_dilation=tuple(rhs_dilation or (1,) * n),
        feature_group_count=feature_group_count,
        input_quantizer=None,
        kernel_quantizer=None,
        pad_value=None,
        precision=precision,
    )


# --- pooling --------------------------------------------------------------------------------------


def _windows(x: jax.Array, window: tuple[int, ...]) -> jax.Array:
    """``(N, *spatial, C)`` -> ``(N, s1 // w1, w1, s2 // w2, w2, ..., C)``, dropping remainders."""
    spatial = x.shape[1:-1]
    keep = tuple(slice(0, (s // w) * w) for s, w in zip(spatial, window, strict=True))
    x = x[(slice(None), *keep, slice(None))]
    shape = [x.shape[0]]
    for s, w in zip(spatial, window, strict=True):
        shape += [s // w, w]
    return x.reshape(*shape, x.shape[-1])


def _window_axes(n: int) -> tuple[int, ...]:
    return tuple(2 + 2 * i for i in range(n))


def _first_max(xw: jax.Array, n: int) -> jax.Array:
    """Bools, ``True`` at the first maximum of each window (row-major order within the window)."""
    axes = _window_axes(n)
    hit = xw == jnp.max(xw, axis=axes, keepdims=True)
    last = tuple(range(xw.ndim - n - 1, xw.ndim - 1))
    hit = jnp.moveaxis(hit, axes, last)
    shape = hit.shape
    flat = hit.reshape(*shape[: -n - 1], -1, shape[-1])
    seen = jnp.zeros_like(flat[..., 0, :])
    first = []
    for k in range(flat.shape[-2]):
        first.append(flat[..., k, :] & ~seen)
        seen = seen | flat[..., k, :]
    return jnp.moveaxis(jnp.stack(first, -2).reshape(shape), last, axes)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _max_pool(x, window):
    return jnp.max(_windows(x, window), axis=_window_axes(len(window)))


def _max_pool_jvp(window, primals, tangents):
    (x,), (x_dot,) = primals, tangents
    xw, axes = _windows(x, window), _window_axes(len(window))
    mask = _first_max(xw, len(window))
    t = jnp.sum(jnp.where(mask, _windows(x_dot, window), 0), axis=axes)
    return jnp.max(xw, axis=axes), t


_max_pool.defjvp(_max_pool_jvp)


def _lowest(dtype) -> Any:
    return -jnp.inf if jnp.issubdtype(dtype, jnp.floating) else jnp.iinfo(dtype).min


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _window_max(x, window: tuple[int, ...], spec: _Spec):
    pieces, _ = shifted_windows(x, window, spec, _lowest(x.dtype), axis=1)
    return functools.reduce(jnp.maximum, pieces)


def _window_max_jvp(window, spec, primals, tangents):
    (x,), (x_dot,) = primals, tangents
    pieces, _ = shifted_windows(x, window, spec, _lowest(x.dtype), axis=1)
    y = functools.reduce(jnp.maximum, pieces)
    t, seen = jnp.zeros_like(y), jnp.zeros(y.shape, bool)
    pieces_dot, _ = shifted_windows(x_dot, window, spec, 0, axis=1)
    for piece, piece_dot in zip(pieces, pieces_dot, strict=True):
        first = (piece == y) & ~seen
        t, seen = jnp.where(first, piece_dot, t), seen | first
    return y, t


_window_max.defjvp(_window_max_jvp)


def max_pool(
    x: jax.Array,
    window: int | Sequence[int],
    strides: int | Sequence[int] | None = None,
    padding: Padding = "VALID",
) -> jax.Array:
    """Max pooling, channels-last: windows of ``window`` every ``strides`` (default: the window,
    non-overlapping), over ``x`` padded as ``padding`` says (``'VALID'``, ``'SAME'``, an int,
    or ``(low, high)`` pairs, as for convolutions) with the lowest value of its dtype.

    The same values and gradients as ``flax.nnx.max_pool`` (the gradient goes to the first
    maximum of each window in row-major order, as XLA's ``select_and_scatter`` picks it; ties
    are common after integer convolutions), computed with a mask instead of
    ``select_and_scatter``, which XLA:CPU expands into a slow scatter: non-overlapping windows
    as a reshape and a max, others as the maximum of the window positions' shifted copies
    (ResNet's 3x3 stride-2 pooling: BENCHMARKS.md section 7). Forward- and reverse-mode
    differentiation both work. A window holding a NaN gives NaN and passes no gradient (XLA's
    ``select_and_scatter`` passes it to one element of the window).

    Args:
      x: ``(batch, *spatial, channels)``.
      window: an int or one int per spatial axis.
      strides: ``None`` (the window), an int or one int per spatial axis.
      padding: as for `binary_conv`; with ``'VALID'`` and non-overlapping windows, trailing rows
        that do not fill a window are dropped.
    """
    n = x.ndim - 2
    window = ntuple(window, n, "window")
    strides = window if strides is None else ntuple(strides, n, "strides")
    if not all(w >= 1 for w in window):
        raise ValueError(f"window must be positive, got {window!r}")
    if not all(s >= 1 for s in strides):
        raise ValueError(f"strides must be positive, got {strides!r}")
    spec = pool_spec(x.shape[1:-1], window, strides, padding)
    if strides == window and not any(lo or hi for lo, hi in spec.pads):
        return _max_pool(x, window)
    return _window_max(x, window, spec)


def pool_spec(spatial, window: tuple[int, ...], strides: tuple[int, ...], padding) -> _Spec:
    """The `shifted_windows` description of pooling windows over an input of ``spatial`` shape."""
    n = len(window)
    pads = conv_padding(padding, spatial, window, strides, (1,) * n)
    return _Spec(False, None, None, strides=strides, pads=tuple(pads), dilation=(1,) * n)
