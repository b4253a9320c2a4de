"""Figure style and one function per figure.  Each function takes computed results (host NumPy
arrays or plain numbers), draws one figure and writes it as PNG and PDF; it returns the paths.

Computation lives elsewhere (``kfc_ref.sud``, ``kfc_ref.ladder``, training logs); these
functions only draw, so they are cheap to test.
"""
from __future__ import annotations

import os

import numpy as np

STYLE = {
    "figure.dpi": 110, "savefig.dpi": 140, "font.size": 9, "axes.titlesize": 9,
    "axes.labelsize": 9, "legend.fontsize": 8, "axes.spines.top": False,
    "axes.spines.right": False, "image.cmap": "viridis",
}
COLORS = {"sgd": "#1f77b4", "kfc-pre": "#d62728", "kfac": "#2ca02c"}


def _pyplot():
    import matplotlib
    if matplotlib.get_backend().lower() not in ("agg", "pdf", "svg") and \
            not os.environ.get("DISPLAY"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update(STYLE)
    return plt


def save_figure(fig, out_dir: str, name: str, formats=("png", "pdf")) -> list[str]:
    """Write ``fig`` as ``out_dir/name.<fmt>`` for each format; close it; return the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for fmt in formats:
        path = os.path.join(out_dir, f"{name}.{fmt}")
        fig.savefig(path, bbox_inches="tight")
        paths.append(path)
    _pyplot().close(fig)
    return paths


def plot_correlation_panels(rows: list[tuple[str, object, object]], title: str, out_dir: str,
                            name: str, maps: int = 3) -> list[str]:
    """Figures 3 and 4 layout: one row per layer; ``maps`` spatial autocorrelation panels
    (absolute values, offset 0 at the centre) and the cross-map correlation matrix.

    rows: (label, autocorr (C, 2R+1, 2R+1), cross (C, C)) per layer.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(len(rows), maps + 1, figsize=(1.7 * (maps + 1), 1.7 * len(rows)),
                             squeeze=False)
    for r, (label, auto, cross) in enumerate(rows):
        auto, cross = np.abs(np.asarray(auto)), np.abs(np.asarray(cross))
        chosen = np.linspace(0, auto.shape[0] - 1, maps).round().astype(int)
        for k, c in enumerate(chosen):
            ax = axes[r, k]
            ax.imshow(auto[c], vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(f"{label}, map {c}" if k == 0 else f"map {c}")
        ax = axes[r, maps]
        im = ax.imshow(cross, vmin=0, vmax=1)
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_title("cross-map")
    fig.colorbar(im, ax=axes, shrink=0.6, label="|correlation|")
    fig.suptitle(title)
    return save_figure(fig, out_dir, name)


def plot_sud_bars(labels: list[str], series: dict[str, list[float]], out_dir: str,
                  name: str, ylabel: str = "mean |corr.| at non-zero offsets") -> list[str]:
    """Grouped bars: one group per layer, one bar per series (e.g. max vs average pooling)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 2.8))
    width = 0.8 / max(1, len(series))
    x = np.arange(len(labels))
    for k, (key, values) in enumerate(series.items()):
        ax.bar(x + (k - (len(series) - 1) / 2) * width, values, width, label=key)
    ax.set_xticks(x, labels)
    ax.set_ylabel(ylabel)
    ax.legend()
    return save_figure(fig, out_dir, name)
