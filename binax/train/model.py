"""The model: a `binax.models` architecture, as a binary network or as one of the baselines."""

from __future__ import annotations

import inspect
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from binax import models
from binax.data import text
from binax.train import optim
from binax.train.config import Config, ConfigError


def hard_tanh(x: jax.Array) -> jax.Array:
    """``clip(x, -1, 1)``: the activation of the full-precision baseline (sign's surrogate)."""
    return jnp.clip(x, -1.0, 1.0)


def build_model(
    name: str,
    model_kwargs: dict[str, Any],
    input_shape: tuple[int, ...],
    num_classes: int,
    seed: int,
    *,
    full_precision: bool = False,
) -> nnx.Module:
    """A `binax.models` architecture for examples of ``input_shape`` (an image's ``(height,
    width, channels)``, or ``(3, max_length)`` for the encoder), or its full-precision baseline:
    its full-precision twin (the transformers' ``binary=False``), else real kernels (still
    `BinaryParam`\\ s, so flips are counted) and `hard_tanh` for the sign activations."""
    kwargs = dict(model_kwargs)
    cls = models._REGISTRY.get(name)  # an unknown name: models.get says so
    if full_precision and cls is not None and "binary" in inspect.signature(cls).parameters:
        kwargs["binary"] = False
    elif full_precision:
        kwargs.update(kernel_quantizer=None, input_quantizer=hard_tanh)
    if name == "encoder":  # rows of (ids, types, mask), binax.data.text.glue_dataset's
        kwargs = {"vocab_size": text.DEFAULT_VOCAB_SIZE, **kwargs, "max_length": input_shape[-1]}
    else:
        kwargs["input_shape"] = tuple(input_shape)
    return models.get(name, num_classes=num_classes, rngs=nnx.Rngs(seed), **kwargs)


def create(config: Config, input_shape: tuple[int, ...], num_classes: int):
    """``(model, init_params)``: the model ``config``'s optimizer trains (`build_model`; else a
    `ConfigError`) and, for the baselines, `latent_init` as `binax.train.make_program` takes it
    (flip rules keep the exactly binary kernels: ``None``)."""
    baseline = optim.recipe(config.optimizer).baseline
    args = (config.model, config.model_kwargs, input_shape, num_classes, config.seed)
    try:
        net = build_model(*args, full_precision=baseline == optim.FULL_PRECISION)
    except (TypeError, ValueError) as e:
        what = f"model {config.model!r} with model_kwargs {config.model_kwargs}"
        raise ConfigError(f"cannot build {what}: {e}") from None
    if baseline is None:
        return net, None
    key = jax.random.key(config.seed + 1)
    # One compiled program for every leaf (drawing eagerly compiles one per shape).
    return net, lambda params, mask: jax.jit(lambda p: latent_init(p, mask, key))(params)


def latent_init(params: Any, mask: Any, key: jax.Array) -> Any:
    """Gives binary leaves Glorot-uniform magnitudes (fans as Flax computes them), keeping
    their signs, so that every optimizer starts from the same binary network: for the
    baselines, whose real kernels would take ~1/lr steps to leave the models' exact +1/-1."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    out = []
    for w, m, k in zip(leaves, jax.tree.leaves(mask), keys, strict=True):
        if m and w.ndim >= 2:
            fans = (w.shape[-2] + w.shape[-1]) * int(np.prod(w.shape[:-2]))  # fan_in + fan_out
            limit = float(np.sqrt(6.0 / fans))
            # In (0, limit]: never exactly zero, so the sign is kept.
            mag = limit * (1.0 - jax.random.uniform(k, w.shape, w.dtype))
            w = jnp.where(w >= 0, mag, -mag).astype(w.dtype)
        out.append(w)
    return jax.tree.unflatten(treedef, out)
