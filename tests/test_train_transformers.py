"""binax-train on transformers: the full-precision twin as baseline, distillation from a run."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from binax.data import text
from binax.nn import BinaryParam
from binax.train import Config, ConfigError, cli, restore, train
from binax.train.loop import CONFIG_FILE, LOG_FILE

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


# ------------------------------------------------------------------ distillation


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def students(teacher_run, tmp_path_factory):
    """Bop ViTs from the same seed: without a teacher, distilled with every weight 0, and
    distilled with the default weights."""
    root = tmp_path_factory.mktemp("students")
    teacher = teacher_run.run_dir
    zero = dict(distill_logits=0.0, distill_attention=0.0, distill_hidden=0.0)
    return {
        "plain": train(tiny_vit(root / "plain", optimizer="bop")),
        "zero": train(tiny_vit(root / "zero", optimizer="bop", distill_from=teacher, **zero)),
        "distilled": train(tiny_vit(root / "distilled", optimizer="bop", distill_from=teacher)),
    }


def test_distillation_terms_enter_the_loss(students):
    plain, zero, distilled = students["plain"], students["zero"], students["distilled"]
    assert "distill" not in plain.final
    for run in (zero, distilled):
        terms = run.final["distill"]
        assert set(terms) == {"logits", "attention", "hidden"}
        assert all(np.isfinite(v) and v > 0 for v in terms.values())
    # Weighted 0, the teacher changes nothing: the same steps as without it (up to float
    # rounding: the step is another compiled program) ...
    for a, b in zip(leaves(plain.state.params), leaves(zero.state.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(plain.final["train_loss"], zero.final["train_loss"], rtol=1e-5)
    # ... and weighted 1, it changes them.
    assert (
        max(
            np.max(np.abs(a - b))
            for a, b in zip(leaves(plain.state.params), leaves(distilled.state.params), strict=True)
        )
        > 1e-3
    )


def test_the_teacher_is_frozen_and_not_in_the_training_state(teacher_run, students):
    plain, distilled = students["plain"], students["distilled"]
    # The student's state (params, optimizer state: what is checkpointed) has no teacher in it.
    assert jax.tree.structure(distilled.state) == jax.tree.structure(plain.state)
    # The teacher did not move.
    again = restore(teacher_run.run_dir)
    for a, b in zip(leaves(again.state.params), leaves(teacher_run.state.params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_resume_keeps_the_distillation(students, teacher_run, capsys):
    run_dir = students["distilled"].run_dir
    saved = json.loads((Path(run_dir) / CONFIG_FILE).read_text())
    assert saved["distill_from"] == teacher_run.run_dir and saved["distill_hidden"] == 1.0
    argv = ["--resume", "--run-dir", run_dir, "--epochs", "2", "--no-progress"]
    assert cli.main(argv) == 0
    assert "resumed" in capsys.readouterr().out
    log = [json.loads(line) for line in (Path(run_dir) / LOG_FILE).read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    assert all(set(r["distill"]) == {"logits", "attention", "hidden"} for r in log)
    # Resuming with other distillation settings is refused.
    assert cli.main([*argv, "--epochs", "3", "--distill-hidden", "0"]) == 2
    assert "distill_hidden" in capsys.readouterr().err


def test_distilling_a_model_that_is_not_a_transformer_uses_the_logits(tmp_path):
    mlp = dict(model="mlp", model_kwargs={"hidden_sizes": [16]}, model_parallel=1)
    teacher = train(tiny_vit(tmp_path / "teacher", optimizer="real", **mlp))
    student = train(tiny_vit(tmp_path / "student", distill_from=teacher.run_dir, **mlp))
    terms = student.final["distill"]
    assert terms["logits"] > 0 and terms["attention"] == 0 and terms["hidden"] == 0
    # A teacher of another model is refused, naming the flag.
    with pytest.raises(ConfigError, match=r"--distill-from .*teacher's model is 'mlp'"):
        train(tiny_vit(tmp_path / "vit", distill_from=teacher.run_dir))


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"distill_from": "no/such/run"}, r"--distill-from no/such/run: cannot restore"),
        ({"distill_temperature": 0.0}, "distill_temperature must be a positive number"),
        ({"distill_hidden": -1.0}, "distill_hidden must be a non-negative number"),
    ],
)
def test_bad_distillation_settings_are_clear_errors(kw, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        train(tiny_vit(tmp_path / "run", **kw))


# --- GLUE: the encoder on token ids -------------------------------------------------------

ENCODER = {"features": 8, "depth": 1, "num_heads": 2, "vocab_size": 64, "max_length": 16}
WORDS = "the a cat dog sat ran on under mat rug big small red blue".split()


def write_mrpc(glue_data):
    """A tiny MRPC in GLUE's layout: 24 training pairs, 8 dev pairs (label: same first word,
    half of each)."""
    rng = np.random.default_rng(0)
    (glue_data / "MRPC").mkdir(parents=True)
    head = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    for split, n in (("train", 24), ("dev", 8)):
        rows = []
        for i in range(n):
            a, b = (list(rng.choice(WORDS, 5)) for _ in range(2))
            b[0] = a[0] if i % 2 else next(w for w in WORDS if w != a[0])
            rows.append(f"{i % 2}\t{i}\t{i + n}\t{' '.join(a)}\t{' '.join(b)}\n")
        (glue_data / "MRPC" / f"{split}.tsv").write_text(head + "".join(rows))
    return glue_data


def encoder_argv(glue_data, run_dir, *extra):
    argv = ["--model", "encoder", "--dataset", "glue/mrpc", "--data-dir", str(glue_data)]
    argv += ["--optimizer", "bop", "--batch-size", "8", "--num-devices", "1", "--no-plots"]
    argv += ["--no-progress", "--run-dir", str(run_dir), *extra]
    for k, v in ENCODER.items():
        argv += ["--model-arg", f"{k}={v}"]
    return argv


def test_encoder_trains_on_a_glue_task_and_resumes_with_its_tokenizer(tmp_path, capsys):
    glue_data, run_dir = write_mrpc(tmp_path / "glue_data"), tmp_path / "run"
    assert cli.main(encoder_argv(glue_data, run_dir, "--epochs", "1")) == 0
    tokenizer = (run_dir / "tokenizer.json").read_text()
    # Resumed, the run reads its own tokenizer even when the training file has changed.
    (glue_data / "MRPC" / "train.tsv").write_text(
        (glue_data / "MRPC" / "train.tsv").read_text().replace("cat", "zebra")
    )
    assert cli.main(encoder_argv(glue_data, run_dir, "--epochs", "2", "--resume")) == 0
    assert (run_dir / "tokenizer.json").read_text() == tokenizer
    records = [json.loads(line) for line in (run_dir / LOG_FILE).read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[1]["step"] == 6 and records[1]["flip_ratio_total"] > 0  # 3 steps of 8
    assert all(np.isfinite(r["train_loss"]) for r in records)
    # The dev split is the test set: 8 pairs, accuracy in eighths.
    assert all(round(8 * r["test_accuracy"], 6) % 1 == 0 for r in records)
    # The dev split's F1 (GLUE's MRPC score), recomputed from the restored model's predictions.
    model = restore(str(run_dir)).model()
    tokenizer = text.load_tokenizer(run_dir / "tokenizer.json")
    dev = text.glue_dataset("mrpc", "dev", glue_data, tokenizer, ENCODER["max_length"])
    predicted = np.argmax(model(dev.images), -1)
    tp = np.sum((predicted == 1) & (dev.labels == 1))
    f1 = 2 * tp / (np.sum(predicted == 1) + np.sum(dev.labels == 1))
    assert records[1]["test_f1"] == pytest.approx(f1)
    assert records[1]["test_accuracy"] == pytest.approx(np.mean(predicted == dev.labels))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(data_dir="missing"), "no file at"),
        (dict(data_dir=None), "data_dir: glue/mrpc needs --data-dir"),
        (dict(dataset="glue/stsb"), "regression task"),
        (dict(dataset="digits"), "does not go with model 'encoder'"),
        (dict(model_kwargs={**ENCODER, "vocab_size": 6}), "smaller than the tokenizer"),
    ],
)
def test_glue_errors_are_clear(change, message, tmp_path):
    glue_data = write_mrpc(tmp_path / "glue_data")
    config = tiny_vit(
        tmp_path / "run", model="encoder", model_kwargs=ENCODER, dataset="glue/mrpc",
        data_dir=str(glue_data), batch_size=8,
    )  # fmt: skip
    for k, v in change.items():
        setattr(config, k, str(tmp_path / v) if k == "data_dir" and v else v)
    from binax.data import DatasetNotFoundError

    with pytest.raises((ConfigError, DatasetNotFoundError), match=message):
        train(config)
