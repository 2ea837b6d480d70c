"""The optimizers the training command offers: one `Recipe` each, in `RECIPES`, from which the
command's flags, help, config check and optimizer all come. The real-valued parameters
(BatchNorm, real first/last layers) get an Optax optimizer (`REAL_OPTIMIZERS`) beside them."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import optax

import binax
from binax.train import schedules

LATENT, FULL_PRECISION = "latent", "full_precision"


@dataclasses.dataclass(frozen=True)
class Hyperparameter:
    """A hyperparameter of the binary optimizers: its ``name`` in ``Config.hparams`` (and
    `flag`), ``help``, whether it is ``schedulable``, the factory's ``arg`` (default ``name``),
    and for a word, ``choices``: flag value -> factory argument."""

    name: str
    help: str
    schedulable: bool = False
    arg: str | None = None
    choices: dict[str, Any] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def parse(self, value: Any) -> Any:
        """``value`` as the factory takes it: a `Schedule`, a word's value or a float."""
        if self.schedulable:
            try:
                return schedules.parse(value)
            except ValueError as e:
                raise ValueError(f"{self.flag}: {e}") from None
        if self.choices is not None:
            if value not in self.choices:
                choices = ", ".join(self.choices)
                raise ValueError(f"{self.flag} must be one of {choices}, got {value!r}")
            return self.choices[value]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{self.flag} must be a number, got {value!r}")
        return float(value)


#: Every hyperparameter a recipe may take, by name.
HYPERPARAMETERS = {
    h.name: h
    for h in (
        Hyperparameter("threshold", "flip threshold tau", schedulable=True),
        Hyperparameter("gamma", "gradient EMA rate in (0, 1]", schedulable=True),
        Hyperparameter("sigma", "squared-gradient EMA rate in (0, 1]", schedulable=True),
        Hyperparameter("alpha", "inertia EMA rate in (0, 1]", schedulable=True),
        Hyperparameter(
            "binary_lr", "learning rate (latent: Adam's)", schedulable=True, arg="learning_rate"
        ),
        Hyperparameter(
            "bias_correction",
            "none (biased), rate (authors' code) or adam",
            choices={"none": None, "rate": "rate", "adam": "adam"},
        ),
        Hyperparameter("momentum", "momentum"),
        Hyperparameter("eps", "added to the adaptive threshold"),
        Hyperparameter("b1", "gradient EMA decay"),
        Hyperparameter("b2", "sign EMA decay"),
        Hyperparameter("init_scale", "scale of its random initial state"),
        Hyperparameter("clip", "latent weights are clipped to [-clip, clip]"),
    )
}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How the training command builds one optimizer of the binary weights: its ``--optimizer``
    ``name``, a one-line ``description`` for ``--help`` (what it is, the paper), the ``factory``
    (``None``: the real-valued optimizer trains every parameter), the command's ``defaults`` of
    its hyperparameters (`HYPERPARAMETERS` names), whether it is ``seeded`` (the factory takes a
    ``seed``), and its ``baseline``: `LATENT` (real latent weights), `FULL_PRECISION` (a real
    network) or ``None`` (a flip rule on exactly binary weights)."""

    name: str
    description: str
    factory: Callable[..., optax.GradientTransformation] | None
    defaults: dict[str, Any] = dataclasses.field(default_factory=dict)
    seeded: bool = False
    baseline: str | None = None

    @property
    def hyperparameters(self) -> tuple[Hyperparameter, ...]:
        return tuple(HYPERPARAMETERS[k] for k in self.defaults)

    def resolve(self, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """The hyperparameters, defaults updated by ``overrides``, parsed (`Hyperparameter.parse`)
        and checked by building the optimizer at the schedules' first values; raises ValueError
        naming the flag or the optimizer."""
        unknown = [k for k in overrides or {} if k not in self.defaults]
        if unknown:
            takes = ", ".join(self.defaults) or "none (it uses --lr for every parameter)"
            raise ValueError(
                f"hyperparameter {unknown[0]!r} does not apply to optimizer {self.name!r}; "
                f"it takes: {takes}"
            )
        values = {**self.defaults, **(overrides or {})}
        out = {h.name: h.parse(values[h.name]) for h in self.hyperparameters}
        first = {k: v.values[0] if isinstance(v, schedules.Schedule) else v for k, v in out.items()}
        try:
            self.build(first, seed=0, steps_per_epoch=1, total_steps=1)
        except (ValueError, TypeError) as e:
            raise ValueError(f"--optimizer {self.name}: {e}") from None
        return out

    def build(
        self, hp: dict[str, Any], *, seed: int, steps_per_epoch: int, total_steps: int
    ) -> optax.GradientTransformation | None:
        """The optimizer of the binary weights from `resolve`'s values (``None`` for "real")."""
        if self.factory is None:
            return None
        kwargs = {
            h.arg or h.name: schedules.parse(hp[h.name]).build(steps_per_epoch, total_steps)
            if h.schedulable
            else hp[h.name]
            for h in self.hyperparameters
        }
        return self.factory(**kwargs, **({"seed": seed} if self.seeded else {}))


