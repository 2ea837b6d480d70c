"""Accuracy cost of the bfloat16 backward pass (``backward_dtype=jnp.bfloat16``) on Fashion-MNIST.

With ``backward_dtype=jnp.bfloat16`` the binary layers compute their backward products (input
and kernel gradients) with bfloat16 operands and float32 accumulation: the output gradient is
rounded to bfloat16 (8 significant bits), the forward pass is unchanged (exact). This trains
the same model with the float32 backward and with the bfloat16 backward, seed by seed (same
initialisation, same data order), with `binax.train.train` (what ``binax-train`` runs: Bop on
the binary kernels, Adam on the rest, the training command's defaults), and reports the final
test accuracy of each (mean, standard deviation, range) and the paired differences.

Usage::

    python benchmarks/bf16_backward.py                  # BinaryNet x1/8, 3 epochs, 4 seeds
    python benchmarks/bf16_backward.py --model mlp --epochs 10 --seeds 5
    python benchmarks/bf16_backward.py --width 0.0625 --epochs 2 --steps-per-epoch 100 --seeds 3
    python benchmarks/bf16_backward.py --quick          # 2 seeds, 1 epoch of 40 steps
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

from binax.train import Config  # noqa: E402

VARIANTS = {"float32 backward": None, "bfloat16 backward": "bfloat16"}
MODELS = {
    "binarynet": {"width_multiplier": 1 / 8},
    "mlp": {"hidden_sizes": [256, 256]},
}


def model_kwargs(args) -> dict:
    kwargs = dict(MODELS[args.model])
    if args.model == "binarynet" and args.width is not None:
        kwargs["width_multiplier"] = args.width
    return kwargs


def final_accuracy(model, backward_dtype, seed, args) -> float:
    kwargs = dict(model_kwargs(args), backward_dtype=backward_dtype)
    config = Config(
        model=model,
        model_kwargs=kwargs,
        dataset="fashion_mnist",
        data_dir=args.data_dir,
        optimizer="bop",
        epochs=args.epochs,
        batch_size=args.batch_size,
        steps_per_epoch=args.steps_per_epoch,
        seed=seed,
        checkpoint=False,
        plots=False,
        progress=False,
    )
    result, _ = _common.train_quietly(config)
    return 100 * result.history[-1]["test_accuracy"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=list(MODELS), default="binarynet")
    p.add_argument("--width", type=float, default=None, help="BinaryNet width (default 1/8)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps-per-epoch", type=int, default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--quick", action="store_true", help="2 seeds, 1 epoch of 40 steps")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.steps_per_epoch = 2, 1, 40
    print(f"Command: `{_common.command()}`\n\nStarted {_common.now()} on: {_common.machine()}\n")
    print(
        f"Fashion-MNIST, {args.model} {model_kwargs(args)}, Bop + Adam "
        "(binax-train defaults), "
        f"batch {args.batch_size}, {args.epochs} epochs, seeds 0-{args.seeds - 1}; final test "
        "accuracy (%)\n",
        flush=True,
    )
    acc = {v: [] for v in VARIANTS}
    for seed in range(args.seeds):
        for name, dtype in VARIANTS.items():
            acc[name].append(final_accuracy(args.model, dtype, seed, args))
        print(
            f"  seed {seed}: " + ", ".join(f"{n} {a[-1]:.2f}" for n, a in acc.items()), flush=True
        )
    rows = []
    for name, a in acc.items():
        sd = statistics.stdev(a) if len(a) > 1 else 0.0
        rows.append((name, f"{statistics.mean(a):.2f}", f"{sd:.2f}", f"{min(a):.2f}-{max(a):.2f}"))
    print(_common.md_table(("backward", "mean", "sd", "range"), rows))
    diff = [b - f for f, b in zip(*acc.values(), strict=True)]
    sd = statistics.stdev(diff) if len(diff) > 1 else 0.0
    print(
        f"\nbfloat16 - float32, paired by seed: mean {statistics.mean(diff):+.2f} points "
        f"(sd {sd:.2f}; per seed {', '.join(f'{d:+.2f}' for d in diff)})"
    )


if __name__ == "__main__":
    main()
