"""Accuracy on Fashion-MNIST: every binary optimizer, latent-weight Adam and full precision.

Every run is `binax.train.train(Config(...))`, what ``binax-train`` runs, on the official
Fashion-MNIST split (60,000 training, 10,000 test images; read from
``/usr/share/datasets/fashion-mnist`` or the binax data directory), with one architecture,
batch size and number of epochs for all candidates:

- bop, bop2nd_order, sgdat, diode, cema: `binax.train.optim.BINARY_DEFAULTS` (the training
  command's per-optimizer defaults), Adam(``--lr``) on the real-valued parameters (BatchNorm);
- latent: Adam on latent real-valued kernels clipped to [-1, 1] (BinaryConnect/BinaryNet);
- real: the same architecture with real-valued kernels and hard-tanh activations, every
  parameter trained by Adam(``--lr``) (the full-precision baseline).

Part 1 ("main"): each candidate with ``--seeds`` seeds (the seed sets the initialisation, the
data order and random optimizer state). Reported: final test accuracy (mean, standard deviation
and range over the seeds), best epoch's test accuracy, flips per epoch (mean over epochs and
seeds; for the baselines, sign changes of the latent/real kernels), and wall time per run
(including compilation and evaluation). The plot shows the test accuracy per epoch, mean over
seeds, one curve per candidate.

Part 2 ("sweep"): for every binary optimizer a 3x3 grid of its threshold-like and rate-like
hyperparameters around the defaults (one seed, ``--sweep-epochs`` epochs), for latent-weight
Adam its learning rate; the final test accuracy of every cell.

Results are written as they come (one JSON record per run, then the tables and the plot are
rewritten), so an interrupted run keeps what it finished; rerunning with the same ``--out``
skips runs already recorded.

Usage::

    python benchmarks/accuracy.py          # MLP 784-256-256-10, 10 epochs, 3 seeds; sweep 3
    python benchmarks/accuracy.py --quick  # 1 seed, 1 epoch of 40 steps, 2-point sweep
    python benchmarks/accuracy.py --part main --epochs 5 --hidden 512 512
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

from binax.train import BINARY_DEFAULTS, Config  # noqa: E402

CANDIDATES = ("bop", "bop2nd_order", "sgdat", "diode", "cema", "latent", "real")

#: The sweep: optimizer -> (threshold-like hyperparameter, rate-like hyperparameter), each
#: swept around the training command's current default (`binax.train.BINARY_DEFAULTS`):
#: thresholds x(1/100, 1, 100), rates x(1/10, 1, 10); for Diode, whose threshold is fixed at 0,
#: its learning rate (relative to ``init_scale``, it plays the threshold's part) and its slow rate
#: ``1 - b2``. Latent-weight Adam has one: its learning rate.
SWEEP_AXES = {
    "bop": (("threshold", 100), ("gamma", 10)),
    "bop2nd_order": (("threshold", 100), ("gamma", 10)),
    "sgdat": (("threshold", 100), ("binary_lr", 10)),
    "diode": (("binary_lr", 10), ("b2", 10)),
    "cema": (("gamma", 10), ("alpha", 10)),
    "latent": (("binary_lr", 10),),
}


def _around(name: str, value: float, factor: float) -> list[float]:
    if name in ("b1", "b2"):  # sweep the rate 1 - b
        return [round(1 - (1 - value) * f, 12) for f in (factor, 1, 1 / factor)]
    return [float(f"{value * f:.3g}") for f in (1 / factor, 1, factor)]


def sweep_grids(quick: bool = False) -> dict[str, dict[str, list[float]]]:
    """optimizer -> {hyperparameter: values}; the middle value is the default.

    ``quick``: the default and the value below it of the first hyperparameter only.
    """
    grids = {}
    for name, axes in SWEEP_AXES.items():
        grid = {hp: _around(hp, BINARY_DEFAULTS[name][hp], f) for hp, f in axes}
        if quick:
            first = next(iter(grid))
            grid = {first: grid[first][:2]}
        grids[name] = grid
    return grids


def run_one(
    args, optimizer: str, hparams: dict, seed: int, epochs: int, steps_per_epoch: int | None
) -> dict:
    """One training run; returns its record (config, per-epoch history, wall time)."""
    config = Config(
        model="mlp",
        model_kwargs={"hidden_sizes": list(args.hidden)},
        dataset="fashion_mnist",
        data_dir=args.data_dir,
        optimizer=optimizer,
        hparams=hparams,
        real_optimizer="adam",
        lr=args.lr,
        epochs=epochs,
        batch_size=args.batch_size,
        steps_per_epoch=steps_per_epoch,
        seed=seed,
        checkpoint=False,
        plots=False,
        progress=False,
    )
    result, wall = _common.train_quietly(config)
    history = []
    for r in result.history:
        history.append(
            {
                k: r[k]
                for k in (
                    "epoch",
                    "step",
                    "train_loss",
                    "train_accuracy",
                    "test_loss",
                    "test_accuracy",
                    "flip_ratio_total",
                    "time_s",
                )
            }
        )
        history[-1]["flips"] = sum(r["flips"].values())
    return {
        "optimizer": optimizer,
        "hparams": {**BINARY_DEFAULTS[optimizer], **hparams},
        "overrides": hparams,
        "seed": seed,
        "epochs": epochs,
        "steps_per_epoch": result.history[0]["step"] if result.history else None,
        "binary_weights": sum(result.program.flip_sizes),
        "wall_s": wall,
        "history": history,
    }


def load_records(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def append_record(path: str, record: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def key(part: str, optimizer: str, hparams: dict, seed: int, setting: str, epochs: int) -> str:
    """Identifies a run: the resolved hyperparameters (defaults included), so a rerun after the
    defaults changed does not reuse old records."""
    resolved = {**BINARY_DEFAULTS[optimizer], **hparams}
    return json.dumps([part, optimizer, resolved, seed, setting, epochs], sort_keys=True)


def fmt_hp(hp: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in hp.items())


def spread(xs):
    mean = statistics.fmean(xs)
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return mean, sd, min(xs), max(xs)


def main_table(records) -> str:
    head = (
        "optimizer",
        "hyperparameters",
        "seeds",
        "final test acc % mean ± sd",
        "[min, max]",
        "best-epoch test acc % (mean)",
        "final train acc %",
        "flips/epoch (mean)",
        "flips/weight/step, last epoch",
        "wall s/run (mean)",
    )
    rows = []
    for name in CANDIDATES:
        rs = [r for r in records if r["optimizer"] == name]
        if not rs:
            continue
        final = [100 * r["history"][-1]["test_accuracy"] for r in rs]
        best = [100 * max(h["test_accuracy"] for h in r["history"]) for r in rs]
        train_acc = [100 * r["history"][-1]["train_accuracy"] for r in rs]
        flips = [statistics.fmean(h["flips"] for h in r["history"]) for r in rs]
        ratio = [r["history"][-1]["flip_ratio_total"] for r in rs]
        m, sd, lo, hi = spread(final)
        hp = fmt_hp(rs[0]["hparams"]) or "(Adam on all parameters)"
        rows.append(
            (
                name,
                hp,
                len(rs),
                f"{m:.2f} ± {sd:.2f}",
                f"[{lo:.2f}, {hi:.2f}]",
                f"{statistics.fmean(best):.2f}",
                f"{statistics.fmean(train_acc):.2f}",
                f"{statistics.fmean(flips):,.0f}",
                f"{statistics.fmean(ratio):.2e}",
                f"{statistics.fmean(r['wall_s'] for r in rs):.0f}",
            )
        )
    return _common.md_table(head, rows)


def per_epoch_table(records) -> str:
    names = [n for n in CANDIDATES if any(r["optimizer"] == n for r in records)]
    if not names:
        return ""
    epochs = max(len(r["history"]) for r in records)
    rows = []
    for e in range(epochs):
        row = [e + 1]
        for n in names:
            accs = [
                100 * r["history"][e]["test_accuracy"]
                for r in records
                if r["optimizer"] == n and len(r["history"]) > e
            ]
            row.append(f"{statistics.fmean(accs):.2f}" if accs else "")
        rows.append(row)
    return _common.md_table(("epoch", *names), rows)


def sweep_tables(records, grids) -> str:
    out = []
    for name, grid in grids.items():
        rs = [r for r in records if r["optimizer"] == name]
        if not rs:
            continue
        acc = {
            json.dumps(r["overrides"], sort_keys=True): 100 * r["history"][-1]["test_accuracy"]
            for r in rs
        }
        flips = {
            json.dumps(r["overrides"], sort_keys=True): r["history"][-1]["flip_ratio_total"]
            for r in rs
        }
        keys = list(grid)
        out.append(
            f"**{name}** (final test accuracy %, and flips per weight per step in the "
            "last epoch; the middle value of each hyperparameter is the default)\n"
        )
        if len(keys) == 1:
            (k,) = keys
            rows = []
            for v in grid[k]:
                c = json.dumps({k: v}, sort_keys=True)
                rows.append((f"{k}={v:g}", _cell(acc.get(c), flips.get(c))))
            out.append(_common.md_table((k, "test acc % (flips/w/step)"), rows))
        else:
            ka, kb = keys
            rows = []
            for a in grid[ka]:
                row = [f"{ka}={a:g}"]
                for b in grid[kb]:
                    c = json.dumps({ka: a, kb: b}, sort_keys=True)
                    row.append(_cell(acc.get(c), flips.get(c)))
                rows.append(row)
            out.append(
                _common.md_table((f"{ka} \\ {kb}", *(f"{kb}={b:g}" for b in grid[kb])), rows)
            )
        vals = list(acc.values())
        if len(vals) > 1:
            out.append(
                f"\nrange over the grid: {min(vals):.2f} – {max(vals):.2f} "
                f"(spread {max(vals) - min(vals):.2f} points)\n"
            )
    return "\n".join(out)


def _cell(acc, flips):
    if acc is None:
        return "–"
    return f"{acc:.2f} ({flips:.1e})"


def plot(records, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in CANDIDATES:
        rs = [r for r in records if r["optimizer"] == name]
        if not rs:
            continue
        epochs = min(len(r["history"]) for r in rs)
        xs = list(range(1, epochs + 1))
        mean = [
            statistics.fmean(100 * r["history"][e]["test_accuracy"] for r in rs)
            for e in range(epochs)
        ]
        lo = [min(100 * r["history"][e]["test_accuracy"] for r in rs) for e in range(epochs)]
        hi = [max(100 * r["history"][e]["test_accuracy"] for r in rs) for e in range(epochs)]
        style = "--" if name in ("latent", "real") else "-"
        (line,) = ax.plot(xs, mean, style, marker=".", label=f"{name} (n={len(rs)})")
        if len(rs) > 1:
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.12, linewidth=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy % (mean over seeds; band: min-max)")
    ax.set_title(title, fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=110)
    os.replace(path + ".tmp.png", path)
    plt.close(fig)


def sweep_plot(records, path: str, title: str) -> None:
    """Final test accuracy against the last epoch's flip rate, every sweep cell."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, name in enumerate(CANDIDATES):
        rs = [r for r in records if r["optimizer"] == name]
        if not rs:
            continue
        color = f"C{i}"
        xs = [max(r["history"][-1]["flip_ratio_total"], 1e-7) for r in rs]
        ys = [100 * r["history"][-1]["test_accuracy"] for r in rs]
        ax.scatter(xs, ys, color=color, label=name, s=22)
        for r, x, y in zip(rs, xs, ys, strict=True):
            if r["hparams"] == BINARY_DEFAULTS[name]:  # the default cell
                ax.scatter([x], [y], s=90, facecolors="none", edgecolors=color, linewidths=1.5)
    ax.set_xscale("log")
    ax.set_xlabel("flips per weight per step, last epoch (log)")
    ax.set_ylabel("final test accuracy %")
    ax.set_title(title + "\n(circled: the default hyperparameters)", fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=110)
    os.replace(path + ".tmp.png", path)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["main", "sweep", "all"], default="all")
    p.add_argument(
        "--hidden",
        type=int,
        nargs="+",
        default=[256, 256],
        help="hidden widths of the binary MLP (default 256 256)",
    )
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--sweep-epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument(
        "--lr",
        type=float,
        default=1e-2,
        help="Adam learning rate of the real-valued parameters (binax-train's default)",
    )
    p.add_argument("--optimizers", nargs="+", default=list(CANDIDATES), choices=CANDIDATES)
    p.add_argument("--data-dir", default=None)
    p.add_argument(
        "--quick",
        action="store_true",
        help="1 seed, 1 epoch of 40 steps; sweep: 2 values of one hyperparameter each",
    )
    p.add_argument(
        "--replot",
        action="store_true",
        help="only redraw the PNGs from <out>.jsonl (runs nothing, keeps <out>.md)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="prefix of the result files (default: benchmarks/results/accuracy[_quick])",
    )
    args = p.parse_args(argv)
    steps = None
    grids = sweep_grids()
    if args.quick:
        args.epochs, args.seeds, args.sweep_epochs, steps = 1, 1, 1, 40
        grids = sweep_grids(quick=True)
    out = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)),
        "results",
        "accuracy_quick" if args.quick else "accuracy",
    )
    log_path = out + ".jsonl"
    done = {r["key"] for r in load_records(log_path)}
    arch = f"binary MLP 784-{'-'.join(map(str, args.hidden))}-10 (BatchNorm, no scale)"
    setting = f"{arch}, batch {args.batch_size}, Adam lr {args.lr:g} on real-valued parameters"
    per_epoch = "" if steps is None else f" of {steps} steps"
    header = (
        "# Accuracy on Fashion-MNIST: binary optimizers vs latent-weight Adam and full "
        "precision\n\n"
        f"Command: `{_common.command()}` (`--quick`: a smoke test of a few minutes). "
        f"Writes `{os.path.basename(out)}.md` (these tables), `{os.path.basename(out)}.jsonl` "
        f"(one record per run, with every epoch), `{os.path.basename(out)}.png` (test "
        f"accuracy per epoch, main part) and `{os.path.basename(out)}_sweep.png` (sweep: "
        "accuracy against flip rate); `--replot` redraws the PNGs from the `.jsonl`; "
        "rerunning skips the runs already in the `.jsonl`.\n\n"
        f"Started {_common.now()} on: {_common.machine()}\n\n"
        f"Setting: {setting}; official split (60,000 train / 10,000 test), inputs normalised, "
        "no augmentation; every run is `binax.train.train(Config(...))` (what `binax-train` "
        "runs)."
        + (
            f" Main: {args.epochs} epochs{per_epoch}, seeds 0..{args.seeds - 1}."
            if args.part in ("main", "all")
            else ""
        )
        + (
            f" Sweep: seed 0, {args.sweep_epochs} epochs{per_epoch}."
            if args.part in ("sweep", "all")
            else ""
        )
        + " Wall time per run includes compilation, data loading and evaluation after every "
        "epoch, on a shared machine.\n"
    )
    plan = []
    if args.part in ("main", "all"):
        for seed in range(args.seeds):  # seed-major: partial results cover every candidate
            for name in args.optimizers:
                plan.append(("main", name, {}, seed, args.epochs))
    if args.part in ("sweep", "all"):
        for name in args.optimizers:
            grid = grids.get(name)
            if not grid:
                continue
            for values in itertools.product(*grid.values()):
                plan.append(
                    ("sweep", name, dict(zip(grid, values, strict=True)), 0, args.sweep_epochs)
                )

    def plots(records):
        main_rs = [r for r in records if r["part"] == "main"]
        sweep_rs = [r for r in records if r["part"] == "sweep"]
        if main_rs:
            plot(main_rs, out + ".png", f"Fashion-MNIST, {arch}, batch {args.batch_size}")
        if sweep_rs:
            epochs = max(r["epochs"] for r in sweep_rs)
            sweep_plot(
                [r for r in sweep_rs if r["epochs"] == epochs],
                out + "_sweep.png",
                f"Sweep, Fashion-MNIST, {arch}, {epochs} epochs, seed 0",
            )

    if args.replot:
        plots(load_records(log_path))
        print(f"redrew the plots of {log_path}")
        return

    print(header, flush=True)

    def report():
        records = load_records(log_path)
        main_rs = [r for r in records if r["part"] == "main"]
        sweep_rs = [r for r in records if r["part"] == "sweep"]
        plots(records)
        text = header
        if main_rs:
            text += (
                "\n## Main: final test accuracy over seeds\n\n"
                + main_table(main_rs)
                + "\n\n### Test accuracy per epoch (mean over seeds)\n\n"
                + per_epoch_table(main_rs)
                + "\n"
            )
            text += f"\nPlot: `{os.path.basename(out)}.png`\n"
        for epochs in sorted({r["epochs"] for r in sweep_rs}):
            rs = [r for r in sweep_rs if r["epochs"] == epochs]
            text += (
                "\n## Sweep: sensitivity to threshold and rate (seed 0, "
                f"{epochs} epochs)\n\n" + sweep_tables(rs, grids) + "\n"
            )
        if sweep_rs:
            text += f"\nPlot: `{os.path.basename(out)}_sweep.png`\n"
        text += f"\nLast updated {_common.now()}; {_common.machine()}\n"
        _common.write_text(out + ".md", text)

    t_start = time.perf_counter()
    for i, (part, name, hp, seed, epochs) in enumerate(plan):
        k = key(part, name, hp, seed, setting, epochs)
        if k in done:
            continue
        rec = run_one(args, name, hp, seed, epochs, steps)
        rec.update(part=part, key=k, setting=setting)
        append_record(log_path, rec)
        h = rec["history"][-1]
        print(
            f"[{i + 1}/{len(plan)}] {part} {name} {fmt_hp(hp)} seed {seed}: test acc "
            f"{100 * h['test_accuracy']:.2f}% after {epochs} epochs, {rec['wall_s']:.0f}s "
            f"(elapsed {time.perf_counter() - t_start:.0f}s)",
            flush=True,
        )
        report()
    report()
    print(f"wrote {out}.md, {out}.jsonl, {out}.png")


if __name__ == "__main__":
    main()
