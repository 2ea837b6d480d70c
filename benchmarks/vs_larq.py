"""Training speed side by side: binax and Larq on the same binary networks, interleaved.

Each model is built twice, by binax (Flax NNX, `binax.models`) and by Larq (Keras), with the same
layer order, widths, quantizers, padding values, BatchNorm settings and optimizers (Bop on the
binary kernels, Adam(1e-2) on everything else, as `lq.optimizers.CaseOptimizer` and
`binax.partition` split them), and trained on the same fixed random batch (the data pipeline is
not timed). What is timed is one training step: binax's own jitted step with donated state
(`binax.train.make_program(...).train_step`, as ``binax-train`` runs it, flip counting and
metrics included) against Keras's ``model.train_on_batch``. After compilation and ``--warmup``
steps on both sides, ``--rounds`` rounds are timed; in each round every model takes one binax
step and one Larq step, alternating which goes first, so a change in machine load hits both
alike. Reported: median images/s of each side and their ratio binax / Larq.

Both sides run with glibc's malloc as the environment gives it. ``--malloc huge-pages`` runs
both on transparent huge pages instead (``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, as
``binax-train`` runs, `binax._malloc`: the benchmark restarts itself with it and the Larq
worker inherits it).

Models:

- ``binarynet``: the Bop paper's BinaryNet (128-128-P-256-256-P-512-512-P-1024-1024-10, every
  kernel binary, sign activations, binary inputs padded with +1, BatchNorm without scale after
  every layer) at widths 0.25, 0.5 and 1.0, on 28x28x1 and 32x32x3 inputs. The Larq layout is
  built from binax's own plan (`binax.models.binarynet.CONV_PLAN`, ``DENSE_PLAN``) with
  ``QuantConv2D(pad_values=1.0)`` and ``QuantDense``, kernel quantizer ``ste_sign``.
- ``birealnet``: ``larq_zoo.literature.BiRealNet(weights=None)`` (Bi-Real Net 18: 7x7 stride-2
  stem, 3x3 max pooling, 16 binary 3x3 convolutions each with its own real shortcut, approx_sign
  activations, magnitude-aware sign kernels) against `binax.models.BinaryResNet18` with
  ``stem='imagenet'``, ``input_quantizer='approx_sign'``,
  ``kernel_quantizer='magnitude_aware_sign'`` and BatchNorm momentum 0.8, on 32x32x3 inputs
  by default (``--birealnet-size``; 224 is ImageNet's and far too slow for a small CPU).

Differences that remain (listed in BENCHMARKS.md too): binax applies ``ste_sign`` to Bop's +-1
kernels (Larq: the same quantizer); larq_zoo's Bi-Real convolutions pad binary inputs with zeros
(``pad_values`` left at 0) where binax pads with +1 (binax accepts only +-1 for a binarized
input), larq_zoo ends with a softmax layer (its loss takes probabilities; binax's, logits),
and larq_zoo constrains kernels with ``weight_clip`` and initialises them Glorot-normal (binax:
random signs); magnitude-aware kernels are not integer-valued, so binax multiplies those in
float32.

The Larq side runs in its own virtual environment, in a worker process started with that
environment's python (``--larq-python``); without it the benchmark says so and exits. Make the
environment with::

    python -m venv /work/venvs/larq
    /work/venvs/larq/bin/pip install "larq==0.14.0" tensorflow-cpu "tf-keras==2.21.*"
    /work/venvs/larq/bin/pip install --no-deps larq-zoo==2.3.1 "zookeeper<1.4"

(larq-zoo 2.3.1 declares ``larq<0.13``; it builds its models with Larq 0.14 unchanged. The
worker runs with ``TF_USE_LEGACY_KERAS=1``, so ``tf.keras`` is tf-keras 2.21 as Larq's
optimizers need, points the name ``keras`` at ``tf_keras`` and ``keras.applications.
imagenet_utils`` at the tf-keras module that has the ``obtain_input_shape`` larq-zoo imports,
and sets ``PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python`` for the old tensorflow-datasets that
larq-zoo's zookeeper imports.)

Usage::

    python benchmarks/vs_larq.py --larq-python /work/venvs/larq/bin/python
    # the issue's target only: BinaryNet 28x28x1, widths 0.25 and 0.5
    python benchmarks/vs_larq.py --larq-python /work/venvs/larq/bin/python \\
        --models binarynet --inputs 28x28x1 --widths 0.25 0.5
    # the default path against its ablations, on the target model
    python benchmarks/vs_larq.py --larq-python /work/venvs/larq/bin/python \\
        --models binarynet --inputs 28x28x1 --widths 0.25 --variants patches-kernel-grad \\
        xla-kernel-grad float-forward float-forward-xla-kernel-grad bf16-backward
    # smoke test: BinaryNet 28x28x1 width 0.25, batch 64, 3 rounds
    python benchmarks/vs_larq.py --larq-python /work/venvs/larq/bin/python --quick
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402  (standard library only at import time)

NUM_CLASSES = 10
#: ``--variants``: binax layer settings other than the default (see `binax.nn.BinaryConv`).
VARIANTS = {
    "patches-kernel-grad": {"kernel_grad": "patches"},
    "xla-kernel-grad": {"kernel_grad": "xla"},
    "float-forward": {"arithmetic": "float"},
    "float-forward-xla-kernel-grad": {"arithmetic": "float", "kernel_grad": "xla"},
    "bf16-backward": {"backward_dtype": "bfloat16"},
}
REPLY = "@@vs_larq "  # prefix of the worker's replies (TensorFlow may print on stdout too)


# --- the Larq side (runs in the Larq environment; imports no binax, no JAX) -------------------


def _larq_binarynet(tf, lq, spec):
    """BinaryNet in Keras from the layer list that binax's plan gives (see `_binarynet_spec`)."""
    bn = dict(scale=False, momentum=0.9, epsilon=1e-5)
    common = dict(kernel_quantizer="ste_sign", kernel_constraint=None, use_bias=False)
    x = inputs = tf.keras.Input(tuple(spec["input_shape"]))
    for i, (out, pool) in enumerate(spec["convs"]):
        x = lq.layers.QuantConv2D(
            out,
            (3, 3),
            padding="same",
            input_quantizer=None if i == 0 else "ste_sign",
            pad_values=0.0 if i == 0 else 1.0,
            kernel_initializer="ones",
            **common,
        )(x)
        if pool:
            x = tf.keras.layers.MaxPool2D((2, 2), strides=(2, 2), padding="valid")(x)
        x = tf.keras.layers.BatchNormalization(**bn)(x)
    x = tf.keras.layers.Flatten()(x)
    for out in spec["dense"]:
        x = lq.layers.QuantDense(
            out, input_quantizer="ste_sign", kernel_initializer="ones", **common
        )(x)
        x = tf.keras.layers.BatchNormalization(**bn)(x)
    model = tf.keras.Model(inputs, x)
    rng = __import__("numpy").random.default_rng(spec["seed"])
    for layer in model.layers:  # random signs, as binax initialises binary kernels
        if isinstance(layer, (lq.layers.QuantConv2D, lq.layers.QuantDense)):
            k = layer.kernel
            k.assign(rng.choice([-1.0, 1.0], size=k.shape).astype("float32"))
    return model, True


