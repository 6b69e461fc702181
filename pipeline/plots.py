"""Shared matplotlib setup for every figure (headless, one style, PNG)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: Snakemake jobs and CI have no display
import matplotlib.pyplot as plt
import numpy as np


def figure(rows: int, cols: int, size: tuple[float, float], **kw):
    """A figure and its axes, flattened (``squeeze=False``: always a 1-d array)."""
    fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False, **kw)
    return fig, axes.ravel()


def save(fig, path: Path, axes=(), title: str | None = None) -> None:
    """Grid and legend on ``axes``, the title over all panels, lay out, write, close."""
    for ax in np.ravel(axes):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title is not None:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.97) if title is not None else None)  # room for the title
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
