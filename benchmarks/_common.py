"""Helpers shared by the benchmarks: machine description, quiet training runs, tables, files."""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """One line: CPU model, cores, load average, JAX/Optax/Flax versions, device."""
    import flax
    import jax
    import optax

    cpu = cpu_model()
    dev = jax.devices()[0]
    try:
        load = "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "load average unknown"
    return (
        f"{cpu}, {os.cpu_count()} cores visible ({len(os.sched_getaffinity(0))} usable), "
        f"{load}; GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')}; "
        f"{dev.platform} {dev.device_kind} x{jax.device_count()}; "
        f"Python {platform.python_version()}, jax {jax.__version__}, optax {optax.__version__}, "
        f"flax {flax.__version__}"
    )


def train_quietly(config, run_dir: str | None = None):
    """(``binax.train.train(config)``, wall seconds), its console table swallowed; the run goes
    to ``run_dir``, or to a temporary directory removed afterwards."""
    from binax.train import train

    with tempfile.TemporaryDirectory() as tmp:
        config.run_dir = run_dir or os.path.join(tmp, "run")
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            result = train(config)
        return result, time.perf_counter() - t0


def command() -> str:
    """The command line that started this process."""
    return "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z")


def median_iqr(xs):
    """(median, first quartile, third quartile) of a list of numbers."""
    xs = sorted(xs)
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return statistics.median(xs), q[0], q[2]


def md_table(head, rows) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def write_text(path: str, text: str) -> None:
    """Writes atomically (a reader never sees half a file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path: str, obj) -> None:
    write_text(path, json.dumps(obj, indent=1) + "\n")


def op_times(step, steps: int) -> dict:
    """Milliseconds per call of every XLA operation the CPU runtime ran in ``steps`` calls of
    ``step()`` (which blocks until done), traced with `jax.profiler` and summed per HLO name
    without its number (``ynn_fusion`` for YNNPACK's convolutions and matrix products, ...);
    largest first."""
    import collections
    import glob
    import gzip
    import re

    import jax

    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp, create_perfetto_trace=True)
        for _ in range(steps):
            step()
        jax.profiler.stop_trace()
        (path,) = glob.glob(os.path.join(tmp, "**", "*.trace.json.gz"), recursive=True)
        with gzip.open(path) as f:
            events = json.load(f)["traceEvents"]
    by_kind = collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") != "X" or name.startswith(("$", "Thunk", "Pjit", "Common", "Parse")):
            continue
        by_kind[re.sub(r"\.\d+$", "", name)] += e["dur"] / 1e3 / steps
    return dict(by_kind.most_common())


def binarynet_step(width: float, shape=(28, 28, 1), batch: int = 256, **layer_kwargs):
    """``step()``: one training step of BinaryNet (`binax.models.BinaryNet` at ``width``, 10
    classes, ``layer_kwargs`` for its layers) on a fixed random batch, Bop on the binary kernels
    and Adam(1e-2) on the rest, in binax's jitted step on one device
    (`binax.train.make_program`), waiting until it is done. Not yet compiled."""
    import jax
    import numpy as np
    from flax import nnx

    from binax import models
    from binax.train import make_mesh, make_program, optim

    net = models.BinaryNet(shape, 10, width_multiplier=width, rngs=nnx.Rngs(0), **layer_kwargs)
    hp = optim.hparams("bop")
    program = make_program(
        net,
        lambda labels: optim.make_optimizer(
            "bop", hp, "adam", 1e-2, labels, seed=0, steps_per_epoch=1000, total_steps=10**5
        ),
        make_mesh(1),
    )
    rng = np.random.default_rng(0)
    x = jax.device_put(rng.normal(size=(batch, *shape)).astype(np.float32))
    y = jax.device_put(rng.integers(0, 10, batch).astype(np.int32))
    carry = [program.init_state(), program.zero_metrics()]

    def step():
        carry[:] = program.train_step(*carry, x, y)
        jax.block_until_ready(carry)

    return step
