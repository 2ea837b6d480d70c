"""The deployed BinaryNet with its first layer as a sum of shifted inputs, against XLA's conv.

`binax.deploy` computes a one-channel float convolution with a ±1 kernel (BinaryNet's first
layer on 28x28x1 images) as a sum of the input's shifted copies on the CPU, from
``SHIFTED_SUM_MIN_BATCH`` images on
(`binax.deploy.program._shifted_sum`), bit-identical to XLA:CPU's convolution. This times the
deployed network (BinaryNet ``--width``, 28x28x1, ``--batch-size`` images) both ways in one
process, alternating which goes first round by round, checks that the logits are equal, and
prints the images/s of each and the median (and quartiles) of the per-round speedup.

Usage::

    python benchmarks/deploy_first_layer.py
    python benchmarks/deploy_first_layer.py --batch-size 1 --rounds 20
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import inference  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--rounds", type=int, default=40)
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp

    import binax.deploy
    from binax.deploy import program as P

    print(_common.machine())
    print(_common.command())
    model = inference._model(args.width)
    shape = (args.batch_size, *inference.INPUT_SHAPE)
    x = jnp.asarray(np.random.default_rng(0).normal(size=shape).astype(np.float32))
    shifted = binax.deploy.compile(model)
    shifted(x)  # compiled for this shape with the shifted sum
    applies = P._shifted_sum_applies
    P._shifted_sum_applies = lambda *a: False
    try:
        conv = binax.deploy.compile(model)
        conv(x)  # compiled with XLA's convolution for the first layer
    finally:
        P._shifted_sum_applies = applies
    if not np.array_equal(np.asarray(shifted(x)), np.asarray(conv(x))):
        raise AssertionError("the two first layers give different logits")
    reps = 5 if args.batch_size > 1 else 200

    def seconds(f):
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(f(x))
            times.append(time.perf_counter() - t0)
        return float(np.median(times))

    speedups, rates = [], {"shifted sum": [], "XLA conv": []}
    for r in range(args.rounds):
        order = [("shifted sum", shifted), ("XLA conv", conv)][:: 1 if r % 2 else -1]
        t = {name: seconds(f) for name, f in order}
        speedups.append(t["XLA conv"] / t["shifted sum"])
        for name in rates:
            rates[name].append(args.batch_size / t[name])
    med, q1, q3 = _common.median_iqr(speedups)
    print(
        f"batch {args.batch_size}: first layer as shifted sum "
        f"{np.median(rates['shifted sum']):.0f} images/s, as XLA conv "
        f"{np.median(rates['XLA conv']):.0f}; speedup per round {med:.3f} "
        f"(quartiles {q1:.3f}-{q3:.3f}, {args.rounds} rounds); logits equal"
    )


if __name__ == "__main__":
    main()
