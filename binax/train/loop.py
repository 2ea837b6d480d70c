"""`train(config) -> TrainResult`: the phases of `binax.train` (run directory, mesh, input
pipeline, model and optimizer, steps), then the epochs: train, evaluate, log, checkpoint."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from binax import data as bdata
from binax.models import distillation_loss, outputs
from binax.train import input_pipeline, model, optim, rundir, schedules
from binax.train.checkpoint import CheckpointError, Checkpoints
from binax.train.config import Config, ConfigError
from binax.train.rundir import CHECKPOINT_DIR, CONFIG_FILE, LOG_FILE, RunDirError  # noqa: F401
from binax.train.sharding import DATA, is_main, make_mesh, say, sync
from binax.train.step import DISTILL_TERMS, Distillation, Program, TrainState, make_program


class TrainingDiverged(RuntimeError):
    """The training loss stopped being finite; the message names the epoch and what was kept."""


@dataclasses.dataclass
class TrainResult:
    """What `train` returns: the run's config, directory and ``history`` (``log.jsonl``'s records),
    the final `TrainState`, the `Program`, and ``compile_s``, the first step's (compiling) time."""

    config: Config
    run_dir: str
    history: list[dict[str, Any]]
    state: TrainState
    program: Program
    compile_s: float = 0.0

    @property
    def final(self) -> dict[str, Any]:
        """The last epoch's record."""
        return self.history[-1] if self.history else {}

    def model(self):
        """The trained model (Flax NNX, in eval mode)."""
        return nnx.merge(self.program.eval_graphdef, self.state.params, self.state.rest)


def setup(config: Config) -> tuple[input_pipeline.InputPipeline, Program, dict[str, Any]]:
    """The phases after the run directory, for a checked config: ``(pipeline, program,
    scheduled)``, ``scheduled`` giving ``"lr"``'s and the hyperparameters' `Schedule`\\ s."""
    try:
        mesh = make_mesh(config.num_devices, config.model_parallel)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    data = input_pipeline.create(config, NamedSharding(mesh, P(DATA)))
    hp = optim.recipe(config.optimizer).resolve(config.hparams)
    lr = schedules.parse(config.lr)
    net, init = model.create(config, data.train_set.images.shape[1:], data.train_set.num_classes)
    make_tx = functools.partial(
        optim.make_optimizer, config.optimizer, hp, config.real_optimizer, lr, seed=config.seed,
        steps_per_epoch=data.steps_per_epoch, total_steps=data.steps_per_epoch * config.epochs,
    )  # fmt: skip
    distill = _teacher(config, net, data) if config.distill_from is not None else None
    program = make_program(net, make_tx, mesh, init_params=init, distill=distill)
    scheduled = {k: v for k, v in hp.items() if isinstance(v, schedules.Schedule)}
    return data, program, scheduled | {"lr": lr}


def _teacher(config: Config, net, data: input_pipeline.InputPipeline) -> Distillation:
    """The frozen teacher of ``config.distill_from`` (its last checkpoint), of the same model
    and dataset as ``net`` and with outputs that line up with its; else a `ConfigError`."""
    where = f"--distill-from {config.distill_from}"
    try:
        teacher = restore(config.distill_from)
    except (RunDirError, CheckpointError) as e:
        raise ConfigError(f"{where}: cannot restore the teacher: {e}") from None
    for field in ("model", "dataset"):
        mine, theirs = getattr(config, field), getattr(teacher.config, field)
        if mine != theirs:
            raise ConfigError(
                f"{where}: the teacher's {field} is {theirs!r}, this run's {mine!r}; distil "
                f"from a run of the same {field}"
            )
    if teacher.history and teacher.history[-1]["epoch"] < teacher.config.epochs:
        say(
            f"note: the teacher {config.distill_from} stopped after "
            f"{rundir.epochs(teacher.history[-1]['epoch'])} of {teacher.config.epochs}"
        )
    graphdef, params, rest = teacher.program.eval_graphdef, *teacher.state[:2]
    student_graphdef, student_state = nnx.split(net)
    batch = jax.ShapeDtypeStruct((2, *data.train_set.images.shape[1:]), data.train_set.images.dtype)

    def loss(s, p, r, x):
        return distillation_loss(
            outputs(nnx.merge(student_graphdef, s), x), outputs(nnx.merge(graphdef, p, r), x)
        )

    try:
        jax.eval_shape(loss, student_state, params, rest, batch)
    except ValueError as e:
        raise ConfigError(f"{where}: the teacher does not fit this model: {e}") from None
    options = {f"{k}_weight": getattr(config, f"distill_{k}") for k in DISTILL_TERMS}
    options["temperature"] = config.distill_temperature
    return Distillation(graphdef, params, rest, options)


