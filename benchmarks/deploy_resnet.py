"""ResNet-18 inference: the float forward and `binax.deploy`, with and without small convolutions
as patch products.

Builds `binax.models.BinaryResNet18` (``--stem``, ``--size`` x ``--size`` x 3 inputs, width 64,
``ste_sign`` kernels, BatchNorm statistics of one random batch), then times, interleaved round
by round, its jitted float forward (eval mode) and its deployed network
(`binax.deploy.compile`), each built once with `binax.nn.functional.SMALL_CONV_WIDTH` at 0
(every convolution is XLA:CPU's) and once at its default (convolutions at most 2 wide are one
matrix product: a ResNet's last stages on small images). Prints images/s (medians) and checks
that the deployed network predicts the float model's classes.

Usage::

    python benchmarks/deploy_resnet.py
    python benchmarks/deploy_resnet.py --stem small --batch 1 256
    python benchmarks/deploy_resnet.py --quick
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stem", default="imagenet", choices=["imagenet", "small"])
    p.add_argument("--size", type=int, default=32, help="input height and width")
    p.add_argument("--batch", type=int, nargs="+", default=[256])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=3, help="calls per round")
    p.add_argument("--quick", action="store_true", help="width 16, batch 32, 2 rounds")
    args = p.parse_args(argv)
    width = 16 if args.quick else 64
    if args.quick:
        args.batch, args.rounds = [32], 2

    import jax
    import numpy as np
    from flax import nnx

    import binax
    from binax import models
    from binax.nn import functional as F

    model = models.BinaryResNet18(
        (args.size, args.size, 3), 10, width=width, stem=args.stem, rngs=nnx.Rngs(0)
    )
    for _, m in nnx.iter_modules(model):
        if isinstance(m, nnx.BatchNorm):
            m.momentum = 0.0
    model.train()
    model(jax.random.normal(jax.random.key(1), (64, args.size, args.size, 3)))
    model.eval()
    graphdef, state = nnx.split(model)

    default = F.SMALL_CONV_WIDTH
    print(f"Command: `{_common.command()}`\n{_common.machine()}\n")
    rows = []
    for batch in args.batch:
        x = jax.random.normal(jax.random.key(2), (batch, args.size, args.size, 3))
        fns = {}
        for label, small in (("XLA's convolutions", 0), ("default", default)):
            F.SMALL_CONV_WIDTH = small  # read while tracing: both are compiled here
            forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
            deployed = binax.deploy.compile(model)
            fns[f"float, {label}"] = (lambda x, f=forward: f(state, x)), forward(state, x)
            fns[f"deployed, {label}"] = deployed, deployed(x)
        F.SMALL_CONV_WIDTH = default
        ref = np.asarray(fns["float, default"][1]).argmax(-1)
        agree = {k: float(np.mean(np.asarray(v[1]).argmax(-1) == ref)) for k, v in fns.items()}
        times = {k: [] for k in fns}
        for _ in range(args.rounds):
            for k, (f, _) in fns.items():
                t0 = time.perf_counter()
                for _ in range(args.reps):
                    jax.block_until_ready(f(x))
                times[k].append((time.perf_counter() - t0) / args.reps)
        for k, ts in times.items():
            med = _common.median_iqr(ts)[0]
            rows.append([batch, k, f"{batch / med:.0f}", f"{agree[k]:.3f}"])
    print(f"BinaryResNet18, stem {args.stem!r}, {args.size}x{args.size}x3, width {width}\n")
    head = ("batch", "forward", "images/s", "predictions equal to the float model's")
    print(_common.md_table(head, rows))


if __name__ == "__main__":
    main()
