"""Optimizer step cost: one `update` + `apply_updates` on N binary weights, side by side.

For every binax optimizer, `optax.sgd`, `optax.adam` and the latent-weight baseline (Adam +
`binax.clip_latent`) this times one jitted step ``(params, state, grads) -> (params, state)``
with params and state donated (updated in place, as in training). Each optimizer is also compared
with its *memory-bound floor*: a jitted elementwise kernel that reads and writes exactly the bytes
the optimizer has to (gradients and params read, params written, every per-weight state array
read and written), doing one add each.

Each optimizer runs interleaved, round after round, with its floor, `optax.sgd` and
`optax.adam` in one process; the table gives medians and the ratios within each group. Usage::

    python benchmarks/optimizer_step.py               # 1M, 10M, 100M weights
    python benchmarks/optimizer_step.py --quick       # 1M, 10M
    python benchmarks/optimizer_step.py --sizes 1e6 --rounds 30 --json out.json
    python benchmarks/optimizer_step.py --sizes 1e7 --leaves 20   # a tree of 20 arrays
    python benchmarks/optimizer_step.py --tree vit    # a binary transformer's parameter tree

``--tree vit`` times the step on the parameters of `binax.models.BinaryViT` (binary kernels and
the many small real leaves of a transformer: scales, thresholds, biases, LayerNorms), as training
runs it: ``binax.partition(optimizer, optax.adam, is_binary=model)``. Each optimizer is compared,
interleaved, with the same partitioned optimizer on a *flat* tree of the same sizes (one binary
and one real array: the cost of the tree's many leaves is the ratio), and with `optax.adam` and
`optax.sgd` on the whole tree; its ratios are medians of per-round ratios (the runs of one
round share the machine's load). Two rows wrap the binary optimizer in `optax.flatten` (one
concatenated vector instead of one array per leaf).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import binax

# The optimizers timed with --tree (the narrow-state variants are about memory on large arrays).
TREE_CANDIDATES = ("bop", "bop2nd_order", "sgdat", "diode", "cema", "latent adam+clip")

# The --tree vit configurations: (name, BinaryViT keyword arguments).
VIT_TREES = (
    ("vit-fmnist", dict(input_shape=(28, 28, 1), features=64, depth=4, num_heads=4)),
    ("vit-tiny", dict(input_shape=(32, 32, 3), features=192, depth=12, num_heads=3)),
)


def cpu_model():
    """The CPU's model name (from /proc/cpuinfo), or what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def candidates():
    """name -> optimizer for the binary weights (all with their default hyperparameters)."""
    return {
        "bop": binax.bop(),
        "bop2nd_order": binax.bop2nd_order(),
        "bop2nd_order/adam": binax.bop2nd_order(bias_correction="adam"),
        "sgdat": binax.sgdat(),
        "sgdat/momentum": binax.sgdat(momentum=0.9),
        "diode": binax.diode(),
        "cema": binax.cema(gamma=1e-3, alpha=1e-2),
        "bop/bf16-state": binax.bop(state_dtype=jnp.bfloat16),
        "bop/bf16-stochastic": binax.bop(state_dtype=jnp.bfloat16, rounding="stochastic"),
        "bop2nd_order/bf16-state": binax.bop2nd_order(state_dtype=jnp.bfloat16),
        "sgdat/int8-counts": binax.sgdat(count_dtype=jnp.int8),
        "sgdat/bf16+int8": binax.sgdat(state_dtype=jnp.bfloat16, count_dtype=jnp.int8),
        "latent adam+clip": optax.chain(optax.adam(1e-3), binax.clip_latent(1.0)),
    }


def per_weight_dtypes(state, leaves):
    """The dtypes of the per-weight state arrays (one per array kind, not per leaf)."""
    arrays = [x for x in jax.tree.leaves(state) if x.ndim]  # grouped by kind, then by leaf
    return [x.dtype for x in arrays[::leaves]]


def make_step(tx):
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1))


def make_floor():
    """Reads grads, params and each state tree; writes params and the state trees."""

    def floor(params, state, grads):
        out = [jax.tree.map(lambda s, g: s + g.astype(s.dtype), s, grads) for s in state]
        return jax.tree.map(jnp.add, params, grads), out

    return jax.jit(floor, donate_argnums=(0, 1))


def time_interleaved(runs, rounds, raw=False):
    """Median seconds per step of each run, all run round-robin (side by side).

    With ``raw=True`` the per-round times (lists in round order) instead of their medians.
    """
    for r in runs.values():  # compile and warm up
        for _ in range(2):
            r[1], r[2] = r[0](r[1], r[2], r[3])
        jax.block_until_ready(r[1])
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, r in runs.items():
            t0 = time.perf_counter()
            r[1], r[2] = r[0](r[1], r[2], r[3])
            jax.block_until_ready((r[1], r[2]))
            times[name].append(time.perf_counter() - t0)
    if raw:
        return times
    return {name: statistics.median(t) for name, t in times.items()}


