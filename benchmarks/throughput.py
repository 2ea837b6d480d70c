"""Training throughput: images/s of the whole training step, binary optimizers vs real + Adam.

What is timed is the training library's own jitted step, `binax.train.make_program(...)
.train_step` (forward, backward, optimizer update, flip counting and the running metrics, as
``binax-train`` runs it), with its state donated as in training. Candidates, all on the same
architecture and batch:

- every binary optimizer of `binax.train.optim` (bop, bop2nd_order, sgdat, diode, cema) and the
  latent-weight baseline (Adam on latent kernels + `binax.clip_latent`), each with the training
  command's default hyperparameters and Adam on the real-valued parameters;
- ``real``: an ordinary float network with the same layout (`FloatBinaryNet`,
  `FloatResNet18`: `flax.nnx.Conv` with zero ``'SAME'`` padding, `flax.nnx.Linear`, BatchNorm,
  ReLU activations where the binary networks binarize), every parameter trained by Adam, run by
  the same training step. It uses none of binax's layers: it is the float network a binary one
  is compared with.

The inputs are a fixed random batch of 32x32x3 images (CIFAR-10's shape; the data pipeline is
not timed). Models: BinaryNet (Bop paper widths 128-128-P-256-256-P-512-512-P-1024-1024 scaled by
``--binarynet-width``) and the Bi-Real-style binary ResNet-18 (first stage ``--resnet-width``
channels, 64 in ResNet-18, CIFAR stem). On 2 CPU cores a step of the published widths at
batch 256 takes tens of seconds and compiling each candidate about a minute, so the default is
half the published widths for all candidates, and the published widths are timed for Bop and
the real-valued baseline alone (the optimizer update is a negligible part of such a step).

After compilation and ``--warmup`` steps, ``--rounds`` rounds are timed; in each round every
candidate takes one step in turn (interleaved, so a change in machine load hits all of them
alike). Reported: median images/s (and the interquartile range of the step time) and the ratio
to ``real`` of the same model.

Usage::

    # all candidates, half widths (BinaryNet x0.5, ResNet-18 width 32), batch 256, 5 rounds
    python benchmarks/throughput.py
    # published widths (BinaryNet x1, ResNet-18 width 64), Bop vs real, batch 256, 3 rounds
    python benchmarks/throughput.py --published
    # smoke test: bop, sgdat, real; BinaryNet x1/16, ResNet-18 width 4, batch 64, 3 rounds
    python benchmarks/throughput.py --quick
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

from binax.models import _common as layout  # noqa: E402
from binax.models.binarynet import CONV_PLAN, DENSE_PLAN  # noqa: E402
from binax.models.resnet import BLOCKS_PER_STAGE, STAGES  # noqa: E402
from binax.train import Config, make_mesh, make_program, optim  # noqa: E402
from binax.train import model as train_model  # noqa: E402

CANDIDATES = ("bop", "bop2nd_order", "sgdat", "diode", "cema", "latent", "real")
INPUT_SHAPE = (32, 32, 3)
NUM_CLASSES = 10


class FloatBinaryNet(nnx.Module):
    """BinaryNet's layout as an ordinary float CNN: conv (zero padding) [-> pool] -> BN, ReLU."""

    def __init__(self, input_shape, num_classes, *, width_multiplier, rngs):
        height, width, features = input_shape
        convs, norms, pools = [], [], []
        for item in CONV_PLAN:
            if item == "P":
                pools[-1] = True
                height, width = height // 2, width // 2
                continue
            out = layout.scaled(item, width_multiplier)
            convs.append(nnx.Conv(features, out, (3, 3), padding="SAME", use_bias=False, rngs=rngs))
            norms.append(nnx.BatchNorm(out, use_scale=False, rngs=rngs))
            pools.append(False)
            features = out
        sizes = [layout.scaled(d, width_multiplier) for d in DENSE_PLAN] + [num_classes]
        dense, dense_norms = [], []
        features = height * width * features
        for out in sizes:
            dense.append(nnx.Linear(features, out, use_bias=False, rngs=rngs))
            dense_norms.append(nnx.BatchNorm(out, use_scale=False, rngs=rngs))
            features = out
        self.convs, self.norms, self.pools = nnx.List(convs), nnx.List(norms), tuple(pools)
        self.dense, self.dense_norms = nnx.List(dense), nnx.List(dense_norms)

    def __call__(self, x):
        for i, (conv, norm, pool) in enumerate(
            zip(self.convs, self.norms, self.pools, strict=True)
        ):
            x = conv(x if i == 0 else nnx.relu(x))
            if pool:
                x = nnx.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
            x = norm(x)
        x = x.reshape((x.shape[0], -1))
        for layer, norm in zip(self.dense, self.dense_norms, strict=True):
            x = norm(layer(nnx.relu(x)))
        return x


