"""The configuration of a training run: one dataclass, saved as JSON in the run directory."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from binax.train import optim, schedules


class ConfigError(ValueError):
    """A bad configuration value; the message names the field and what it expects."""


#: Fields that may change when a run is resumed (they do not change what is computed, or, for
#: ``epochs``, only extend or shorten the run).
RUNTIME_FIELDS = frozenset(
    {
        "run_dir",
        "resume",
        "data_dir",
        "download",
        "progress",
        "log_every",
        "plots",
        "checkpoint",
        "keep_checkpoints",
        "epochs",
        "num_devices",
        "model_parallel",
    }
)


@dataclasses.dataclass
class Config:
    """A training run. Every field has a command-line flag of the same name (``_`` as ``-``).

    Attributes:
      model: a `binax.models` name ("mlp", "binarynet", "resnet18").
      model_kwargs: extra keyword arguments of the model (e.g. ``{"hidden_sizes": [256]}``).
      dataset: a `binax.data` name ("digits" needs no download).
      data_dir: where the dataset files are (default: ``$BINAX_DATA_DIR`` or
        ``~/.cache/binax/datasets``).
      download: download missing dataset files.
      augment: random crop and flip (None: on for CIFAR, off otherwise).
      optimizer: for the binary weights, one of `binax.train.optim.OPTIMIZERS`.
      hparams: its hyperparameters, overriding `binax.train.optim.BINARY_DEFAULTS`; numbers or
        schedule strings (`binax.train.schedules`).
      real_optimizer: for the real-valued parameters: "adam", "adamw" or "sgd" (momentum 0.9).
      lr: its learning rate (number or schedule string).
      epochs: number of epochs.
      batch_size: global batch size (over all devices and hosts).
      eval_batch_size: global batch size of the evaluation.
      steps_per_epoch: at most this many steps per epoch (None: the whole training set).
      seed: seeds the model, the data order and augmentation, and random optimizer state.
      run_dir: where the log, config, plots and checkpoints go (None: a new directory under
        ``runs/``).
      resume: continue the run in ``run_dir`` from its last checkpoint.
      checkpoint: save a checkpoint after every epoch.
      keep_checkpoints: how many checkpoints to keep.
      num_devices: use the first N devices (None: all).
      model_parallel: size of the mesh's "model" axis (kernels split along it).
      progress: show a progress bar.
      log_every: refresh the progress bar's loss and accuracy every N steps.
      plots: write PNG plots after every epoch.
    """

    model: str = "mlp"
    model_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    augment: bool | None = None
    optimizer: str = "bop"
    hparams: dict[str, Any] = dataclasses.field(default_factory=dict)
    real_optimizer: str = "adam"
    lr: float | str = 1e-2
    epochs: int = 20
    batch_size: int = 64
    eval_batch_size: int = 512
    steps_per_epoch: int | None = None
    seed: int = 0
    run_dir: str | None = None
    resume: bool = False
    checkpoint: bool = True
    keep_checkpoints: int = 2
    num_devices: int | None = None
    model_parallel: int = 1
    progress: bool = True
    log_every: int = 10
    plots: bool = True

    def validate(self) -> Config:
        """Checks every field; raises `ConfigError` naming the field and what it expects."""
        from binax import models
        from binax.data import DATASET_NAMES

        if self.model not in models.names():
            raise ConfigError(
                f"model: unknown model {self.model!r}; valid choices: {', '.join(models.names())}"
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
        for name in (
            "epochs",
            "batch_size",
            "eval_batch_size",
            "keep_checkpoints",
            "log_every",
            "model_parallel",
        ):
            _positive_int(name, getattr(self, name))
        for name in ("steps_per_epoch", "num_devices"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed!r}")
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
        """The fields (other than `RUNTIME_FIELDS`) whose values differ, as ``name: a != b``."""
        a, b = _normal(self.to_dict()), _normal(other.to_dict())
        return [
            f"{k}: {a[k]!r} != {b[k]!r}"
            for k in sorted(a)
            if k not in RUNTIME_FIELDS and a[k] != b[k]
        ]


def _normal(d: dict[str, Any]) -> dict[str, Any]:
    """JSON round trip, so that tuples and lists compare equal."""
    return json.loads(json.dumps(d))


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