def bench(size, rounds, leaves=1, seed=0):
    """For each optimizer, times it side by side with its floor, optax.sgd and optax.adam.

    The ``size`` weights are split into ``leaves`` arrays of (nearly) equal size: one leaf
    measures bandwidth, many leaves (a real network has tens) add the per-leaf costs.
    Groups of four keep memory bounded (at 1e8 weights every array is 400 MB) while each ratio
    still compares runs interleaved round by round in the same minutes.
    """
    rng = np.random.default_rng(seed)
    sizes = [len(c) for c in np.array_split(np.arange(size), leaves)]
    w = [jnp.asarray(np.where(rng.random(n) < 0.5, -1.0, 1.0), jnp.float32) for n in sizes]
    g = [jnp.asarray(rng.normal(size=n).astype(np.float32) * 1e-3) for n in sizes]
    copy = lambda tree: jax.tree.map(jnp.array, tree)  # noqa: E731
    rows = []
    for name, tx in candidates().items():
        group = {"optax.sgd": optax.sgd(1e-2), "optax.adam": optax.adam(1e-3), name: tx}
        runs = {k: [make_step(t), copy(w), t.init(w), g] for k, t in group.items()}
        dtypes = per_weight_dtypes(runs[name][2], leaves)
        floor_state = [[jnp.zeros(n, d) for n in sizes] for d in dtypes]
        runs["floor"] = [make_floor(), copy(w), floor_state, g]
        med = time_interleaved(runs, rounds)
        state = runs[name][2]
        state_bytes = sum(x.nbytes for x in jax.tree.leaves(state)) / size
        moved = 4 + 4 + 4 + 2 * sum(d.itemsize for d in dtypes)  # g, w in; w out
        rows.append(
            dict(
                optimizer=name,
                size=size,
                leaves=leaves,
                median_ms=1e3 * med[name],
                floor_ms=1e3 * med["floor"],
                vs_floor=med[name] / med["floor"],
                vs_adam=med[name] / med["optax.adam"],
                vs_sgd=med[name] / med["optax.sgd"],
                state_bytes_per_weight=state_bytes,
                bytes_moved_per_weight=moved,
                gbps=moved * size / med[name] / 1e9,
            )
        )
        del runs
    return rows


def paired_ratio(times, other):
    """Median over rounds of ``times[i] / other[i]`` (one round's runs share the machine's load)."""
    return statistics.median(a / b for a, b in zip(times, other, strict=True))


def vit_tree(kwargs, seed=0):
    """Random params, gradients and binary labels with the structure of a BinaryViT's params."""
    from flax import nnx

    model = nnx.eval_shape(lambda: binax.models.BinaryViT(**kwargs, rngs=nnx.Rngs(0)))
    labels = binax.nn.binary_labels(model)
    shapes = nnx.as_pure(nnx.state(model, nnx.Param))
    rng = np.random.default_rng(seed)
    params = jax.tree.map(
        lambda s, b: jnp.asarray(
            np.where(rng.random(s.shape) < 0.5, -1.0, 1.0) if b else rng.normal(size=s.shape),
            jnp.float32,
        ),
        shapes,
        labels,
    )
    grads = jax.tree.map(
        lambda p: jnp.asarray(rng.normal(size=p.shape) * 1e-3, jnp.float32), params
    )
    return params, grads, labels