class FloatResNet18(nnx.Module):
    """The Bi-Real ResNet-18 layout (small stem) as an ordinary float network.

    3x3 stem conv and BN; stages of ``width * (1, 2, 4, 8)`` channels, two blocks each, every
    3x3 convolution (zero padding, ReLU input) with its own shortcut; 2x2 average pooling, 1x1
    convolution and BN on the shortcuts that change shape; global average pooling and a dense
    head.
    """

    def __init__(self, input_shape, num_classes, *, width, rngs):
        bn = dict(rngs=rngs)
        self.stem = nnx.Conv(input_shape[-1], width, (3, 3), use_bias=False, rngs=rngs)
        self.stem_bn = nnx.BatchNorm(width, **bn)
        convs, norms, shortcuts, strides = [], [], [], []
        features = width
        for i, mult in enumerate(STAGES):
            out = width * mult
            for j in range(BLOCKS_PER_STAGE):
                stride = 2 if (i > 0 and j == 0) else 1
                for c in range(2):
                    s = stride if c == 0 else 1
                    convs.append(
                        nnx.Conv(features, out, (3, 3), strides=s, use_bias=False, rngs=rngs)
                    )
                    norms.append(nnx.BatchNorm(out, **bn))
                    if features != out or s != 1:
                        shortcuts.append(
                            nnx.Sequential(
                                nnx.Conv(features, out, (1, 1), use_bias=False, rngs=rngs),
                                nnx.BatchNorm(out, **bn),
                            )
                        )
                    else:
                        shortcuts.append(None)
                    strides.append(s)
                    features = out
        self.convs, self.norms = nnx.List(convs), nnx.List(norms)
        self.shortcuts, self.strides = nnx.List(shortcuts), tuple(strides)
        self.head = nnx.Linear(features, num_classes, rngs=rngs)

    def __call__(self, x):
        x = self.stem_bn(self.stem(x))
        for conv, norm, shortcut, s in zip(
            self.convs, self.norms, self.shortcuts, self.strides, strict=True
        ):
            skip = x
            if shortcut is not None:
                if s != 1:
                    skip = nnx.avg_pool(skip, (s, s), strides=(s, s), padding="SAME")
                skip = shortcut(skip)
            x = norm(conv(nnx.relu(x))) + skip
        return self.head(jnp.mean(x, axis=(1, 2)))


def model_kwargs(model: str, args) -> dict:
    if model == "binarynet":
        return {"width_multiplier": args.binarynet_width}
    if model == "resnet18":
        return {"width": args.resnet_width}
    raise ValueError(f"unknown model {model!r}")


class FloatProgram(NamedTuple):
    """The float network's training step, shaped like `binax.train.Program`'s."""

    train_step: Any
    flip_sizes: tuple = ()


def float_program(net, seed: int):
    """(program, state, metrics): the float network trained by Adam(1e-2), one jitted step with
    donated state (the step of `binax.train` without flip counting: there are no binary
    weights), the mean softmax cross-entropy, BatchNorm statistics updated."""
    graphdef, params, rest = nnx.split(net, nnx.Param, ...)
    params, rest = nnx.as_pure(params), nnx.as_pure(rest)
    tx = optax.adam(1e-2)

    def train_step(state, metrics, images, labels):
        params, rest, opt_state = state

        def loss_fn(p):
            model = nnx.merge(graphdef, p, rest)
            logits = model(images)
            new_rest = nnx.as_pure(nnx.state(model, nnx.Not(nnx.Param)))
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, new_rest

        (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), rest, opt_state), metrics + loss

    step_fn = jax.jit(train_step, donate_argnums=(0, 1))
    return FloatProgram(step_fn), (params, rest, tx.init(params)), jnp.zeros((), jnp.float32)


