"""Data-parallel, model-parallel and multi-process training on simulated CPU devices.

conftest.py gives every test process 8 CPU devices. A "1-device run" uses a mesh of the first
device only.

Tolerance between device counts: the same step on 1 and on 8 devices sums the batch gradient
(and the BatchNorm statistics) in a different order, so floats differ by a few ulps. A Bop-style
rule flips a weight where ``w * m > threshold``: a weight whose ``m`` lies within ulps of the
threshold can flip on one run and not the other, and after that the runs differ by that
weight. Such ties are rare, so flips per layer and per epoch must agree within 1% (+2) and test
accuracy within 1 percentage point (3 of the 359 test digits). In practice Bop runs agree
exactly; latent-weight Adam (which divides by sqrt(v)) differs by a flip or two.
"""

import contextlib
import functools
import io
import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import binax
from binax.train import Config, build_model, make_mesh, make_optimizer, make_program, train
from binax.train.loop import LOG_FILE
from binax.train.optim import hparams

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = jax.device_count()
pytestmark = pytest.mark.skipif(DEVICES < 8, reason="needs the 8 CPU devices of conftest.py")

RUN = dict(
    model="mlp",
    model_kwargs={"hidden_sizes": [16]},
    dataset="digits",
    epochs=2,
    steps_per_epoch=6,
    batch_size=64,
    progress=False,
    plots=False,
    checkpoint=False,
)


def quiet_train(config):
    with contextlib.redirect_stdout(io.StringIO()):
        return train(config)


def assert_close_runs(a_history, b_history):
    """Flips per layer and epoch within 1% (+2); test accuracy within 1 percentage point."""
    assert len(a_history) == len(b_history)
    for a, b in zip(a_history, b_history, strict=True):
        assert a["flips"].keys() == b["flips"].keys()
        for name, n in a["flips"].items():
            assert abs(n - b["flips"][name]) <= 0.01 * n + 2, (name, n, b["flips"][name])
        assert abs(a["test_accuracy"] - b["test_accuracy"]) <= 0.01
        assert abs(a["train_loss"] - b["train_loss"]) <= 1e-3 * a["train_loss"] + 1e-4


def program(num_devices, model_parallel=1, optimizer="bop", hidden=16):
    model = build_model(
        "mlp", {"hidden_sizes": [hidden]}, (8, 8, 1), 10, seed=0, full_precision=optimizer == "real"
    )
    hp = hparams(optimizer, {"momentum": 0.9} if optimizer == "sgdat" else None)

    def make_tx(labels):
        return make_optimizer(
            optimizer, hp, "adam", 1e-2, labels, seed=0, steps_per_epoch=10, total_steps=100
        )

    return make_program(model, make_tx, make_mesh(num_devices, model_parallel))


# ------------------------------------------------------------------ BatchNorm over devices


# ------------------------------------------------------------------ sharding of the state


@pytest.mark.parametrize("optimizer", ["bop2nd_order", "sgdat", "diode", "latent"])
def test_optimizer_state_has_the_sharding_of_its_parameter(optimizer):
    prog = program(8, model_parallel=2, optimizer=optimizer)
    assert dict(prog.mesh.shape) == {"data": 4, "model": 2}
    state = prog.init_state()
    params = {
        jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(state.params)
    }
    split = [k for k, x in params.items() if "model" in str(x.sharding.spec)]
    assert split, "no parameter is split over the 'model' axis"
    checked = set()
    for path, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state):
        key = jax.tree_util.keystr(path)
        owners = [k for k in params if key.endswith(k) and params[k].shape == leaf.shape]
        if not owners:
            assert leaf.sharding.is_fully_replicated, key  # counts and other scalars
            continue
        owner = max(owners, key=len)
        assert leaf.sharding.is_equivalent_to(params[owner].sharding, leaf.ndim), key
        checked.add(owner)
    # Every split kernel has state that was checked (the binary optimizer's or Adam's).
    assert set(split) <= checked