def restore(run_dir: str, epoch: int | None = None) -> TrainResult:
    """The run in ``run_dir`` as its checkpoint of ``epoch`` (the last by default) holds it,
    without training; ``restore(run_dir).model()`` is the trained model. Raises `RunDirError`
    (no readable ``config.json``) or `CheckpointError` (no such checkpoint, or unreadable)."""
    config = dataclasses.replace(rundir.read_config(run_dir), run_dir=run_dir, resume=False)
    data, program, _ = setup(config)
    with contextlib.closing(Checkpoints(os.path.join(run_dir, CHECKPOINT_DIR), create=False)) as c:
        state, meta = c.restore(program.init_state(), epoch)
    return TrainResult(config, run_dir, list(meta["history"]), state, program)


def train(config: Config, *, on_step: Callable[[int, int], None] | None = None) -> TrainResult:
    """Trains a binary network as ``config`` says, on all devices of all processes, for
    ``config.epochs`` epochs, evaluating, logging, plotting and checkpointing after each. With
    ``config.resume`` it continues the run in ``config.run_dir`` from its last checkpoint (or
    its beginning), bit-identically to a run never interrupted; a larger ``epochs`` extends it.
    ``on_step(epoch, step_in_epoch)`` (0-based), if given, is called before each training step;
    an exception it raises stops training (the last checkpoint stays).

    Raises:
      ConfigError, RunDirError, CheckpointError, binax.data.DatasetNotFoundError: a bad config
        field, a run directory that exists without ``resume`` (or ``resume`` of none), an
        unreadable checkpoint (nothing is changed), missing data; the message says what to do.
      TrainingDiverged: the loss became NaN or infinite (the earlier checkpoints stay).
      KeyboardInterrupt: passed on after saying which checkpoint is the last complete one.
    """
    config = rundir.check(config)
    sync("binax-train: run directory checked")  # before any process writes into it
    data, program, scheduled = setup(config)
    for split in (data.train_set, data.test_set):
        say(f"{config.dataset} {split.split}: {len(split):,} images from {', '.join(split.source)}")
    run, state = rundir.open_run(config, program.init_state())
    if run.epoch == 0:
        say(_header(config, data, program))
    elif run.epoch >= config.epochs:
        say(
            f"{run.path} has already trained its {rundir.epochs(run.epoch)}; to extend it, "
            f"resume with a larger --epochs (e.g. --epochs {2 * run.epoch})"
        )
    with _deferred_interrupts() as stop_if_interrupted:
        try:
            start, compile_total = run.epoch, 0.0
            for epoch in range(start, config.epochs):
                state, record, compile_s = _epoch(
                    config, data, program, state, epoch, scheduled, epoch == start,
                    stop_if_interrupted, on_step,
                )  # fmt: skip
                compile_total += compile_s
                _check_finite(record, run)
                run.end_epoch(record, state)
                say(
                    f"epoch {epoch + 1}/{config.epochs}: train loss {record['train_loss']:.4f} "
                    f"acc {100 * record['train_accuracy']:.2f}% | test loss "
                    f"{record['test_loss']:.4f} acc {100 * record['test_accuracy']:.2f}% | "
                    f"flip ratio {record['flip_ratio_total']:.2e} | {record['time_s']:.1f}s"
                )
        except KeyboardInterrupt:
            last = run.last_checkpoint()
            say(
                f"\ninterrupted; the last complete checkpoint is epoch {last} in "
                f"{run.checkpoints.directory}. Continue with:\n"
                f"  binax-train --resume --run-dir {run.path}"
                if last is not None
                else "\ninterrupted before the first checkpoint was written. Start again with:\n"
                f"  binax-train --resume --run-dir {run.path}   (from the beginning)\n"
                f"or delete {run.path}."
            )
            raise
        finally:
            run.close()
    if run.history:
        say("\n" + rundir.table(run.history))
        say(
            f"final test accuracy: {100 * run.history[-1]['test_accuracy']:.2f}% after "
            f"{rundir.epochs(run.history[-1]['epoch'])} ({run.path})"
        )
    return TrainResult(config, run.path, run.history, state, program, compile_total)


def _header(config: Config, data: input_pipeline.InputPipeline, program: Program) -> str:
    baseline, mesh = optim.recipe(config.optimizer).baseline, program.mesh
    n, layers = sum(program.flip_sizes), len(program.flip_names)
    weights = f"{n:,} binary weights in {layers} binary layers"
    if baseline is not None and not layers:  # built as its full-precision twin
        weights = f"its full-precision twin ({baseline} baseline), no binary layer"
    elif baseline is not None:  # the kernels the binary network would binarize are real here
        weights = (
            f"{n:,} real-valued weights ({baseline} baseline) in the {layers} layers that are "
            "binary in the binary network"
        )
    return (
        f"{config.model} on {config.dataset} with {config.optimizer}: {weights}; "
        f"{len(data.train_set):,} training examples, {data.steps_per_epoch} steps of "
        f"{config.batch_size} per epoch; {len(mesh.devices.flat)} device(s), mesh "
        f"{dict(mesh.shape)}; run dir {config.run_dir}"
    )


