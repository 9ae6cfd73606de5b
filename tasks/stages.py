"""Prefect tasks around the loop's stages: one task per `ipr_core.run.loop.Stage`, each a
call of `loop.run_stage`, and the `Runner` the flows hand to `loop.run_iteration`.

A task's cache key is `TASK_SOURCE` plus the stage's fingerprint (what it reads, see
`ipr_core.run.loop`) and where its rows go (store, run, iteration). A cached result counts
only while the store's completion record still holds it (`loop.is_done`); otherwise the
task is rerun with `refresh_cache=True`, and `run_stage` redoes the stage.
"""

from __future__ import annotations

import functools
from typing import Any, TypeVar

from prefect import get_run_logger, task
from prefect.cache_policies import TASK_SOURCE, CacheKeyFnPolicy
from prefect.tasks import Task

from ipr_core.config import RunConfig
from ipr_core.errors import raised_by_interrupt
from ipr_core.run import loop
from ipr_core.run.context import RunContext, StepScoring, score_in_process
from ipr_core.run.loop import Iteration, Stage
from ipr_core.store.store import Store
from tasks.progress import StageProgress

R = TypeVar("R")


class StageFailed(RuntimeError):
    """A stage's error, named by stage, run and iteration, with the cause chained."""


def context(config: RunConfig, scoring: StepScoring = score_in_process) -> RunContext:
    """The run context of a flow or task: Prefect's logger, progress artifacts."""
    logger = get_run_logger()
    return RunContext(config, Store(config.store), logger.info, StageProgress, scoring)


def first_line(exc: BaseException) -> str:
    """The cause as one line: the task's, the flow run's state message and `ipr run` show it
    alike (the traceback is in the task's log)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else ""


def _cache_key(stage: Stage[Any], config: RunConfig, it: Iteration) -> str:
    ctx = RunContext(config, Store(config.store), log=lambda _: None)
    at = stage.at(ctx, it)
    name = stage.record_name(ctx, it)
    return loop.digest(name, stage.fingerprint(ctx, it), str(config.store), at.run_id, at.iteration)


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

    policy = TASK_SOURCE + CacheKeyFnPolicy(
        cache_key_fn=lambda _ctx, params: _cache_key(stage, params["config"], params["it"])
    )
    # Training tasks do not turn prints into logs: `datasets` (through dill) reads `dis`
    # output by capturing stdout, which Prefect's print patching would send to the log.
    return task(
        run,
        name=stage.name,
        cache_policy=policy,
        task_run_name=stage.name + "[{it.number}]",
        log_prints=not stage.trains,
    )


def run_task(stage: Stage[R], ctx: RunContext, it: Iteration) -> R:
    """The `Runner` of the flows: the stage's task; a cached result whose completion
    record left the store is recomputed once. Sharded step scoring runs in the flow itself,
    where its shards can be the tasks of a Dask subflow."""
    if stage.scores_steps and ctx.config.scale_out is not None:
        return loop.run_stage(stage, ctx, it)
    job = stage_task(stage)
    state = job(ctx.config, it, return_state=True)
    result = state.result()  # raises the task's error (named by stage) if it failed
    if state.name == "Cached" and not loop.is_done(stage, ctx, it):
        get_run_logger().warning(f"cached {stage.name!r} is not in the store; recomputing")
        result = job.with_options(refresh_cache=True)(ctx.config, it)
    return result
