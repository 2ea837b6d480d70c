"""The training loop behind ``binax-train``: `train(config) -> TrainResult`.

A run directory holds::

    config.json        the Config (JSON)
    log.jsonl          one JSON record per epoch (losses, accuracies, flips per binary layer)
    loss.png, accuracy.png, flip_ratio.png
    checkpoints/<N>/   the Orbax checkpoint after epoch N (the last ``keep_checkpoints``)

Each record of ``log.jsonl`` has ``epoch`` (1-based), ``step``, ``train_loss``,
``train_accuracy`` (running, in train mode), ``test_loss``, ``test_accuracy`` (eval mode),
``flips`` (per binary layer, summed over the epoch), ``flip_ratio`` (per binary layer: flips per
weight per step, averaged over the epoch), ``flip_ratio_total``, ``hparams`` (the scheduled
values at the epoch's last step) and ``time_s``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

import binax
from binax import data as bdata
from binax.train import optim, plots, schedules
from binax.train.checkpoint import CheckpointError, Checkpoints
from binax.train.config import Config, ConfigError
from binax.train.step import (
    Program,
    TrainState,
    build_model,
    global_batch,
    make_mesh,
    make_program,
    process_rows,
    to_host,
)

CONFIG_FILE, LOG_FILE, CHECKPOINT_DIR = "config.json", "log.jsonl", "checkpoints"


class RunDirError(ValueError):
    """The run directory does not fit the request (exists without ``resume``, or missing)."""


@dataclasses.dataclass
class TrainResult:
    """What `train` returns.

    Attributes:
      config: the config of the run.
      run_dir: its directory.
      history: the per-epoch records (as in ``log.jsonl``).
      state: the final `TrainState` (global arrays).
      program: the model's graph definitions, optimizer and compiled steps.
    """

    config: Config
    run_dir: str
    history: list[dict[str, Any]]
    state: TrainState
    program: Program

    @property
    def final(self) -> dict[str, Any]:
        """The last epoch's record."""
        return self.history[-1] if self.history else {}

    def model(self):
        """The trained model (Flax NNX, in eval mode)."""
        from flax import nnx

        return nnx.merge(self.program.eval_graphdef, self.state.params, self.state.rest)


def _is_main() -> bool:
    return jax.process_index() == 0


def _say(text: str) -> None:
    if _is_main():
        from tqdm import tqdm

        tqdm.write(text, file=sys.stdout)


