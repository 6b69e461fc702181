"""Shared matplotlib setup for the analysis figures (headless, one style, PNG)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: Snakemake jobs and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def figure(rows: int, cols: int, size: tuple[float, float]):
    fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False)
    return fig, axes.ravel()


def save(fig, path: Path, axes=()) -> None:
    for ax in np.ravel(axes):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
