"""Optimizer memory: bytes of optimizer state per binary weight, and what narrower state costs.

Part 1 reads the bytes straight from each optimizer's state pytree (per-weight arrays and
scalars) for N binary weights, against Adam on latent real-valued weights (whose latent
weights are float32 too, while binary weights could be stored in 1 bit for inference).

Part 2 trains the same binary MLP on scikit-learn's digits with float32 state and with narrow
state (bfloat16 moments, int8/int16 flip counts), from the same initialisation and data order,
and reports the test accuracy of each and how many flips the two runs shared in the first epoch
(after the first differing flip the runs diverge, so later flips are not comparable one by one).

Usage::

    python benchmarks/memory.py            # 5 seeds, 20 epochs
    python benchmarks/memory.py --quick    # 2 seeds, 5 epochs
"""

from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import optax

import binax
from binax import data
from binax.quantizers import ste_sign

N = 1_000_000


def variants():
    """name -> (optimizer with default state, the same with narrow state); None: not offered."""
    return {
        "bop": (binax.bop(), binax.bop(state_dtype=jnp.bfloat16)),
        "bop2nd_order": (
            binax.bop2nd_order(1e-2, 1e-3, 1e-2),
            binax.bop2nd_order(1e-2, 1e-3, 1e-2, state_dtype=jnp.bfloat16),
        ),
        "sgdat": (
            binax.sgdat(1e-3, 1e-4, eps=1e-8),
            binax.sgdat(1e-3, 1e-4, eps=1e-8, count_dtype=jnp.int8),
        ),
        "sgdat/int16": (None, binax.sgdat(1e-3, 1e-4, eps=1e-8, count_dtype=jnp.int16)),
        "diode": (
            binax.diode(1e-3, 0.9, 0.99),
            binax.diode(1e-3, 0.9, 0.99, state_dtype=jnp.bfloat16),
        ),
        "cema": (binax.cema(1e-3, 1e-3), binax.cema(1e-3, 1e-3, state_dtype=jnp.bfloat16)),
        "latent adam+clip": (optax.chain(optax.adam(1e-3), binax.clip_latent()), None),
    }


def state_bytes(tx, n=N):
    w = jax.ShapeDtypeStruct((n,), jnp.float32)
    state = jax.eval_shape(tx.init, w)
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(state)) / n


# ---- a small binary MLP on digits (kernels binary, biases real) --------------------------------


def init(key, sizes=(64, 256, 256, 10)):
    keys = jax.random.split(key, len(sizes) - 1)
    return {
        f"l{i}": {
            "kernel": jnp.where(jax.random.bernoulli(k, 0.5, (a, b)), 1.0, -1.0),
            "bias": jnp.zeros(b),
        }
        for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:], strict=True))
    }


def forward(params, x):
    """Binary kernels; hidden layers normalised with batch statistics (BatchNorm without state,
    also at test time, on the whole test set), sign activations except on the input."""
    h = x.reshape(x.shape[0], -1)
    layers = list(params.values())
    for i, layer in enumerate(layers):
        h = ste_sign(h) if i else h
        h = h @ layer["kernel"] / jnp.sqrt(h.shape[-1]) + layer["bias"]
        if i < len(layers) - 1:
            h = (h - h.mean(0)) / jnp.sqrt(h.var(0) + 1e-5)
    return h


def is_kernel(path):
    return path[-1] == "kernel"


def train(binary_tx, seed, epochs):
    train_set, test_set = data.load("digits", "train"), data.load("digits", "test")
    params = init(jax.random.key(seed))
    tx = binax.partition(binary_tx, optax.adam(1e-2), is_kernel)
    state = tx.init(params)

    @jax.jit
    def step(params, state, x, y):
        def loss(p):
            logits = forward(p, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        u, state = tx.update(jax.grad(loss)(params), state, params)
        new = optax.apply_updates(params, u)
        flipped = jax.tree.map(lambda a, b: a != b, params, new)
        return new, state, flipped

    first_epoch = []
    for epoch in range(epochs):
        for b in data.batches(train_set, 64, seed=seed, epoch=epoch):
            params, state, flipped = step(params, state, b.images, b.labels)
            if epoch == 0:
                first_epoch.append(
                    np.concatenate([np.asarray(flipped[k]["kernel"]).ravel() for k in params])
                )
    acc = float(jnp.mean(jnp.argmax(forward(params, test_set.images), -1) == test_set.labels))
    return acc, np.stack(first_epoch)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 seeds, 5 epochs")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=20)
    args = p.parse_args(argv)
    seeds, epochs = (2, 5) if args.quick else (args.seeds, args.epochs)

    print("## State bytes per binary weight (from the state pytree, N = 1e6)\n")
    print("| optimizer | default state | narrow state |\n|---|---|---|")
    for name, (tx, narrow) in variants().items():
        a = f"{state_bytes(tx):.2f}" if tx is not None else "-"
        b = f"{state_bytes(narrow):.2f}" if narrow is not None else "-"
        print(f"| {name} | {a} | {b} |")

    print(
        f"\n## Narrow state on digits ({seeds} seeds, {epochs} epochs, binary MLP 64-256-256-10)\n"
    )
    print(
        "| optimizer | accuracy, default | accuracy, narrow | first-epoch flips: default / "
        "narrow / shared |\n|---|---|---|---|"
    )
    for name, (tx, narrow) in variants().items():
        if tx is None or narrow is None:
            continue
        accs, accn, fl = [], [], []
        for seed in range(seeds):
            a, fa = train(tx, seed, epochs)
            b, fb = train(narrow, seed, epochs)
            accs.append(a)
            accn.append(b)
            fl.append((int(fa.sum()), int(fb.sum()), int((fa & fb).sum())))
        fmt = lambda xs: f"{statistics.mean(xs):.4f} ± {statistics.pstdev(xs):.4f}"
        flips = " / ".join(str(sum(f[i] for f in fl)) for i in range(3))
        print(f"| {name} | {fmt(accs)} | {fmt(accn)} | {flips} |", flush=True)


if __name__ == "__main__":
    main()