# ------------------------------------------------------------------ 1 device against 8


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory):
    return quiet_train(Config(**RUN, num_devices=1, run_dir=str(tmp_path_factory.mktemp("r1"))))


@pytest.fixture(scope="module")
def eight_device_run(tmp_path_factory):
    return quiet_train(Config(**RUN, num_devices=8, run_dir=str(tmp_path_factory.mktemp("r8"))))


@pytest.mark.parametrize("model_parallel", [1, 2])
def test_eight_devices_match_one(one_device_run, eight_device_run, model_parallel, tmp_path):
    if model_parallel == 1:
        result = eight_device_run
    else:
        result = quiet_train(
            Config(
                **RUN, num_devices=8, model_parallel=model_parallel, run_dir=str(tmp_path / "r8")
            )
        )
    assert dict(result.program.mesh.shape) == {"data": 8 // model_parallel, "model": model_parallel}
    assert result.program.train_step._cache_size() == 1  # compiled once for the whole run
    params = jax.tree.leaves(result.state.params)
    assert all(len(x.sharding.device_set) == 8 for x in params)
    assert_close_runs(one_device_run.history, result.history)


def test_batchnorm_statistics_are_global_over_a_sharded_batch(one_device_run, eight_device_run):
    rng = np.random.default_rng(0)
    # Each device's eighth of the batch has its own offset: per-device means differ a lot.
    images = rng.normal(size=(64, 8, 8, 1)).astype(np.float32)
    images += np.repeat(np.arange(8, dtype=np.float32) * 3.0, 8)[:, None, None, None]
    labels = rng.integers(0, 10, size=64).astype(np.int32)

    for run in (one_device_run, eight_device_run):
        prog = run.program
        state = jax.tree.map(lambda x: x.copy(), run.state)  # the step donates its input
        kernel = np.asarray(state.params["layers"][0]["kernel"])
        before = np.asarray(state.rest["norms"][0]["mean"])
        x = jax.device_put(images, prog.batch_sharding)
        y = jax.device_put(labels, prog.batch_sharding)
        assert len(x.sharding.device_set) == len(prog.mesh.devices.flat)
        state, _ = prog.train_step(state, prog.zero_metrics(), x, y)
        after = np.asarray(state.rest["norms"][0]["mean"])

        # BatchNorm's running mean (momentum 0.9): 0.9 * before + 0.1 * batch mean.
        h = images.reshape(64, -1) @ kernel
        np.testing.assert_allclose(after, 0.9 * before + 0.1 * h.mean(0), rtol=1e-5, atol=1e-5)
        first_device_only = 0.9 * before + 0.1 * h[:8].mean(0)
        assert not np.allclose(after, first_device_only, rtol=1e-2)


# ------------------------------------------------------------------ several processes


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_on_localhost_train_together(one_device_run, tmp_path):
    """Two CLI processes with 2 CPU devices each (4 in all) over JAX's distributed runtime."""
    run_dir = tmp_path / "run"
    port = _free_port()
    env = dict(
        os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2"
    )
    args = [
        "--model",
        "mlp",
        "--hidden-sizes",
        "16",
        "--dataset",
        "digits",
        "--epochs",
        "2",
        "--steps-per-epoch",
        "6",
        "--batch-size",
        "64",
        "--run-dir",
        str(run_dir),
        "--no-progress",
        "--no-plots",
        "--coordinator-address",
        f"127.0.0.1:{port}",
        "--num-processes",
        "2",
    ]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "binax.train", *args, "--process-id", str(i)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=150)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    assert "4 device(s), mesh {'data': 4, 'model': 1}" in outputs[0]
    assert "final test accuracy" in outputs[0]
    assert "final test accuracy" not in outputs[1]  # only process 0 reports
    history = [json.loads(line) for line in (run_dir / LOG_FILE).read_text().splitlines()]
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["1", "2"]
    assert_close_runs(one_device_run.history, history)


# ------------------------------------------------------------------ pmap compatibility


