"""What Bop2ndOrder's exact divisions cost: ``bias_correction="rate"`` as shipped, against
plain ``x / rate`` (which XLA compiles into a multiplication by the reciprocal, and reassociates
``(m / rate) / d`` into ``m / (rate * d)``: an ulp off the authors' code in many elements).

binax divides as the reference does (``binax.transforms._true_divide``). This times the whole
update (statistic and flip) of both spellings side by side, with ``optax.adam`` for scale, on N
binary weights (donated, in place), and prints the CPU model.

Usage::

    python benchmarks/true_division.py            # N = 1e7, 15 rounds
    python benchmarks/true_division.py --quick    # N = 1e6, 5 rounds
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp
import numpy as np
import optax
from optimizer_step import cpu_model, make_step, paired_ratio, time_interleaved

import binax
from binax import transforms as T

VARIANTS = {"true divisions (shipped)": T._true_divide, "x / rate": lambda x, d: x / d}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=float, default=1e7)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    size, rounds = (int(1e6), 5) if args.quick else (int(args.size), args.rounds)
    print(f"CPU: {cpu_model()}")
    rng = np.random.default_rng(0)
    w = jnp.asarray(np.where(rng.random(size) < 0.5, -1.0, 1.0), jnp.float32)
    g = jnp.asarray(rng.normal(size=size).astype(np.float32) * 1e-3)
    shipped, runs = T._true_divide, {}
    try:
        for name, divide in VARIANTS.items():
            T._true_divide = divide  # read when the step is traced, just below
            tx = binax.bop2nd_order(bias_correction="rate")
            step = make_step(tx)
            params, state = step(jnp.array(w), tx.init(w), g)
            runs[name] = [step, params, state, g]
    finally:
        T._true_divide = shipped
    adam = optax.adam(1e-3)
    runs["optax.adam"] = [make_step(adam), jnp.array(w), adam.init(w), g]
    times = time_interleaved(runs, rounds, raw=True)
    plain = times["x / rate"]
    print(f"| bop2nd_order rate, N = {size:.0e} | median ms | x plain x / rate (paired) |")
    print("|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {1e3 * np.median(t):.2f} | {paired_ratio(t, plain):.2f} |")


if __name__ == "__main__":
    main()
