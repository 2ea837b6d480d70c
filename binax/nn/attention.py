"""Flax NNX layers of binary transformers in the style of BiT.

* `ElasticBinarization`: BiT's activation binarizer with a learned scale and threshold
  (`binax.quantizers.elastic_binarize`), ``+-1`` or ``{0, 1}`` codes.
* `ElasticLinear`: a `binax.nn.BinaryLinear` (binary kernel, learned per-output scale) whose input
  is binarized by its own `ElasticBinarization`; with ``binary=False`` an ordinary real dense layer.
* `BinaryEmbed`: an embedding table of ``+-1`` values (a `BinaryParam`) times a learned scale.
* `BinaryMultiHeadAttention`, `BinaryTransformerBlock`: attention and a transformer block built
  from those, with every projection and the attention itself binary (``binary=True``) or a
  full-precision twin with the same parameters less the binary ones (``binary=False``).

Reference:
  Liu, Oguz, Pappu, Xiao, Yih, Li, Mehdad, Krishnamoorthi, "BiT: Robustly Binarized
  Multi-distilled Transformer", NeurIPS 2022.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from binax import quantizers as q
from binax.nn import functional as F
from binax.nn.layers import BinaryLinear, BinaryParam

__all__ = [
    "Attention",
    "BinaryEmbed",
    "BinaryMultiHeadAttention",
    "BinaryTransformerBlock",
    "ElasticBinarization",
    "ElasticLinear",
]


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class ElasticBinarization(nnx.Module):
    """BiT's elastic binarization of activations: ``scale * clip-round((x - threshold) / scale)``.

    The scale ``alpha`` (one per layer) and the threshold ``beta`` (one per feature, or one in
    all with ``features=None``) are `nnx.Param` leaves, trained by the real-valued optimizer. The
    forward value and the gradients are those of `binax.quantizers.elastic_binarize`; the scale
    is clamped at ``min_scale`` (as BiT does) so that it stays positive.

    Args:
      features: size of the last axis of the input (one threshold each), or ``None`` for a
        single threshold (e.g. attention probabilities, whose last axis is the key axis).
      signed: ``+-scale`` outputs (True) or ``{0, scale}`` outputs for non-negative inputs such
        as attention probabilities (False).
      scale_init: initial scale (> 0). BiT sets it from the first batch (LSQ's
        ``2 * mean|x|``); here it is an argument, e.g. ``1`` after a LayerNorm and ``2 / T``
        for the softmax over ``T`` keys.
      min_scale: lower clamp of the scale.
      param_dtype: dtype of the scale and threshold.
    """

    def __init__(
        self,
        features: int | None,
        *,
        signed: bool = True,
        scale_init: float = 1.0,
        min_scale: float = 1e-5,
        param_dtype: Any = jnp.float32,
    ):
        if features is not None:
            _positive_int(features, "ElasticBinarization: features")
        if not scale_init > 0 or not min_scale > 0:
            raise ValueError(
                "ElasticBinarization: scale_init and min_scale must be positive, got "
                f"{scale_init!r} and {min_scale!r}"
            )
        self.signed = bool(signed)
        self.min_scale = float(min_scale)
        self.scale = nnx.Param(jnp.full((), scale_init, param_dtype))
        shape = () if features is None else (features,)
        self.threshold = nnx.Param(jnp.zeros(shape, param_dtype))

    def scale_value(self) -> jax.Array:
        """The scale used in the forward pass, ``max(scale, min_scale)``."""
        return jnp.maximum(self.scale[...], self.min_scale)

    def quantizer(self) -> q.Quantizer:
        """``x -> elastic_sign(x, scale, threshold)``: the one-bit codes, without the scale."""
        return functools.partial(
            q.elastic_sign,
            scale=self.scale_value(),
            threshold=self.threshold[...],
            signed=self.signed,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return q.elastic_binarize(x, self.scale_value(), self.threshold[...], signed=self.signed)


class ElasticLinear(BinaryLinear):
    """A dense layer of a binary transformer: ``y = a * s * (codes(x) @ q_k(W)) + b``.

    With ``binary=True`` the input is binarized by an `ElasticBinarization` (``codes`` in
    ``+-1``, or ``{0, 1}`` with ``signed_input=False``; learned scale ``a`` and threshold), the
    kernel ``W`` is a `BinaryParam` (random signs) read through ``kernel_quantizer`` and ``s`` is a
    learned per-output scale (the weight scale of BiT, initialised to ``1/sqrt(in_features)`` so
    that outputs start at unit variance). The product is computed by `binax.nn.functional.
    binary_dense` with one-bit operands (the scale ``a`` is applied to the output), so it uses
    binax's binary product. With ``binary=False`` it is an ordinary dense layer (real LeCun-normal
    kernel, no quantizer, no scale): the full-precision twin. A binary layer's
    ``input_quantizer`` attribute is `binax.quantizers.elastic_sign` (applied with the learned
    scale and threshold), so `binax.summary` counts its products as one-bit.

    Args:
      in_features, out_features: sizes of the input's and output's last axis.
      binary: binary (True) or full-precision (False) layer.
      use_bias: add a real bias.
      kernel_quantizer: quantizer of the binary kernel (default ``"ste_sign"``).
      weight_scale: learn a per-output scale ``s`` (binary layers only).
      signed_input: ``+-1`` (True) or ``{0, 1}`` (False) input codes.
      input_scale_init: initial scale of the input binarization.
      dtype, param_dtype, precision: as `BinaryLinear`.
      rngs: `nnx.Rngs` with a ``params`` stream.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        binary: bool = True,
        use_bias: bool = True,
        kernel_quantizer: q.QuantizerLike = "ste_sign",
        weight_scale: bool = True,
        signed_input: bool = True,
        input_scale_init: float = 1.0,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        rngs: nnx.Rngs,
    ):
        _positive_int(in_features, "ElasticLinear: in_features")
        _positive_int(out_features, "ElasticLinear: out_features")
        if not isinstance(binary, bool):
            raise ValueError(f"ElasticLinear: binary must be True or False, got {binary!r}")
        super().__init__(
            in_features,
            out_features,
            use_bias=use_bias,
            input_quantizer=None,
            kernel_quantizer=kernel_quantizer if binary else None,
            binary_kernel=binary,
            scale="learned" if binary and weight_scale else None,
            dtype=dtype,
            param_dtype=param_dtype,
            precision=precision,
            scale_init=nnx.initializers.constant(1.0 / math.sqrt(in_features)),
            rngs=rngs,
        )
        self.binary = binary
        if binary:  # what the input goes through (with the learned scale and threshold)
            self.input_quantizer = q.elastic_sign
        self.input_binarization = (
            ElasticBinarization(
                in_features,
                signed=signed_input,
                scale_init=input_scale_init,
                param_dtype=param_dtype,
            )
            if binary
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.input_binarization is None:
            return super().__call__(x)
        act = self.input_binarization
        scale = act.scale_value()
        if self.scale is not None:
            scale = scale * self.scale[...]
        return F.binary_dense(
            x,
            self.kernel[...],
            input_quantizer=act.quantizer(),
            kernel_quantizer=self.kernel_quantizer,
            scale=scale,
            bias=self._value(self.bias),
            dtype=self.dtype,
            precision=self.precision,
        )


class BinaryEmbed(nnx.Module):
    """An embedding table of ``+-1`` values times a learned per-feature scale.

    ``y = scale * kernel_quantizer(table[ids])``: the table is a `BinaryParam` (random signs),
    trained by the binary optimizer; the scale (ones) is real. BiT binarizes the word embeddings
    (its "E1"); `binax.models.BinaryEncoder` uses this layer with ``binary_embeddings=True``.

    Args:
      num_embeddings, features: table shape.
      kernel_quantizer: quantizer applied to the looked-up rows (default ``"ste_sign"``).
      param_dtype: dtype of the table and scale.
      rngs: `nnx.Rngs` with a ``params`` stream.
    """

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        kernel_quantizer: q.QuantizerLike = "ste_sign",
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        _positive_int(num_embeddings, "BinaryEmbed: num_embeddings")
        _positive_int(features, "BinaryEmbed: features")
        self.num_embeddings = num_embeddings
        self.kernel_quantizer = q.get(kernel_quantizer, argname="BinaryEmbed: kernel_quantizer")
        self.embedding = BinaryParam(
            F.binary_init(rngs.params(), (num_embeddings, features), param_dtype)
        )
        self.scale = nnx.Param(jnp.ones((features,), param_dtype))

    def __call__(self, ids: jax.Array) -> jax.Array:
        rows = jnp.take(self.embedding[...], ids, axis=0)
        if self.kernel_quantizer is not None:
            rows = self.kernel_quantizer(rows)
        return rows * self.scale[...]


class Attention(NamedTuple):
    """What one attention layer saw: for distillation and inspection.

    Attributes:
      scores: ``(batch, heads, queries, keys)`` scaled dot products before the softmax (masked
        entries hold the dtype's minimum).
      probs: the softmax of ``scores`` (real-valued, before any binarization).
    """

    scores: jax.Array
    probs: jax.Array


class BinaryMultiHeadAttention(nnx.Module):
    """Multi-head self-attention with binary projections and binarized attention (BiT).

    With ``binary=True``: the fused query/key/value projection and the output projection are
    `ElasticLinear` layers (binarized input, binary kernel); the queries, keys and values are
    binarized to ``+-1`` times a learned scale by `ElasticBinarization` (one threshold per
    feature), and the attention probabilities to ``{0, 1}`` times a learned scale, so
    ``softmax(Q_b K_b^T / sqrt(d)) -> A_b`` and ``A_b V_b`` multiply binary operands. With
    ``binary=False`` all of it is real-valued: the full-precision twin.

    Args:
      features: model width (divisible by ``num_heads``).
      num_heads: number of heads.
      binary: binary (True) or full-precision (False).
      kernel_quantizer: quantizer of the binary kernels.
      prob_scale_init: initial scale of the probabilities' binarization; ``2 / T`` (LSQ's
        initialisation for uniform attention over ``T`` keys) is a good value.
      dtype, param_dtype, precision: as `BinaryLinear`.
      rngs: `nnx.Rngs` with a ``params`` stream.
    """

    def __init__(
        self,
        features: int,
        num_heads: int,
        *,
        binary: bool = True,
        kernel_quantizer: q.QuantizerLike = "ste_sign",
        prob_scale_init: float = 0.1,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        rngs: nnx.Rngs,
    ):
        _positive_int(features, "BinaryMultiHeadAttention: features")
        _positive_int(num_heads, "BinaryMultiHeadAttention: num_heads")
        if features % num_heads:
            raise ValueError(
                f"BinaryMultiHeadAttention: features ({features}) must be divisible by "
                f"num_heads ({num_heads})"
            )
        self.features = features
        self.num_heads = num_heads
        self.binary = binary
        self.precision = precision
        dense = functools.partial(
            ElasticLinear,
            binary=binary,
            kernel_quantizer=kernel_quantizer,
            dtype=dtype,
            param_dtype=param_dtype,
            precision=precision,
            rngs=rngs,
        )
        self.qkv = dense(features, 3 * features)
        self.out = dense(features, features)
        if binary:
            act = functools.partial(ElasticBinarization, features, param_dtype=param_dtype)
            self.query_binarization = act()
            self.key_binarization = act()
            self.value_binarization = act()
            self.prob_binarization = ElasticBinarization(
                None, signed=False, scale_init=prob_scale_init, param_dtype=param_dtype
            )
        else:
            self.query_binarization = self.key_binarization = None
            self.value_binarization = self.prob_binarization = None

    def __call__(
        self, x: jax.Array, mask: jax.Array | None = None, *, return_attention: bool = False
    ) -> jax.Array | tuple[jax.Array, Attention]:
        """Self-attention over the second-to-last axis of ``x`` (``(batch, length, features)``).

        Args:
          x: ``(batch, length, features)``.
          mask: booleans broadcastable to ``(batch, heads, length, length)``, True where a query
            may attend to a key (e.g. ``valid[:, None, None, :]`` for padding), or None.
          return_attention: also return the `Attention` (scores and probabilities).
        """
        if x.ndim != 3 or x.shape[-1] != self.features:
            raise ValueError(
                f"BinaryMultiHeadAttention: x must be (batch, length, {self.features}), "
                f"got shape {x.shape}"
            )
        batch, length, _ = x.shape
        head = self.features // self.num_heads
        query, key, value = jnp.split(self.qkv(x), 3, axis=-1)
        if self.binary:
            query = self.query_binarization(query)
            key = self.key_binarization(key)
            value = self.value_binarization(value)
        split = lambda t: t.reshape(batch, length, self.num_heads, head)
        query, key, value = split(query), split(key), split(value)
        scores = jnp.einsum("bqhd,bkhd->bhqk", query, key, precision=self.precision)
        scores = scores / jnp.sqrt(jnp.asarray(head, scores.dtype))
        if mask is not None:
            scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
        probs = jax.nn.softmax(scores, axis=-1)
        attend = probs
        if self.prob_binarization is not None:
            attend = self.prob_binarization(probs)
            if mask is not None:  # a learned threshold below 0 must not let masked keys in
                attend = jnp.where(mask, attend, jnp.zeros((), attend.dtype))
        context = jnp.einsum("bhqk,bkhd->bqhd", attend, value, precision=self.precision)
        y = self.out(context.reshape(batch, length, self.features))
        return (y, Attention(scores, probs)) if return_attention else y


class BinaryTransformerBlock(nnx.Module):
    """A transformer encoder block: `BinaryMultiHeadAttention` and a two-layer MLP.

    Post-norm (BERT, BiT): ``x = LN(x + attn(x)); x = LN(x + mlp(x))``. Pre-norm (ViT):
    ``x = x + attn(LN(x)); x = x + mlp(LN(x))``. The MLP is ``ElasticLinear -> activation ->
    ElasticLinear`` (binary inputs and kernels with ``binary=True``). LayerNorms and the residual
    connections stay real-valued, as in BiT.

    Args:
      features, num_heads: width and number of heads.
      mlp_features: hidden width of the MLP (default ``4 * features``).
      binary: binary (True) or full-precision twin (False).
      pre_norm: pre-norm (True) or post-norm (False).
      activation: the MLP's nonlinearity (default GELU).
      layer_norm_epsilon: LayerNorm epsilon.
      kernel_quantizer, prob_scale_init, dtype, param_dtype, precision: as
        `BinaryMultiHeadAttention`.
      rngs: `nnx.Rngs` with a ``params`` stream.
    """

    def __init__(
        self,
        features: int,
        num_heads: int,
        *,
        mlp_features: int | None = None,
        binary: bool = True,
        pre_norm: bool = False,
        activation: Callable[[jax.Array], jax.Array] = nnx.gelu,
        layer_norm_epsilon: float = 1e-6,
        kernel_quantizer: q.QuantizerLike = "ste_sign",
        prob_scale_init: float = 0.1,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        rngs: nnx.Rngs,
    ):
        mlp_features = 4 * features if mlp_features is None else mlp_features
        _positive_int(mlp_features, "BinaryTransformerBlock: mlp_features")
        self.pre_norm = bool(pre_norm)
        self.activation = activation
        self.attention = BinaryMultiHeadAttention(
            features,
            num_heads,
            binary=binary,
            kernel_quantizer=kernel_quantizer,
            prob_scale_init=prob_scale_init,
            dtype=dtype,
            param_dtype=param_dtype,
            precision=precision,
            rngs=rngs,
        )
        dense = functools.partial(
            ElasticLinear,
            binary=binary,
            kernel_quantizer=kernel_quantizer,
            dtype=dtype,
            param_dtype=param_dtype,
            precision=precision,
            rngs=rngs,
        )
        self.mlp_in = dense(features, mlp_features)
        self.mlp_out = dense(mlp_features, features)
        norm = functools.partial(
            nnx.LayerNorm, features, epsilon=layer_norm_epsilon, param_dtype=param_dtype, rngs=rngs
        )
        self.attention_norm = norm()
        self.mlp_norm = norm()

    def _mlp(self, x):
        return self.mlp_out(self.activation(self.mlp_in(x)))

    def __call__(
        self, x: jax.Array, mask: jax.Array | None = None, *, return_attention: bool = False
    ) -> jax.Array | tuple[jax.Array, Attention]:
        """``x``: ``(batch, length, features)``; ``mask`` as `BinaryMultiHeadAttention`."""
        if self.pre_norm:
            a, attention = self.attention(self.attention_norm(x), mask, return_attention=True)
            x = x + a
            x = x + self._mlp(self.mlp_norm(x))
        else:
            a, attention = self.attention(x, mask, return_attention=True)
            x = self.attention_norm(x + a)
            x = self.mlp_norm(x + self._mlp(x))
        return (x, attention) if return_attention else x
