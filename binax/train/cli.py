"""``binax-train``: train a binary network from the command line.

Also ``python -m binax.train``. ``binax-train --help`` explains every flag; ``main`` returns
the exit status (0 done, 2 bad input / missing data / unusable checkpoint, 130 interrupted).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import sys
import textwrap
from typing import Any

from binax.train import optim, schedules
from binax.train.config import Config, ConfigError

EXIT_OK, EXIT_USAGE, EXIT_INTERRUPTED = 0, 2, 130

_PER_OPTIMIZER = " (default: per optimizer, see the table below)"
_MODEL_FLAGS = {"hidden_sizes": "mlp", "width_multiplier": "binarynet", "width": "resnet18"}

_EPILOG_HEAD = """\
main job (offline, a couple of minutes on 2 CPU cores):
  binax-train --model mlp --dataset digits --optimizer bop --epochs 20

schedules: every hyperparameter marked SCHEDULE takes a number or
  linear:START,END            linear over the whole run, e.g. --lr linear:1e-2,1e-4
  cosine:START[,END]          cosine decay over the whole run (END default 0)
  step:START,FACTOR,EVERY     times FACTOR every EVERY epochs, e.g. --gamma step:1e-4,0.1,100

binary optimizers and their defaults (the papers' for bop, bop2nd_order and sgdat; diode's
are faster than the paper's 1e-4/0.99/0.9999, which need thousands of steps per flip; cema's
are this command's choice, none being published); a hyperparameter flag the chosen optimizer
does not take is an error:
"""

_EPILOG_TAIL = """
output: <run-dir>/config.json, log.jsonl (one record per epoch), loss.png, accuracy.png,
  flip_ratio.png, checkpoints/<epoch>/ (Orbax). Resume with --resume --run-dir <run-dir>.

several devices: every local device is used (data parallel); --model-parallel N also splits
  kernels over N devices. Several hosts: run the same command on every host with
  --coordinator-address HOST:PORT --num-processes N --process-id I (or the JAX_* variables),
  or --distributed on a Cloud TPU pod slice / SLURM. See docs/training.md.
"""


def _epilog() -> str:
    lines = []
    for r in optim.RECIPES.values():
        args = ", ".join(f"{h.flag} {h.default}" for h in r.hyperparameters) or "(none)"
        text = textwrap.fill(r.description, 78, initial_indent=" " * 16, subsequent_indent=" " * 16)
        lines.append(f"  {r.name:<13} {args}\n{text}")
    return _EPILOG_HEAD + "\n".join(lines) + "\n" + _EPILOG_TAIL


def _hyperparameters() -> dict[str, list[tuple[str, optim.Hyperparameter]]]:
    """Every hyperparameter name, with the (optimizer, Hyperparameter) pairs that take it."""
    out: dict[str, list[tuple[str, optim.Hyperparameter]]] = {}
    for r in optim.RECIPES.values():
        for h in r.hyperparameters:
            out.setdefault(h.name, []).append((r.name, h))
    return out


def _add_hyperparameter_flags(group, takers: dict[str, list[tuple[str, optim.Hyperparameter]]]):
    for owners in takers.values():
        h = owners[0][1]
        by_help: dict[str, list[str]] = {}
        for name, hh in owners:
            by_help.setdefault(hh.help, []).append(name)
        text = "; ".join(f"{', '.join(names)}: {t}" for t, names in by_help.items())
        defaults = {hh.default for _, hh in owners}
        default = f" (default {h.default})" if len(defaults) == 1 else _PER_OPTIMIZER
        if h.choices is not None:
            group.add_argument(h.flag, choices=tuple(h.choices), help=text + default)
        elif h.schedulable:
            group.add_argument(h.flag, type=_schedule, metavar="SCHEDULE", help=text + default)
        else:
            group.add_argument(h.flag, type=float, help=text + default)


def _schedule(text: str) -> float | str:
    try:
        s = schedules.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return s.values[0] if s.kind == "constant" else text.strip()


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected integers separated by commas, got {text!r}"
        ) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value
    return key.strip(), parsed


def build_parser() -> argparse.ArgumentParser:
    """The argument parser. Defaults are suppressed: only flags given appear in the result."""
    from binax import models
    from binax.data import DATASET_NAMES

    d = Config()
    p = argparse.ArgumentParser(
        prog="binax-train",
        description="Train a binary neural network (Flax NNX) with a BNN optimizer; "
        "log, plot and checkpoint every epoch.",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    g = p.add_argument_group("model and data")
    g.add_argument("--model", choices=models.names(), help=f"architecture (default {d.model})")
    g.add_argument(
        "--hidden-sizes",
        type=_int_list,
        metavar="N,N,...",
        help="mlp: hidden layer widths (default 512,512)",
    )
    g.add_argument(
        "--width-multiplier",
        type=float,
        metavar="F",
        help="binarynet: scales every width (default 1.0)",
    )
    g.add_argument(
        "--width", type=int, metavar="N", help="resnet18: width of the first stage (default 64)"
    )
    g.add_argument(
        "--model-arg",
        type=_key_value,
        action="append",
        metavar="KEY=VALUE",
        help="any other keyword argument of the model (a Python literal), e.g. "
        "--model-arg real_first_last=True; repeatable",
    )
    g.add_argument(
        "--dataset",
        choices=DATASET_NAMES,
        help=f"dataset (default {d.dataset}, bundled with scikit-learn: no download)",
    )
    g.add_argument(
        "--data-dir",
        metavar="DIR",
        help="where the dataset files are (default $BINAX_DATA_DIR or ~/.cache/binax/datasets)",
    )
    g.add_argument(
        "--download",
        action="store_true",
        help="download missing dataset files (checked against SHA-256)",
    )
    g.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        help="random crop (pad 4) and horizontal flip of training images "
        "(default: on for cifar10/cifar100, off otherwise)",
    )

    g = p.add_argument_group("binary weights")
    g.add_argument(
        "--optimizer",
        choices=optim.OPTIMIZERS,
        help=f"optimizer of the binary weights (default {d.optimizer}); see below",
    )
    _add_hyperparameter_flags(g, _hyperparameters())

    g = p.add_argument_group("real-valued weights (BatchNorm, real layers; all for 'real')")
    g.add_argument(
        "--real-optimizer",
        choices=tuple(optim.REAL_OPTIMIZERS),
        help=f"optimizer (default {d.real_optimizer}; sgd has momentum 0.9)",
    )
    g.add_argument(
        "--lr", type=_schedule, metavar="SCHEDULE", help=f"its learning rate (default {d.lr})"
    )

    g = p.add_argument_group("training")
    g.add_argument(
        "--epochs",
        type=int,
        help=f"number of epochs (default {d.epochs}); with --resume, a larger "
        "number extends the run (schedules then span the new length)",
    )
    g.add_argument(
        "--batch-size",
        type=int,
        help=f"global batch size, over all devices and hosts (default {d.batch_size})",
    )
    g.add_argument(
        "--eval-batch-size",
        type=int,
        help=f"global batch size of the evaluation (default {d.eval_batch_size})",
    )
    g.add_argument(
        "--steps-per-epoch",
        type=int,
        help="at most this many steps per epoch (default: the whole training set)",
    )
    g.add_argument(
        "--seed", type=int, help=f"seed of the model, data order, augmentation (default {d.seed})"
    )

    g = p.add_argument_group("output")
    g.add_argument(
        "--run-dir",
        metavar="DIR",
        help="run directory (default runs/<model>-<dataset>-<optimizer>-<time>)",
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --run-dir from its last checkpoint (its saved "
        "config is used; flags given must agree with it, except runtime ones such "
        "as --epochs)",
    )
    g.add_argument(
        "--no-checkpoint", dest="checkpoint", action="store_false", help="do not save checkpoints"
    )
    g.add_argument(
        "--keep-checkpoints",
        type=int,
        help=f"how many checkpoints to keep (default {d.keep_checkpoints})",
    )
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    g.add_argument(
        "--log-every",
        type=int,
        help=f"refresh the bar's loss/accuracy every N steps (default {d.log_every})",
    )
    g.add_argument("--no-plots", dest="plots", action="store_false", help="no PNG plots")

    g = p.add_argument_group("devices and hosts")
    g.add_argument(
        "--num-devices",
        type=int,
        help="use only the first N devices (default: all; single process only)",
    )
    g.add_argument(
        "--model-parallel",
        type=int,
        help="devices along the mesh's 'model' axis: kernels whose last axis it "
        "divides are split over them (default 1: pure data parallel)",
    )
    g.add_argument(
        "--coordinator-address",
        metavar="HOST:PORT",
        help="multi-host: address of process 0 ($JAX_COORDINATOR_ADDRESS)",
    )
    g.add_argument(
        "--num-processes", type=int, help="multi-host: number of processes ($JAX_NUM_PROCESSES)"
    )
    g.add_argument(
        "--process-id", type=int, help="multi-host: this process's index ($JAX_PROCESS_ID)"
    )
    g.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() even without the three flags above "
        "(cluster auto-detection: Cloud TPU pod slices, SLURM, Open MPI)",
    )
    return p


def config_from_args(args: dict[str, Any], base: Config | None = None) -> Config:
    """The Config of the flags given in ``args`` (over ``base``, or the defaults)."""
    config = base or Config()
    fields = {f.name for f in dataclasses.fields(Config)}
    updates = {k: v for k, v in args.items() if k in fields}
    hparams = dict(config.hparams)
    for key in _hyperparameters():
        if key in args:
            hparams[key] = args[key]
    model_kwargs = dict(config.model_kwargs)
    model = updates.get("model", config.model)
    for key, owner in _MODEL_FLAGS.items():
        if key in args:
            if model != owner:
                raise ConfigError(
                    f"--{key.replace('_', '-')} applies to --model {owner} only (the model is "
                    f"{model!r}); use --model-arg for other models' arguments"
                )
            model_kwargs[key] = args[key]
    for key, value in args.get("model_arg", []):
        model_kwargs[key] = value
    return dataclasses.replace(config, **updates, hparams=hparams, model_kwargs=model_kwargs)


def _error(message: str) -> int:
    print(f"binax-train: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    """Runs the command; returns its exit status."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    # Data errors are imported late: the parser must work before JAX is started.
    from binax.data import DataFormatError, DatasetNotFoundError
    from binax.train.checkpoint import CheckpointError
    from binax.train.loop import RunDirError, train

    try:
        base = None
        if args.get("resume"):
            if "run_dir" not in args:
                return _error("--resume needs --run-dir (the directory of the run to continue)")
            saved = os.path.join(args["run_dir"], "config.json")
            if not os.path.isfile(saved):
                return _error(f"cannot resume: {saved} does not exist")
            with open(saved) as f:
                base = Config.from_dict(json.load(f))
        config = config_from_args(args, base).validate()
        dist = ("coordinator_address", "num_processes", "process_id")
        if args.get("distributed") or any(k in args for k in dist):
            from binax.train.distributed import initialize_distributed

            initialize_distributed(*(args.get(k) for k in dist))
        train(config)
    except KeyboardInterrupt:
        print("binax-train: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except DatasetNotFoundError as e:
        return _error(f"{e}\nWith binax-train: add --download (and --data-dir DIR) to fetch it.")
    except (ConfigError, RunDirError, CheckpointError, DataFormatError) as e:
        return _error(str(e))
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
