"""The configuration of a training run: one dataclass, saved as JSON in the run directory."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from binax.data import DATASET_NAMES
from binax.train import optim, schedules


class ConfigError(ValueError):
    """A bad configuration value; the message names the field and what it expects."""


def _field(default: Any, help: str, group: str, *, runtime: bool = False, **flag: Any) -> Any:
    """A Config field with its ``--flag`` (the field's name, ``_`` as ``-``; ``flag["flag"]`` if
    given): ``help`` (the default is appended unless it names it), ``group`` in ``--help``,
    ``runtime`` (it may change when a run is resumed) and `argparse` arguments in ``flag``
    (``type="schedule"``: a number or schedule string)."""
    if "default" not in help and default is not None and "action" not in flag:
        help = f"{help} (default {default})"
    meta = {"help": help, "group": group, "runtime": runtime, "flag": flag}
    return dataclasses.field(default=default, metadata=meta)


_MODEL, _BINARY, _REAL = "model and data", "binary weights", "real-valued weights"
_TRAINING, _OUTPUT, _DEVICES = "training", "output", "devices and hosts"


def _model_names() -> tuple[str, ...]:
    from binax import models

    return models.names()


@dataclasses.dataclass
class Config:
    """A training run: one field per ``binax-train`` flag (``_`` as ``-``), saved as JSON.

    The fields (and what ``binax-train --help`` says of them) are listed below. Besides,
    ``model_kwargs`` holds the model's extra keyword arguments (``--hidden-sizes``,
    ``--model-arg``...) and ``hparams`` the binary optimizer's hyperparameters, overriding its
    recipe's defaults (`binax.train.optim.RECIPES`; numbers or schedule strings).
    """

    model: str = _field("mlp", "architecture", _MODEL, choices=_model_names)
    model_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    dataset: str = _field(
        "digits",
        "dataset (default digits: bundled with scikit-learn, no download)",
        _MODEL,
        choices=DATASET_NAMES,
    )
    data_dir: str | None = _field(
        None,
        "where the dataset files are, and only there (default $BINAX_DATA_DIR or "
        "~/.cache/binax/datasets, and for fashion_mnist the Debian package's copy)",
        _MODEL,
        runtime=True,
        metavar="DIR",
    )
    download: bool = _field(
        False,
        "download missing dataset files (checked against SHA-256)",
        _MODEL,
        runtime=True,
        action="store_true",
    )
    augment: bool | None = _field(
        None,
        "random crop (pad 4) and horizontal flip of training images (default: on for "
        "cifar10/cifar100, off otherwise)",
        _MODEL,
        action=argparse.BooleanOptionalAction,
    )
    optimizer: str = _field(
        "bop",
        "optimizer of the binary weights (default bop); see below",
        _BINARY,
        choices=optim.OPTIMIZERS,
    )
    hparams: dict[str, Any] = dataclasses.field(default_factory=dict)
    real_optimizer: str = _field(
        "adam",
        "optimizer of BatchNorm and real layers, of every parameter for --optimizer real "
        "(default adam; sgd has momentum 0.9)",
        _REAL,
        choices=tuple(optim.REAL_OPTIMIZERS),
    )
    lr: float | str = _field(1e-2, "its learning rate", _REAL, type="schedule")
    epochs: int = _field(
        20,
        "number of epochs; with --resume, a larger number extends the run (schedules then "
        "span the new length)",
        _TRAINING,
        runtime=True,
        type=int,
    )
    batch_size: int = _field(
        64, "global batch size, over all devices and hosts", _TRAINING, type=int
    )
    eval_batch_size: int = _field(512, "global batch size of the evaluation", _TRAINING, type=int)
    steps_per_epoch: int | None = _field(
        None,
        "at most this many steps per epoch (default: the whole training set)",
        _TRAINING,
        type=int,
    )
    seed: int = _field(0, "seed of the model, data order, augmentation", _TRAINING, type=int)
    run_dir: str | None = _field(
        None,
        "run directory (default runs/<model>-<dataset>-<optimizer>-<time>)",
        _OUTPUT,
        runtime=True,
        metavar="DIR",
    )
    resume: bool = _field(
        False,
        "continue the run in --run-dir from its last checkpoint (its saved config is used; "
        "flags given must agree with it, except runtime ones such as --epochs)",
        _OUTPUT,
        runtime=True,
        action="store_true",
    )
    checkpoint: bool = _field(
        True, "do not save checkpoints", _OUTPUT, runtime=True, flag="--no-checkpoint",
        action="store_false",
    )  # fmt: skip
    keep_checkpoints: int = _field(
        2, "how many checkpoints to keep", _OUTPUT, runtime=True, type=int
    )
    num_devices: int | None = _field(
        None,
        "use only the first N devices (default: all; single process only)",
        _DEVICES,
        runtime=True,
        type=int,
    )
    model_parallel: int = _field(
        1,
        "devices along the mesh's 'model' axis: kernels whose last axis it divides are split "
        "over them (default 1: pure data parallel)",
        _DEVICES,
        runtime=True,
        type=int,
    )
    progress: bool = _field(
        True,
        "no progress bar (there is none either when stderr is not a terminal)",
        _OUTPUT,
        runtime=True,
        flag="--no-progress",
        action="store_false",
    )
    log_every: int = _field(
        10, "refresh the bar's loss/accuracy every N steps", _OUTPUT, runtime=True, type=int
    )
    plots: bool = _field(
        True, "no PNG plots", _OUTPUT, runtime=True, flag="--no-plots", action="store_false"
    )

    def validate(self) -> Config:
        """Checks every field; raises `ConfigError` naming the field and what it expects."""
        if self.model not in _model_names():
            raise ConfigError(
                f"model: unknown model {self.model!r}; valid choices: {', '.join(_model_names())}"
            )
        if self.dataset not in DATASET_NAMES:
            raise ConfigError(
                f"dataset: unknown dataset {self.dataset!r}; valid choices: "
                f"{', '.join(DATASET_NAMES)}"
            )
        try:
            optim.hparams(self.optimizer, self.hparams)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.real_optimizer not in optim.REAL_OPTIMIZERS:
            raise ConfigError(
                f"real_optimizer: unknown optimizer {self.real_optimizer!r}; valid choices: "
                f"{', '.join(optim.REAL_OPTIMIZERS)}"
            )
        try:
            schedules.parse(self.lr)
        except ValueError as e:
            raise ConfigError(f"lr: {e}") from None
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("flag", {}).get("type") is int and value is not None:
                low = 0 if f.name == "seed" else 1
                if isinstance(value, bool) or not isinstance(value, int) or value < low:
                    kind = "non-negative" if low == 0 else "positive"
                    raise ConfigError(f"{f.name} must be a {kind} integer, got {value!r}")
        if not isinstance(self.model_kwargs, dict):
            raise ConfigError(f"model_kwargs must be a dict, got {self.model_kwargs!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        """A Config from a dict (e.g. a saved ``config.json``); unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; valid keys: {sorted(names)}")
        return cls(**d)

    def differences(self, other: Config) -> list[str]:
        """The fields (other than runtime ones) whose values differ, as ``name: a != b``."""
        a, b = _normal(self.to_dict()), _normal(other.to_dict())
        return [
            f"{k}: {a[k]!r} != {b[k]!r}"
            for k in sorted(a)
            if k not in RUNTIME_FIELDS and a[k] != b[k]
        ]


#: The fields that may change when a run is resumed.
RUNTIME_FIELDS = frozenset(f.name for f in dataclasses.fields(Config) if f.metadata.get("runtime"))
Config.__doc__ += "\n    Attributes:\n" + "".join(
    f"      {f.name}: {f.metadata['help']}\n"
    if "flag" not in f.metadata["flag"]
    else f"      {f.name}: {f.metadata['flag']['flag']}: {f.metadata['help']}\n"
    for f in dataclasses.fields(Config)
    if f.metadata
)


def _normal(d: dict[str, Any]) -> dict[str, Any]:
    """JSON round trip, so that tuples and lists compare equal."""
    return json.loads(json.dumps(d))