def _sync(name: str) -> None:
    """A barrier over all processes (nothing to do in a single-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _default_run_dir(config: Config) -> str:
    stamp = np.array([int(c) for c in time.strftime("%Y%m%d%H%M%S")], np.int32)
    if jax.process_count() > 1:  # every process must name the same directory
        from jax.experimental import multihost_utils

        stamp = np.asarray(multihost_utils.broadcast_one_to_all(stamp))
    text = "".join(str(int(d)) for d in stamp)
    return os.path.join(
        "runs", f"{config.model}-{config.dataset}-{config.optimizer}-{text[:8]}-{text[8:]}"
    )


def _check_run_dir(config: Config, run_dir: str) -> Config | None:
    """Checks the run directory against the request; returns the saved config when resuming."""
    saved_path = os.path.join(run_dir, CONFIG_FILE)
    if config.resume:
        if not os.path.isfile(saved_path):
            raise RunDirError(
                f"cannot resume: {saved_path} does not exist (is --run-dir the directory of a "
                "previous run?)"
            )
        with open(saved_path) as f:
            saved = Config.from_dict(json.load(f))
        diff = config.differences(saved)
        if diff:
            raise RunDirError(
                "cannot resume: the config differs from the run's (" + "; ".join(diff) + "); "
                "resume with the same settings, or start a new run"
            )
        return saved
    if os.path.exists(os.path.join(run_dir, CHECKPOINT_DIR)) or os.path.exists(saved_path):
        raise RunDirError(
            f"{run_dir} already holds a run; pass --resume to continue it, or choose another "
            "--run-dir"
        )
    return None


def _load_data(config: Config):
    augment = config.augment if config.augment is not None else config.dataset.startswith("cifar")
    kw = dict(data_dir=config.data_dir, download=config.download, seed=0)
    train_set = bdata.load(config.dataset, "train", normalized=not augment, **kw)
    test_set = bdata.load(config.dataset, "test", normalized=True, **kw)
    return train_set, test_set, augment


def _prepare(images: np.ndarray, indices: np.ndarray, dataset, augment: bool, seed, epoch):
    if not augment:
        return images
    images = bdata.random_crop_flip(images, seed, epoch, indices)
    return bdata.normalize(images, dataset.mean, dataset.std, dataset.max_value)


def _schedule_values(scheduled: dict[str, schedules.Schedule], spe: int, total: int, step: int):
    return {k: s.value(max(step - 1, 0), spe, total) for k, s in scheduled.items()}


def _evaluate(program: Program, state: TrainState, test_set, eval_bs: int) -> tuple[float, float]:
    n = len(test_set)
    padded = math.ceil(n / eval_bs) * eval_bs
    images = np.zeros((padded, *test_set.images.shape[1:]), test_set.images.dtype)
    labels = np.zeros((padded,), np.int32)
    images[:n], labels[:n] = test_set.images, test_set.labels
    index, count = process_rows(program.batch_sharding, eval_bs)
    metrics = program.zero_metrics()
    for b in bdata.batches(
        (images, labels),
        eval_bs,
        seed=0,
        epoch=0,
        shuffle=False,
        process_index=index,
        process_count=count,
    ):
        weights = (b.indices < n).astype(np.float32)
        metrics = program.eval_step(
            state,
            metrics,
            global_batch(program.batch_sharding, b.images, eval_bs),
            global_batch(program.batch_sharding, b.labels, eval_bs),
            global_batch(program.batch_sharding, weights, eval_bs),
        )
    m = to_host(metrics)
    return float(m["loss"]) / n, float(m["correct"]) / n


def _table(history: list[dict[str, Any]]) -> str:
    head = (
        f"{'epoch':>5}  {'train loss':>10}  {'train acc':>9}  {'test loss':>9}  "
        f"{'test acc':>8}  {'flip ratio':>10}"
    )
    rows = [head, "-" * len(head)]
    for r in history:
        rows.append(
            f"{r['epoch']:>5}  {r['train_loss']:>10.4f}  {100 * r['train_accuracy']:>8.2f}%  "
            f"{r['test_loss']:>9.4f}  {100 * r['test_accuracy']:>7.2f}%  "
            f"{r['flip_ratio_total']:>10.2e}"
        )
    return "\n".join(rows)


def _write_log(run_dir: str, history: list[dict[str, Any]]) -> None:
    tmp = os.path.join(run_dir, LOG_FILE + ".tmp")
    with open(tmp, "w") as f:
        for r in history:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, os.path.join(run_dir, LOG_FILE))


def train(
    config: Config,
    *,
    on_step: Callable[[int, int], None] | None = None,
) -> TrainResult:
    """Trains a binary network as ``config`` says, on all devices of all processes.

    Loads the data (`binax.data.load`), builds the model (`binax.models.get`) and the optimizer
    (`binax.train.optim.make_optimizer`), and runs ``config.epochs`` epochs of the jitted,
    sharded step (`binax.train.step`), evaluating, logging, plotting and checkpointing after
    each. With ``config.resume`` it continues the run in ``config.run_dir`` from its last
    checkpoint, bit-identically to a run that was never interrupted.

    Args:
      config: the run (see `Config`).
      on_step: called as ``on_step(epoch, step_in_epoch)`` (0-based) before each training
        step; an exception it raises stops training (the last checkpoint stays).

    Returns:
      A `TrainResult`.

    Raises:
      ConfigError: a bad config field (the message names it).
      RunDirError: the run directory exists without ``resume``, or ``resume`` finds no run.
      binax.data.DatasetNotFoundError: the dataset's files are missing (the message says how
        to get them).
      CheckpointError: resuming from an unreadable or corrupt checkpoint (nothing is changed).
      KeyboardInterrupt: passed on after saying which checkpoint is the last complete one.
    """
    config.validate()
    run_dir = config.run_dir or _default_run_dir(config)
    config = dataclasses.replace(config, run_dir=run_dir)
    _check_run_dir(config, run_dir)
    _sync("binax-train: run directory checked")  # before any process writes into it
    recipe = optim.recipe(config.optimizer)
    hp = recipe.resolve(config.hparams)
    lr = schedules.parse(config.lr)
    scheduled = {k: v for k, v in hp.items() if isinstance(v, schedules.Schedule)} | {"lr": lr}

    train_set, test_set, augment = _load_data(config)
    try:
        mesh = make_mesh(config.num_devices, config.model_parallel)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    data_size = mesh.shape["data"]
    if config.batch_size % data_size:
        raise ConfigError(
            f"batch_size={config.batch_size} must be divisible by the number of data-parallel "
            f"devices ({data_size})"
        )
    eval_bs = math.ceil(config.eval_batch_size / data_size) * data_size
    spe = bdata.num_batches(len(train_set), config.batch_size)
    if spe < 1:
        raise ConfigError(
            f"batch_size={config.batch_size} is larger than the training set ({len(train_set)})"
        )
    if config.steps_per_epoch is not None:
        spe = min(spe, config.steps_per_epoch)
    total = spe * config.epochs

    try:
        model = build_model(
            config.model,
            config.model_kwargs,
            train_set.images.shape[1:],
            train_set.num_classes,
            config.seed,
            full_precision=recipe.baseline == optim.FULL_PRECISION,
        )
    except (TypeError, ValueError) as e:
        raise ConfigError(
            f"cannot build model {config.model!r} with model_kwargs {config.model_kwargs}: {e}"
        ) from None
    init_params = None
    if recipe.baseline is not None:
        key = jax.random.key(config.seed + 1)
        # One compiled program for every leaf (drawing eagerly compiles one per shape).
        init_params = lambda params, mask: jax.jit(lambda p: optim.latent_init(p, mask, key))(
            params
        )
    program = make_program(
        model,
        lambda labels: optim.make_optimizer(
            config.optimizer,
            hp,
            config.real_optimizer,
            lr,
            labels,
            seed=config.seed,
            steps_per_epoch=spe,
            total_steps=total,
        ),
        mesh,
        init_params=init_params,
    )
    state = program.init_state()

    ckpts = None
    history: list[dict[str, Any]] = []
    start_epoch = 0
    if config.checkpoint or config.resume:
        if config.resume:
            if not os.path.isdir(os.path.join(run_dir, CHECKPOINT_DIR)):
                raise CheckpointError(f"cannot resume: {run_dir} has no checkpoints")
            ckpts = Checkpoints(
                os.path.join(run_dir, CHECKPOINT_DIR), config.keep_checkpoints, create=False
            )
            try:
                state, meta = ckpts.restore(state)
            except CheckpointError:
                ckpts.close()
                raise
            history = list(meta["history"])
            start_epoch = int(meta["epoch"])
            _say(f"resumed {run_dir} after epoch {start_epoch} (step {int(to_host(state.step))})")
        else:
            if _is_main():
                os.makedirs(run_dir, exist_ok=True)
            ckpts = Checkpoints(os.path.join(run_dir, CHECKPOINT_DIR), config.keep_checkpoints)
    if _is_main():
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, CONFIG_FILE), "w") as f:
            f.write(config.to_json())
        _write_log(run_dir, history)

    index, count = process_rows(program.batch_sharding, config.batch_size)
    sharding = program.batch_sharding
    if start_epoch == 0:
        n_binary = sum(program.flip_sizes)
        kind = "binary" if recipe.baseline is None else f"real-valued ({recipe.baseline} baseline)"
        _say(
            f"{config.model} on {config.dataset} with {config.optimizer}: {n_binary:,} {kind} "
            f"weights in {len(program.flip_names)} binary layers; {len(train_set):,} training "
            f"examples, "
            f"{spe} steps of {config.batch_size} per epoch; {len(mesh.devices.flat)} device(s), "
            f"mesh {dict(mesh.shape)}; run dir {run_dir}"
        )
    with _deferred_interrupts() as stop_if_interrupted:
        try:
            for epoch in range(start_epoch, config.epochs):
                t0 = time.perf_counter()
                metrics = program.zero_metrics()
                stream = bdata.batches(
                    train_set,
                    config.batch_size,
                    config.seed,
                    epoch,
                    process_index=index,
                    process_count=count,
                )
                bar = _progress(config, epoch, spe)
                for i in range(spe):
                    stop_if_interrupted()
                    if on_step is not None:
                        on_step(epoch, i)
                    b = next(stream)
                    images = _prepare(b.images, b.indices, train_set, augment, config.seed, epoch)
                    state, metrics = program.train_step(
                        state,
                        metrics,
                        global_batch(sharding, images, config.batch_size),
                        global_batch(sharding, b.labels, config.batch_size),
                    )
                    if bar is not None:
                        bar.update(1)
                        if (i + 1) % config.log_every == 0 or i + 1 == spe:
                            m = to_host(metrics)
                            bar.set_postfix(
                                loss=f"{m['loss'] / m['count']:.4f}",
                                acc=f"{m['correct'] / m['count']:.3f}",
                            )
                if bar is not None:
                    bar.close()
                m = to_host(metrics)
                test_loss, test_acc = _evaluate(program, state, test_set, eval_bs)
                step = int(to_host(state.step))
                flips = {k: int(v) for k, v in m["flips"].items()}
                ratios = {
                    k: flips[k] / (size * spe)
                    for k, size in zip(program.flip_names, program.flip_sizes, strict=True)
                }
                record = {
                    "epoch": epoch + 1,
                    "step": step,
                    "train_loss": float(m["loss"]) / int(m["count"]),
                    "train_accuracy": int(m["correct"]) / int(m["count"]),
                    "test_loss": test_loss,
                    "test_accuracy": test_acc,
                    "flips": flips,
                    "flip_ratio": ratios,
                    "flip_ratio_total": sum(flips.values()) / (sum(program.flip_sizes) * spe),
                    "hparams": _schedule_values(scheduled, spe, total, step),
                    "time_s": time.perf_counter() - t0,
                }
                history.append(record)
                if ckpts is not None and config.checkpoint:
                    meta = {
                        "config": config.to_dict(),
                        "history": history,
                        "step": step,
                        "binax_version": binax.__version__,
                    }
                    ckpts.save(epoch + 1, state, meta)
                if _is_main():
                    _write_log(run_dir, history)
                    if config.plots:
                        plots.write_plots(history, run_dir)
                _say(
                    f"epoch {epoch + 1}/{config.epochs}: train loss {record['train_loss']:.4f} "
                    f"acc {100 * record['train_accuracy']:.2f}% | test loss {test_loss:.4f} "
                    f"acc {100 * test_acc:.2f}% | flip ratio {record['flip_ratio_total']:.2e} | "
                    f"{record['time_s']:.1f}s"
                )
        except KeyboardInterrupt:
            last = ckpts.epochs() if ckpts is not None else []
            if last:
                _say(
                    f"\ninterrupted; the last complete checkpoint is epoch {last[-1]} in "
                    f"{os.path.join(run_dir, CHECKPOINT_DIR)}. Continue with:\n"
                    f"  binax-train --resume --run-dir {run_dir}"
                )
            else:
                _say("\ninterrupted before the first checkpoint was written")
            raise
        finally:
            if ckpts is not None:
                ckpts.close()

    if history:
        _say("\n" + _table(history))
        _say(
            f"final test accuracy: {100 * history[-1]['test_accuracy']:.2f}% after "
            f"{history[-1]['epoch']} epochs ({run_dir})"
        )
    return TrainResult(
        config=config, run_dir=run_dir, history=history, state=state, program=program
    )


@contextlib.contextmanager
def _deferred_interrupts() -> Iterator[Callable[[], None]]:
    """Ctrl-C (SIGINT) waits for a safe point: yields a function that raises `KeyboardInterrupt`
    if one arrived. Training calls it between steps, so an interrupt never lands inside a step
    (whose buffers are donated) or inside a checkpoint save; a second Ctrl-C raises at once.
    Outside the main thread (where Python cannot install handlers) interrupts are not changed.
    """
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return
    pending: list[int] = []

    def on_sigint(signum, frame):
        if pending:
            raise KeyboardInterrupt
        pending.append(signum)

    def stop_if_interrupted():
        if pending:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield stop_if_interrupted
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)


def _progress(config: Config, epoch: int, total: int):
    if not (config.progress and _is_main()):
        return None
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=f"epoch {epoch + 1}/{config.epochs}",
        leave=False,
        dynamic_ncols=True,
        file=sys.stderr,
    )
