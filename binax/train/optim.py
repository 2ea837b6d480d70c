"""The optimizers the training command offers, built from a `Config`.

Binary weights (the model's `binax.nn.BinaryParam` leaves) get one of the BNN optimizers, the
latent-weight baseline (Adam on real latent weights, clipped to [-1, 1]) or, for the
full-precision baseline ``"real"``, the same optimizer as every other parameter. Real-valued
parameters (BatchNorm, real first/last layers) get an ordinary Optax optimizer. The two are
combined with `binax.partition`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import binax
from binax.train import schedules

#: Optimizers for the binary weights, with their hyperparameters and the defaults used by the
#: training command: the papers' defaults (``spec/optimizers.md``) for Bop, Bop2ndOrder and
#: SGDAT; for Diode, whose published defaults need thousands of steps per flip, faster rates
#: for runs of tens of epochs; CEMA has no published defaults. On the digits main job (MLP,
#: 20 epochs) the papers' Diode defaults reach 82% test accuracy, these 96%.
BINARY_DEFAULTS: dict[str, dict[str, Any]] = {
    "bop": {"threshold": 1e-8, "gamma": 1e-4},
    "bop2nd_order": {
        "threshold": 1e-6,
        "gamma": 1e-6,
        "sigma": 1e-2,
        "bias_correction": "none",
    },
    "sgdat": {"binary_lr": 1e-4, "threshold": 1e-7, "momentum": 0.0, "eps": 0.0},
    "diode": {"binary_lr": 1e-3, "b1": 0.9, "b2": 0.999, "init_scale": 1e-3},
    "cema": {"gamma": 1e-3, "alpha": 1e-2},
    "latent": {"binary_lr": 1e-2, "clip": 1.0},
    "real": {},
}
OPTIMIZERS = tuple(BINARY_DEFAULTS)

#: What each optimizer does, for ``--help``.
DESCRIPTIONS = {
    "bop": "Bop (Helwegen et al. 2019): EMA of gradients, flip where w*m > threshold",
    "bop2nd_order": "Bop2ndOrder (Suarez-Ramirez et al. 2021): Bop on m/sqrt(v)",
    "sgdat": "SGDAT (Gu et al. 2023): accumulated gradients, per-weight adaptive threshold",
    "diode": "Diode (Guo et al. 2024): stochastic sign descent",
    "cema": "CEMA (Quist et al. 2023): Bop on a cascade of two EMAs (no published defaults)",
    "latent": "latent-weight baseline: Adam on real latent weights + clip_latent(clip)",
    "real": "full-precision baseline: same architecture, real kernels and hard-tanh "
    "activations, every parameter trained by the real-valued optimizer",
}

#: Hyperparameters that take a schedule (see `binax.train.schedules`).
SCHEDULABLE = frozenset({"threshold", "gamma", "sigma", "alpha", "binary_lr"})
BIAS_CORRECTIONS = ("none", "rate", "adam")
REAL_OPTIMIZERS = ("adam", "adamw", "sgd")


def hparams(optimizer: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The binary optimizer's hyperparameters: its defaults updated by ``overrides``.

    Raises:
      ValueError: unknown optimizer, a hyperparameter the optimizer does not take, or a bad
        value (the message names it).
    """
    if optimizer not in BINARY_DEFAULTS:
        raise ValueError(f"unknown optimizer {optimizer!r}; valid choices: {', '.join(OPTIMIZERS)}")
    out = dict(BINARY_DEFAULTS[optimizer])
    for key, value in (overrides or {}).items():
        if key not in out:
            takes = ", ".join(out) or "none (it uses --lr for every parameter)"
            raise ValueError(
                f"hyperparameter {key!r} does not apply to optimizer {optimizer!r}; "
                f"it takes: {takes}"
            )
        out[key] = value
    for key, value in out.items():
        if key in SCHEDULABLE:
            schedules.parse(value)
        elif key == "bias_correction":
            if value not in BIAS_CORRECTIONS:
                raise ValueError(
                    f"bias_correction must be one of {', '.join(BIAS_CORRECTIONS)}, got {value!r}"
                )
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"hyperparameter {key!r} must be a number, got {value!r}")
    return out


