"""Prefect tasks around the loop's stages: one task per `ipr_core.run.loop.Stage`, each a
call of `loop.run_stage`, and the `Runner` the flows hand to `loop.run_iteration`.

Prefect's result cache is off: whether a stage is done is the store's completion record
alone (`stage_runs`, read by `run_stage`), the one rule every entry point follows. A rerun
task finds its record and returns the recorded result without computing.
"""

from __future__ import annotations

import functools
from typing import Any, TypeVar

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import Task

from ipr_core.config import RunConfig
from ipr_core.errors import raised_by_interrupt
from ipr_core.run import loop
from ipr_core.run.context import RunContext, ScoringRunner, score_in_process
from ipr_core.run.loop import Iteration, Stage
from ipr_core.store.store import Store
from tasks.progress import StageProgress

R = TypeVar("R")


class StageFailed(RuntimeError):
    """A stage's error, named by stage, run and iteration, with the cause chained."""


def context(config: RunConfig, scoring: ScoringRunner = score_in_process) -> RunContext:
    """The run context of a flow or task: Prefect's logger, progress artifacts."""
    logger = get_run_logger()
    return RunContext(config, Store(config.store), logger.info, StageProgress, scoring)


def first_line(exc: BaseException) -> str:
    """The cause as one line: the task's, the flow run's state message and `ipr run` show it
    alike (the traceback is in the task's log)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else ""


@functools.cache
def stage_task(stage: Stage[Any]) -> Task:
    """The Prefect task of a stage (made once per stage)."""

    def run(config: RunConfig, it: Iteration) -> Any:
        try:
            return loop.run_stage(stage, context(config), it)
        except Exception as exc:
            if raised_by_interrupt(exc):
                raise KeyboardInterrupt from exc
            message = (
                f"stage {stage.name!r} failed (run {config.run_id!r}, iteration {it.number}): "
                f"{type(exc).__name__}: {first_line(exc)}"
            )
            get_run_logger().error(message)
            raise StageFailed(message) from exc

    # Training tasks do not turn prints into logs: `datasets` (through dill) reads `dis`
    # output by capturing stdout, which Prefect's print patching would send to the log.
    return task(
        run,
        name=stage.name,
        cache_policy=NO_CACHE,
        task_run_name=stage.name + "[{it.number}]",
        log_prints=not stage.trains,
    )


def run_task(stage: Stage[R], ctx: RunContext, it: Iteration) -> R:
    """The `Runner` of the flows: the stage's task. Sharded step scoring runs in the flow
    itself, where its shards can be the tasks of a Dask subflow."""
    if stage.scores_steps and ctx.config.scale_out is not None:
        return loop.run_stage(stage, ctx, it)
    return stage_task(stage)(ctx.config, it)
