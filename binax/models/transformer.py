"""Binary transformers: a vision transformer and a BERT-style encoder (BiT-style binarization).

Both are built from `binax.nn.BinaryTransformerBlock`; ``binary=False`` gives the full-precision
twin (the same architecture, real-valued everywhere, no `binax.nn.BinaryParam`), e.g. a
distillation teacher. ``return_intermediates=True`` returns a `TransformerOutput` with the hidden
states and attention of every layer, the quantities BiT distils besides the logits;
`distillation_loss` compares a student's with a teacher's.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from binax import quantizers as q
from binax.models import _common
from binax.nn import Attention, BinaryEmbed, BinaryTransformerBlock, ElasticLinear

__all__ = ["BinaryEncoder", "BinaryViT", "TransformerOutput", "distillation_loss", "outputs"]

_EMBED_INIT = nnx.initializers.normal(0.02)


class TransformerOutput(NamedTuple):
    """Logits and what every layer computed.

    Attributes:
      logits: ``(batch, num_classes)``.
      hidden_states: ``depth + 1`` arrays ``(batch, length, features)``: the embeddings' output,
        then every block's output.
      attentions: ``depth`` `binax.nn.Attention` (scores before the softmax, real probabilities).
    """

    logits: jax.Array
    hidden_states: tuple[jax.Array, ...]
    attentions: tuple[Attention, ...]


def _blocks(depth, features, num_heads, length, *, rngs, **kwargs):
    _positive(depth, "depth")
    return nnx.List(
        [
            BinaryTransformerBlock(
                features, num_heads, prob_scale_init=2.0 / length, rngs=rngs, **kwargs
            )
            for _ in range(depth)
        ]
    )


def _positive(value, name):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _run_blocks(blocks, x, mask, final_norm):
    hidden, attentions = [x], []
    for block in blocks:
        x, attention = block(x, mask, return_attention=True)
        hidden.append(x)
        attentions.append(attention)
    if final_norm is not None:
        x = final_norm(x)
    return x, tuple(hidden), tuple(attentions)


class BinaryViT(nnx.Module):
    """A vision transformer with BiT-style binary blocks, for small images (28x28, 32x32).

    Non-overlapping ``patch_size`` patches are flattened and embedded by a dense layer, a class
    token and learned position embeddings are added, ``depth`` pre-norm (by default)
    `binax.nn.BinaryTransformerBlock` follow, then a final LayerNorm and a dense head on the class
    token. As in BiT the embeddings, LayerNorms and head are real-valued by default; each is an
    argument.

    Reference:
      Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition at
      Scale", ICLR 2021; Liu et al., "BiT", NeurIPS 2022 (binarization).

    Args:
      input_shape: ``(height, width, channels)``, both sides divisible by ``patch_size``.
      num_classes: output size.
      patch_size: side of a patch (default 4: 49 patches of 28x28 images, 64 of 32x32).
      features, depth, num_heads: width, number of blocks, heads per block.
      mlp_features: hidden width of the blocks' MLP (default ``4 * features``).
      binary: binary blocks (True) or the full-precision twin (False).
      binary_patch_embedding: binarize the patch embedding as well (binary input and kernel).
      binary_head: binarize the classification head as well.
      pre_norm: pre-norm blocks (ViT, default) or post-norm (BERT).
      kernel_quantizer: quantizer of the binary kernels.
      rngs: `nnx.Rngs` for the parameters.
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (28, 28, 1),
        num_classes: int = 10,
        *,
        patch_size: int = 4,
        features: int = 64,
        depth: int = 4,
        num_heads: int = 4,
        mlp_features: int | None = None,
        binary: bool = True,
        binary_patch_embedding: bool = False,
        binary_head: bool = False,
        pre_norm: bool = True,
        kernel_quantizer: q.QuantizerLike = "ste_sign",
        rngs: nnx.Rngs,
    ):
        height, width, channels = _common.image_shape(input_shape, "BinaryViT")
        _positive(patch_size, "BinaryViT: patch_size")
        if height % patch_size or width % patch_size:
            raise ValueError(
                f"BinaryViT: patch_size ({patch_size}) must divide the image's height and width "
                f"({height}x{width})"
            )
        _positive(num_classes, "BinaryViT: num_classes")
        _positive(features, "BinaryViT: features")
        self.patch_size = patch_size
        self.input_shape = (height, width, channels)
        num_patches = (height // patch_size) * (width // patch_size)
        dense = functools.partial(ElasticLinear, kernel_quantizer=kernel_quantizer, rngs=rngs)
        self.patch_embedding = dense(
            patch_size * patch_size * channels, features, binary=binary and binary_patch_embedding
        )
        self.cls_token = nnx.Param(jnp.zeros((1, 1, features)))
        self.position_embedding = nnx.Param(
            _EMBED_INIT(rngs.params(), (1, num_patches + 1, features))
        )
        self.blocks = _blocks(
            depth,
            features,
            num_heads,
            num_patches + 1,
            mlp_features=mlp_features,
            binary=binary,
            pre_norm=pre_norm,
            kernel_quantizer=kernel_quantizer,
            rngs=rngs,
        )
        self.final_norm = nnx.LayerNorm(features, epsilon=1e-6, rngs=rngs) if pre_norm else None
        self.head = dense(features, num_classes, binary=binary and binary_head)

    def __call__(
        self, x: jax.Array, *, return_intermediates: bool = False
    ) -> jax.Array | TransformerOutput:
        """``x``: NHWC images of ``input_shape``. Returns logits, or a `TransformerOutput`."""
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"BinaryViT: x must be (batch, {', '.join(map(str, self.input_shape))}), "
                f"got shape {x.shape}"
            )
        b, h, w, c = x.shape
        p = self.patch_size
        patches = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        tokens = self.patch_embedding(patches.reshape(b, (h // p) * (w // p), p * p * c))
        cls = jnp.broadcast_to(self.cls_token[...], (b, 1, tokens.shape[-1])).astype(tokens.dtype)
        tokens = jnp.concatenate([cls, tokens], axis=1) + self.position_embedding[...]
        y, hidden, attentions = _run_blocks(self.blocks, tokens, None, self.final_norm)
        logits = self.head(y[:, 0])
        if return_intermediates:
            return TransformerOutput(logits, hidden, attentions)
        return logits


class BinaryEncoder(nnx.Module):
    """A BERT-style encoder for sequence classification with BiT-style binary blocks.

    Word, position and token-type embeddings are summed and normalized (LayerNorm), ``depth``
    post-norm (by default) `binax.nn.BinaryTransformerBlock` follow, then BERT's pooler (dense +
    tanh on the first token) and a dense classifier. With ``binary=True`` the word embeddings are
    a `binax.nn.BinaryEmbed` (``binary_embeddings``, BiT's "E1"); position and type embeddings,
    LayerNorms, pooler and classifier are real unless ``binary_head``. ``num_classes=1`` gives a
    regression output (STS-B).

    Reference:
      Devlin et al., "BERT", NAACL 2019; Liu et al., "BiT", NeurIPS 2022.

    Args:
      vocab_size: size of the word vocabulary.
      num_classes: output size.
      max_length: longest sequence (number of position embeddings).
      features, depth, num_heads, mlp_features: as `BinaryViT`.
      type_vocab_size: number of token types (segments); 0 for none.
      binary: binary blocks (True) or the full-precision twin (False).
      binary_embeddings: binary word embeddings (with ``binary=True``).
      binary_head: binarize the pooler and classifier as well.
      pre_norm: pre-norm blocks, or post-norm (BERT, default).
      pad_id: token id of padding; without an ``attention_mask`` keys equal to it are masked.
      kernel_quantizer: quantizer of the binary kernels and embeddings.
      rngs: `nnx.Rngs` for the parameters.
    """

    def __init__(
        self,
        vocab_size: int,
        num_classes: int = 2,
        *,
        max_length: int = 128,
        features: int = 64,
        depth: int = 4,
        num_heads: int = 4,
        mlp_features: int | None = None,
        type_vocab_size: int = 2,
        binary: bool = True,
        binary_embeddings: bool = True,
        binary_head: bool = False,
        pre_norm: bool = False,
        pad_id: int = 0,
        kernel_quantizer: q.QuantizerLike = "ste_sign",
        rngs: nnx.Rngs,
    ):
        for name, value in (
            ("vocab_size", vocab_size),
            ("num_classes", num_classes),
            ("max_length", max_length),
            ("features", features),
        ):
            _positive(value, f"BinaryEncoder: {name}")
        if isinstance(type_vocab_size, bool) or not isinstance(type_vocab_size, int):
            raise ValueError(
                f"BinaryEncoder: type_vocab_size must be an int >= 0, got {type_vocab_size!r}"
            )
        if type_vocab_size < 0:
            raise ValueError(f"BinaryEncoder: type_vocab_size must be >= 0, got {type_vocab_size}")
        self.max_length = max_length
        self.pad_id = pad_id
        if binary and binary_embeddings:
            self.word_embedding = BinaryEmbed(
                vocab_size, features, kernel_quantizer=kernel_quantizer, rngs=rngs
            )
        else:
            self.word_embedding = nnx.Embed(
                vocab_size, features, embedding_init=_EMBED_INIT, rngs=rngs
            )
        self.position_embedding = nnx.Param(_EMBED_INIT(rngs.params(), (max_length, features)))
        self.type_embedding = (
            nnx.Embed(type_vocab_size, features, embedding_init=_EMBED_INIT, rngs=rngs)
            if type_vocab_size
            else None
        )
        self.embedding_norm = nnx.LayerNorm(features, epsilon=1e-12, rngs=rngs)
        self.blocks = _blocks(
            depth,
            features,
            num_heads,
            max_length,
            mlp_features=mlp_features,
            binary=binary,
            pre_norm=pre_norm,
            layer_norm_epsilon=1e-12,
            kernel_quantizer=kernel_quantizer,
            rngs=rngs,
        )
        self.final_norm = nnx.LayerNorm(features, epsilon=1e-12, rngs=rngs) if pre_norm else None
        dense = functools.partial(
            ElasticLinear,
            binary=binary and binary_head,
            kernel_quantizer=kernel_quantizer,
            rngs=rngs,
        )
        self.pooler = dense(features, features)
        self.classifier = dense(features, num_classes)

    def __call__(
        self,
        input_ids: jax.Array,
        token_type_ids: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        *,
        return_intermediates: bool = False,
    ) -> jax.Array | TransformerOutput:
        """Classifies sequences of token ids.

        Args:
          input_ids: ``(batch, length)`` integer ids, ``length <= max_length``; the first token
            (e.g. ``[CLS]``) is pooled. Or ``(batch, 3, length)``: ids, token types and
            attention mask stacked (`binax.data.text.glue_dataset`'s rows, what ``binax-train``
            feeds), with ``token_type_ids`` and ``attention_mask`` None.
          token_type_ids: ``(batch, length)`` segment ids, or None (all 0).
          attention_mask: ``(batch, length)``, nonzero at real tokens; default
            ``input_ids != pad_id``.
          return_intermediates: return a `TransformerOutput` instead of the logits.
        """
        stacked = input_ids.ndim == 3 and input_ids.shape[1] == 3
        if stacked and token_type_ids is None and attention_mask is None:
            input_ids, token_type_ids, attention_mask = (input_ids[:, i] for i in range(3))
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(
                "BinaryEncoder: input_ids must be (batch, length) or (batch, 3, length) "
                f"integers, got {input_ids.dtype} of shape {input_ids.shape}"
            )
        length = input_ids.shape[1]
        if length > self.max_length:
            raise ValueError(
                f"BinaryEncoder: input length {length} exceeds max_length {self.max_length}"
            )
        x = self.word_embedding(input_ids) + self.position_embedding[...][:length]
        if self.type_embedding is not None:
            types = jnp.zeros_like(input_ids) if token_type_ids is None else token_type_ids
            x = x + self.type_embedding(types)
        x = self.embedding_norm(x)
        valid = input_ids != self.pad_id if attention_mask is None else attention_mask != 0
        mask = valid[:, None, None, :]
        y, hidden, attentions = _run_blocks(self.blocks, x, mask, self.final_norm)
        logits = self.classifier(jnp.tanh(self.pooler(y[:, 0])))
        if return_intermediates:
            return TransformerOutput(logits, hidden, attentions)
        return logits


def _masked_mean_sq(a, b, weights):
    sq = jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32))
    if weights is None:
        return jnp.mean(sq)
    weights = jnp.broadcast_to(weights, sq.shape).astype(jnp.float32)
    return jnp.sum(sq * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def _mean(losses):
    """Their mean; 0 for none (outputs without attention or hidden states: logits only)."""
    return jnp.mean(jnp.stack(losses)) if losses else jnp.zeros((), jnp.float32)


def outputs(model: nnx.Module, x: jax.Array, intermediates: bool = True) -> TransformerOutput:
    """``model``'s `TransformerOutput` on ``x``, what `distillation_loss` compares: with a
    transformer's hidden states and attention (``return_intermediates``) if ``intermediates``,
    else (and for any other model) with the logits alone."""
    params = inspect.signature(type(model).__call__).parameters
    if intermediates and "return_intermediates" in params:
        return model(x, return_intermediates=True)
    return TransformerOutput(model(x), (), ())


def distillation_loss(
    student: TransformerOutput,
    teacher: TransformerOutput,
    *,
    temperature: float = 1.0,
    logits_weight: float = 1.0,
    attention_weight: float = 1.0,
    hidden_weight: float = 1.0,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Knowledge distillation from a full-precision twin: logits, attention and hidden states.

    ``loss = logits_weight * L_logits + attention_weight * L_attention + hidden_weight * L_hidden``
    where (the teacher's values are constants: `jax.lax.stop_gradient`)

    * ``L_logits``: soft cross-entropy ``-sum softmax(t / T) * log_softmax(s / T)``, times ``T**2``
      (Hinton et al., 2015), averaged over the batch; the mean squared error for one output
      (regression, STS-B);
    * ``L_attention``: mean over layers of the mean squared error between the attention scores
      (before the softmax), over the (query, key) pairs of real tokens;
    * ``L_hidden``: mean over the ``depth + 1`` hidden states of their mean squared error, over
      real tokens.

    A `TransformerOutput` with no hidden states and no attention (``TransformerOutput(logits,
    (), ())``, e.g. of a model that is not a transformer) distils the logits only (the other
    terms are 0).

    These are the losses of TinyBERT and BinaryBERT, which BiT uses (Jiao et al., "TinyBERT",
    Findings of EMNLP 2020; Bai et al., "BinaryBERT", ACL 2021; Liu et al., "BiT", NeurIPS 2022).

    Args:
      student, teacher: `TransformerOutput` of the same architecture on the same batch
        (``return_intermediates=True``).
      temperature: softmax temperature ``T`` of the logits' loss (> 0).
      logits_weight, attention_weight, hidden_weight: weights of the three terms (0 drops one).
      mask: ``(batch, length)``, nonzero at real tokens (e.g. the encoder's attention mask), or
        None for all tokens.

    Returns:
      ``(loss, {"logits": ..., "attention": ..., "hidden": ...})``, float32 scalars.

    Raises:
      ValueError: the outputs do not line up (number of layers or shapes), or ``temperature``
        is not positive.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature!r}")
    shapes = lambda out: (  # noqa: E731
        out.logits.shape,
        [h.shape for h in out.hidden_states],
        [a.scores.shape for a in out.attentions],
    )
    if shapes(student) != shapes(teacher):
        raise ValueError(
            "distillation_loss: student and teacher outputs do not line up (logits, hidden "
            f"states, attention scores): {shapes(student)} vs {shapes(teacher)}"
        )
    teacher = jax.lax.stop_gradient(teacher)
    s, t = student.logits.astype(jnp.float32), teacher.logits.astype(jnp.float32)
    if s.shape[-1] == 1:
        logits_loss = jnp.mean(jnp.square(s - t))
    else:
        p = jax.nn.softmax(t / temperature, axis=-1)
        log_q = jax.nn.log_softmax(s / temperature, axis=-1)
        logits_loss = -jnp.mean(jnp.sum(p * log_q, axis=-1)) * temperature**2
    tokens = pairs = None
    if mask is not None:
        valid = mask != 0
        tokens = valid[:, :, None]  # (batch, length, 1)
        pairs = (valid[:, :, None] & valid[:, None, :])[:, None]  # (batch, 1, query, key)
    attention_loss = _mean(
        [
            _masked_mean_sq(a.scores, b.scores, pairs)
            for a, b in zip(student.attentions, teacher.attentions, strict=True)
        ]
    )
    hidden_loss = _mean(
        [
            _masked_mean_sq(a, b, tokens)
            for a, b in zip(student.hidden_states, teacher.hidden_states, strict=True)
        ]
    )
    parts = {"logits": logits_loss, "attention": attention_loss, "hidden": hidden_loss}
    loss = (
        logits_weight * logits_loss
        + attention_weight * attention_loss
        + hidden_weight * hidden_loss
    )
    return loss, parts
