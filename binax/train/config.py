"""The configuration of a training run: one dataclass, saved as JSON in the run directory."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from binax import models
from binax.data import DATASET_NAMES, GLUE_DATASETS
from binax.train import optim, schedules


class ConfigError(ValueError):
    """A bad configuration value; the message names the field and what it expects."""


def _field(default: Any, help: str, group: str, *, runtime=False, positive=True, **flag) -> Any:
    """A Config field with its ``--flag`` (the field's name, ``_`` as ``-``, or ``flag["flag"]``):
    ``help`` (the default appended unless it names it), ``group`` in ``--help``, ``runtime`` (it
    may change on resume), `argparse` arguments in ``flag`` (``type="schedule"``: a number or
    schedule string). `Config.validate` checks ``choices``, schedules, and that an ``int`` or
    ``float`` field is ``positive`` (else non-negative)."""
    if "default" not in help and default is not None and "action" not in flag:
        help = f"{help} (default {default})"
    meta = {"help": help, "group": group, "runtime": runtime, "positive": positive, "flag": flag}
    return dataclasses.field(default=default, metadata=meta)


_MODEL, _BINARY, _REAL = "model and data", "binary weights", "real-valued weights"
_TRAIN, _OUT, _HOSTS = "training", "output", "devices and hosts"
_BOOL, OPTIMIZERS = argparse.BooleanOptionalAction, optim.OPTIMIZERS
# Runtime fields (they may change on --resume) of each kind.
_N, _RUN_DIR = dict(runtime=True, type=int), dict(runtime=True, metavar="DIR")
_ON, _OFF = dict(runtime=True, action="store_true"), dict(runtime=True, action="store_false")
_DISTILL, _WEIGHT = "distillation", dict(type=float, positive=False)


@dataclasses.dataclass
class Config:
    """A training run: one field per ``binax-train`` flag (``_`` as ``-``; below, with its help),
    saved as JSON; and ``model_kwargs``, the model's other keyword arguments (``--hidden-sizes``,
    ``--model-arg``...), and ``hparams``, the binary optimizer's hyperparameters over its
    recipe's defaults (`binax.train.optim.RECIPES`; numbers or schedule strings).
    """

    model: str = _field("mlp", "architecture", _MODEL, choices=models.names())
    model_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    dataset: str = _field(
        "digits",
        "dataset (digits: no download; glue/<task>: GLUE's files in --data-dir, --model encoder)",
        _MODEL,
        choices=DATASET_NAMES + GLUE_DATASETS,
    )
    data_dir: str | None = _field(
        None,
        "where the dataset files are, and only there "
        "(default $BINAX_DATA_DIR, else ~/.cache/binax/datasets)",
        _MODEL,
        **_RUN_DIR,
    )
    download: bool = _field(
        False, "download missing dataset files (SHA-256 checked)", _MODEL, **_ON
    )
    augment: bool | None = _field(
        None, "random crop and flip (default: on for cifar*)", _MODEL, action=_BOOL
    )
    optimizer: str = _field("bop", "of the binary weights; see below", _BINARY, choices=OPTIMIZERS)
    hparams: dict[str, Any] = dataclasses.field(default_factory=dict)
    real_optimizer: str = _field(
        "adam", "of the real-valued parameters (all for 'real'); sgd: momentum 0.9", _REAL,
        choices=tuple(optim.REAL_OPTIMIZERS),
    )  # fmt: skip
    lr: float | str = _field(1e-2, "its learning rate", _REAL, type="schedule")
    epochs: int = _field(20, "number of epochs (more, with --resume, extend a run)", _TRAIN, **_N)
    batch_size: int = _field(64, "global batch size, over all devices and hosts", _TRAIN, type=int)
    eval_batch_size: int = _field(512, "global batch size of the evaluation", _TRAIN, type=int)
    steps_per_epoch: int | None = _field(
        None, "at most N steps per epoch (default: the whole training set)", _TRAIN, type=int
    )
    seed: int = _field(
        0, "seed of the model, data order and augmentation", _TRAIN, type=int, positive=False
    )
    distill_from: str | None = _field(
        None,
        "distil from the finished run in RUN_DIR (same model and dataset; frozen)",
        _DISTILL,
        metavar="RUN_DIR",
    )
    distill_temperature: float = _field(
        1.0, "temperature of the logits' distillation loss", _DISTILL, type=float
    )
    distill_logits: float = _field(1.0, "weight of the logits' term", _DISTILL, **_WEIGHT)
    distill_attention: float = _field(
        1.0, "weight of the attention scores' term", _DISTILL, **_WEIGHT
    )
    distill_hidden: float = _field(1.0, "weight of the hidden states' term", _DISTILL, **_WEIGHT)
    run_dir: str | None = _field(
        None, "run directory (default runs/<name>-<time>)", _OUT, **_RUN_DIR
    )
    resume: bool = _field(
        False, "continue the run in --run-dir (flags must agree with its config)", _OUT, **_ON
    )
    checkpoint: bool = _field(True, "do not save checkpoints", _OUT, **_OFF, flag="--no-checkpoint")
    keep_checkpoints: int = _field(2, "how many checkpoints to keep", _OUT, **_N)
    num_devices: int | None = _field(None, "use the first N devices (default: all)", _HOSTS, **_N)
    model_parallel: int = _field(1, "devices along the 'model' axis (kernels split)", _HOSTS, **_N)
    progress: bool = _field(
        True, "no progress bar (none off a terminal)", _OUT, **_OFF, flag="--no-progress"
    )
    log_every: int = _field(10, "refresh the bar's loss/accuracy every N steps", _OUT, **_N)
    plots: bool = _field(True, "no PNG plots", _OUT, **_OFF, flag="--no-plots")

    @property
    def glue_task(self) -> str | None:
        """The GLUE task of a ``glue/<task>`` dataset (``'sst2'``, ...); ``None`` otherwise."""
        return self.dataset[len("glue/") :] if self.dataset in GLUE_DATASETS else None

    def validate(self) -> Config:
        """Checks every field; raises `ConfigError` naming the field and what it expects."""
        for f in dataclasses.fields(self):
            value, flag = getattr(self, f.name), f.metadata.get("flag", {})
            choices = flag.get("choices")
            if choices is not None and value not in choices:
                raise ConfigError(
                    f"{f.name}: unknown {f.name.replace('_', ' ')} {value!r}; valid choices: "
                    f"{', '.join(choices)}"
                )
            kind = flag.get("type")
            if kind == "schedule":
                try:
                    schedules.parse(value)
                except ValueError as e:
                    raise ConfigError(f"{f.name}: {e}") from None
            if kind in (int, float) and value is not None:
                positive = f.metadata["positive"]
                number = isinstance(value, (int, kind)) and not isinstance(value, bool)
                if not number or value < 0 or (positive and value == 0):
                    sign = "positive" if positive else "non-negative"
                    what = "integer" if kind is int else "number"
                    raise ConfigError(f"{f.name} must be a {sign} {what}, got {value!r}")
        _check_text(self)
        try:
            optim.recipe(self.optimizer).resolve(self.hparams)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.distill_from is not None and not isinstance(self.distill_from, str):
            raise ConfigError(f"distill_from must be a run directory, got {self.distill_from!r}")
        if not isinstance(self.model_kwargs, dict):
            raise ConfigError(f"model_kwargs must be a dict, got {self.model_kwargs!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

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
        # A JSON round trip, so that tuples and lists compare equal.
        a, b = (json.loads(json.dumps(c.to_dict())) for c in (self, other))
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


def _check_text(config: Config) -> None:
    """GLUE tasks go with the encoder (and it with them), from files in ``data_dir``."""
    text = config.glue_task is not None
    if text != (config.model == "encoder"):
        raise ConfigError(
            f"dataset: {config.dataset!r} does not go with model {config.model!r}: the text "
            f"datasets ({', '.join(GLUE_DATASETS)}) are for --model encoder, and it is for them"
        )
    if text and config.data_dir is None:
        raise ConfigError(
            f"data_dir: {config.dataset} needs --data-dir DIR, the glue_data folder of GLUE's "
            "download script (binax does not download GLUE)"
        )
    if config.glue_task == "stsb":
        raise ConfigError(
            "dataset: glue/stsb is a regression task (similarity scores) and binax-train trains "
            "classifiers; build binax.models.BinaryEncoder(num_classes=1) with your own loss"
        )
