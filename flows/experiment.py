"""The `experiment` flow: `ipr_core.run.experiment.run_experiment` with each (method, seed)
a `method-run` subflow, each of its iterations an `iteration` subflow (`flows.ipr_flow`) and
every stage a Prefect task: the same stages, in the same order, as `--no-prefect`.

A rerun skips what the store records as done: finished runs (`experiment_runs`) and, within
a run, finished stages (`stage_runs`, `ipr_core.run.loop.run_stage`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.settings import configure_prefect_env

configure_prefect_env()  # before the first `import prefect`

from prefect import flow, get_run_logger  # noqa: E402

from flows import ipr_flow  # noqa: E402
from ipr_core.run import experiment as plain  # noqa: E402
from ipr_core.run.experiment import ExperimentConfig  # noqa: E402
from tasks import stages  # noqa: E402


def absolute(config: ExperimentConfig) -> ExperimentConfig:
    """Paths made absolute, so every task means the same files from any cwd."""
    return config.model_copy(update={"run": ipr_flow.absolute(config.run)})


@flow(name="method-run", flow_run_name="{method}-s{seed}", log_prints=True)
def method_run(
    config: ExperimentConfig,
    method: str,
    seed: int,
    scorer: Path | None = None,
    allow_manifest_change: bool = False,
) -> None:
    """One (method, seed) of the experiment: `run_method` with stages as tasks and each
    iteration a subflow."""
    plain.run_method(
        config,
        method,
        seed,
        scorer,
        get_run_logger().info,
        allow_manifest_change,
        stages.run_task,
        ipr_flow.iterate,
    )


@flow(name="experiment", flow_run_name="experiment-{config.experiment_id}", log_prints=True)
def experiment(
    config: ExperimentConfig, allow_manifest_change: bool = False
) -> list[dict[str, Any]]:
    """Every (method, seed) of `config` not finished yet; returns the per-run table's rows."""
    config = absolute(config)

    def run_one(config: ExperimentConfig, method: str, seed: int, scorer: Path | None) -> None:
        method_run(config, method, seed, scorer, allow_manifest_change)

    runs = plain.run_experiment(
        config, get_run_logger().info, allow_manifest_change, stages.run_task, run_one
    )
    return ipr_flow.summary_records(runs)