def bench_tree(name, kwargs, rounds, seed=0):
    """Each optimizer, partitioned over a ViT's tree, against the flat tree, Adam and SGD."""
    params, grads, labels = vit_tree(kwargs, seed)
    flags, ps = jax.tree.leaves(labels), jax.tree.leaves(params)
    n_binary = sum(p.size for p, b in zip(ps, flags, strict=True) if b)
    n_real = sum(p.size for p, b in zip(ps, flags, strict=True) if not b)
    rng = np.random.default_rng(seed)
    flat = {
        "binary": jnp.asarray(np.where(rng.random(n_binary) < 0.5, -1.0, 1.0), jnp.float32),
        "real": jnp.asarray(rng.normal(size=n_real), jnp.float32),
    }
    flat_grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), flat)
    flat_labels = {"binary": True, "real": False}
    copy = lambda tree: jax.tree.map(jnp.array, tree)  # noqa: E731
    rows = []
    txs = {k: v for k, v in candidates().items() if k in TREE_CANDIDATES}
    # optax.flatten runs the binary optimizer on one concatenated vector: fewer, larger kernels.
    txs["bop/optax.flatten"] = optax.flatten(binax.bop())
    txs["diode/optax.flatten"] = optax.flatten(binax.diode())
    for opt, tx in txs.items():
        tree_tx = binax.partition(tx, optax.adam(1e-3), is_binary=labels)
        flat_tx = binax.partition(tx, optax.adam(1e-3), is_binary=flat_labels)
        group = {"optax.sgd": optax.sgd(1e-2), "optax.adam": optax.adam(1e-3), opt: tree_tx}
        runs = {k: [make_step(t), copy(params), t.init(params), grads] for k, t in group.items()}
        runs["flat"] = [make_step(flat_tx), copy(flat), flat_tx.init(flat), flat_grads]
        times = time_interleaved(runs, rounds, raw=True)
        med = {k: statistics.median(t) for k, t in times.items()}
        ratio = lambda other, t=times, o=opt: paired_ratio(t[o], t[other])  # noqa: E731
        rows.append(
            dict(
                tree=name,
                optimizer=opt,
                leaves=len(ps),
                binary_leaves=sum(flags),
                binary_weights=n_binary,
                real_weights=n_real,
                median_ms=1e3 * med[opt],
                flat_ms=1e3 * med["flat"],
                vs_flat=ratio("flat"),
                vs_adam=ratio("optax.adam"),
                vs_sgd=ratio("optax.sgd"),
                adam_ms=1e3 * med["optax.adam"],
            )
        )
        del runs
    return rows


def tree_table(rows):
    r0 = rows[0]
    lines = [
        f"{r0['tree']}: {r0['leaves']} leaves ({r0['binary_leaves']} binary), "
        f"{r0['binary_weights']:,} binary and {r0['real_weights']:,} real weights",
        "",
        "| optimizer (+ adam for real leaves) | median ms | flat-tree ms | x flat | x adam "
        "| x sgd | adam ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['optimizer']} | {r['median_ms']:.3f} | {r['flat_ms']:.3f} | {r['vs_flat']:.2f} "
            f"| {r['vs_adam']:.2f} | {r['vs_sgd']:.2f} | {r['adam_ms']:.3f} |"
        )
    return "\n".join(lines)


def table(rows):
    head = (
        "optimizer",
        "N",
        "median ms",
        "floor ms",
        "x floor",
        "x adam",
        "x sgd",
        "state B/w",
        "moved B/w",
        "GB/s",
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(
            f"| {r['optimizer']} | {r['size']:.0e} | {r['median_ms']:.2f} | {r['floor_ms']:.2f} "
            f"| {r['vs_floor']:.2f} | {r['vs_adam']:.2f} | {r['vs_sgd']:.2f} "
            f"| {r['state_bytes_per_weight']:.1f} | {r['bytes_moved_per_weight']} "
            f"| {r['gbps']:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--sizes",
        type=float,
        nargs="+",
        default=[1e6, 1e7, 1e8],
        help="numbers of binary weights (default: 1e6 1e7 1e8)",
    )
    p.add_argument("--rounds", type=int, default=20, help="timed rounds per size (default 20)")
    p.add_argument(
        "--leaves",
        type=int,
        default=1,
        help="split the weights into this many arrays (default 1; a ResNet-18 has 20 binary)",
    )
    p.add_argument(
        "--tree",
        choices=["vit"],
        help="time on a model's parameter tree instead of --sizes/--leaves: 'vit' (BinaryViT "
        "trees: " + ", ".join(n for n, _ in VIT_TREES) + ")",
    )
    p.add_argument("--quick", action="store_true", help="sizes 1e6 1e7, 10 rounds")
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    sizes, rounds = ([1e6, 1e7], 10) if args.quick else (args.sizes, args.rounds)
    dev = jax.devices()[0]
    layout = f"tree {args.tree}" if args.tree else f"weights in {args.leaves} array(s)"
    print(
        f"# {cpu_model()}; {dev.platform} {dev.device_kind}, {jax.device_count()} device(s), "
        f"{platform.machine()}, jax {jax.__version__}, optax {optax.__version__}, "
        f"rounds {rounds}, {layout}"
    )
    rows = []
    if args.tree:
        for name, kwargs in VIT_TREES[:1] if args.quick else VIT_TREES:
            rows += bench_tree(name, kwargs, rounds)
            print(tree_table([r for r in rows if r["tree"] == name]), flush=True)
        sizes = []
    for size in sizes:
        rows += bench(int(size), rounds, args.leaves)
        print(table([r for r in rows if r["size"] == int(size)]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
