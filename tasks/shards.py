"""The Prefect task of one Parquet shard of a step reward stage (see `ipr_core.run.shards`).

It runs wherever the flow's task runner puts it (a Dask worker) and is not cached by
Prefect: a shard's files carry their job's fingerprint, so a finished shard is skipped by
`ipr_core.run.shards` itself, on any worker, with no shared Prefect result storage.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from ipr_core.run import shards


@task(name="compute-mc-shard", cache_policy=NO_CACHE, task_run_name="compute-mc-shard[{job.name}]")
def compute(job: shards.ShardJob) -> dict[str, Any]:
    """One shard on a worker: loads the scorer, opens its envs, writes the shard's Parquet."""
    computed = shards.compute_shard(job)
    get_run_logger().info(
        f"{job.name}: {len(job.queries)} queries ({'computed' if computed else 'already done'})"
    )
    return {"shard": job.name, "computed": computed}
