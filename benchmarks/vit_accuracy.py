"""Accuracy of a binary ViT on Fashion-MNIST: every binary optimizer, with and without distillation.

Issue 14's table: `binax.models.BinaryViT` (BiT-style binary blocks: binary Q/K/V/output and
MLP kernels, elastic binarization of the activations, real patch embedding, LayerNorms and head)
on the official Fashion-MNIST split, trained by Diode, Bop, Bop2ndOrder, SGDAT and latent-weight
Adam, each without and with knowledge distillation from its full-precision twin
(``--optimizer real``, the same ViT with ``binary=False``; the twin run of seed ``s`` is the
teacher of the students of seed ``s``), and the twin itself. Every run is
``binax.train.train(Config(...))``, what ``binax-train --model vit`` runs; the real-valued
parameters get Adam(``--lr``) in every run.

Every run is one epoch of ``--steps`` batches (a fraction of the training set: the scale this
2-core machine allows), then the test accuracy on the whole test split. In order:

1. sweep: seed 0, each optimizer over a few values of the hyperparameter that sets its flip
   rate (`SWEEP`; the training command's defaults were set on MLPs); each keeps its best;
2. distillation sweep: seed 0, Bop at its best setting distilled from the seed-0 twin with the
   weights of `DISTILL_SWEEP` (all four terms, or the logits only); the best weights are used
   for every optimizer;
3. main: ``--seeds`` seeds of the eleven candidates at those settings (a sweep run with the
   same settings and seed is that seed's run: runs are identified by their configuration);
   the runs without distillation first, then distilled Diode and latent Adam, then the rest.

Reported: final test accuracy (mean, sample standard deviation and range over the seeds), the
flips per binary weight per step and wall time per run. Records are appended to
``<out>.jsonl`` as runs finish (rerunning skips those already recorded) and ``<out>.md`` is
rewritten after each. The teachers' run directories (with their checkpoints) go to
``--work-dir``. Choosing settings on seed 0's test accuracy favours seed 0 a little, alike for
every optimizer.

Usage::

    python benchmarks/vit_accuracy.py            # 200 steps per run, 3 seeds
    python benchmarks/vit_accuracy.py --quick    # smoke test: 1 seed, 10 steps
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
from accuracy import append_record, fmt_hp, load_records, spread  # noqa: E402

from binax.train import Config  # noqa: E402

OPTIMIZERS = ("diode", "bop", "bop2nd_order", "sgdat", "latent")

#: The ViT of the table: 4x4 = 16 patches of 7x7 and a class token, width 64, 2 blocks of 4
#: heads, MLP 256 (98,304 binary weights; real patch embedding, LayerNorms and head).
VIT = {"patch_size": 7, "features": 64, "depth": 2, "num_heads": 4}

#: The sweep: optimizer -> (hyperparameter, values); the one that sets the flip rate.
SWEEP = {
    "bop": ("threshold", [1e-8, 1e-7, 1e-6, 1e-5]),
    "bop2nd_order": ("threshold", [1e-6, 1e-4, 1e-3]),
    "sgdat": ("threshold", [1e-7, 1e-6]),
    "diode": ("binary_lr", [1e-3, 1e-2, 1e-1]),
    "latent": ("binary_lr", [1e-3, 1e-2, 1e-1]),
}

#: Distillation weights tried by the distillation sweep: (temperature, logits, attention,
#: hidden); the first is ``binax-train``'s default.
DISTILL_SWEEP = [(1.0, 1.0, 1.0, 1.0), (1.0, 1.0, 0.0, 0.0)]


def _distill_fields(weights) -> dict:
    t, lg, at, hd = weights
    return dict(distill_temperature=t, distill_logits=lg, distill_attention=at, distill_hidden=hd)


def run_one(args, optimizer, hparams, seed, epochs, steps, *, teacher=None, weights=None,
            run_dir=None) -> dict:  # fmt: skip
    """One training run; returns its record (settings, per-epoch history, wall time)."""
    config = Config(
        model="vit",
        model_kwargs=dict(VIT),
        dataset="fashion_mnist",
        data_dir=args.data_dir,
        optimizer=optimizer,
        hparams=dict(hparams),
        lr=args.lr,
        epochs=epochs,
        batch_size=args.batch_size,
        steps_per_epoch=steps,
        seed=seed,
        checkpoint=run_dir is not None,
        plots=False,
        progress=False,
        distill_from=teacher,
        **(_distill_fields(weights) if teacher else {}),
    )
    result, wall = _common.train_quietly(config, run_dir)
    keys = ("epoch", "step", "train_accuracy", "test_accuracy", "flip_ratio_total", "distill")
    return {
        "optimizer": optimizer,
        "overrides": dict(hparams),
        "distill": list(weights) if teacher else None,
        "seed": seed,
        "epochs": epochs,
        "wall_s": wall,
        "history": [{k: r[k] for k in keys if k in r} for r in result.history],
    }


def name_of(r) -> str:
    return r["optimizer"] + (" + KD" if r["distill"] else "")


def main_table(records) -> str:
    head = ("recipe", "settings", "seeds", "final test acc % mean ± sd", "[min, max]",
            "flips/weight/step, last epoch", "wall s/run")  # fmt: skip
    rows = []
    for name in ("real", *OPTIMIZERS):
        for kd in (False, True):
            rs = [r for r in records if r["optimizer"] == name and bool(r["distill"]) == kd]
            if not rs:
                continue
            m, sd, lo, hi = spread([100 * r["history"][-1]["test_accuracy"] for r in rs])
            settings = fmt_hp(rs[0]["overrides"]) or "defaults"
            if kd:
                settings += "; T, logits, attention, hidden = " + ", ".join(
                    f"{w:g}" for w in rs[0]["distill"]
                )
            ratio = statistics.fmean(r["history"][-1]["flip_ratio_total"] for r in rs)
            wall = statistics.fmean(r["wall_s"] for r in rs)
            rows.append((name_of(rs[0]), settings, len(rs), f"{m:.2f} ± {sd:.2f}",
                         f"[{lo:.2f}, {hi:.2f}]", f"{ratio:.1e}", f"{wall:.0f}"))  # fmt: skip
    return _common.md_table(head, rows)


def sweep_table(records) -> str:
    head = ("recipe", "setting", "test acc %", "flips/weight/step, last epoch", "wall s")
    rows = []
    for r in records:
        setting = fmt_hp(r["overrides"]) or "defaults"
        if r["distill"]:
            setting += "; T, logits, attention, hidden = " + ", ".join(
                f"{w:g}" for w in r["distill"]
            )
        h = r["history"][-1]
        rows.append((name_of(r), setting, f"{100 * h['test_accuracy']:.2f}",
                     f"{h['flip_ratio_total']:.1e}", f"{r['wall_s']:.0f}"))  # fmt: skip
    return _common.md_table(head, rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200, help="training steps of every run")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's, real-valued parameters")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--work-dir", default="/tmp/binax-vit-accuracy", help="teachers' runs")
    p.add_argument("--quick", action="store_true", help="1 seed, 10 steps, 2-point sweeps")
    p.add_argument("--out", default=None, help="prefix of the result files")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.seeds = 10, 1
    out = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)),
        "results",
        "vit_accuracy_quick" if args.quick else "vit_accuracy",
    )
    log_path = out + ".jsonl"
    os.makedirs(args.work_dir, exist_ok=True)
    setting = (
        f"BinaryViT {json.dumps(VIT)}, batch {args.batch_size}, Adam lr {args.lr:g} on the "
        "real-valued parameters"
    )
    header = (
        "# BinaryViT on Fashion-MNIST: binary optimizers, distillation, full precision\n\n"
        f"Started {_common.now()} on: {_common.machine()}\n\nSetting: {setting}; official "
        f"split (60,000 train / 10,000 test), no augmentation; every run {args.steps} steps "
        f"(one epoch of {args.steps} batches), then the test accuracy; main: seeds "
        f"0..{args.seeds - 1}, sweeps: seed 0.\n"
    )

    def teacher(seed):
        """The run directory of ``seed``'s full-precision twin (trained once)."""
        schedule("main", "real", {}, seed, None)
        return teacher_dir(seed)

    def teacher_dir(seed):
        return os.path.join(args.work_dir, f"real-seed{seed}-{args.steps}")

    def schedule(part, name, hp, seed, weights):
        """Runs one configuration unless a record of it exists (from any part): returns it.

        The twin runs in its `teacher_dir`, and runs again (deterministically, with no second
        record) when that directory is gone."""
        k = json.dumps([name, hp, seed, weights, setting, args.steps], sort_keys=True)
        run_dir = teacher_dir(seed) if name == "real" else None
        kept = run_dir is None or os.path.exists(os.path.join(run_dir, "config.json"))
        old = next((r for r in load_records(log_path) if r["key"] == k), None)
        if old is not None and kept:
            return old
        tdir = teacher(seed) if weights else None
        if run_dir is not None:  # an unfinished run is started again
            shutil.rmtree(run_dir, ignore_errors=True)
        rec = run_one(args, name, hp, seed, 1, args.steps, teacher=tdir, weights=weights,
                      run_dir=run_dir)  # fmt: skip
        rec.update(part=part, key=k)
        if old is not None:
            return old
        append_record(log_path, rec)
        h = rec["history"][-1]
        print(f"{part} {name_of(rec)} {fmt_hp(hp)} seed {seed}: test acc "
              f"{100 * h['test_accuracy']:.2f}%, flips/w/step {h['flip_ratio_total']:.1e}, "
              f"{rec['wall_s']:.0f}s", flush=True)  # fmt: skip
        report()
        return rec

    def best(records):
        return max(records, key=lambda r: r["history"][-1]["test_accuracy"])

    def plan():
        """(chosen settings, chosen distillation weights): the sweeps' best on seed 0."""
        chosen = {"real": {}}
        for name, (hp, values) in SWEEP.items():
            values = values[:2] if args.quick else values
            chosen[name] = best([schedule("sweep", name, {hp: v}, 0, None) for v in values])[
                "overrides"
            ]
        weights = best(
            [schedule("distill-sweep", "bop", chosen["bop"], 0, list(w)) for w in DISTILL_SWEEP]
        )["distill"]
        return chosen, weights

    def report():
        records = load_records(log_path)
        text = header
        for part, title in (("sweep", "Sweep (seed 0)"),
                            ("distill-sweep", "Distillation weights (Bop, seed 0)")):  # fmt: skip
            rs = [r for r in records if r["part"] == part]
            if rs:
                text += f"\n## {title}\n\n{sweep_table(rs)}\n"
        if chosen:
            settings, weights = chosen
            rs = [r for r in records if r["seed"] < args.seeds and r["overrides"] ==
                  settings.get(r["optimizer"]) and r["distill"] in (None, weights)]  # fmt: skip
            text += (
                "\n## Main: final test accuracy over seeds\n\nEach optimizer at its sweep's "
                "best setting, distillation (KD) with the distillation sweep's best weights; "
                "a seed-0 run of the sweeps with those settings is that seed's run.\n\n"
                + main_table(rs)
                + "\n"
            )
        text += f"\nLast updated {_common.now()}; {_common.machine()}\n"
        _common.write_text(out + ".md", text)

    print(header, flush=True)
    chosen = None  # report() shows the main table once the sweeps have chosen
    chosen = plan()
    settings, weights = chosen
    # Without distillation first, then distilled Diode and latent Adam (the claim), then the
    # other distilled runs; seed-major within each, so partial results cover every candidate.
    for names, w in ((("real", *OPTIMIZERS), None), (("diode", "latent"), weights),
                     (("bop", "bop2nd_order", "sgdat"), weights)):  # fmt: skip
        for seed in range(args.seeds):
            for name in names:
                schedule("main", name, settings[name], seed, w)
    report()
    print(f"wrote {out}.md, {out}.jsonl")


if __name__ == "__main__":
    main()
