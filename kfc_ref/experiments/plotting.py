"""Figure style and one function per figure.  Each function takes computed results (host NumPy
arrays or plain numbers), draws one figure and writes it as PNG and PDF; it returns the paths.

Computation lives elsewhere (``kfc_ref.theory.sud``, ``kfc_ref.theory.ladder``, training
logs); these
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
COLORS = {"sgd": "#1f77b4", "kfc-pre": "#d62728", "kfac": "#2ca02c", "kfc": "#d62728"}


def _color(label: str, k: int) -> str:
    """The method colour for a label starting with a method name (case-insensitive), else C<k>."""
    low = label.lower()
    return next((c for key, c in COLORS.items() if low.startswith(key)), f"C{k}")


def _pyplot():
    import matplotlib
    backend = matplotlib.get_backend().lower()
    # A GUI backend without a display cannot draw: fall back to Agg.  Jupyter's inline backend
    # ("module://...") works without a display and is kept.
    if backend not in ("agg", "pdf", "svg") and not backend.startswith("module://") and \
            not os.environ.get("DISPLAY"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update(STYLE)
    return plt


def _wrap(text: str, width: int) -> str:
    """``text`` broken into lines of at most ``width`` characters (figure notes)."""
    import textwrap
    return "\n".join(textwrap.wrap(text, width))


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


def choose_maps(auto, maps: int = 3):
    """Indices of ``maps`` maps spread evenly over those whose (C, P1, P2) panel is defined (no
    NaN: not identically zero); all maps when fewer are defined."""
    auto = np.asarray(auto)
    finite = np.flatnonzero(np.isfinite(auto).all(axis=(1, 2)))
    pool = finite if len(finite) >= maps else np.arange(auto.shape[0])
    return np.unique(pool[np.linspace(0, len(pool) - 1, maps).round().astype(int)])


def plot_correlation_panels(rows: list[tuple], title: str, out_dir: str,
                            name: str, maps: int = 3, note: str | None = None) -> list[str]:
    """Figures 3 and 4 layout: one row per layer; ``maps`` spatial autocorrelation panels
    (absolute values, offset 0 at the centre) and the cross-map correlation matrix.

    rows: (label, autocorr (C, 2R+1, 2R+1), cross (C, C)) per layer, optionally with a fourth
    entry: the map indices to show in that row (default :func:`choose_maps`).  ``note``: a
    line of small text under the panels (e.g. what NaN / white entries mean).
    """
    plt = _pyplot()
    fig, axes = plt.subplots(len(rows), maps + 1, figsize=(1.7 * (maps + 1), 1.7 * len(rows)),
                             squeeze=False)
    for r, (label, auto, cross, *given) in enumerate(rows):
        auto, cross = np.abs(np.asarray(auto)), np.abs(np.asarray(cross))
        chosen = (choose_maps(auto, maps) if not given or given[0] is None
                  else list(given[0])[:maps])
        for ax in axes[r, len(chosen):maps]:
            ax.axis("off")                               # fewer maps than panels
        for k, c in enumerate(chosen):
            ax = axes[r, k]
            ax.imshow(auto[c], vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(f"map {c}")
            if k == 0:
                ax.set_ylabel(label)
        ax = axes[r, maps]
        im = ax.imshow(cross, vmin=0, vmax=1)
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_title("cross-map")
    fig.colorbar(im, ax=axes, shrink=0.6, label="|correlation|")
    fig.suptitle(title)
    if note:
        fig.text(0.5, 0.0, _wrap(note, 14 * (maps + 1)), ha="center", va="top", fontsize=7)
    return save_figure(fig, out_dir, name)


def plot_sud_profile(panels: list[tuple[str, dict[str, tuple]]], title: str, out_dir: str,
                     name: str, note: str | None = None) -> list[str]:
    """Mean |correlation| against the offset r = max(|d1|, |d2|) = 1..R, one panel per field.

    panels: (panel title, {layer label: (profile (R,), shuffled baseline (R,))}); the profile
    is drawn solid with dots, its baseline dashed in the same colour (NaN points are skipped).
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 2.9), squeeze=False)
    for ax, (panel_title, layers) in zip(axes[0], panels):
        for k, (label, (profile, base)) in enumerate(layers.items()):
            r = np.arange(1, len(profile) + 1)
            ax.plot(r, profile, "o-", ms=3, color=f"C{k}", label=label)
            ax.plot(np.arange(1, len(base) + 1), base, "--", color=f"C{k}", lw=1)
        ax.set_xlabel("offset r = max(|d1|, |d2|)")
        ax.set_ylabel("mean |correlation|")
        ax.set_ylim(bottom=0)
        ax.set_title(panel_title)
        ax.legend(fontsize=7, title="dashed: shuffled examples", title_fontsize=6)
    fig.suptitle(title)
    fig.tight_layout()
    if note:
        fig.text(0.5, 0.0, _wrap(note, 40 * len(panels)), ha="center", va="top", fontsize=7)
    return save_figure(fig, out_dir, name)


