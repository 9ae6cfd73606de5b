"""The `ipr` flow: ingest -> SFT -> evaluate -> one `iteration` subflow per IPR iteration.

Each iteration is explore -> step rewards (expert, once per scorer; agent) -> mine pairs
-> mixture training -> evaluate. Every stage is a cached task (see `tasks.stages`), so
rerunning a run with the same config skips finished work, and a run killed midway
resumes at the first stage whose result is missing.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import pandas as pd

from tasks.settings import configure_prefect_env

configure_prefect_env()  # before the first `import prefect`

from prefect import flow, get_run_logger  # noqa: E402
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402
from prefect.tasks import Task  # noqa: E402

from flows import scale_out  # noqa: E402
from ipr_core.config import RunConfig  # noqa: E402
from ipr_core.models import resolve_model  # noqa: E402
from ipr_core.plots import iteration_plot_png  # noqa: E402
from ipr_core.run import BASE_ITERATION, iteration_summary  # noqa: E402
from ipr_core.store import Store  # noqa: E402
from tasks import stages  # noqa: E402


def absolute(config: RunConfig) -> RunConfig:
    """Paths made absolute, so tasks and cache keys mean the same files from any cwd."""
    return config.model_copy(
        update={"store": config.store.resolve(), "cache_dir": config.cache_dir.resolve()}
    )


def run_stage(task: Task, config: RunConfig, *args: Any, **kwargs: Any) -> Any:
    """Run a task; a cached result whose output left the store is recomputed once."""
    state = task(config, *args, return_state=True, **kwargs)
    result = state.result()  # raises the task's error (named by stage) if it failed
    if state.name == "Cached" and not stages.still_valid(task.name, config, result, **kwargs):
        get_run_logger().warning(
            f"cached result of {task.name!r} is no longer in the store; recomputing"
        )
        state = task.with_options(refresh_cache=True)(config, *args, return_state=True, **kwargs)
        result = state.result()
    return result


def artifact_key(*parts: object) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(str(p) for p in parts).lower()).strip("-")


def run_summary(config: RunConfig) -> pd.DataFrame:
    return iteration_summary(Store(config.store), config.run_id, config.dev_split)


def summary_records(summary: pd.DataFrame) -> list[dict[str, Any]]:
    return summary.astype(object).where(summary.notna(), None).to_dict("records")


def plot_markdown(summary: pd.DataFrame, run_id: str) -> str:
    """The run's dev curve as an inline PNG: the Prefect UI renders data URIs in markdown
    artifacts, so the plot needs no file server."""
    png = base64.b64encode(iteration_plot_png(summary, run_id)).decode("ascii")
    return f"![dev reward and average steps by iteration](data:image/png;base64,{png})"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no rows)"
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join("" if r[c] is None else str(r[c]) for c in columns) + " |"
              for r in rows]  # fmt: skip
    return "\n".join(lines)


@flow(name="iteration", flow_run_name="iteration-{iteration}", log_prints=True)
def iteration(config: RunConfig, sft_path: str, policy_path: str, iteration: int) -> dict[str, Any]:
    """One IPR iteration; returns the trained checkpoint (`path`, `checkpoint_id`)."""
    config = absolute(config)
    if config.scale_out is None:
        run_stage(stages.expert_step_rewards, config, sft_path)
    else:  # shards on a Dask task runner, one ingest
        scale_out.mc_step_rewards(config, sft_path, "expert", iteration)
    explored = run_stage(stages.explore, config, policy_path, iteration=iteration)
    if config.scale_out is None:
        scored = run_stage(stages.agent_step_rewards, config, sft_path, iteration=iteration)
    else:
        scored = scale_out.mc_step_rewards(config, sft_path, "agent", iteration)
    pairs = run_stage(stages.mine_pairs, config, scored["scorer_id"], iteration=iteration)
    trained = run_stage(
        stages.train_mixture, config, sft_path,
        policy_path if iteration > 1 else None, iteration=iteration,
    )  # fmt: skip
    metrics = run_stage(stages.evaluate, config, trained["path"], iteration=iteration)
    summary = run_summary(config)
    row = [r for r in summary_records(summary) if r["iteration"] == iteration]
    create_markdown_artifact(
        key=artifact_key(config.run_id, "iteration", iteration),
        description=f"IPR iteration {iteration} of run {config.run_id}",
        markdown="\n\n".join(
            [
                f"# Run `{config.run_id}`, iteration {iteration}",
                f"- explorations: {explored['explorations']} (policy `{explored['policy_id']}`)",
                f"- agent steps scored: {scored['queries']} (scorer `{scored['scorer_id']}`)",
                f"- pairs: {pairs['trajectory']} trajectory-level, {pairs['step']} step-level",
                f"- checkpoint: `{trained['checkpoint_id']}`",
                f"- {config.dev_split}: reward {metrics['avg_reward']}, "
                f"success {metrics['success_rate']}, steps {metrics['avg_steps']}",
                "## Summary row",
                markdown_table(row),
                "## Dev reward and average steps by iteration",
                plot_markdown(summary, config.run_id),
            ]
        ),
    )
    return trained


@flow(name="ipr", flow_run_name="ipr-{config.run_id}", log_prints=True)
def ipr(config: RunConfig) -> list[dict[str, Any]]:
    """Train an agent with IPR for `config`; returns the per-iteration summary rows."""
    config = absolute(config)
    base_path = stages.prepare(config)
    run_stage(stages.ingest, config)
    sft_path = base_path
    if config.sft is not None:
        if config.evaluate_base:
            run_stage(stages.evaluate, config, base_path, iteration=BASE_ITERATION)
        sft_path = run_stage(stages.sft, config, base_path)["path"]
    run_stage(stages.evaluate, config, sft_path, iteration=0)
    if config.mixture_settings is not None:  # method `sft` stops after stage 1
        policy_path = sft_path
        for k in range(1, config.iterations + 1):
            policy_path = iteration(config, sft_path, policy_path, k)["path"]
    rows = summary_records(run_summary(config))
    create_table_artifact(
        key=artifact_key(config.run_id, "summary"),
        table=rows,
        description=f"IPR summary of run {config.run_id} ({config.method}, {config.env})",
    )
    return rows


@flow(name="evaluate", flow_run_name="evaluate-{model}", log_prints=True)
def evaluate_flow(config: RunConfig, model: str, iteration: int = 0) -> dict[str, Any]:
    """Greedy episodes of one model (a model spec or folder) on the config's dev split."""
    config = absolute(config)
    path = resolve_model(model, config.cache_dir)
    return run_stage(stages.evaluate, config, str(Path(path)), iteration=iteration)
