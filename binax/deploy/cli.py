"""``binax-deploy RUN_DIR OUT``: a ``binax-train`` run directory to a deployed-model file.

Restores the run with `binax.train.restore` (its ``config.json`` and checkpoint, whose
fingerprint is checked), compiles the model in eval mode with `binax.deploy.compile`, writes
``OUT``, and checks that the deployed network predicts the same class as the float model on the
run's test images.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

__all__ = ["main"]


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
    from binax import data as bdata
    from binax.train import CheckpointError, RunDirError, restore

    try:
        run = restore(args.run_dir, args.epoch)
        model, config, epoch = run.model(), run.config, run.final.get("epoch")
        deployed = binax.deploy.compile(
            model, meta={"config": config.to_dict(), "epoch": epoch, "source": args.run_dir}
        )
        test_set = bdata.load(
            config.dataset, "test", normalized=True, data_dir=config.data_dir, seed=0
        )
    except (FileNotFoundError, CheckpointError, RunDirError, ValueError) as e:
        print(f"binax-deploy: error: {e}", file=sys.stderr)
        return 2
    size = deployed.save(args.out)
    n_float = sum(int(np.size(x)) * 4 for x in jax.tree.leaves(nnx.state(model)))
    print(
        f"wrote {args.out}: {size:,} bytes ({n_float / size:.1f}x smaller than the float32 "
        f"parameters and statistics, {n_float:,} bytes); epoch {epoch}"
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