def real_optimizer(name: str, lr: optax.ScalarOrSchedule) -> optax.GradientTransformation:
    """The optimizer of the real-valued parameters."""
    if name == "adam":
        return optax.adam(lr)
    if name == "adamw":
        return optax.adamw(lr)
    if name == "sgd":
        return optax.sgd(lr, momentum=0.9)
    raise ValueError(
        f"unknown real optimizer {name!r}; valid choices: {', '.join(REAL_OPTIMIZERS)}"
    )


def binary_optimizer(
    optimizer: str, hp: dict[str, Any], seed: int, steps_per_epoch: int, total_steps: int
) -> optax.GradientTransformation:
    """The optimizer of the binary weights (``None`` for ``"real"``)."""
    h = {
        k: schedules.build(v, steps_per_epoch, total_steps) if k in SCHEDULABLE else v
        for k, v in hp.items()
    }
    if optimizer == "bop":
        return binax.bop(threshold=h["threshold"], gamma=h["gamma"])
    if optimizer == "bop2nd_order":
        bc = None if h["bias_correction"] == "none" else h["bias_correction"]
        return binax.bop2nd_order(
            threshold=h["threshold"], gamma=h["gamma"], sigma=h["sigma"], bias_correction=bc
        )
    if optimizer == "sgdat":
        return binax.sgdat(
            learning_rate=h["binary_lr"],
            threshold=h["threshold"],
            momentum=h["momentum"],
            eps=h["eps"],
        )
    if optimizer == "diode":
        return binax.diode(
            learning_rate=h["binary_lr"],
            b1=h["b1"],
            b2=h["b2"],
            init_scale=h["init_scale"],
            seed=seed,
        )
    if optimizer == "cema":
        return binax.cema(gamma=h["gamma"], alpha=h["alpha"])
    if optimizer == "latent":
        return optax.chain(optax.adam(h["binary_lr"]), binax.clip_latent(h["clip"]))
    raise ValueError(f"unknown optimizer {optimizer!r}; valid choices: {', '.join(OPTIMIZERS)}")


def make_optimizer(
    optimizer: str,
    hp: dict[str, Any],
    real: str,
    lr: float | str,
    is_binary: Any,
    *,
    seed: int,
    steps_per_epoch: int,
    total_steps: int,
) -> optax.GradientTransformation:
    """The whole optimizer: the binary one and the real one, joined by `binax.partition`.

    Args:
      optimizer: one of `OPTIMIZERS`.
      hp: its hyperparameters, as returned by `hparams` (numbers or schedule strings).
      real: one of `REAL_OPTIMIZERS`, for the real-valued parameters.
      lr: its learning rate (number or schedule string).
      is_binary: the label tree of the binary leaves (`binax.nn.binary_labels`).
      seed: seed of optimizers that draw random state (Diode).
      steps_per_epoch, total_steps: to turn schedules into Optax schedules.
    """
    real_tx = real_optimizer(real, schedules.build(lr, steps_per_epoch, total_steps))
    if optimizer == "real":
        return real_tx
    binary_tx = binary_optimizer(optimizer, hp, seed, steps_per_epoch, total_steps)
    return binax.partition(binary=binary_tx, real=real_tx, is_binary=is_binary)


def latent_init(params: Any, mask: Any, key: jax.Array) -> Any:
    """Gives binary leaves Glorot-uniform magnitudes, keeping their signs.

    For the latent-weight and full-precision baselines, whose kernels are real: the models
    initialise binary kernels to exactly +1/-1, which a latent weight clipped to [-1, 1] would
    take ~1/lr steps to leave. The signs are kept, so every optimizer starts from the same
    binary network. Fans are computed as Flax does (receptive field times channels).
    """
    leaves, treedef = jax.tree.flatten(params)
    masks = jax.tree.leaves(mask)
    keys = jax.random.split(key, len(leaves))
    out = []
    for w, m, k in zip(leaves, masks, keys, strict=True):
        if m and w.ndim >= 2:
            receptive = int(np.prod(w.shape[:-2]))
            fan_in, fan_out = w.shape[-2] * receptive, w.shape[-1] * receptive
            limit = float(np.sqrt(6.0 / (fan_in + fan_out)))
            # In (0, limit]: never exactly zero, so the sign is kept.
            mag = limit * (1.0 - jax.random.uniform(k, w.shape, w.dtype))
            w = jnp.where(w >= 0, mag, -mag).astype(w.dtype)
        out.append(w)
    return jax.tree.unflatten(treedef, out)
