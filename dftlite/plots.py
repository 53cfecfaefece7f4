"""Training curves of `dftlite train`, like Figure 3 of the DFT paper (Guo et al. 2025, arXiv 2502.18679).

    from dftlite.plots import plot_training_curves
    plot_training_curves(trainer.state.log_history, "runs/dftlite/training_curves.png")

Three panels over optimizer steps: the loss; the mean per-token log-likelihood of positives and
of negatives; mean log u. Evaluation points (eval_*) are drawn dashed. matplotlib is an optional
extra (`pip install dftlite[plot]`); without it no PNG is written.
"""

from __future__ import annotations

import os
from pathlib import Path


def _series(log_history: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(entry["step"], entry[key]) for entry in log_history if key in entry and "step" in entry]
    return [p[0] for p in points], [p[1] for p in points]


def plot_training_curves(log_history: list[dict], path: str | Path) -> Path | None:
    """Write the curves to `path` (PNG); return it, or None when matplotlib is missing."""
    try:
        from matplotlib.figure import Figure  # the object API: no pyplot, no global backend state
    except ImportError:
        print(f"matplotlib is not installed: skipping {path} (pip install 'dftlite[plot]')")
        return None
    panels = [
        ("loss", [("loss", "train"), ("eval_loss", "eval")]),
        ("log-likelihood per token", [("pos_logp_per_token", "positives"), ("neg_logp_per_token", "negatives"),
                                      ("eval_pos_logp_per_token", "eval positives"),
                                      ("eval_neg_logp_per_token", "eval negatives")]),
        ("mean log u", [("log_u_mean", "train")]),
    ]
    figure = Figure(figsize=(13, 3.6), layout="constrained")
    axes = figure.subplots(1, len(panels))
    for ax, (title, series) in zip(axes, panels):
        for key, label in series:
            steps, values = _series(log_history, key)
            if steps:
                style = "--o" if key.startswith("eval_") else "-"
                ax.plot(steps, values, style, label=label, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:  # through a temporary file: a full disk leaves no half-written image
        figure.savefig(tmp, dpi=110, format=path.suffix.lstrip(".") or "png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
