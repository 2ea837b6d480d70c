"""Does the device wait for the host? The train step fed by the input pipeline vs a resident batch.

    python benchmarks/input_pipeline.py [--rounds 5] [--steps 20]

For two settings of ``binax-train`` (the MLP on digits, no augmentation; BinaryNet x0.25 on
CIFAR-shaped 32x32x3 images with the crop-and-flip augmentation), times per step, interleaved
in rounds so that other load on the machine cancels in the ratios:

- ``pipeline``: what ``binax-train`` runs: `InputPipeline.train_batches` (shuffle, per-process
  rows, augmentation, normalisation, host-to-device) feeding the jitted train step;
- ``resident``: the same step on one batch already on the device (no host work at all);
- ``host only``: `InputPipeline.train_batches` alone (no step);
- ``grain host only``: the same batches built with Grain (``grain.MapDataset``: shuffle by
  seed, batch, the same augmentation as a map), to compare the host side with the JAX
  ecosystem's loader (skipped without ``grain``).

Prints the CPU model and the medians; ``pipeline / resident`` near 1 means the device does not
wait for the host.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from _common import cpu_model  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from binax import data as bdata  # noqa: E402
from binax.train import input_pipeline, make_mesh, make_program, model, optim  # noqa: E402


def setting(name: str, batch: int, steps: int):
    mesh = make_mesh(1)
    sharding = NamedSharding(mesh, P("data"))
    if name == "mlp-digits":
        train = bdata.load("digits", "train")
        test = bdata.load("digits", "test")
        net, kw, augment = "mlp", {}, False
    else:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (batch * steps * 2, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, len(images)).astype(np.int32)
        stats = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
        train = bdata.Dataset("synthetic", "train", images, labels, 10, *stats)
        test = train
        net, kw, augment = "binarynet", {"width_multiplier": 0.25}, True
    data = input_pipeline.InputPipeline(train, test, augment, batch, batch, steps, 0, sharding)
    m = model.build_model(net, kw, train.images.shape[1:], 10, 0)
    hp = optim.recipe("bop").resolve()
    program = make_program(
        m,
        lambda labels: optim.make_optimizer(
            "bop", hp, "adam", 1e-2, labels, seed=0, steps_per_epoch=steps, total_steps=steps
        ),
        mesh,
    )
    return data, program


def grain_batches(data, epoch):
    import grain

    ds = data.train_set

    def augment(batch):
        images, idx = batch["images"], batch["index"]
        if data.augment:
            images = bdata.random_crop_flip(images, data.seed, epoch, idx)
            images = bdata.normalize(images, ds.mean, ds.std, ds.max_value)
        return images, batch["labels"]

    source = grain.MapDataset.range(len(ds)).map(
        lambda i: {"images": ds.images[i], "labels": ds.labels[i], "index": i}
    )
    pipeline = source.shuffle(seed=data.seed + epoch).batch(data.batch_size, drop_remainder=True)
    pipeline = pipeline.map(augment)
    for i, b in enumerate(pipeline):
        if i == data.steps_per_epoch:
            break
        yield b


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args()
    try:
        import grain  # noqa: F401

        has_grain = True
    except ImportError:
        has_grain = False
        print("grain not installed: the grain row is skipped (pip install grain)")
    print(f"CPU: {cpu_model()}; JAX {jax.__version__}, {jax.devices()[0].platform}")
    for name in ("mlp-digits", "binarynet-x0.25-cifar-shaped-augmented"):
        data, program = setting(name, args.batch_size, args.steps)
        state, metrics = program.init_state(), program.zero_metrics()
        first = next(data.train_batches(0))
        state, metrics = program.train_step(state, metrics, *first)  # compile
        jax.block_until_ready(state)
        times = {"pipeline": [], "resident": [], "host only": []}
        if has_grain:
            times["grain host only"] = []
        for r in range(args.rounds):
            t = time.perf_counter()
            for images, labels in data.train_batches(r):
                state, metrics = program.train_step(state, metrics, images, labels)
            jax.block_until_ready(state)
            times["pipeline"].append((time.perf_counter() - t) / args.steps)
            t = time.perf_counter()
            for _ in range(args.steps):
                state, metrics = program.train_step(state, metrics, *first)
            jax.block_until_ready(state)
            times["resident"].append((time.perf_counter() - t) / args.steps)
            t = time.perf_counter()
            for b in data.train_batches(r):
                jax.block_until_ready(b)
            times["host only"].append((time.perf_counter() - t) / args.steps)
            if has_grain:
                t = time.perf_counter()
                for _ in grain_batches(data, r):
                    pass
                times["grain host only"].append((time.perf_counter() - t) / args.steps)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"\n{name}: batch {args.batch_size}, {args.steps} steps x {args.rounds} rounds")
        for k, v in med.items():
            print(f"  {k:<16} {1e3 * v:8.3f} ms/step   x resident {v / med['resident']:.2f}")
        ratios = [a / b for a, b in zip(times["pipeline"], times["resident"], strict=True)]
        print(f"  pipeline / resident per round: {', '.join(f'{x:.2f}' for x in ratios)}")


if __name__ == "__main__":
    main()