def build(model: str, kwargs: dict, optimizer: str, batch: int, seed: int = 0):
    """(program, state, metrics, images, labels) as `binax.train.train` would set them up."""
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(batch, *INPUT_SHAPE)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, batch).astype(np.int32)
    if optimizer == "real":
        cls = FloatBinaryNet if model == "binarynet" else FloatResNet18
        net = cls(INPUT_SHAPE, NUM_CLASSES, rngs=nnx.Rngs(seed), **kwargs)
        program, state, metrics = float_program(net, seed)
        return [program, state, metrics, jnp.asarray(images), jnp.asarray(labels)]
    mesh = make_mesh(1)
    config = Config(model=model, model_kwargs=kwargs, optimizer=optimizer, seed=seed)
    net, init_params = train_model.create(config, INPUT_SHAPE, NUM_CLASSES)
    hp = optim.recipe(optimizer).resolve()
    program = make_program(
        net,
        lambda labels: optim.make_optimizer(
            optimizer,
            hp,
            "adam",
            1e-2,
            labels,
            seed=seed,
            steps_per_epoch=1000,
            total_steps=100_000,
        ),
        mesh,
        init_params=init_params,
    )
    images = jax.device_put(images, program.batch_sharding)
    labels = jax.device_put(labels, program.batch_sharding)
    return [program, program.init_state(), program.zero_metrics(), images, labels]


def step(run):
    program, state, metrics, images, labels = run
    run[1], run[2] = program.train_step(state, metrics, images, labels)
    jax.block_until_ready(run[1])


def bench_model(
    model: str, kwargs: dict, candidates, batch: int, warmup: int, rounds: int, log=print
):
    runs, compile_s, n_params = {}, {}, {}
    for name in candidates:
        t0 = time.perf_counter()
        runs[name] = build(model, kwargs, name, batch)
        step(runs[name])  # compiles
        compile_s[name] = time.perf_counter() - t0
        program, state = runs[name][0], runs[name][1]
        n_params[name] = sum(program.flip_sizes) or sum(  # the float network: all its kernels
            int(np.size(x)) for x in jax.tree.leaves(state[0]) if np.ndim(x) >= 2
        )
        log(f"  {model} {name}: built and compiled in {compile_s[name]:.1f}s")
    for _ in range(warmup):
        for name in candidates:
            step(runs[name])
    times = {name: [] for name in candidates}
    for r in range(rounds):
        for name in candidates:
            t0 = time.perf_counter()
            step(runs[name])
            times[name].append(time.perf_counter() - t0)
        log(
            f"  {model} round {r + 1}/{rounds}: "
            + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in candidates)
        )
    rows = []
    real_med = _common.median_iqr(times["real"])[0] if "real" in times else None
    for name in candidates:
        med, q1, q3 = _common.median_iqr(times[name])
        rows.append(
            dict(
                model=model,
                model_kwargs=kwargs,
                optimizer=name,
                batch=batch,
                kernel_weights=n_params[name],
                rounds=rounds,
                step_s=times[name],
                median_step_s=med,
                q1_step_s=q1,
                q3_step_s=q3,
                images_per_s=batch / med,
                vs_real=(real_med / med) if real_med else None,
                compile_s=compile_s[name],
            )
        )
    return rows