def _larq_birealnet(tf, lq, spec):
    import larq_zoo

    model = larq_zoo.literature.BiRealNet(
        weights=None, input_shape=tuple(spec["input_shape"]), num_classes=NUM_CLASSES
    )
    return model, False  # ends with a softmax: the loss takes probabilities


def worker() -> None:
    """Builds and steps Larq models on request: one JSON object per line on stdin/stdout."""
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import tensorflow as tf
    import tf_keras

    sys.modules.setdefault("keras", tf_keras)  # larq-zoo imports Keras 2 as `keras`
    from tf_keras.src.applications import imagenet_utils

    sys.modules["keras.applications.imagenet_utils"] = imagenet_utils  # has obtain_input_shape
    import larq as lq

    models = {}

    def reply(obj):
        sys.stdout.write(REPLY + json.dumps(obj) + "\n")
        sys.stdout.flush()

    reply(
        {
            "larq": lq.__version__,
            "tensorflow": tf.__version__,
            "keras": tf.keras.__version__ if hasattr(tf.keras, "__version__") else "?",
        }
    )
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["cmd"] == "build":
            spec = msg["spec"]
            t0 = time.perf_counter()
            tf.keras.utils.set_random_seed(spec["seed"])
            build = _larq_binarynet if spec["model"] == "binarynet" else _larq_birealnet
            model, logits = build(tf, lq, spec)
            optimizer = lq.optimizers.CaseOptimizer(
                (
                    lq.optimizers.Bop.is_binary_variable,
                    lq.optimizers.Bop(threshold=spec["threshold"], gamma=spec["gamma"]),
                ),
                default_optimizer=tf.keras.optimizers.legacy.Adam(spec["lr"]),
            )
            model.compile(
                optimizer=optimizer,
                loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=logits),
            )
            rng = np.random.default_rng(spec["seed"])
            images = rng.normal(size=(spec["batch"], *spec["input_shape"])).astype(np.float32)
            labels = rng.integers(0, NUM_CLASSES, spec["batch"]).astype(np.int32)
            model.train_on_batch(images, labels)  # traces and compiles the step
            binary = sum(
                int(np.prod(v.shape))
                for v in model.trainable_variables
                if lq.optimizers.Bop.is_binary_variable(v)
            )
            models[msg["name"]] = (model, images, labels)
            reply(
                {
                    "compile_s": time.perf_counter() - t0,
                    "binary_weights": binary,
                    "params": int(model.count_params()),
                }
            )
        elif msg["cmd"] == "step":
            model, images, labels = models[msg["name"]]
            t0, c0 = time.perf_counter(), time.process_time()
            loss = model.train_on_batch(images, labels)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            reply({"s": wall, "cpu_s": cpu, "loss": float(np.asarray(loss))})
        elif msg["cmd"] == "quit":
            return


