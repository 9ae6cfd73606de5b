"""Figures of runs and experiments (matplotlib, written as PNG; no display needed)."""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd


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
