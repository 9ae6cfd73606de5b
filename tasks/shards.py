"""Thin Prefect tasks of the sharded Monte Carlo step reward stages (see `ipr_core.shards`).

`plan` and `ingest` run in the flow's process (the only one that writes the store);
`compute` runs wherever the flow's task runner puts it (a Dask worker). None is cached by
Prefect: a shard's files carry their job's fingerprint, so a finished shard is skipped by
`ipr_core.shards` itself, on any worker, with no shared Prefect result storage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from ipr_core import shards
from ipr_core.config import RunConfig
from ipr_core.store import Store
from ipr_core.types import Actor
from tasks.stages import iteration_seed, stage


@task(name="plan-mc-shards", cache_policy=NO_CACHE, task_run_name="plan-mc-shards[{actor}]")
@stage("plan step reward shards")
def plan(
    config: RunConfig, scorer_path: str, actor: Actor, iteration: int
) -> list[shards.ShardJob]:
    """The stage's shards, with the seed the in-process stage would use."""
    assert config.scale_out is not None
    seed = config.seed if actor == "expert" else iteration_seed(config, iteration)
    store = Store(config.store)
    experts = store.expert_trajectories(config.env, config.train_split, config.train_limit)
    jobs = shards.plan_step_reward_shards(
        store, config, experts, Path(scorer_path), actor, iteration,
        seed, config.scale_out.shards,
    )  # fmt: skip
    get_run_logger().info(
        f"{actor} step rewards: {sum(len(j.queries) for j in jobs)} queries in {len(jobs)} shards"
    )
    return jobs


@task(name="compute-mc-shard", cache_policy=NO_CACHE, task_run_name="compute-mc-shard[{job.name}]")
@stage("compute step reward shard")
def compute(job: shards.ShardJob) -> dict[str, Any]:
    """One shard on a worker: loads the scorer, opens its envs, writes the shard's Parquet."""
    computed = shards.compute_shard(job)
    get_run_logger().info(
        f"{job.name}: {len(job.queries)} queries ({'computed' if computed else 'already done'})"
    )
    return {"shard": job.name, "computed": computed}


@task(name="ingest-mc-shards", cache_policy=NO_CACHE, task_run_name="ingest-mc-shards[{actor}]")
@stage("ingest step reward shards")
def ingest(config: RunConfig, jobs: list[shards.ShardJob], actor: Actor) -> dict[str, int]:
    """Every shard of the stage into the store, in one transaction (idempotent)."""
    changed = shards.ingest_shards(Store(config.store), jobs)
    get_run_logger().info(
        f"{actor} step rewards: ingested {len(jobs)} shards, rows changed {changed}"
    )
    return changed