def _epoch(config, data, program, state, epoch, scheduled, first, stop_if_interrupted, on_step):
    """One epoch of training and the evaluation after it: ``(state, record, compile_s)``; in
    the ``first`` epoch of a process the first step, which compiles the step, is announced and
    timed apart (``compile_s``, not in the record's ``time_s``)."""
    spe, metrics = data.steps_per_epoch, program.zero_metrics()
    show = config.progress and is_main() and sys.stderr.isatty()  # no redraws in a log file
    desc, batches = f"epoch {epoch + 1}/{config.epochs}", data.train_batches(epoch)
    bar = tqdm(batches, desc=desc, total=spe, leave=False, dynamic_ncols=True, disable=not show)
    compile_s, t0 = 0.0, time.perf_counter()
    for i, (images, labels) in enumerate(bar):
        stop_if_interrupted()
        if on_step is not None:
            on_step(epoch, i)
        if first and i == 0:
            say("compiling the train step (minutes for the conv models on a CPU)...")
        state, metrics = program.train_step(state, metrics, images, labels)
        if first and i == 0:
            jax.block_until_ready(state)
            compile_s = time.perf_counter() - t0
            say(f"compiled: the first step took {compile_s:.1f}s (not counted in time_s)")
            t0 = time.perf_counter()
        if show and ((i + 1) % config.log_every == 0 or i + 1 == spe):
            m = jax.device_get(metrics)
            bar.set_postfix(
                loss=f"{m['loss'] / m['count']:.4f}", acc=f"{m['correct'] / m['count']:.3f}"
            )
    m, time_s = jax.device_get(metrics), time.perf_counter() - t0
    glue = config.glue_task  # scores from the confusion matrix
    test = program.zero_metrics(confusion=data.test_set.num_classes if glue else 0)
    for images, labels, weights in data.eval_batches():
        test = program.eval_step(state, test, images, labels, weights)
    test = jax.device_get(test)
    step = int(state.step)
    flips = {k: int(v) for k, v in m["flips"].items()}
    sizes = zip(program.flip_names, program.flip_sizes, strict=True)
    record = {
        "epoch": epoch + 1,
        "step": step,
        "train_loss": float(m["loss"]) / int(m["count"]),
        "train_accuracy": int(m["correct"]) / int(m["count"]),
        "test_loss": float(test["loss"]) / len(data.test_set),
        "test_accuracy": float(test["correct"]) / len(data.test_set),
        "flips": flips,
        "flip_ratio": {k: flips[k] / (n * spe) for k, n in sizes},
        # 0 for a full-precision twin, which has no binary leaf
        "flip_ratio_total": sum(flips.values()) / max(sum(program.flip_sizes) * spe, 1),
        "hparams": {
            k: s.value(max(step - 1, 0), spe, spe * config.epochs) for k, s in scheduled.items()
        },
        "time_s": time_s,
    }
    if glue:  # GLUE's scores besides accuracy: F1 (MRPC, QQP), Matthews correlation (CoLA)
        scores = bdata.glue_metrics(glue, test["confusion"])
        record.update({f"test_{k}": v for k, v in scores.items()})
    if "distill" in m:  # the unweighted distillation terms, means over the epoch's examples
        record["distill"] = {k: float(v) / int(m["count"]) for k, v in m["distill"].items()}
    return state, record, compile_s


def _check_finite(record: dict[str, Any], run: rundir.RunDir) -> None:
    if math.isfinite(loss := record["train_loss"]):
        return
    last = run.last_checkpoint()
    kept = "there is no checkpoint"
    if last is not None:
        kept = f"the last good checkpoint (epoch {last}) is in {run.checkpoints.directory}"
    raise TrainingDiverged(
        f"the training loss became {loss} in epoch {record['epoch']}: training diverged. "
        f"Nothing was saved for that epoch; {kept}. Resuming would repeat the same steps: "
        "start a new run with a smaller learning rate (or other hyperparameters)."
    )


@contextlib.contextmanager
def _deferred_interrupts() -> Iterator[Callable[[], None]]:
    """Ctrl-C (SIGINT) waits for a safe point, between steps (never inside a donating step or a
    checkpoint save): yields a function that raises `KeyboardInterrupt` if one arrived; a second
    Ctrl-C raises at once. Outside the main thread (no handlers there) nothing is changed."""
    pending: list[int] = []

    def stop_if_interrupted():
        if pending:
            raise KeyboardInterrupt

    def on_sigint(signum, frame):
        stop_if_interrupted()  # the second Ctrl-C
        pending.append(signum)

    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return
    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield stop_if_interrupted
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)
