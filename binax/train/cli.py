"""``binax-train`` (also ``python -m binax.train``), whose ``--help`` explains every flag: `main`
runs it and returns the exit status (0 done, 2 bad input, missing data or an unusable
checkpoint, 3 the loss became NaN or infinite, 130 interrupted)."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import sys
import textwrap
from typing import Any

from binax._malloc import restart_with_huge_pages
from binax.data import DOWNLOADABLE, DataFormatError, DatasetNotFoundError
from binax.train import loop, optim, schedules
from binax.train.checkpoint import CheckpointError
from binax.train.config import Config, ConfigError
from binax.train.rundir import RunDirError, read_config
from binax.train.sharding import initialize_distributed

EXIT_OK, EXIT_USAGE, EXIT_DIVERGED, EXIT_INTERRUPTED = 0, 2, 3, 130

_PER_OPTIMIZER = " (default: per optimizer, see the table below)"

_EPILOG_HEAD = """\
main job (offline, about a minute on 2 CPU cores):
  binax-train --model mlp --dataset digits --optimizer bop --epochs 20

schedules: every hyperparameter marked SCHEDULE takes a number or one of these over the
whole run, e.g. --lr linear:1e-2,1e-4 or --gamma step:1e-4,0.1,100:
{schedules}

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
    forms = "\n".join(f"  {form:<31}{text}" for form, _, text in schedules.FORMS.values())
    lines = []
    for r in optim.RECIPES.values():
        args = ", ".join(f"{h.flag} {r.defaults[h.name]}" for h in r.hyperparameters) or "(none)"
        text = textwrap.fill(r.description, 78, initial_indent=" " * 16, subsequent_indent=" " * 16)
        lines.append(f"  {r.name:<13} {args}\n{text}")
    return _EPILOG_HEAD.format(schedules=forms) + "\n".join(lines) + "\n" + _EPILOG_TAIL


def _add_hyperparameter_flags(group) -> None:
    for h in optim.HYPERPARAMETERS.values():
        owners = [r for r in optim.RECIPES.values() if h.name in r.defaults]
        defaults = {r.defaults[h.name] for r in owners}
        text = f"{', '.join(r.name for r in owners)}: {h.help}"
        text += f" (default {defaults.pop()})" if len(defaults) == 1 else _PER_OPTIMIZER
        if h.choices is not None:
            group.add_argument(h.flag, choices=tuple(h.choices), help=text)
        elif h.schedulable:
            group.add_argument(h.flag, type=_schedule, metavar="SCHEDULE", help=text)
        else:
            group.add_argument(h.flag, type=float, metavar="X", help=text)


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
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(
            f"expected positive integers separated by commas, got {text!r}"
        )
    return values


