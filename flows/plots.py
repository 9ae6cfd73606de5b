"""Figures of runs and experiments (matplotlib, written as PNG; no display needed)."""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd

TRAINING_PANELS = (
    ("pair accuracy", "accuracy", (-0.02, 1.02)),
    ("implicit reward margin", "margin", None),
    ("DPO loss", "loss", None),
)
"""Per DPO level (o: trajectory pairs, s: step pairs), what the training-step figures plot."""


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def iteration_plot_png(summary: pd.DataFrame, run_id: str) -> bytes:
    """Dev reward and average steps by iteration of one run (`ipr_core.run.direct.iteration_summary`
    rows), as PNG bytes: the flows embed it in the iteration's Prefect artifact."""
    plt = _pyplot()
    rows = summary.dropna(subset=["dev_reward"])
    fig, (reward_ax, steps_ax) = plt.subplots(1, 2, figsize=(8, 3.2))
    reward_ax.plot(rows["iteration"], rows["dev_reward"].astype(float), marker="o", label="reward")
    reward_ax.plot(
        rows["iteration"],
        rows["success_rate"].astype(float),
        marker="s",
        linestyle="--",
        label="success rate",
    )
    reward_ax.set_ylim(-0.02, 1.02)  # rewards live in [0, 1]
    reward_ax.set_ylabel("dev")
    reward_ax.legend()
    steps_ax.plot(rows["iteration"], rows["avg_steps"].astype(float), marker="o", color="tab:green")
    steps_ax.set_ylabel("dev average steps")
    for ax in (reward_ax, steps_ax):
        ax.set_xlabel("iteration (-1 base, 0 SFT)")
        ax.set_xticks(list(rows["iteration"]))
        ax.grid(alpha=0.3)
    fig.suptitle(f"Run {run_id}")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def plot_dev_curve(curve: pd.DataFrame, path: Path, experiment_id: str) -> None:
    """Mean dev reward by iteration per method, bars from the worst to the best seed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for method, rows in curve.groupby("method", sort=False):
        mean = rows["dev_reward_mean"].astype(float)
        spread = [
            mean - rows["dev_reward_min"].astype(float),
            rows["dev_reward_max"].astype(float) - mean,
        ]
        ax.errorbar(rows["iteration"], mean, yerr=spread, marker="o", capsize=3, label=method)
    ax.set_xlabel("iteration (0 = SFT)")
    ax.set_ylabel("dev average reward")
    ax.set_ylim(-0.02, 1.02)  # rewards live in [0, 1]: a fixed scale keeps plots comparable
    ax.set_title(f"Dev reward by iteration, experiment {experiment_id}")
    ax.grid(alpha=0.3)
    if not curve.empty:
        ax.legend()
        ax.set_xticks(sorted(curve["iteration"].unique()))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def training_steps_png(steps: pd.DataFrame, title: str) -> bytes:
    """Per-step diagnostics of mixture training as PNG bytes: for each DPO level (o-DPO:
    trajectory pairs, s-DPO: step pairs) pair accuracy, implicit reward margin and loss, one
    line per `label`. `steps` holds `label`, `iteration`, `step` and the `training_steps`
    columns; an iteration's steps are spread over [iteration, iteration + 1) on the x axis,
    so methods with different step counts line up by iteration."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(TRAINING_PANELS), figsize=(4 * len(TRAINING_PANELS), 3.4))
    steps = steps.sort_values(["iteration", "step"])
    count = steps.groupby(["label", "iteration"])["step"].transform("count")
    rank = steps.groupby(["label", "iteration"]).cumcount()
    steps = steps.assign(x=steps["iteration"] + rank / count)
    for ax, (name, metric, limits) in zip(axes, TRAINING_PANELS, strict=True):
        for i, (label, rows) in enumerate(steps.groupby("label", sort=False)):
            for level, style in (("o", "--"), ("s", "-")):  # a method keeps its colour
                values = rows[f"{level}_dpo_{metric}"].astype(float)
                if values.notna().any():
                    ax.plot(
                        rows["x"], values, style, color=f"C{i}", marker=".",
                        label=f"{label} {level}-DPO",
                    )  # fmt: skip
        ax.set_title(name)
        ax.set_xlabel("iteration (its optimizer steps in order)")
        ax.set_xticks(sorted(steps["iteration"].unique()))
        ax.grid(alpha=0.3)
        if limits:
            ax.set_ylim(*limits)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.1 if handles else 0, 1, 1))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()
