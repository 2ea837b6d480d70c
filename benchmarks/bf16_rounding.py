"""bfloat16 optimizer state: accuracy with rounding to nearest and with stochastic rounding.

binax stores ``state_dtype=jnp.bfloat16`` state by rounding each new float32 value once. To
nearest (the default), an EMA step below half a bfloat16 ulp is lost, and with small rates (Bop's
gamma 1e-4) the average lags; ``rounding="stochastic"`` rounds up or down at random so that the
stored value is unbiased. This trains the same binary MLP as ``memory.py`` on digits (same
initialisations and data order) with float32 state and with bfloat16 state rounded each way,
and reports the test accuracy (mean ± sd over seeds).

Usage::

    python benchmarks/bf16_rounding.py            # 5 seeds, 20 epochs
    python benchmarks/bf16_rounding.py --quick    # 2 seeds, 5 epochs
"""

from __future__ import annotations

import argparse
import statistics

import jax.numpy as jnp
import memory

import binax

VARIANTS = {
    "float32 state": {},
    "bfloat16, nearest": dict(state_dtype=jnp.bfloat16),
    "bfloat16, stochastic": dict(state_dtype=jnp.bfloat16, rounding="stochastic"),
}
OPTIMIZERS = {
    "bop": lambda kw: binax.bop(**kw),
    "bop2nd_order": lambda kw: binax.bop2nd_order(1e-2, 1e-3, 1e-2, **kw),
    "cema": lambda kw: binax.cema(1e-3, 1e-3, **kw),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="2 seeds, 5 epochs")
    args = p.parse_args(argv)
    seeds, epochs = (2, 5) if args.quick else (args.seeds, args.epochs)
    print(f"digits, binary MLP 64-256-256-10, {seeds} seeds x {epochs} epochs, test accuracy\n")
    print("| optimizer | " + " | ".join(VARIANTS) + " |")
    print("|---|" + "---|" * len(VARIANTS))
    for name, make in OPTIMIZERS.items():
        cells = []
        for kw in VARIANTS.values():
            accs = [memory.train(make(kw), seed, epochs)[0] for seed in range(seeds)]
            cells.append(f"{statistics.mean(accs):.4f} ± {statistics.stdev(accs):.4f}")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
