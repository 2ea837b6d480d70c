"""Would stochastic rounding rescue bfloat16 optimizer state? An experiment, not a binax feature.

binax stores ``state_dtype=jnp.bfloat16`` state by rounding each new float32 value to the
nearest bfloat16. With small rates (Bop's gamma 1e-4) an EMA step below half an ulp is rounded
away, and on digits Bop and Bop2ndOrder lose 0.6-0.7 points against float32 state
(``benchmarks/memory.py``). This script trains the same binary MLP as ``memory.py`` (same
initialisations and data order) with float32 state, bfloat16 rounded to nearest, and bfloat16
with *stochastic* rounding: the float32 value is rounded up with probability equal to its
distance from the bfloat16 below (random low 16 bits added, then truncated). The random bits
here hash the value's own bits and the element index (a dither that changes whenever the value
does), which is enough to test the idea; a library version would hash the step count instead.

Usage::

    python benchmarks/bf16_rounding.py            # 5 seeds, 20 epochs
    python benchmarks/bf16_rounding.py --quick    # 2 seeds, 5 epochs
"""

from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp
import memory

import binax
from binax import transforms as T
from binax._hashing import mix32


def stochastic_store(new, old):
    """`binax.transforms._store` with stochastic rounding to bfloat16 (float32 state as is)."""
    if old.dtype != jnp.bfloat16:
        return T._keep_finite(new.astype(old.dtype), old)
    bits = jax.lax.bitcast_convert_type(new.astype(jnp.float32), jnp.uint32)
    index = jax.lax.broadcasted_iota(jnp.uint32, new.shape, new.ndim - 1)
    noise = mix32(bits ^ mix32(index + jnp.uint32(0x9E3779B9))) & jnp.uint32(0xFFFF)
    up = (bits + noise) & jnp.uint32(0xFFFF0000)  # a bfloat16 value: the cast below is exact
    rounded = jax.lax.bitcast_convert_type(up, jnp.float32).astype(jnp.bfloat16)
    return T._keep_finite(rounded, old)  # a carry into the exponent gives inf: kept out


def optimizers(state_dtype):
    return {
        "bop": binax.bop(state_dtype=state_dtype),
        "bop2nd_order": binax.bop2nd_order(1e-2, 1e-3, 1e-2, state_dtype=state_dtype),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="2 seeds, 5 epochs")
    args = p.parse_args(argv)
    seeds, epochs = (2, 5) if args.quick else (args.seeds, args.epochs)

    def accuracy(tx):
        accs = [memory.train(tx, seed, epochs)[0] for seed in range(seeds)]
        return f"{statistics.mean(accs):.4f} ± {statistics.stdev(accs):.4f}"

    rows = {name: [accuracy(tx)] for name, tx in optimizers(None).items()}
    for name, tx in optimizers(jnp.bfloat16).items():
        rows[name].append(accuracy(tx))
    shipped = T._store
    try:
        T._store = stochastic_store  # read when the optimizers' steps are traced
        for name, tx in optimizers(jnp.bfloat16).items():
            rows[name].append(accuracy(tx))
    finally:
        T._store = shipped
    print(f"digits, binary MLP 64-256-256-10, {seeds} seeds x {epochs} epochs, test accuracy\n")
    print("| optimizer | float32 state | bfloat16, nearest | bfloat16, stochastic |")
    print("|---|---|---|---|")
    for name, (a, b, c) in rows.items():
        print(f"| {name} | {a} | {b} | {c} |")


if __name__ == "__main__":
    main()