class LarqWorker:
    """The Larq environment's python, running `worker`, behind a request/reply interface."""

    def __init__(self, python: str, log_path: str):
        env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2")
        # zookeeper (larq-zoo) imports an old tensorflow-datasets whose protobuf modules need
        # the pure-Python protobuf implementation (only imports get slower).
        env["PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"] = "python"
        env.pop("PYTHONPATH", None)
        self.log = open(log_path, "w")  # noqa: SIM115 (lives as long as the worker)
        self.proc = subprocess.Popen(
            [python, os.path.abspath(__file__), "--worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
        )
        self.info = self._read()

    def _read(self):
        for line in self.proc.stdout:
            if line.startswith(REPLY):
                return json.loads(line[len(REPLY) :])
        raise RuntimeError(f"the Larq worker exited; see {self.log.name}")

    def call(self, **msg):
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)
        self.log.close()


# --- the binax side -----------------------------------------------------------------------------


def _binarynet_spec(input_shape, width):
    """(conv (width, pool) list, dense widths) from binax's own BinaryNet plan."""
    from binax.models import _common
    from binax.models.binarynet import CONV_PLAN, DENSE_PLAN

    convs = []
    for item in CONV_PLAN:
        if item == "P":
            convs[-1][1] = True
        else:
            convs.append([_common.scaled(item, width), False])
    dense = [_common.scaled(d, width) for d in DENSE_PLAN] + [NUM_CLASSES]
    return {"convs": convs, "dense": dense}


def binax_program(spec, binax_kwargs):
    import jax
    import numpy as np
    from flax import nnx

    from binax import models
    from binax.train import make_mesh, make_program, optim

    if spec["model"] == "binarynet":
        net = models.BinaryNet(
            tuple(spec["input_shape"]),
            NUM_CLASSES,
            width_multiplier=spec["width"],
            rngs=nnx.Rngs(spec["seed"]),
            **binax_kwargs,
        )
    else:
        net = models.BinaryResNet18(
            tuple(spec["input_shape"]),
            NUM_CLASSES,
            width=64,
            stem="imagenet",
            input_quantizer="approx_sign",
            kernel_quantizer="magnitude_aware_sign",
            bn_momentum=0.8,
            rngs=nnx.Rngs(spec["seed"]),
            **binax_kwargs,
        )
    hp = optim.hparams("bop", {"threshold": spec["threshold"], "gamma": spec["gamma"]})
    program = make_program(
        net,
        lambda labels: optim.make_optimizer(
            "bop", hp, "adam", spec["lr"], labels, seed=0, steps_per_epoch=1000, total_steps=10**5
        ),
        make_mesh(1),
    )
    rng = np.random.default_rng(spec["seed"])
    images = rng.normal(size=(spec["batch"], *spec["input_shape"])).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, spec["batch"]).astype(np.int32)
    images = jax.device_put(images, program.batch_sharding)
    labels = jax.device_put(labels, program.batch_sharding)
    run = [program, program.init_state(), program.zero_metrics(), images, labels]
    binary = sum(program.flip_sizes)
    return run, binary


