"""Inference speed and model size: binax's float forward, `binax.deploy`, and LCE / Keras.

One BinaryNet (the Bop paper layout scaled by ``--width``, 28x28x1 inputs, 10 classes, binary
kernels everywhere, float first-layer input) is timed, side by side and interleaved round by
round, as:

- ``binax float``: the NNX model in eval mode, jitted (`nnx.split` + `jax.jit`), float32;
- ``binax deployed``: `binax.deploy.compile(model)`: kernels bit-packed, BatchNorm + sign
  folded into integer thresholds, binary convolutions as XOR + popcount on activations packed
  32 channels to a word (`binax.deploy.program.Packed`), the dense layers as int8 products with
  int32 accumulation; a large batch runs in cache-sized chunks
  (`binax.deploy.Deployed.batch_chunk`);
- ``binax deployed, int8 convs``: the same with ``Deployed.packed = False``: the convolutions
  as int8 products too (as before packed convolutions);
- ``binax float, chunked``: the float forward run in the same chunks
  (`binax.nn.functional.map_chunks`): how much of the deployed network's lead at batch 256
  comes from chunking alone, which helps XLA:CPU's float convolutions too;
- with ``--lce-python``: the same network (same weights and BatchNorm statistics) built in Larq,
  converted by Larq Compute Engine (`larq_compute_engine.convert_keras_model`) and run by its
  interpreter (``--lce-threads``, default 2), and the float Keras forward
  (``predict_on_batch``), in a worker process of that python. LCE's interpreter runs one image
  at a time (its model has batch 1). TFLite's thread pool suffers badly on an oversubscribed
  machine (load average well above the core count): compare runs at similar load.

The BatchNorm statistics are those of a random batch (so thresholds are not trivial); the check
reports how many predicted classes of each engine agree with the float model on 256 images.

With ``--profile``, the deployed network at batch 256 is also traced (`jax.profiler`) and its
time printed per kind of XLA operation (``ynn_fusion``: the int8 products, which YNNPACK runs;
the loop fusions: the first layer, thresholds and data movement between the products).

Also reported: file sizes (the deployed file, and the float32 parameters and statistics as an
``.npz`` checkpoint), the binary operations per image and GOP/s at batch 256 of the whole
deployed network (binary ops only, so a lower bound) and of its binary layers alone (the
deployed program from the first integer product on, given int8 ±1 inputs: the int8 products,
thresholds and pooling, and the last layer's float BatchNorm), next to the integer throughput
this CPU allows: an int8 matrix product with int32 accumulation (M256 x K4096 x N1024), and
XOR + popcount on uint32-packed words in XLA, the other way to multiply ±1 matrices.

Make the LCE environment (its own venv, never a binax dependency)::

    python -m venv /work/venvs/lce
    /work/venvs/lce/bin/pip install larq-compute-engine "tensorflow-cpu==2.16.*" \\
        "tf-keras==2.16.*" larq

Usage::

    python benchmarks/inference.py --lce-python /work/venvs/lce/bin/python
    python benchmarks/inference.py --quick          # small and short, no peer unless given
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
INPUT_SHAPE = (28, 28, 1)
NUM_CLASSES = 10


# ---------------------------------------------------------------------------------------------
# The peer worker: runs under the LCE python (TensorFlow, Larq, LCE; no JAX, no binax).


def _larq_model(weights: dict, width_plan: list, dense_plan: list):
    import larq as lq
    import tf_keras as keras

    x = inp = keras.Input(INPUT_SHAPE)
    for i, (out, pool) in enumerate(width_plan):
        first = i == 0
        x = lq.layers.QuantConv2D(
            out,
            3,
            padding="same",
            pad_values=0.0 if first else 1.0,
            use_bias=False,
            input_quantizer=None if first else "ste_sign",
            kernel_quantizer="ste_sign",
            kernel_constraint="weight_clip",
        )(x)
        if pool:
            x = keras.layers.MaxPool2D(2)(x)
        x = keras.layers.BatchNormalization(scale=False, epsilon=1e-5)(x)
    x = keras.layers.Flatten()(x)
    for out in dense_plan:
        x = lq.layers.QuantDense(
            out,
            use_bias=False,
            input_quantizer="ste_sign",
            kernel_quantizer="ste_sign",
            kernel_constraint="weight_clip",
        )(x)
        x = keras.layers.BatchNormalization(scale=False, epsilon=1e-5)(x)
    model = keras.Model(inp, x)
    layers = [
        layer
        for layer in model.layers
        if isinstance(
            layer,
            (lq.layers.QuantConv2D, lq.layers.QuantDense, keras.layers.BatchNormalization),
        )
    ]
    for i, layer in enumerate(layers):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.set_weights([weights[f"{i}_bias"], weights[f"{i}_mean"], weights[f"{i}_var"]])
        else:
            layer.set_weights([weights[f"{i}_kernel"]])
    return model


def worker(spec_path: str) -> None:
    """Reads commands on stdin, one JSON per line; answers one JSON line each."""
    import larq_compute_engine as lce
    import tensorflow as tf
    from larq_compute_engine.tflite.python.interpreter import Interpreter

    tf.config.threading.set_inter_op_parallelism_threads(2)
    tf.config.threading.set_intra_op_parallelism_threads(2)
    with open(spec_path) as f:
        spec = json.load(f)
    weights = dict(np.load(spec["weights"]))
    model = _larq_model(weights, spec["width_plan"], spec["dense_plan"])
    flatbuffer = lce.convert_keras_model(model)
    interpreter = Interpreter(flatbuffer, num_threads=spec["lce_threads"])
    images = np.load(spec["images"])
    engines = {
        "lce": lambda x: interpreter.predict(x),
        "keras": lambda x: model.predict_on_batch(x),
    }
    out = {
        "ready": True,
        "lce_bytes": len(flatbuffer),
        "versions": f"tensorflow {tf.__version__}, larq-compute-engine {lce.__version__}",
        "logits": {k: np.asarray(f(images)).tolist() for k, f in engines.items()},
    }
    print(json.dumps(out), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        x = images[: cmd["batch"]]
        f = engines[cmd["engine"]]
        f(x)
        times = []
        for _ in range(cmd["reps"]):
            t0 = time.perf_counter()
            f(x)
            times.append(time.perf_counter() - t0)
        print(json.dumps({"times": times}), flush=True)


# ---------------------------------------------------------------------------------------------
# The main process (JAX, binax)


def _model(width: float, seed: int = 0):
    import jax
    from flax import nnx

    from binax import models

    model = models.get(
        "binarynet",
        input_shape=INPUT_SHAPE,
        num_classes=NUM_CLASSES,
        width_multiplier=width,
        rngs=nnx.Rngs(seed),
    )
    # Running statistics of one random batch (momentum 0), so thresholds are not trivial.
    norms = [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)]
    for n in norms:
        n.momentum = 0.0
    model.train()
    model(jax.random.normal(jax.random.key(seed + 1), (256, *INPUT_SHAPE)))
    model.eval()
    return model


def _peer_files(model, directory: str, images: np.ndarray, lce_threads: int) -> str:
    """Writes the weights (Larq's layout: the same as binax's) and a spec for the worker."""
    from flax import nnx

    weights = {}
    layers = []
    for conv, norm in zip(model.convs, model.conv_norms, strict=True):
        layers += [conv, norm]
    for dense, norm in zip(model.dense, model.dense_norms, strict=True):
        layers += [dense, norm]
    for i, layer in enumerate(layers):
        if isinstance(layer, nnx.BatchNorm):
            weights[f"{i}_bias"] = np.asarray(layer.bias[...])
            weights[f"{i}_mean"] = np.asarray(layer.mean[...])
            weights[f"{i}_var"] = np.asarray(layer.var[...])
        else:
            weights[f"{i}_kernel"] = np.asarray(layer.kernel[...])
    plan = [
        [int(c.kernel[...].shape[-1]), bool(p)]
        for c, p in zip(model.convs, model.pools, strict=True)
    ]
    dense_plan = [int(d.kernel[...].shape[-1]) for d in model.dense]
    np.savez(os.path.join(directory, "weights.npz"), **weights)
    np.save(os.path.join(directory, "images.npy"), images)
    spec = {
        "weights": os.path.join(directory, "weights.npz"),
        "images": os.path.join(directory, "images.npy"),
        "width_plan": plan,
        "dense_plan": dense_plan,
        "lce_threads": lce_threads,
    }
    path = os.path.join(directory, "spec.json")
    with open(path, "w") as f:
        json.dump(spec, f)
    return path


class Peer:
    """The worker process under the LCE python."""

    def __init__(self, python: str, spec: str):
        self.proc = subprocess.Popen(
            [python, os.path.abspath(__file__), "--worker", spec],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TF_USE_LEGACY_KERAS": "1"},
        )
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the LCE worker under {python} did not start (see its stderr)")
        self.info = json.loads(line)

    def time(self, engine: str, batch: int, reps: int) -> list[float]:
        self.proc.stdin.write(json.dumps({"engine": engine, "batch": batch, "reps": reps}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["times"]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _timer(fn, x):
    def run(reps):
        fn(x).block_until_ready()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn(x).block_until_ready()
            times.append(time.perf_counter() - t0)
        return times

    return run


def binary_ops(deployed) -> int:
    """Operations (2 per multiply-add) of the integer products for one 28x28 image."""
    import jax

    from binax.deploy import program as P

    outputs: list = []  # each node's output (BinaryNet has no residual nodes)
    x = jax.ShapeDtypeStruct((1, *INPUT_SHAPE), np.float32)
    borders = deployed.borders(INPUT_SHAPE)
    jax.eval_shape(lambda x: P.run(deployed.program, deployed.arrays, x, borders, seen=outputs), x)
    total = 0
    for node, out in zip(deployed.program, outputs, strict=True):
        if node["op"] in P.INT_PRODUCTS:
            positions = int(np.prod(out.shape[1:-1]))
            total += 2 * positions * P.fan_in(node) * node["kernel_shape"][-1]
    return total


def binary_part(deployed, chunk: int):
    """``(f, x)``: the deployed program from its first integer product on, jitted and run in
    chunks as `Deployed` runs, and a batch of 256 int8 ±1 inputs for it."""
    import jax
    import jax.numpy as jnp

    from binax.deploy import program as P
    from binax.nn import functional as F

    start = [node["op"] in P.INT_PRODUCTS for node in deployed.program].index(True)
    outputs: list = []
    x = jax.ShapeDtypeStruct((1, *INPUT_SHAPE), np.float32)
    borders = deployed.borders(INPUT_SHAPE)
    jax.eval_shape(lambda x: P.run(deployed.program, deployed.arrays, x, borders, seen=outputs), x)
    program = deployed.program[start:]
    arrays = deployed._device_arrays[start:]  # with the packed kernels' words
    x = jax.random.rademacher(jax.random.key(3), (256, *outputs[start - 1].shape[1:]), jnp.int8)
    borders = {}
    P.run(program, arrays, x[:1], borders)  # the border terms, once
    f = jax.jit(lambda a, b, x: F.map_chunks(lambda x: P.run(program, a, x, dict(b)), x, chunk))
    return (lambda x: f(arrays, borders, x)), x


PRODUCT = (256, 4096, 1024)  # M x K x N of the reference ±1 matrix products


def kernel_products(shape: tuple[int, int, int] = PRODUCT, pallas: bool = False) -> dict:
    """The ±1 matrix products of ``shape`` (M x K x N) this device allows, as ``{name: (f,
    args)}``: int8 with int32 accumulation, XOR + popcount on uint32-packed words, and with
    ``pallas`` `binax.deploy.pallas.packed_dot` on the bytes (in Pallas' interpreter on the
    CPU); all checked equal to the int8 product."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    m, k, n = shape
    a = jnp.where(jax.random.normal(jax.random.key(0), (m, k)) >= 0, 1, -1).astype(jnp.int8)
    b = jnp.where(jax.random.normal(jax.random.key(1), (k, n)) >= 0, 1, -1).astype(jnp.int8)
    int8 = jax.jit(lambda a, b: lax.dot(a, b, preferred_element_type=jnp.int32))

    def pack(x):  # ±1 (rows, k) -> uint32 words (rows, ceil(k / 32)), zero bits appended
        bits = (jnp.pad(x, [(0, 0), (0, -k % 32)]) > 0).astype(jnp.uint32)
        bits = bits.reshape(x.shape[0], -1, 32)
        return jnp.sum(bits << jnp.arange(32, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)

    @jax.jit
    def xnor(pa, pb):
        diff = lax.population_count(pa[:, None, :] ^ pb[None, :, :]).astype(jnp.int32)
        return k - 2 * jnp.sum(diff, axis=-1)

    products = {
        "int8 product": (int8, (a, b)),
        "XOR+popcount product": (xnor, (pack(a), pack(b.T))),
    }
    if pallas:
        from binax.deploy.pallas import packed_dot
        from binax.deploy.program import pack_kernel

        interpret = jax.default_backend() == "cpu"
        f = jax.jit(lambda x, w: packed_dot(x, w, k, interpret=interpret))
        args = (jnp.packbits(a > 0, axis=-1), jnp.asarray(pack_kernel(np.asarray(b))))
        products["Pallas packed product"] = (f, args)
    exact = np.asarray(int8(a, b))
    for name, (f, args) in products.items():
        if not np.array_equal(np.asarray(f(*args)), exact):
            raise AssertionError(f"the {name} differs from the int8 product")
    return products


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--width", type=float, default=0.25, help="BinaryNet width multiplier")
    p.add_argument("--lce-python", help="a python with larq-compute-engine, tf-keras, larq")
    p.add_argument("--lce-threads", type=int, default=2, help="LCE interpreter threads")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds")
    p.add_argument("--reps1", type=int, default=100, help="calls per round at batch 1")
    p.add_argument("--reps256", type=int, default=4, help="calls per round at batch 256")
    p.add_argument("--quick", action="store_true", help="3 rounds, fewer calls")
    p.add_argument(
        "--profile",
        action="store_true",
        help="also trace the deployed network at batch 256 and print its time per XLA op kind",
    )
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    if args.quick:
        args.rounds, args.reps1, args.reps256 = 3, 20, 2

    import jax
    from flax import nnx

    sys.path.insert(0, HERE)
    import _common

    import binax.deploy
    from binax.nn import functional as F

    print(_common.machine())
    print(_common.command())
    model = _model(args.width)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    deployed = binax.deploy.compile(model)
    int8_convs = binax.deploy.compile(model)
    int8_convs.packed = False
    images = np.asarray(jax.random.normal(jax.random.key(7), (256, *INPUT_SHAPE)), np.float32)

    tmp = tempfile.mkdtemp(prefix="binax-inference-")
    deployed_bytes = deployed.save(os.path.join(tmp, "model.bnx"))
    ckpt = os.path.join(tmp, "float32.npz")
    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(model))
    np.savez(ckpt, **{jax.tree_util.keystr(k): np.asarray(v, np.float32) for k, v in leaves})
    float_bytes = os.path.getsize(ckpt)
    reference = np.asarray(forward(state, images))
    agree = {
        name: float(np.mean(np.asarray(d(images)).argmax(-1) == reference.argmax(-1)))
        for name, d in (("binax deployed", deployed), ("binax deployed, int8 convs", int8_convs))
    }
    n_binary = sum(
        int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, binax.nn.BinaryParam))
    )
    print(f"BinaryNet width {args.width}: {n_binary:,} binary weights")

    chunk = deployed.chunk(INPUT_SHAPE)
    chunked = jax.jit(lambda s, x: F.map_chunks(lambda x: nnx.merge(graphdef, s)(x), x, chunk))
    part, part_x = binary_part(deployed, chunk)
    products = kernel_products()
    engines = {
        "binax float": lambda x: forward(state, x),
        "binax deployed": deployed,
        "binax deployed, int8 convs": int8_convs,
        "binax float, chunked": lambda x: chunked(state, x),
    }
    peer = None
    sizes = {"binax float": float_bytes, "binax deployed": deployed_bytes}
    if args.lce_python:
        peer = Peer(args.lce_python, _peer_files(model, tmp, images, args.lce_threads))
        print(peer.info["versions"])
        sizes["LCE interpreter"] = peer.info["lce_bytes"]
        for name, key in (("LCE interpreter", "lce"), ("Keras float", "keras")):
            logits = np.asarray(peer.info["logits"][key])
            agree[name] = float(np.mean(logits.argmax(-1) == reference.argmax(-1)))
    else:
        print("LCE and Keras skipped: pass --lce-python PYTHON (see this file's docstring)")

    results = {}
    for batch, reps in ((1, args.reps1), (256, args.reps256)):
        x = jax.numpy.asarray(images[:batch])
        timers = {name: _timer(f, x) for name, f in engines.items()}
        if peer is not None:
            for name, key in (("LCE interpreter", "lce"), ("Keras float", "keras")):
                timers[name] = lambda r, key=key, batch=batch: peer.time(key, batch, r)
        if batch == 256:
            timers["binary layers"] = _timer(part, part_x)
            for name, (f, f_args) in products.items():
                timers[name] = _timer(lambda _, f=f, f_args=f_args: f(*f_args), None)
        per_round = {name: [] for name in timers}
        for _ in range(args.rounds):
            for name, run in timers.items():
                per_round[name].append(float(np.median(run(reps))))
        for name, ts in per_round.items():
            med, q1, q3 = _common.median_iqr([batch / t for t in ts])
            results.setdefault(name, {})[batch] = {"images_s": med, "q1": q1, "q3": q3}
    if peer is not None:
        peer.close()

    ops = binary_ops(deployed)
    dep256 = results["binax deployed"][256]["images_s"]

    def gops(name):  # binary operations per second at batch 256
        per_call = 2 * np.prod(PRODUCT) if name in products else ops * 256
        return per_call * results[name][256]["images_s"] / 256 / 1e9

    head = ["engine", "batch 1 images/s", "batch 256 images/s", "file bytes", "agree"]
    rows = []
    for name, r in results.items():
        if name in products:
            continue
        rows.append(
            [
                name,
                f"{r[1]['images_s']:.0f}" if 1 in r else "-",
                f"{r[256]['images_s']:.0f}",
                f"{sizes[name]:,}" if name in sizes else "-",
                f"{agree[name]:.3f}" if name in agree else "-",
            ]
        )
    print(_common.md_table(head, rows))
    flt, dep1 = results["binax float"], results["binax deployed"][1]["images_s"]
    chunked256 = results["binax float, chunked"][256]["images_s"]
    print(
        f"deployed / float: batch 1 {dep1 / flt[1]['images_s']:.2f}x, "
        f"batch 256 {dep256 / flt[256]['images_s']:.2f}x (/ the float forward chunked alike: "
        f"{dep256 / chunked256:.2f}x); file {float_bytes / deployed_bytes:.1f}x "
        "smaller than the float32 .npz"
    )
    int8_256 = results["binax deployed, int8 convs"][256]["images_s"]
    print(
        f"deployed (packed convs) / deployed with int8 convs: batch 1 "
        f"{dep1 / results['binax deployed, int8 convs'][1]['images_s']:.2f}x, "
        f"batch 256 {dep256 / int8_256:.2f}x"
    )
    if peer is not None:
        lce = results["LCE interpreter"]
        print(
            f"deployed / LCE: batch 1 {dep1 / lce[1]['images_s']:.2f}x, "
            f"batch 256 {dep256 / lce[256]['images_s']:.2f}x; deployed / Keras float at 256: "
            f"{dep256 / results['Keras float'][256]['images_s']:.2f}x"
        )
    peaks = {name: gops(name) for name in products}
    print(
        f"binary ops per image {ops / 1e6:.1f} M; at batch 256: whole deployed network "
        f"{gops('binax deployed'):.0f} GOP/s, its binary layers alone {gops('binary layers'):.0f} "
        f"GOP/s; M{PRODUCT[0]}xK{PRODUCT[1]}xN{PRODUCT[2]} ±1 products, interleaved: "
        + ", ".join(f"{name} {g:.0f} GOP/s" for name, g in peaks.items())
    )
    profile = None
    if args.profile:
        x = jax.numpy.asarray(images)
        profile = _common.op_times(lambda: deployed(x).block_until_ready(), 5)
        profile.pop("while", None)  # the chunk loop: the sum of the operations inside it
        total = sum(profile.values())
        rows = [(k, f"{v:.2f}", f"{100 * v / total:.1f}") for k, v in list(profile.items())[:12]]
        print(f"deployed at batch 256: {total:.1f} ms of XLA operations per call")
        print(_common.md_table(("operation kind", "ms per call", "%"), rows))
    if args.out:
        _common.write_json(
            args.out,
            {
                "machine": _common.machine(),
                "command": _common.command(),
                "results": results,
                "sizes": sizes,
                "agree": agree,
                "binary_ops_per_image": ops,
                "kernel_gops": peaks,
                "binary_layers_gops": gops("binary layers"),
                "batch_chunk": chunk,
                "deployed_op_ms": profile,
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