def latent_adam(learning_rate: optax.ScalarOrSchedule, clip: float):
    """The latent-weight baseline: Adam on real latent weights, clipped to [-clip, clip]."""
    return optax.chain(optax.adam(learning_rate), binax.clip_latent(clip))


#: The training command's optimizers (defaults: ``--help``; Diode's measured in docs/training.md).
RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            "bop",
            "Bop (Helwegen et al. 2019): EMA of gradients, flip where w*m > threshold",
            binax.bop,
            {"threshold": 1e-8, "gamma": 1e-4},
        ),
        Recipe(
            "bop2nd_order",
            "Bop2ndOrder (Suarez-Ramirez et al. 2021): Bop on m/sqrt(v)",
            binax.bop2nd_order,
            {"threshold": 1e-6, "gamma": 1e-6, "sigma": 1e-2, "bias_correction": "none"},
        ),
        Recipe(
            "sgdat",
            "SGDAT (Gu et al. 2023): accumulated gradients, per-weight adaptive threshold",
            binax.sgdat,
            {"binary_lr": 1e-4, "threshold": 1e-7, "momentum": 0.0, "eps": 0.0},
        ),
        Recipe(
            "diode",
            "Diode (Guo et al. 2024): stochastic sign descent",
            binax.diode,
            {"binary_lr": 1e-3, "b1": 0.9, "b2": 0.999, "init_scale": 1e-3},
            seeded=True,
        ),
        Recipe(
            "cema",
            "CEMA (Quist et al. 2023): Bop on a cascade of two EMAs (no published defaults)",
            binax.cema,
            {"gamma": 1e-3, "alpha": 1e-2},
        ),
        Recipe(
            "latent",
            "latent-weight baseline: Adam on real latent weights + clip_latent(clip)",
            latent_adam,
            {"binary_lr": 1e-2, "clip": 1.0},
            baseline=LATENT,
        ),
        Recipe(
            "real",
            "full-precision baseline: same architecture, real kernels and hard-tanh "
            "activations, every parameter trained by the real-valued optimizer",
            None,
            baseline=FULL_PRECISION,
        ),
    )
}
OPTIMIZERS = tuple(RECIPES)
#: Each optimizer's defaults, ``{name: {hyperparameter: default}}``.
BINARY_DEFAULTS = {name: dict(r.defaults) for name, r in RECIPES.items()}

#: Optimizers of the real-valued parameters: name -> factory of the learning rate.
REAL_OPTIMIZERS: dict[str, Callable[[optax.ScalarOrSchedule], optax.GradientTransformation]] = {
    "adam": optax.adam,
    "adamw": optax.adamw,
    "sgd": lambda lr: optax.sgd(lr, momentum=0.9),
}


def _lookup(table: dict[str, Any], name: str, what: str) -> Any:
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}; valid choices: {', '.join(table)}")
    return table[name]


def recipe(optimizer: str) -> Recipe:
    """The recipe of ``optimizer``; raises ValueError listing the valid names."""
    return _lookup(RECIPES, optimizer, "optimizer")


def hparams(optimizer: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """``recipe(optimizer).resolve(overrides)``: its checked, parsed hyperparameters."""
    return recipe(optimizer).resolve(overrides)


def make_optimizer(
    optimizer: str,
    hp: dict[str, Any],
    real: str,
    lr: float | str | schedules.Schedule,
    is_binary: Any,
    *,
    seed: int,
    steps_per_epoch: int,
    total_steps: int,
) -> optax.GradientTransformation:
    """The whole optimizer: ``optimizer``'s recipe built with ``hp`` (from `hparams`) on the
    binary leaves that the label tree ``is_binary`` marks (`binax.nn.binary_labels`), ``real``
    (one of `REAL_OPTIMIZERS`) with the learning rate ``lr`` (number, schedule string or
    `Schedule`) on the others, joined by `binax.partition`. ``seed`` seeds a random initial
    state (Diode); the step counts turn schedules into Optax schedules."""
    steps = dict(steps_per_epoch=steps_per_epoch, total_steps=total_steps)
    real_tx = _lookup(REAL_OPTIMIZERS, real, "real optimizer")(schedules.parse(lr).build(**steps))
    binary_tx = recipe(optimizer).build(hp, seed=seed, **steps)
    if binary_tx is None:
        return real_tx
    return binax.partition(binary=binary_tx, real=real_tx, is_binary=is_binary)