#: Model arguments with a flag of their own: name -> (model, type, metavar, help).
_MODEL_FLAGS = {
    "hidden_sizes": ("mlp", _int_list, "N,N,...", "hidden layer widths (default 512,512)"),
    "width_multiplier": ("binarynet", float, "F", "scales every width (default 1.0)"),
    "width": ("resnet18", int, "N", "width of the first stage (default 64)"),
}


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
    """The argument parser: a flag per `Config` field, per hyperparameter of the recipes, per
    model argument, and the multi-host flags. Defaults are suppressed: only flags given appear
    in the result."""
    p = argparse.ArgumentParser(
        prog="binax-train",
        description="Train a binary neural network (Flax NNX) with a BNN optimizer; "
        "log, plot and checkpoint every epoch.",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    groups = {}
    for f in dataclasses.fields(Config):
        if not f.metadata:
            continue  # model_kwargs, hparams: the flags below
        title, kw = f.metadata["group"], dict(f.metadata["flag"])
        group = groups[title] = groups.get(title) or p.add_argument_group(title)
        flag = kw.pop("flag", "--" + f.name.replace("_", "-"))
        if kw.get("type") is int:
            kw.setdefault("metavar", "N")
        if kw.get("type") == "schedule":
            kw.update(type=_schedule, metavar="SCHEDULE")
        group.add_argument(flag, dest=f.name, help=f.metadata["help"], **kw)
        if f.name == "model":
            for name, (owner, kind, metavar, text) in _MODEL_FLAGS.items():
                flag = "--" + name.replace("_", "-")
                group.add_argument(flag, type=kind, metavar=metavar, help=f"{owner}: {text}")
            group.add_argument(
                "--model-arg",
                type=_key_value,
                action="append",
                metavar="KEY=VALUE",
                help="any other keyword argument of the model (a Python literal), e.g. "
                "--model-arg real_first_last=True; repeatable",
            )
        if f.name == "optimizer":
            _add_hyperparameter_flags(group)
    for flag, kw in _HOST_FLAGS.items():
        groups["devices and hosts"].add_argument(flag, **kw)
    return p


#: The multi-host flags (`binax.train.initialize_distributed`'s arguments).
_HOST_FLAGS = {
    "--coordinator-address": dict(
        metavar="HOST:PORT", help="multi-host: address of process 0 ($JAX_COORDINATOR_ADDRESS)"
    ),
    "--num-processes": dict(type=int, help="multi-host: number of processes ($JAX_NUM_PROCESSES)"),
    "--process-id": dict(type=int, help="multi-host: this process's index ($JAX_PROCESS_ID)"),
    "--distributed": dict(
        action="store_true",
        help="call jax.distributed.initialize() even without the three flags above "
        "(cluster auto-detection: Cloud TPU pod slices, SLURM, Open MPI)",
    ),
}


def config_from_args(args: dict[str, Any], base: Config | None = None) -> Config:
    """The Config of the flags given in ``args`` (over ``base``, or the defaults)."""
    config = base or Config()
    updates = {f.name: args[f.name] for f in dataclasses.fields(Config) if f.name in args}
    hparams = {**config.hparams, **{k: args[k] for k in optim.HYPERPARAMETERS if k in args}}
    model_kwargs = dict(config.model_kwargs)
    model = updates.get("model", config.model)
    for key, (owner, *_) in _MODEL_FLAGS.items():
        if key in args:
            if model != owner:
                raise ConfigError(
                    f"--{key.replace('_', '-')} applies to --model {owner} only (the model is "
                    f"{model!r}); use --model-arg for other models' arguments"
                )
            model_kwargs[key] = args[key]
    model_kwargs.update(args.get("model_arg", []))
    return dataclasses.replace(config, **updates, hparams=hparams, model_kwargs=model_kwargs)


def _error(message: str) -> int:
    print(f"binax-train: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def run() -> None:
    """The ``binax-train`` executable: `main` on ``sys.argv``, with huge pages (`binax._malloc`)."""
    restart_with_huge_pages(["-m", "binax.train", *sys.argv[1:]])
    sys.exit(main())


def main(argv: list[str] | None = None) -> int:
    """Runs the command; returns its exit status."""
    args = vars(build_parser().parse_args(argv))
    try:
        if args.get("resume") and "run_dir" not in args:
            return _error("--resume needs --run-dir (the directory of the run to continue)")
        base = read_config(args["run_dir"]) if args.get("resume") else None
        config = config_from_args(args, base).validate()
        dist = ("coordinator_address", "num_processes", "process_id")
        if args.get("distributed") or any(k in args for k in dist):
            initialize_distributed(*(args.get(k) for k in dist))
        loop.train(config)
    except KeyboardInterrupt:
        print("binax-train: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except DatasetNotFoundError as e:
        if config.dataset in DOWNLOADABLE and not config.download:
            e = f"{e}\nWith binax-train: add --download (and --data-dir DIR) to fetch it."
        return _error(str(e))
    except (ConfigError, RunDirError, CheckpointError, DataFormatError) as e:
        return _error(str(e))
    except loop.TrainingDiverged as e:
        print(f"binax-train: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    return EXIT_OK
