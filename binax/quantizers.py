"""Quantizers for binary neural networks: exact forward values, surrogate gradients.

Every quantizer here is a pure function of an array. The forward value is exact (``sign0``: ``+1``
for ``x >= 0`` and ``-1`` otherwise, never ``0``); the gradient is a *straight-through estimator*
(STE): the derivative of a smooth or piecewise-linear surrogate of the sign function. The
estimators are written with `jax.custom_jvp`, so reverse mode (`jax.grad`, `jax.vjp`), forward mode
(`jax.jvp`, `jax.jacfwd`) and `jax.vmap` all work.

The gradients follow Larq's quantizers (larq/larq ``larq/quantizers.py``) and the papers cited on
each function, boundaries included (``|x| <= clip_value`` passes the gradient).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from binax._ops import sign0  # +1 where x >= 0, else -1: the one definition in binax

Quantizer = Callable[[jax.Array], jax.Array]
QuantizerLike = str | Quantizer | None

__all__ = [
    "Quantizer",
    "QuantizerLike",
    "approx_sign",
    "elastic_binarize",
    "elastic_sign",
    "get",
    "magnitude_aware_sign",
    "magnitude_scale",
    "names",
    "precision",
    "sign0",
    "ste_heaviside",
    "ste_sign",
    "swish_sign",
]


def _heaviside(x: jax.Array) -> jax.Array:
    """``1`` where ``x > 0``, ``0`` elsewhere (Larq's ``larq.math.heaviside``)."""
    x = jnp.asarray(x)
    return jnp.where(x > 0, jnp.ones((), x.dtype), jnp.zeros((), x.dtype))


# --- straight-through sign --------------------------------------------------------------------


@jax.custom_jvp
def _ste_sign(x, clip_value):
    return sign0(x)


@_ste_sign.defjvp
def _ste_sign_jvp(primals, tangents):
    x, clip_value = primals
    x_dot, _ = tangents
    passes = jnp.abs(x) <= clip_value
    return sign0(x), jnp.where(passes, x_dot, jnp.zeros_like(x_dot))


@jax.custom_jvp
def _identity_ste_sign(x):
    return sign0(x)


@_identity_ste_sign.defjvp
def _identity_ste_sign_jvp(primals, tangents):
    (x,), (x_dot,) = primals, tangents
    return sign0(x), x_dot


def ste_sign(x: jax.Array, clip_value: float | None = 1.0) -> jax.Array:
    """Sign with a (clipped) straight-through estimator.

    Forward: ``sign0(x)`` (``+1`` for ``x >= 0``, ``-1`` otherwise). Backward: the incoming
    gradient passes unchanged where ``|x| <= clip_value`` (inclusive) and is zero elsewhere, the
    derivative of ``clip(x, -clip_value, clip_value)`` (hard tanh). With ``clip_value=None`` the
    gradient is the identity everywhere.

    References:
      Hubara, Courbariaux, Soudry, El-Yaniv, Bengio, "Binarized Neural Networks", NeurIPS 2016.
      Bengio, Léonard, Courville, "Estimating or Propagating Gradients Through Stochastic Neurons
      for Conditional Computation", arXiv:1308.3432, 2013.

    Args:
      x: input array (floating point).
      clip_value: gradients pass where ``|x| <= clip_value``; ``None`` passes them everywhere.

    Returns:
      ``sign0(x)``, same shape and dtype as ``x``.
    """
    if clip_value is None:
        return _identity_ste_sign(x)
    return _ste_sign(x, clip_value)


# --- Bi-Real Net's approximate sign -----------------------------------------------------------


@jax.custom_jvp
def approx_sign(x: jax.Array) -> jax.Array:
    """Sign with the piecewise-polynomial gradient of Bi-Real Net.

    Forward: ``sign0(x)``. Backward: ``(2 - 2|x|) * g`` where ``|x| <= 1``, ``0`` elsewhere: the
    derivative of the surrogate ``2x + x|x|`` (clipped to ``[-1, 1]`` for ``|x| > 1``).

    Reference:
      Liu, Wu, Luo, Yang, Liu, Cheng, "Bi-Real Net: Enhancing the Performance of 1-bit CNNs with
      Improved Representational Capability and Advanced Training Algorithm", ECCV 2018.
    """
    return sign0(x)


@approx_sign.defjvp
def _approx_sign_jvp(primals, tangents):
    (x,), (x_dot,) = primals, tangents
    abs_x = jnp.abs(x)
    slope = jnp.where(abs_x <= 1, 2 - 2 * abs_x, jnp.zeros_like(abs_x))
    return sign0(x), slope.astype(x_dot.dtype) * x_dot


# --- BNN+ swish sign --------------------------------------------------------------------------


@jax.custom_jvp
def _swish_sign(x, beta):
    return sign0(x)


@_swish_sign.defjvp
def _swish_sign_jvp(primals, tangents):
    x, beta = primals
    x_dot, _ = tangents
    bx = beta * x
    slope = beta * (2 - bx * jnp.tanh(bx / 2)) / (1 + jnp.cosh(bx))
    return sign0(x), slope.astype(x_dot.dtype) * x_dot


def swish_sign(x: jax.Array, beta: float = 5.0) -> jax.Array:
    """Sign with the SignSwish gradient of BNN+.

    Forward: ``sign0(x)``. Backward:
    ``g * beta * (2 - beta*x*tanh(beta*x/2)) / (1 + cosh(beta*x))``, the derivative of the
    SignSwish ``2*sigmoid(beta*x)*(1 + beta*x*(1 - sigmoid(beta*x))) - 1``.

    Reference:
      Darabi, Belbahri, Courbariaux, Partovi Nia, "BNN+: Improved Binary Network Training",
      arXiv:1812.11800, 2018.

    Args:
      x: input array.
      beta: sharpness; larger ``beta`` approaches the sign function.
    """
    return _swish_sign(x, beta)


# --- magnitude-aware sign ---------------------------------------------------------------------


def magnitude_aware_sign(x: jax.Array, clip_value: float | None = 1.0) -> jax.Array:
    """Per-channel scaled sign for weights, as in Bi-Real Net (section 3.3).

    Computes ``stop_gradient(mean(|x|)) * ste_sign(x, clip_value)``, the mean taken over all axes
    but the last (the output channels of a kernel). The scale is not differentiated: the gradient
    is ``mean(|x|)`` times the straight-through gradient of `ste_sign`.

    Reference:
      Liu et al., "Bi-Real Net", ECCV 2018, section 3.3 ("magnitude-aware gradient").
    """
    x = jnp.asarray(x)
    return magnitude_scale(x) * ste_sign(x, clip_value)


def magnitude_scale(x: jax.Array) -> jax.Array:
    """`magnitude_aware_sign`'s scale: ``stop_gradient(mean(|x|))`` over all axes but the last."""
    return jax.lax.stop_gradient(jnp.mean(jnp.abs(x), axis=tuple(range(x.ndim - 1))))


# --- straight-through Heaviside ---------------------------------------------------------------


@jax.custom_jvp
def _ste_heaviside(x, clip_value):
    return _heaviside(x)


@_ste_heaviside.defjvp
def _ste_heaviside_jvp(primals, tangents):
    x, clip_value = primals
    x_dot, _ = tangents
    passes = jnp.abs(x) <= clip_value
    return _heaviside(x), jnp.where(passes, x_dot, jnp.zeros_like(x_dot))


def ste_heaviside(x: jax.Array, clip_value: float = 1.0) -> jax.Array:
    """Binarization to ``{0, 1}`` with a clipped straight-through estimator.

    Forward: ``1`` where ``x > 0``, ``0`` elsewhere (``0`` maps to ``0``, as in Larq's
    ``SteHeaviside``). Backward: the gradient passes where ``|x| <= clip_value`` (inclusive).

    Reference:
      Larq ``SteHeaviside`` (larq/larq ``larq/quantizers.py``); the clipped STE of Hubara et al.,
      "Binarized Neural Networks", NeurIPS 2016.
    """
    return _ste_heaviside(x, clip_value)


# --- elastic binarization (BiT) ---------------------------------------------------------------


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _elastic_codes(x, scale, threshold, signed):
    u = (x - threshold) / scale
    if signed:
        return sign0(u)
    return jnp.round(jnp.clip(u, 0, 1))  # round half to even: u == 1/2 gives 0


@_elastic_codes.defjvp
def _elastic_codes_jvp(signed, primals, tangents):
    x, scale, threshold = primals
    x_dot, scale_dot, threshold_dot = tangents
    u = (x - threshold) / scale
    lo = -1 if signed else 0
    inside = ((u >= lo) & (u <= 1)).astype(x.dtype)
    codes = _elastic_codes(x, scale, threshold, signed)
    # d codes = inside / scale * (dx - dthreshold - u * dscale)
    codes_dot = inside / scale * (x_dot - threshold_dot - u * scale_dot)
    return codes, codes_dot.astype(x.dtype)


def _check_elastic(x, scale, threshold):
    x = jnp.asarray(x)
    scale = jnp.asarray(scale, x.dtype)
    threshold = jnp.asarray(threshold, x.dtype)
    try:
        fits = jnp.broadcast_shapes(x.shape, scale.shape, threshold.shape) == x.shape
    except (TypeError, ValueError):
        fits = False
    if not fits:
        raise ValueError(
            f"elastic binarization: scale (shape {scale.shape}) and threshold (shape "
            f"{threshold.shape}) must broadcast to the input's shape {x.shape}"
        )
    return x, scale, threshold


def elastic_sign(
    x: jax.Array, scale: jax.Array, threshold: jax.Array = 0.0, *, signed: bool = True
) -> jax.Array:
    """The one-bit codes of BiT's elastic binarization, with their straight-through gradients.

    With ``u = (x - threshold) / scale`` the forward value is ``sign0(u)`` (``+1``/``-1``) when
    ``signed``, else ``round(clip(u, 0, 1))`` (``{0, 1}``; ``1`` where ``u > 1/2``). The gradients
    are those that make ``scale * elastic_sign(x, scale, threshold)`` (`elastic_binarize`) have
    the gradients of the paper (the rounding passes the gradient straight through inside the clip
    range ``lo <= u <= 1``, ``lo = -1`` signed, ``0`` unsigned, bounds included)::

        d codes = 1[lo <= u <= 1] / scale * (dx - dthreshold - u * dscale)

    Use this (rather than `elastic_binarize`) as the input quantizer of a binary product and put
    the scale on the product's output: the operands of the product then stay one-bit.
    ``scale`` must be positive (BiT clamps it at ``1e-5``; `binax.nn.ElasticBinarization` does).

    Args:
      x: input array.
      scale: the learned scale ``alpha`` (> 0), broadcastable to ``x``'s shape.
      threshold: the learned threshold ``beta``, broadcastable to ``x``'s shape.
      signed: ``{-1, +1}`` codes (True) or ``{0, 1}`` codes for non-negative inputs such as
        attention probabilities (False).

    Raises:
      ValueError: ``scale`` or ``threshold`` do not broadcast to ``x``'s shape.
    """
    x, scale, threshold = _check_elastic(x, scale, threshold)
    return _elastic_codes(x, scale, threshold, bool(signed))


def elastic_binarize(
    x: jax.Array, scale: jax.Array, threshold: jax.Array = 0.0, *, signed: bool = True
) -> jax.Array:
    """BiT's elastic binarization: ``scale * clip-round((x - threshold) / scale)``.

    Forward, with ``u = (x - threshold) / scale``: ``scale * sign0(u)`` (``signed``, values
    ``+-scale``) or ``scale * round(clip(u, 0, 1))`` (values ``{0, scale}``, for non-negative
    inputs such as attention probabilities). Gradients (eq. 4 of the paper; the rounding is passed
    straight through inside the range ``lo <= u <= 1``, ``lo = -1`` signed, ``0`` unsigned)::

        d/dx         = 1[lo <= u <= 1]
        d/dthreshold = -1[lo <= u <= 1]
        d/dscale     = codes - u   inside the range,   codes (= lo or 1) outside,

    where ``codes = elastic_sign(x, scale, threshold, signed=signed)``. (The authors' released code
    uses ``sign(x)`` as the scale's gradient of the signed one-bit case everywhere, i.e. without
    the ``-u`` term inside the range; binax follows the paper's formula, which is the
    derivative of the clipped surrogate. It also omits LSQ's gradient scaling of ``scale``, which an
    Adam-type optimizer for the real-valued parameters makes moot.)

    Reference:
      Liu, Oguz, Pappu, Xiao, Yih, Li, Mehdad, Krishnamoorthi, "BiT: Robustly Binarized
      Multi-distilled Transformer", NeurIPS 2022, section 3.2 (elastic binarization function);
      Esser et al., "Learned Step Size Quantization", ICLR 2020.

    Args: as `elastic_sign`.
    """
    x, scale, threshold = _check_elastic(x, scale, threshold)
    return scale * _elastic_codes(x, scale, threshold, bool(signed))


# --- resolution by name -----------------------------------------------------------------------

_REGISTRY: dict[str, Quantizer] = {
    "ste_sign": ste_sign,
    "approx_sign": approx_sign,
    "swish_sign": swish_sign,
    "magnitude_aware_sign": magnitude_aware_sign,
    "ste_heaviside": ste_heaviside,
}

# Quantizers whose output takes two values (one bit per element, maybe times a real scale).
_ONE_BIT = frozenset([*_REGISTRY.values(), elastic_sign, elastic_binarize])


def names() -> tuple[str, ...]:
    """The string aliases accepted by `get`."""
    return tuple(_REGISTRY)


def get(identifier: QuantizerLike, argname: str = "quantizer") -> Quantizer | None:
    """Resolves a quantizer given by name, as a callable, or ``None``.

    Args:
      identifier: one of `names` (``"ste_sign"``, ``"approx_sign"``, ``"swish_sign"``,
        ``"magnitude_aware_sign"``, ``"ste_heaviside"``), any callable ``x -> q(x)`` (returned
        unchanged; use `functools.partial` to set arguments, e.g.
        ``functools.partial(ste_sign, clip_value=1.3)``), or ``None`` (no quantization).
      argname: the argument name used in error messages.

    Raises:
      ValueError: unknown name, or something that is neither a string, a callable nor ``None``.
    """
    if identifier is None or callable(identifier):
        return identifier
    if isinstance(identifier, str):
        try:
            return _REGISTRY[identifier]
        except KeyError:
            raise ValueError(
                f"{argname}: unknown quantizer {identifier!r}; valid names are "
                f"{', '.join(repr(n) for n in _REGISTRY)} (or pass a callable, or None)"
            ) from None
    raise ValueError(
        f"{argname}: expected a quantizer name, a callable or None, got {identifier!r}"
    )


def precision(quantizer: QuantizerLike) -> int | None:
    """Bits per element of a quantizer's output: 1, 32 for ``None``, or ``None`` if unknown.

    The quantizers of this module (and `functools.partial` objects over them) are 1-bit. A custom
    callable can declare its precision with an attribute, e.g. ``my_quantizer.precision = 1``.
    """
    q: Any = get(quantizer)
    if q is None:
        return 32
    while isinstance(q, functools.partial):
        q = q.func
    if q in _ONE_BIT:
        return 1
    declared = getattr(q, "precision", None)
    return int(declared) if declared is not None else None
