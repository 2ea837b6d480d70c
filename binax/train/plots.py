"""PNG plots of a run's history: loss, accuracy and flip ratio per epoch (matplotlib, Agg)."""

from __future__ import annotations

import os
from typing import Any

PLOTS = ("loss.png", "accuracy.png", "flip_ratio.png")


def figures(history: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures of `PLOTS` (file name -> matplotlib figure), each with a title; accuracy is
    in percent, as the command prints it."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in history]
    out = {}
    for key, label, scale in (("loss", "cross-entropy loss", 1), ("accuracy", "accuracy (%)", 100)):
        fig, ax = plt.subplots(figsize=(6, 4))
        for split in ("train", "test"):
            values = [scale * r[f"{split}_{key}"] for r in history]
            ax.plot(epochs, values, marker=".", label=split)
        ax.set_ylabel(label)
        ax.set_title(f"{key}: train (running, train mode) and test (eval mode)")
        ax.legend()
        out[f"{key}.png"] = fig

    fig, ax = plt.subplots(figsize=(6, 4))
    names = list(history[0]["flip_ratio"]) if history else []
    for name in names:
        ax.plot(epochs, [r["flip_ratio"][name] for r in history], marker=".", label=name)
    ax.set_yscale("symlog", linthresh=1e-6)
    ax.set_ylabel("flips per weight per step")
    ax.set_title("flip ratio of the binary layers")
    if names:
        ax.legend(fontsize="small")
    out["flip_ratio.png"] = fig
    for fig in out.values():
        ax = fig.axes[0]
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        fig.tight_layout()
    return out


def write_plots(history: list[dict[str, Any]], directory: str) -> None:
    """Writes `PLOTS` into ``directory`` from the per-epoch records."""
    import matplotlib.pyplot as plt

    for name, fig in figures(history).items():
        path = os.path.join(directory, name)
        fig.savefig(path + ".tmp.png", dpi=100)
        os.replace(path + ".tmp.png", path)  # a reader never sees half a PNG
        plt.close(fig)
