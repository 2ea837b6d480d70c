"""binax-train on transformers: the full-precision twin as baseline, distillation from a run."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from binax.nn import BinaryParam
from binax.train import Config, cli, train
from binax.train.loop import LOG_FILE

VIT = {"patch_size": 4, "features": 8, "depth": 1, "num_heads": 2}


def tiny_vit(run_dir, **kw):
    """A one-block ViT on the 8x8 digits, a few steps: seconds."""
    base = dict(
        model="vit",
        model_kwargs=VIT,
        dataset="digits",
        epochs=1,
        steps_per_epoch=3,
        batch_size=32,
        num_devices=1,
        run_dir=str(run_dir),
        progress=False,
        plots=False,
    )
    base.update(kw)
    return Config(**base)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A finished full-precision ViT run: the teacher."""
    return train(tiny_vit(tmp_path_factory.mktemp("teacher") / "run", optimizer="real"))


def test_real_baseline_of_vit_is_its_full_precision_twin(teacher_run, capsys):
    model = teacher_run.model()
    assert not jax.tree.leaves(nnx.state(model, BinaryParam))  # no binary leaf at all
    assert not any(jax.tree.leaves(teacher_run.program.binary_mask))
    (record,) = teacher_run.history
    assert np.isfinite(record["train_loss"]) and record["flips"] == {}
    assert record["flip_ratio_total"] == 0.0
    # Every parameter trained by the real optimizer: the kernels moved off their init.
    kernel = np.asarray(model.blocks[0].attention.qkv.kernel[...])
    assert len(np.unique(kernel)) > 2


def test_real_baseline_of_vit_from_the_command_line(tmp_path, capsys):
    argv = ["--model", "vit", "--optimizer", "real", "--epochs", "1", "--steps-per-epoch", "2"]
    argv += ["--num-devices", "1", "--no-plots", "--no-checkpoint", "--no-progress"]
    for k, v in VIT.items():
        argv += ["--model-arg", f"{k}={v}"]
    assert cli.main([*argv, "--run-dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "its full-precision twin (full_precision baseline), no binary layer" in out
    log = [json.loads(line) for line in (tmp_path / "run" / LOG_FILE).read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1]