PMAP_OPTIMIZERS = {
    "bop": binax.bop(threshold=1e-6, gamma=1e-2),
    "bop2nd_order": binax.bop2nd_order(threshold=1e-2, gamma=1e-2, sigma=1e-2),
    "sgdat": binax.sgdat(learning_rate=1e-2, threshold=1e-6, momentum=0.9),
    "diode": binax.diode(learning_rate=1e-3, b1=0.9, b2=0.5),
    "cema": binax.cema(gamma=1e-2, alpha=0.5),
    "latent": optax.chain(optax.adam(1e-1), binax.clip_latent(1.0)),
}


def test_optimizers_work_inside_pmap():
    """Older data-parallel code: pmap over 8 devices, gradients pmean'ed by the user.

    In JAX 0.10 ``jax.pmap`` is kept (in maintenance mode) as a wrapper over ``jit`` and
    ``shard_map``; the optimizers need nothing special under it. One kernel per optimizer
    (combined with `optax.partition`, so that one program is compiled), each compared with
    the same optimizer run without pmap on the mean gradient.
    """
    n = 8
    rng = np.random.default_rng(1)
    signs = lambda: np.where(rng.random((16, 8)) < 0.5, -1.0, 1.0).astype(np.float32)
    params = {
        name: {"kernel": jnp.asarray(signs() * (0.05 if name == "latent" else 1.0))}
        for name in PMAP_OPTIMIZERS
    }
    params["head"] = {"bias": jnp.zeros((8,), jnp.float32)}
    labels = {name: jax.tree.map(lambda _, n=name: n, p) for name, p in params.items()}
    tx = optax.partition({**PMAP_OPTIMIZERS, "head": optax.adam(1e-2)}, labels)
    grads = [
        jax.tree.map(lambda x: rng.normal(size=(n, *x.shape)).astype(np.float32) * 1e-2, params)
        for _ in range(6)
    ]

    def step(params, state, g):
        g = jax.lax.pmean(g, axis_name="batch")
        return _plain(tx, params, state, g)

    stack = lambda tree: jax.tree.map(lambda x: jnp.stack([x] * n), tree)
    p_params, p_state = stack(params), stack(tx.init(params))
    p_step = jax.pmap(step, axis_name="batch")
    ref_params, ref_state = params, tx.init(params)
    ref_step = jax.jit(functools.partial(_plain, tx))
    for g in grads:
        p_params, p_state = p_step(p_params, p_state, g)
        mean = jax.tree.map(lambda x: jnp.mean(x, 0), g)
        ref_params, ref_state = ref_step(ref_params, ref_state, mean)
    for name in PMAP_OPTIMIZERS:
        replicas = np.asarray(p_params[name]["kernel"])
        start, ref = np.asarray(params[name]["kernel"]), np.asarray(ref_params[name]["kernel"])
        assert all((replicas[i] == replicas[0]).all() for i in range(n)), name
        np.testing.assert_array_equal(np.sign(replicas[0]), np.sign(ref), err_msg=name)
        np.testing.assert_allclose(replicas[0], ref, rtol=1e-5, atol=1e-6, err_msg=name)
        if name != "diode":  # diode needs thousands of steps for its first flips
            assert (np.sign(replicas[0]) != np.sign(start)).any(), f"{name}: no flip"
    np.testing.assert_allclose(
        np.asarray(p_params["head"]["bias"][0]),
        np.asarray(ref_params["head"]["bias"]),
        rtol=1e-5,
        atol=1e-6,
    )


def _plain(tx, params, state, g):
    updates, state = tx.update(g, state, params)
    return optax.apply_updates(params, updates), state


def test_initialize_distributed_names_a_process_variable_that_is_not_an_integer(monkeypatch):
    from binax.train import initialize_distributed

    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match=r"\$JAX_NUM_PROCESSES must be an integer, got 'two'"):
        initialize_distributed("127.0.0.1:1", process_id=0)  # raises before JAX is called