def binax_step(run) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one training step."""
    import jax

    program, state, metrics, images, labels = run
    t0, c0 = time.perf_counter(), time.process_time()
    run[1], run[2] = program.train_step(state, metrics, images, labels)
    jax.block_until_ready(run[1])
    return time.perf_counter() - t0, time.process_time() - c0


# --- the benchmark ------------------------------------------------------------------------------


def model_specs(args):
    specs = []
    if "binarynet" in args.models:
        for shape in args.inputs:
            for width in args.widths:
                specs.append(
                    {
                        "name": f"binarynet {shape} x{width:g}",
                        "model": "binarynet",
                        "input_shape": [int(s) for s in shape.split("x")],
                        "width": width,
                    }
                )
    if "birealnet" in args.models:
        n = args.birealnet_size
        specs.append(
            {"name": f"birealnet18 {n}x{n}x3", "model": "birealnet", "input_shape": [n, n, 3]}
        )
    for s in specs:
        s.update(batch=args.batch_size, seed=0, threshold=1e-8, gamma=1e-4, lr=1e-2)
        if s["model"] == "binarynet":
            s.update(_binarynet_spec(s["input_shape"], s["width"]))
    return specs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--larq-python", default=None, help="python of the Larq virtual environment")
    p.add_argument(
        "--models",
        nargs="+",
        default=["binarynet", "birealnet"],
        choices=["binarynet", "birealnet"],
    )
    p.add_argument("--inputs", nargs="+", default=["28x28x1", "32x32x3"])
    p.add_argument("--widths", nargs="+", type=float, default=[0.25, 0.5, 1.0])
    p.add_argument("--birealnet-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds (one step per side each)")
    p.add_argument(
        "--pause",
        type=float,
        default=0.5,
        help="seconds of sleep before each timed step (threads of the side that just ran "
        "spin for a while after their work and would slow the other side down)",
    )
    p.add_argument(
        "--variants",
        nargs="+",
        default=[],
        choices=list(VARIANTS),
        help="also time binax with these layer settings (ablations of the default path)",
    )
    p.add_argument(
        "--malloc",
        choices=["huge-pages", "default"],
        default="default",
        help="default: glibc as the environment gives it, both sides; huge-pages: restart with "
        "GLIBC_TUNABLES=glibc.malloc.hugetlb=1, as binax-train runs, for both sides",
    )
    p.add_argument("--quick", action="store_true", help="BinaryNet 28x28x1 x0.25, batch 64")
    p.add_argument("--out", default=None, help="write <out>.md and <out>.json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker()
    if args.larq_python is None or not os.path.exists(args.larq_python):
        print(
            "vs_larq: skipped, no Larq environment (pass --larq-python PATH, the python of a "
            "virtual environment with larq, tensorflow-cpu, tf-keras and larq-zoo; the "
            "docstring of benchmarks/vs_larq.py gives the commands)"
        )
        return 0
    if args.malloc == "huge-pages":
        from binax._malloc import restart_with_huge_pages

        restart_with_huge_pages(
            [os.path.abspath(__file__), *(sys.argv[1:] if argv is None else argv)]
        )
    if args.quick:
        args.models, args.inputs, args.widths = ["binarynet"], ["28x28x1"], [0.25]
        args.batch_size, args.warmup, args.rounds = 64, 1, 3

    out = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)),
        "results",
        "vs_larq_quick" if args.quick else "vs_larq",
    )
    larq = LarqWorker(args.larq_python, os.path.join(tempfile.gettempdir(), "vs_larq_worker.log"))
    header = (
        "# Training speed, binax vs Larq (images/s of one training step, interleaved)\n\n"
        f"Command: `{_common.command()}`\n\n"
        f"Started {_common.now()} on: {_common.machine()}\n\n"
        f"Larq side: larq {larq.info['larq']}, TensorFlow {larq.info['tensorflow']} "
        f"(`{args.larq_python}`, TF_USE_LEGACY_KERAS=1, `train_on_batch`). binax side: its "
        "jitted training step with donated state (`binax.train.make_program`), default "
        f"layer settings. Batch {args.batch_size} of fixed random images, Bop (threshold 1e-8, "
        "gamma 1e-4) on binary kernels and Adam(1e-2) on the rest, both sides; compiled, "
        f"{args.warmup} warm-up steps, then {args.rounds} rounds, each model stepping once per "
        "side per round. `binax / Larq` = ratio of the median images/s.\n"
    )
    print(header, flush=True)
    binax_variants = {"binax": {}}
    for v in args.variants:
        binax_variants[f"binax {v}"] = VARIANTS[v]
    rows = []
    try:
        for spec in model_specs(args):
            runs, info = {}, {}
            for v, kw in binax_variants.items():
                t0 = time.perf_counter()
                runs[v], binary = binax_program(spec, kw)
                binax_step(runs[v])
                info[v] = {"compile_s": time.perf_counter() - t0, "binary_weights": binary}
            info["larq"] = larq.call(cmd="build", name=spec["name"], spec=spec)
            print(f"  {spec['name']}: built and compiled; {json.dumps(info)}", flush=True)
            sides = [*binax_variants, "larq"]

            def step(side, spec=spec, runs=runs):
                time.sleep(args.pause)  # let the other side's idle threads stop spinning
                if side == "larq":
                    r = larq.call(cmd="step", name=spec["name"])
                    return r["s"], r["cpu_s"]
                return binax_step(runs[side])

            for _ in range(args.warmup):
                for side in sides:
                    step(side)
            times = {side: [] for side in sides}
            cpu = {side: [] for side in sides}
            for r in range(args.rounds):
                order = sides if r % 2 == 0 else sides[::-1]
                for side in order:
                    wall, c = step(side)
                    times[side].append(wall)
                    cpu[side].append(c)
                print(
                    f"  {spec['name']} round {r + 1}/{args.rounds}: "
                    + ", ".join(f"{s} {times[s][-1]:.3f}s (CPU {cpu[s][-1]:.3f}s)" for s in sides),
                    flush=True,
                )
            larq_med = _common.median_iqr(times["larq"])[0]
            larq_cpu = _common.median_iqr(cpu["larq"])[0]
            for side in sides:
                med, q1, q3 = _common.median_iqr(times[side])
                cpu_med = _common.median_iqr(cpu[side])[0]
                rows.append(
                    dict(
                        model=spec["name"],
                        side=side,
                        batch=args.batch_size,
                        binary_weights=info[side]["binary_weights"],
                        step_s=times[side],
                        median_step_s=med,
                        q1_step_s=q1,
                        q3_step_s=q3,
                        images_per_s=args.batch_size / med,
                        vs_larq=larq_med / med,
                        cpu_s=cpu[side],
                        median_cpu_s=cpu_med,
                        cpu_vs_larq=larq_cpu / cpu_med,
                        compile_s=info[side]["compile_s"],
                    )
                )
            text = header + "\n" + table(rows) + "\n"
            _common.write_text(out + ".md", text)
            _common.write_json(
                out + ".json",
                {
                    "command": _common.command(),
                    "machine": _common.machine(),
                    "larq": larq.info,
                    "rows": rows,
                },
            )
            print(table([r for r in rows if r["model"] == spec["name"]]), flush=True)
    finally:
        larq.close()
    text = header + "\n" + table(rows) + f"\n\nFinished {_common.now()}; {_common.machine()}\n"
    _common.write_text(out + ".md", text)
    print(f"wrote {out}.md and {out}.json")
    return 0


def table(rows) -> str:
    head = (
        "model",
        "trained by",
        "binary weights",
        "median step s (IQR)",
        "images/s",
        "binax / Larq",
        "CPU s per step",
        "binax / Larq by CPU time",
    )
    body = [
        (
            r["model"],
            r["side"],
            f"{r['binary_weights']:,}",
            f"{r['median_step_s']:.3f} ({r['q1_step_s']:.3f}-{r['q3_step_s']:.3f})",
            f"{r['images_per_s']:.1f}",
            "-" if r["side"] == "larq" else f"{r['vs_larq']:.2f}",
            f"{r['median_cpu_s']:.3f}",
            "-" if r["side"] == "larq" else f"{r['cpu_vs_larq']:.2f}",
        )
        for r in rows
    ]
    return _common.md_table(head, body)


if __name__ == "__main__":
    sys.exit(main())
