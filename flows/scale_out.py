"""Sharded Monte Carlo step rewards: shards fanned out on Dask, one ingest into the store.

`mc_step_rewards` plans the stage's shards in the flow's process, runs the unfinished ones
in the `mc-shards` subflow on a Dask task runner (a local cluster, or the scheduler at
`scale_out.address`), then ingests every shard in the flow's process, the store's only
writer. The `iteration` flow uses it in place of the in-process step reward stages when
the config has `scale_out`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.settings import configure_prefect_env

configure_prefect_env()  # before the first `import prefect`

from prefect import flow, get_client  # noqa: E402

from ipr_core import shards  # noqa: E402
from ipr_core.config import RunConfig, ScaleOutConfig  # noqa: E402
from ipr_core.types import Actor  # noqa: E402
from tasks import shards as shard_tasks  # noqa: E402

if TYPE_CHECKING:
    from prefect_dask import DaskTaskRunner


def dask_task_runner(scale: ScaleOutConfig) -> DaskTaskRunner:
    """A task runner on the scheduler at `scale.address`, else on a local cluster of
    worker processes (processes, not threads: each worker holds its own model and JVM).

    Local workers get this flow's Prefect API URL: without it each worker process would
    start a temporary Prefect server of its own and record its task runs there.
    """
    from prefect_dask import DaskTaskRunner  # imports distributed: only when sharding

    if scale.address:
        return DaskTaskRunner(address=scale.address)
    with get_client(sync_client=True) as client:
        api_url = str(client.api_url)
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": scale.workers,
            "threads_per_worker": scale.threads_per_worker,
            "processes": True,
            "host": "127.0.0.1",
            "dashboard_address": "127.0.0.1:0",
            "env": {"PREFECT_API_URL": api_url},
        },
    )


@flow(name="mc-shards", flow_run_name="mc-shards-{label}")
def compute_shards(jobs: list[shards.ShardJob], label: str) -> list[dict[str, Any]]:
    """Every job as one task on the flow's task runner; fails if any shard failed."""
    futures = [shard_tasks.compute.submit(job) for job in jobs]
    return [future.result() for future in futures]


@flow(name="mc-step-rewards", flow_run_name="mc-step-rewards-{actor}-{iteration}")
def mc_step_rewards(
    config: RunConfig, scorer_path: str, actor: Actor, iteration: int
) -> dict[str, Any]:
    """The step rewards of `actor`'s steps in `iteration`, computed in shards.

    Returns what the in-process stages return (`queries`, `scorer_id`), plus the shard
    counts and the rows the ingest changed.
    """
    assert config.scale_out is not None
    jobs = shard_tasks.plan(config, scorer_path, actor, iteration)
    pending = [job for job in jobs if not shards.shard_complete(job)]
    if pending:
        runner = dask_task_runner(config.scale_out)
        compute_shards.with_options(task_runner=runner)(pending, f"{actor}-{iteration}")
    changed = shard_tasks.ingest(config, jobs, actor)
    return {
        "queries": sum(len(job.queries) for job in jobs),
        "scorer_id": shards.step_scorer_id(config, Path(scorer_path)),
        "shards": len(jobs),
        "computed": len(pending),
        "changed": changed,
    }