def table(rows) -> str:
    head = (
        "model",
        "optimizer",
        "kernel weights",
        "median step s (IQR)",
        "images/s",
        "x real (images/s ratio)",
    )
    out = []
    for r in rows:
        width = ", ".join(f"{k}={v}" for k, v in r["model_kwargs"].items())
        out.append(
            (
                f"{r['model']} ({width})",
                r["optimizer"],
                f"{r['kernel_weights']:,}",
                f"{r['median_step_s']:.3f} ({r['q1_step_s']:.3f}-{r['q3_step_s']:.3f})",
                f"{r['images_per_s']:.1f}",
                "-" if r["vs_real"] is None else f"{r['vs_real']:.2f}",
            )
        )
    return _common.md_table(head, out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--models", nargs="+", default=["binarynet", "resnet18"], choices=["binarynet", "resnet18"]
    )
    p.add_argument("--optimizers", nargs="+", default=list(CANDIDATES), choices=CANDIDATES)
    p.add_argument(
        "--binarynet-width",
        type=float,
        default=0.5,
        help="BinaryNet width multiplier (1.0: the published 128..1024 widths)",
    )
    p.add_argument(
        "--resnet-width",
        type=int,
        default=32,
        help="ResNet-18 first-stage width (64: the published width)",
    )
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after compilation")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (one step each)")
    p.add_argument(
        "--published",
        action="store_true",
        help="published widths (BinaryNet x1, ResNet-18 width 64), bop and real, "
        "1 warm-up, 3 rounds",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="bop, sgdat, real; BinaryNet x1/16, ResNet-18 width 4, batch 64, 1 warm-up, 3 rounds",
    )
    p.add_argument(
        "--out",
        default=None,
        help="write <out>.md and <out>.json (default: benchmarks/results/"
        "throughput[_published|_quick])",
    )
    args = p.parse_args(argv)
    if args.published:
        args.binarynet_width, args.resnet_width, args.warmup, args.rounds = 1.0, 64, 1, 3
        args.optimizers = ["bop"]
    if args.quick:
        args.binarynet_width, args.resnet_width, args.batch_size = 1 / 16, 4, 64
        args.warmup, args.rounds, args.optimizers = 1, 3, ["bop", "sgdat"]
    if "real" not in args.optimizers:
        args.optimizers.append("real")
    out = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)),
        "results",
        "throughput_quick"
        if args.quick
        else "throughput_published"
        if args.published
        else "throughput",
    )
    header = (
        "# Training throughput (images/s of the jitted training step)\n\n"
        f"Command: `{_common.command()}`. Writes `{os.path.basename(out)}.md` (this table) "
        f"and `{os.path.basename(out)}.json` (every timed step). Other settings: "
        "`python benchmarks/throughput.py` (all candidates, half widths), `--published` "
        "(published widths, bop vs real), `--quick` (smoke test).\n\n"
        f"Started {_common.now()} on: {_common.machine()}\n\n"
        f"Batch {args.batch_size} of random 32x32x3 images, 10 classes; the training library's "
        "own step (`binax.train.make_program(...).train_step`: forward, backward, optimizer "
        "update, flip and metric accumulation), state donated; compiled, "
        f"{args.warmup} warm-up step(s), then {args.rounds} timed rounds with every candidate "
        "stepping once per round, interleaved. `real`: an ordinary float network of the same "
        "layout (flax.nnx.Conv with zero padding, ReLU, BatchNorm; none of binax's layers), "
        "every parameter trained by Adam. Binary optimizers use `binax.train`'s defaults and "
        "Adam(1e-2) on the real-valued parameters. `x real` = images/s of the row / images/s "
        "of `real` for the same model, from the medians of the same run.\n"
    )
    print(header, flush=True)
    rows = []
    for model in args.models:
        kwargs = model_kwargs(model, args)
        rows += bench_model(
            model,
            kwargs,
            args.optimizers,
            args.batch_size,
            args.warmup,
            args.rounds,
            log=lambda s: print(s, flush=True),
        )
        text = header + "\n" + table(rows) + "\n"
        _common.write_text(out + ".md", text)
        _common.write_json(
            out + ".json",
            {"command": _common.command(), "machine": _common.machine(), "rows": rows},
        )
        print(table([r for r in rows if r["model"] == model]), flush=True)
    text = header + "\n" + table(rows) + f"\n\nFinished {_common.now()}; {_common.machine()}\n"
    _common.write_text(out + ".md", text)
    print(f"wrote {out}.md and {out}.json")


if __name__ == "__main__":
    main()
