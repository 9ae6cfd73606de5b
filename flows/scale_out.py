"""Sharded Monte Carlo step rewards: the shards of a step reward stage fanned out on Dask.

`sharded_scoring` is the `StepScoring` the `ipr` flow gives its step reward stages when the
config has `scale_out`: the stage (in the flow's process) plans its shards, runs the
unfinished ones in the `mc-shards` subflow on a Dask task runner (a local cluster, or the
scheduler at `scale_out.address`), then commits every shard's rows with its completion
record: the flow's process is the store's only writer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tasks.settings import configure_prefect_env

configure_prefect_env()  # before the first `import prefect`

from prefect import flow, get_client  # noqa: E402

from ipr_core.config import ScaleOutConfig  # noqa: E402
from ipr_core.run import shards  # noqa: E402
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


def sharded_scoring(scale: ScaleOutConfig) -> shards.ShardedScoring:
    """Step scoring whose unfinished shards run as the `mc-shards` subflow on Dask."""

    def run(jobs: list[shards.ShardJob], label: str) -> None:
        compute_shards.with_options(task_runner=dask_task_runner(scale))(jobs, label)

    return shards.ShardedScoring(scale.shards, run)
