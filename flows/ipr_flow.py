"""The `ipr` flow: `ipr_core.run.loop.run_ipr` with every stage a cached Prefect task and one
`iteration` subflow per IPR iteration (`loop.run_iteration`, the one stage list).

Rerunning a run with the same config skips finished work (cache keys are the stages'
fingerprints); a run killed midway resumes at the first stage whose completion record
is not in the store.
"""

from __future__ import annotations

import base64
import re
from typing import Any

import pandas as pd

from tasks.settings import configure_prefect_env

configure_prefect_env()  # before the first `import prefect`

from prefect import flow  # noqa: E402
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402

from flows import scale_out  # noqa: E402
from flows.plots import iteration_plot_png, training_steps_png  # noqa: E402
from flows.report import markdown_table  # noqa: E402
from ipr_core.config import RunConfig  # noqa: E402
from ipr_core.run import loop  # noqa: E402
from ipr_core.run.context import RunContext  # noqa: E402
from ipr_core.run.loop import Iteration, IterationResult, Mined, StepsScored  # noqa: E402
from ipr_core.store.transcripts import pair_transcript  # noqa: E402
from tasks import stages  # noqa: E402


def absolute(config: RunConfig) -> RunConfig:
    """Paths made absolute, so tasks and cache keys mean the same files from any cwd."""
    return config.model_copy(
        update={"store": config.store.resolve(), "cache_dir": config.cache_dir.resolve()}
    )


def flow_context(config: RunConfig) -> RunContext:
    """The flow's run context; with `scale_out`, step scoring in shards on Dask."""
    if config.scale_out is None:
        return stages.context(config)
    return stages.context(config, scale_out.sharded_scoring(config.scale_out))


def artifact_key(*parts: object) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(str(p) for p in parts).lower()).strip("-")


def summary_records(summary: pd.DataFrame) -> list[dict[str, Any]]:
    return summary.astype(object).where(summary.notna(), None).to_dict("records")


def inline_png(png: bytes, alt: str) -> str:
    """A figure inline: the Prefect UI renders data URIs in markdown artifacts, so plots
    need no file server."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"


def plot_markdown(summary: pd.DataFrame, run_id: str) -> str:
    """The run's dev curve."""
    return inline_png(iteration_plot_png(summary, run_id), "dev reward and average steps")


def training_steps_markdown(ctx: RunContext, number: int) -> str:
    """The iteration's mixture training, step by step (pair accuracy, margin, loss per DPO
    level): whether the step term learns anything the trajectory term does not."""
    steps = ctx.store.mixture_steps(ctx.run_id, number)
    if steps.empty:
        return "(no mixture training steps recorded: the method trains no mixture)"
    steps = steps.assign(label=ctx.config.method)
    title = f"Run {ctx.run_id}, iteration {number}: mixture training steps"
    return inline_png(training_steps_png(steps, title), "mixture training steps")


EXAMPLE_PAIRS = 2
EXAMPLE_CHARS = 3000
"""A pair transcript in the artifact is cut to this length (`ipr show pair` prints it all)."""


def agent_steps_line(agent: StepsScored | None) -> str:
    if agent is None:
        return "- agent steps scored: none (the method reads no step pair)"
    return f"- agent steps scored: {agent.queries} (scorer `{agent.scorer_id}`)"


def pairs_line(mined: Mined | None) -> str:
    if mined is None:
        return "- pairs: none (the method trains on no pair)"
    return f"- pairs: {mined.trajectory} trajectory-level, {mined.step} step-level"


def cost_markdown(ctx: RunContext, number: int) -> str:
    """The iteration's cost row and the run's total (`Store.iteration_costs`)."""
    costs = ctx.store.iteration_costs(ctx.run_id, ctx.config.dev_split)
    return markdown_table(costs[costs["iteration"].isin([str(number), "total"])])


def example_pairs_markdown(ctx: RunContext, number: int) -> str:
    """A few of the iteration's pairs as transcripts, each with its `ipr show pair` id."""
    examples = ctx.store.example_pairs(ctx.run_id, number, EXAMPLE_PAIRS)
    if not examples:
        return "(no pairs mined)"
    parts = []
    for pair in examples:
        text = pair_transcript(pair, ctx.store.pair_mc_samples(pair["id"]))
        if len(text) > EXAMPLE_CHARS:
            text = text[:EXAMPLE_CHARS] + f"\n... (ipr show pair {pair['id']} prints the rest)"
        parts.append(f"```text\n{text}\n```")
    return "\n\n".join(parts)


@flow(name="iteration", flow_run_name="iteration-{it.number}", log_prints=True)
def iteration(config: RunConfig, it: Iteration) -> IterationResult:
    """One IPR iteration (`loop.run_iteration`); publishes its summary as an artifact."""
    config = absolute(config)
    ctx = flow_context(config)
    result = loop.run_iteration(ctx, it, stages.run_task)
    summary = ctx.store.iteration_summary(config.run_id, config.dev_split)
    row = summary[summary["iteration"] == it.number]
    metrics = result.evaluated
    create_markdown_artifact(
        key=artifact_key(config.run_id, "iteration", it.number),
        description=f"IPR iteration {it.number} of run {config.run_id}",
        markdown="\n\n".join(
            [
                f"# Run `{config.run_id}`, iteration {it.number}",
                f"- explorations: {result.explored.explorations} "
                f"(policy `{result.explored.policy_id}`)",
                agent_steps_line(result.agent),
                pairs_line(result.mined),
                f"- checkpoint: `{result.trained.checkpoint_id}`",
                f"- {config.dev_split}: reward {metrics.avg_reward}, "
                f"success {metrics.success_rate}, steps {metrics.avg_steps}",
                "## Summary row",
                markdown_table(row),
                "## Cost (this iteration and the run so far)",
                cost_markdown(ctx, it.number),
                "## Example pairs (what the model is taught)",
                example_pairs_markdown(ctx, it.number),
                "## Training steps (dashed: o-DPO, solid: s-DPO)",
                training_steps_markdown(ctx, it.number),
                "## Dev reward and average steps by iteration",
                plot_markdown(summary, config.run_id),
            ]
        ),
    )
    return result


def iterate(ctx: RunContext, it: Iteration, run: loop.Runner) -> IterationResult:
    """Each iteration as its own subflow run."""
    return iteration(ctx.config, it)


@flow(name="ipr", flow_run_name="ipr-{config.run_id}", log_prints=True)
def ipr(config: RunConfig, allow_manifest_change: bool = False) -> list[dict[str, Any]]:
    """Train an agent with IPR for `config`; returns the per-iteration summary rows.
    `allow_manifest_change`: resume even if the run's manifest changed results."""
    config = absolute(config)
    ctx = flow_context(config)
    ctx.allow_manifest_change = allow_manifest_change
    loop.run_ipr(ctx, stages.run_task, iterate)
    rows = summary_records(ctx.store.iteration_summary(config.run_id, config.dev_split))
    create_table_artifact(
        key=artifact_key(config.run_id, "summary"),
        table=rows,
        description=f"IPR summary of run {config.run_id} ({config.method}, {config.env})",
    )
    return rows