def plot_sud_history(iterations, panels: list[tuple[str, dict[str, tuple]]], title: str,
                     out_dir: str, name: str) -> list[str]:
    """One panel per field: {layer label: (values, baseline)} against ``iterations``; values
    solid with dots, the baseline dashed in the same colour."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 2.9), squeeze=False)
    for ax, (panel_title, layers) in zip(axes[0], panels):
        for k, (label, (values, base)) in enumerate(layers.items()):
            ax.plot(iterations, values, "o-", ms=3, color=f"C{k}", label=label)
            ax.plot(iterations, base, "--", color=f"C{k}", lw=1)
        ax.set_xlabel("iteration")
        ax.set_ylabel("mean |correlation|")
        ax.set_ylim(bottom=0)
        ax.set_title(panel_title)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
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


def _symmetric_limits(*mats, percentile: float = 99.5):
    """One colour scale, symmetric about 0, shared by all matrices (so blocks are comparable),
    clipped at a high percentile of |entries| so that one large entry (the bias-bias corner,
    Omega[0, 0] = |T|) does not wash out the structure."""
    values = np.abs(np.concatenate([np.asarray(a, dtype=float).ravel() for a in mats]))
    m = float(np.nanpercentile(values, percentile)) or float(np.nanmax(values)) or 1.0
    return -m, m


def plot_fisher_vs_kfc(panels: list[tuple[str, object]], title: str, out_dir: str,
                       name: str) -> list[str]:
    """Side-by-side heatmaps of dense Fisher blocks (e.g. exact F, Omega kron Gamma, F - F_hat)
    on one symmetric colour scale (clipped at the 99.5th percentile of |entries|).
    panels: (label, (P, P) matrix); labels may contain a newline."""
    plt = _pyplot()
    mats = [np.asarray(m) for _, m in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.9 * len(panels), 3.3), squeeze=False)
    lo, hi = _symmetric_limits(*mats)
    for ax, (label, _), mat in zip(axes[0], panels, mats):
        im = ax.imshow(mat, cmap="RdBu_r", vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_title(label)
    fig.colorbar(im, ax=axes, shrink=0.8, extend="both")
    fig.suptitle(title)
    return save_figure(fig, out_dir, name)


def plot_ladder(rows: list, title: str, out_dir: str, name: str) -> list[str]:
    """The approximation ladder (docs/ladder.md) as two bar charts: ||F_k - F|| / ||F|| and the
    angle between the damped solves F^-1 g and F_k^-1 g.  rows: (name, rel_error, angle_deg)."""
    plt = _pyplot()
    names = [r[0] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(7.5, 2.8))
    x = np.arange(len(rows))
    ax1.bar(x, [r[1] for r in rows], color="#7f7f7f")
    ax1.set_ylabel("||F_k - F||_F / ||F||_F")
    ax2.bar(x, [r[2] for r in rows], color="#9467bd")
    ax2.set_ylabel("angle to F^-1 g, damped (deg)")
    for ax in (ax1, ax2):
        ax.set_xticks(x, names, rotation=30, ha="right")
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, out_dir, name)


def _series(metrics: list[dict], key: str):
    """(rows with a numeric ``key``, values) from a metrics log (empty strings / None skipped)."""
    keep = [m for m in metrics if m.get(key) not in (None, "")]
    return keep, np.array([float(m[key]) for m in keep])


def plot_training_curves(runs: dict[str, list[dict]], title: str, out_dir: str,
                         name: str) -> list[str]:
    """Figures 1-2 in miniature: loss and classification error of each run against wall-clock
    seconds (top) and iterations (bottom); solid = test, dashed = train (as in Figure 1).

    runs: {label: metrics rows with iteration, wall_seconds, train_loss, train_error,
    test_loss, test_error}; a label starting with 'sgd', 'kfc-pre' or 'kfac' takes its colour.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(7.5, 5.2))
    for k, (label, metrics) in enumerate(runs.items()):
        color = _color(label, k)
        for col, quantity in enumerate(("loss", "error")):
            for row, xkey in enumerate(("wall_seconds", "iteration")):
                ax = axes[row, col]
                for split, style in (("test", "-"), ("train", "--")):
                    kept, y = _series(metrics, f"{split}_{quantity}")
                    if len(kept) == 0:
                        continue
                    x = np.array([float(m[xkey]) for m in kept])
                    ax.plot(x, y, style, marker=".", color=color, label=f"{label} ({split})")
                ax.set_xlabel("seconds" if xkey == "wall_seconds" else "iterations")
                ax.set_ylabel("cross-entropy" if quantity == "loss" else "classification error")
    for ax in axes[:, 0]:
        ax.set_yscale("log")
    axes[0, 1].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, out_dir, name)


def plot_damping_sweep(dampings, panels: list[tuple[str, dict[str, list[float]]]], title: str,
                       out_dir: str, name: str) -> list[str]:
    """One panel per (ylabel, {series label: values}) against the damping gamma (log x axis);
    a legend where a panel has more than one series."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.0), squeeze=False)
    for ax, (ylabel, series) in zip(axes[0], panels):
        for label, values in series.items():
            ax.plot(dampings, values, "o-", ms=3, label=label)
        ax.set_xscale("log")
        ax.set_xlabel("damping gamma")
        ax.set_ylabel(ylabel)
        if len(series) > 1:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, out_dir, name)


def plot_invariance(losses: dict[str, list[float]], gaps: dict[str, list[float]], title: str,
                    out_dir: str, name: str) -> list[str]:
    """Theorem 3 over a trajectory: left, the training loss per iteration of each method on the
    original network (solid) and on the reparameterised one (dashed, keys ending in
    ' (reparam.)'); right, the gap max |log p - log p_dagger| between the two per method."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(7.5, 3.0))
    for k, (label, values) in enumerate(losses.items()):
        method = label.replace(" (reparam.)", "")
        color = _color(method, k)
        ax1.plot(values, "--" if label != method else "-", color=color, label=label)
    ax1.set_xlabel("iteration")
    ax1.set_ylabel("training loss")
    ax1.legend(fontsize=7)
    for k, (label, values) in enumerate(gaps.items()):
        color = _color(label, k)
        ax2.semilogy(np.maximum(np.asarray(values, dtype=float), 1e-17), color=color,
                     label=label)
    ax2.set_xlabel("iteration")
    ax2.set_ylabel("max |log p - log p_dagger|")
    ax2.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, out_dir, name)
