"""PNG plots of a run's history: loss, accuracy and flip ratio per epoch (matplotlib, Agg)."""

from __future__ import annotations

import os
from typing import Any

PLOTS = ("loss.png", "accuracy.png", "flip_ratio.png")


def write_plots(history: list[dict[str, Any]], directory: str) -> list[str]:
    """Writes `PLOTS` into ``directory`` from the per-epoch records; returns their paths."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in history]
    paths = []

    def save(fig, name):
        path = os.path.join(directory, name)
        fig.axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.tight_layout()
        fig.savefig(path + ".tmp.png", dpi=100)
        os.replace(path + ".tmp.png", path)  # a reader never sees half a PNG
        plt.close(fig)
        paths.append(path)

    for key, label in (("loss", "cross-entropy loss"), ("accuracy", "accuracy")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for split in ("train", "test"):
            ax.plot(epochs, [r[f"{split}_{key}"] for r in history], marker=".", label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
        save(fig, f"{key}.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    names = list(history[0]["flip_ratio"]) if history else []
    for name in names:
        ax.plot(epochs, [r["flip_ratio"][name] for r in history], marker=".", label=name)
    ax.set_yscale("symlog", linthresh=1e-6)
    ax.set_xlabel("epoch")
    ax.set_ylabel("flips per weight per step")
    ax.set_title("flip ratio of the binary layers")
    ax.grid(alpha=0.3)
    if names:
        ax.legend(fontsize="small")
    save(fig, "flip_ratio.png")
    return paths
