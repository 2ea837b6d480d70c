"""The run directory: checking it, resuming from it, and the log, plots and checkpoints in it
(its files and the fields of a ``log.jsonl`` record: ``docs/training.md``)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from typing import Any

import numpy as np
from jax.experimental import multihost_utils

import binax
from binax.train import plots
from binax.train.checkpoint import Checkpoints
from binax.train.config import Config, ConfigError
from binax.train.sharding import is_main, say

CONFIG_FILE, LOG_FILE, CHECKPOINT_DIR = "config.json", "log.jsonl", "checkpoints"


class RunDirError(ValueError):
    """The run directory does not fit: a run without ``resume``, none, or an unreadable config."""


def read_config(run_dir: str) -> Config:
    """The `Config` saved in ``run_dir/config.json``; a `RunDirError` that says what to do
    when the file is missing, is not JSON, or is not a config."""
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise RunDirError(
            f"cannot resume: {path} does not exist (is --run-dir the directory of a previous run?)"
        )
    try:
        with open(path) as f:
            d = json.load(f)
        if not isinstance(d, dict):
            raise ConfigError(f"expected a JSON object, got {type(d).__name__}")
        return Config.from_dict(d)
    except (json.JSONDecodeError, UnicodeDecodeError, ConfigError) as e:
        raise RunDirError(
            f"cannot resume: {path} is not a readable run config ({e}). Repair it (it is "
            f"what the run was started with), or start a new run with another --run-dir"
        ) from None


def default_run_dir(config: Config) -> str:
    """``runs/<model>-<dataset>-<optimizer>-<date>-<time>`` (process 0's time on every host)."""
    t = time.localtime()
    day, now = multihost_utils.broadcast_one_to_all(
        np.array([int(time.strftime(f, t)) for f in ("%Y%m%d", "%H%M%S")], np.int32)
    )
    dataset = config.dataset.replace("/", "-")  # glue/sst2
    return os.path.join("runs", f"{config.model}-{dataset}-{config.optimizer}-{day}-{now:06d}")


def check(config: Config) -> Config:
    """``config`` validated (`ConfigError`) and with its ``run_dir`` set, once the directory is
    checked to fit, writing nothing: a `RunDirError` if it holds a run without ``resume``, none
    with ``resume``, or a run whose config differs from this one (`RUNTIME_FIELDS` aside)."""
    run_dir = config.validate().run_dir or default_run_dir(config)
    config = dataclasses.replace(config, run_dir=run_dir)
    if config.resume:
        diff = config.differences(read_config(run_dir))
        if diff:
            raise RunDirError(
                "cannot resume: the config differs from the run's (" + "; ".join(diff) + "); "
                "resume with the same settings, or start a new run"
            )
    elif any(os.path.exists(os.path.join(run_dir, f)) for f in (CHECKPOINT_DIR, CONFIG_FILE)):
        raise RunDirError(
            f"{run_dir} already holds a run; pass --resume to continue it, or choose another "
            "--run-dir"
        )
    return config


@dataclasses.dataclass
class RunDir:
    """An open run directory at ``path``: the run's config, the ``history`` of the epochs done
    (the records of ``log.jsonl``), its `Checkpoints` (``None`` with ``checkpoint=False``)."""

    path: str
    config: Config
    history: list[dict[str, Any]]
    checkpoints: Checkpoints | None

    @property
    def epoch(self) -> int:
        """The number of epochs done."""
        return len(self.history)

    def end_epoch(self, record: dict[str, Any], state: Any) -> None:
        """Adds ``record``; saves the checkpoint, the log and the plots."""
        self.history.append(record)
        if self.checkpoints is not None:
            meta = {
                "config": self.config.to_dict(),
                "history": self.history,
                "step": record["step"],
                "binax_version": binax.__version__,
            }
            self.checkpoints.save(record["epoch"], state, meta)
        if is_main():
            self.write_log()
            if self.config.plots:
                plots.write_plots(self.history, self.path)

    def write_log(self) -> None:
        tmp = os.path.join(self.path, LOG_FILE + ".tmp")
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.history)
        os.replace(tmp, os.path.join(self.path, LOG_FILE))

    def last_checkpoint(self) -> int | None:
        """The epoch of the last complete checkpoint (``None``: there is none)."""
        epochs = self.checkpoints.epochs() if self.checkpoints is not None else []
        return epochs[-1] if epochs else None

    def close(self) -> None:
        if self.checkpoints is not None:
            self.checkpoints.close()


def open_run(config: Config, state: Any) -> tuple[RunDir, Any]:
    """The `RunDir` of a checked config and the state to start from: the initial ``state``
    (a `binax.train.TrainState`), or with ``resume`` the last checkpoint's (a `CheckpointError`
    if it cannot be read; a run without one starts from the beginning, and says so). Writes
    ``config.json`` and the log."""
    path = config.run_dir
    directory = os.path.join(path, CHECKPOINT_DIR)
    history: list[dict[str, Any]] = []
    if config.resume and os.path.isdir(directory):
        with contextlib.closing(Checkpoints(directory, create=False)) as saved:
            if saved.epochs():
                state, meta = saved.restore(state)
                history = list(meta["history"])
                say(f"resumed {path} after epoch {meta['epoch']} (step {meta['step']})")
    if config.resume and not history:
        say(f"{path} has no complete checkpoint: starting the run from the beginning")
    ckpts = Checkpoints(directory, config.keep_checkpoints) if config.checkpoint else None
    run = RunDir(path, config, history, ckpts)
    if is_main():
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, CONFIG_FILE), "w") as f:
            json.dump(config.to_dict(), f, indent=2, sort_keys=True)
        run.write_log()
    return run, state


def table(history: list[dict[str, Any]]) -> str:
    """The history as a table, accuracies in percent."""
    head = "epoch  train loss  train acc  test loss  test acc  flip ratio"
    rows = [
        f"{r['epoch']:>5}  {r['train_loss']:>10.4f}  {100 * r['train_accuracy']:>8.2f}%  "
        f"{r['test_loss']:>9.4f}  {100 * r['test_accuracy']:>7.2f}%  {r['flip_ratio_total']:>10.2e}"
        for r in history
    ]
    return "\n".join([head, "-" * len(head), *rows])


def epochs(n: int) -> str:
    """``"1 epoch"``, ``"2 epochs"``."""
    return f"{n} epoch" if n == 1 else f"{n} epochs"
