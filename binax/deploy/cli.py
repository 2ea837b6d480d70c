"""``binax-deploy RUN_DIR OUT``: a ``binax-train`` run directory to a deployed-model file.

Reads the run's ``config.json``, rebuilds the model and the training state as ``binax-train``
does (`binax.train.build_model`, `binax.train.make_program`, `binax.train.make_optimizer`),
restores the checkpoint through `binax.train.Checkpoints` (which checks its fingerprint),
compiles the model in eval mode with `binax.deploy.compile`, writes ``OUT``, and checks that the
deployed network predicts the same class as the float model on the run's test images.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

__all__ = ["main", "restore_model"]

CONFIG_FILE, CHECKPOINT_DIR = "config.json", "checkpoints"


def restore_model(run_dir: str, epoch: int | None = None):
    """``(model, config, meta, test_set)`` of a ``binax-train`` run; the model in eval mode.

    Raises:
      FileNotFoundError: ``run_dir`` has no ``config.json`` or no checkpoints.
      binax.train.CheckpointError: the checkpoint is missing, truncated or corrupt.
    """
    import jax
    from flax import nnx

    from binax import data as bdata
    from binax.train import Checkpoints, Config, build_model, make_mesh, make_program, optim

    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} does not exist: is {run_dir!r} a binax-train run directory?"
        )
    if not os.path.isdir(os.path.join(run_dir, CHECKPOINT_DIR)):
        raise FileNotFoundError(f"{run_dir} has no {CHECKPOINT_DIR}/ (was it run --no-checkpoint?)")
    with open(path) as f:
        config = Config.from_dict(json.load(f))
    test_set = bdata.load(
        config.dataset, "test", normalized=True, data_dir=config.data_dir, download=False, seed=0
    )
    model = build_model(
        config.model,
        config.model_kwargs,
        test_set.images.shape[1:],
        test_set.num_classes,
        config.seed,
        full_precision=config.optimizer == "real",
    )
    hp = optim.hparams(config.optimizer, config.hparams)
    program = make_program(
        model,
        lambda labels: optim.make_optimizer(
            config.optimizer,
            hp,
            config.real_optimizer,
            config.lr,
            labels,
            seed=config.seed,
            steps_per_epoch=1,
            total_steps=max(1, config.epochs),
        ),
        make_mesh(1),
    )
    ckpts = Checkpoints(os.path.join(run_dir, CHECKPOINT_DIR), create=False)
    try:
        state, meta = ckpts.restore(program.init_state(), epoch)
    finally:
        ckpts.close()
    params, rest = jax.device_get((state.params, state.rest))
    model = nnx.merge(program.eval_graphdef, params, rest)
    model.eval()
    return model, config, meta, test_set


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="binax-deploy",
        description="Compile the trained model of a binax-train run directory into one file: "
        "bit-packed binary kernels, integer thresholds, float first/last layers "
        "(binax.deploy).",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a binax-train run directory")
    p.add_argument("out", metavar="OUT", help="the file to write (e.g. model.bnx)")
    p.add_argument("--epoch", type=int, help="which checkpoint (default: the latest)")
    p.add_argument(
        "--check",
        type=int,
        default=None,
        metavar="N",
        help="compare predictions with the float model on the first N test images "
        "(default: all; 0: no check)",
    )
    args = p.parse_args(argv)

    import jax
    from flax import nnx

    import binax.deploy
    from binax.train import CheckpointError

    try:
        model, config, meta, test_set = restore_model(args.run_dir, args.epoch)
        deployed = binax.deploy.compile(
            model,
            meta={"config": config.to_dict(), "epoch": meta.get("epoch"), "source": args.run_dir},
        )
    except (FileNotFoundError, CheckpointError, ValueError) as e:
        print(f"binax-deploy: error: {e}", file=sys.stderr)
        return 2
    size = deployed.save(args.out)
    n_float = sum(int(np.size(x)) * 4 for x in jax.tree.leaves(nnx.state(model)))
    print(
        f"wrote {args.out}: {size:,} bytes ({n_float / size:.1f}x smaller than the float32 "
        f"parameters and statistics, {n_float:,} bytes); epoch {meta.get('epoch')}"
    )
    n = len(test_set) if args.check is None else min(args.check, len(test_set))
    if n > 0:
        images = test_set.images[:n]
        graphdef, state = nnx.split(model)
        forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
        agree, correct = 0, 0
        for i in range(0, n, 256):
            x = images[i : i + 256]
            ref = np.asarray(forward(state, x)).argmax(-1)
            got = np.asarray(deployed(x)).argmax(-1)
            agree += int(np.sum(ref == got))
            correct += int(np.sum(got == test_set.labels[i : i + 256]))
        print(
            f"check on {n} test images: {agree}/{n} predictions equal to the float model's; "
            f"deployed accuracy {correct / n:.2%}"
        )
        if agree != n:
            print(
                "binax-deploy: error: the deployed model disagrees with the float model",
                file=sys.stderr,
            )
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
