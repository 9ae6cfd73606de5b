"""Sharded Monte Carlo step rewards: a local Dask cluster (2 worker processes) computes
Parquet shards, the stage commits them with its completion record, and the rows equal the
in-process stage's."""

import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

# Prefect reads its settings at import: a private home unless another test module set one.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="ipr-prefect-"))
os.environ.pop("PREFECT_API_URL", None)

import pytest  # noqa: E402

from flows import scale_out  # noqa: E402
from ipr_core.config import (  # noqa: E402
    RunConfig,
    ScaleOutConfig,
    load_config,
)
from ipr_core.errors import InputError  # noqa: E402
from ipr_core.run import shards  # noqa: E402
from ipr_core.run.context import EXPERT_SEED, Engines, RunContext, ScoringJob  # noqa: E402
from ipr_core.run.loop import (  # noqa: E402
    AGENT_STEP_REWARDS,
    EXPERT_STEP_REWARDS,
    EXPLORE,
    Iteration,
    run_stage,
)
from ipr_core.run.pipeline import agent_queries, ingest_gold, pending_expert_queries  # noqa: E402
from ipr_core.store.store import At, Store  # noqa: E402

ENV = "twx/arithmetic"  # 5 gold steps per task: 2 tasks give 10 expert steps to score


def table(store: Store, name: str, with_created_at: bool = False) -> list[dict]:
    """A table's rows in a stable order. Without `with_created_at`, rollouts also leave out
    `prefill_tokens`: it counts the prompt tokens the process had to compute, i.e. missed
    its prefix cache, and a shard's process has not seen the other shards' prompts."""
    excluded = [] if with_created_at else ["created_at"]
    if name == "rollouts" and not with_created_at:
        excluded.append("prefill_tokens")
    columns = f"* EXCLUDE ({', '.join(excluded)})" if excluded else "*"
    return store.query(f"SELECT {columns} FROM {name} ORDER BY ALL").to_dict("records")


def quiet(_: str) -> None:
    pass


def compute_in_process(jobs: list[shards.ShardJob], label: str) -> None:
    for job in jobs:
        shards.compute_shard(job)


class Recording:
    """Sharded scoring that records which shards it was asked to compute."""

    def __init__(self, n_shards: int, run: shards.RunShards):
        self.computed: list[shards.ShardJob] = []

        def record(jobs: list[shards.ShardJob], label: str) -> None:
            self.computed += jobs
            run(jobs, label)

        self.scoring = shards.ShardedScoring(n_shards, record)


def expert_job(store: Store, config: RunConfig, scorer: Path) -> ScoringJob:
    """The expert stage's scoring job, as the stage plans it."""
    experts = store.expert_trajectories(ENV, "train")
    scorer_id = Engines(config).scorer_id(scorer, 1)
    at = At(config.run_id, 0)
    queries = pending_expert_queries(store, at, scorer_id, experts)
    return ScoringJob(at, "expert", scorer, tuple(queries), EXPERT_SEED, 1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_path, two_task_mc_config):
    """The expert step rewards of 2 tasks, in process and in 2 shards on 2 Dask workers."""
    root = tmp_path_factory.mktemp("scale-out")
    single = two_task_mc_config("shards", root / "single.duckdb", max_live=32)
    ingest_gold(Store(single.store), ENV, "train", 2)
    experts_only = root / "experts-only.duckdb"
    shutil.copy(single.store, experts_only)
    shutil.copy(single.store, root / "sharded.duckdb")
    sharded = single.model_copy(
        update={"store": root / "sharded.duckdb", "scale_out": ScaleOutConfig(shards=2, workers=2)}
    )
    store = Store(single.store)
    it = Iteration(1, tiny_model_path, tiny_model_path)
    run_stage(EXPERT_STEP_REWARDS, RunContext(single, store, quiet), it)
    jobs = shards.plan_shards(
        sharded, expert_job(Store(sharded.store), sharded, tiny_model_path), 2
    )
    dask = Recording(2, scale_out.sharded_scoring(sharded.scale_out).run)
    sharded_ctx = RunContext(sharded, Store(sharded.store), quiet, scoring=dask.scoring)
    result = run_stage(EXPERT_STEP_REWARDS, sharded_ctx, it)
    return {
        "single": store,
        "sharded": Store(sharded.store),
        "config": sharded,
        "context": sharded_ctx,
        "iteration": it,
        "dask": dask,
        "result": result,
        "jobs": jobs,
        "experts_only": experts_only,
        "scorer": tiny_model_path,
    }


def test_sharded_rows_equal_the_in_process_stage(runs):
    result = runs["result"]
    assert (result.queries, len(runs["jobs"]), len(runs["dask"].computed)) == (10, 2, 2)
    assert all(job.file(t).exists() for job in runs["jobs"] for t in shards.TABLES)
    in_process = table(runs["single"], "step_rewards")
    assert len(in_process) == 10
    assert table(runs["sharded"], "step_rewards") == in_process
    rollouts = table(runs["single"], "rollouts")
    assert len(rollouts) > 10  # the non-terminal steps were sampled, N = 2 each
    assert table(runs["sharded"], "rollouts") == rollouts  # the generated turns too


def test_rerun_computes_nothing_and_changes_no_row(runs):
    store, ctx, it = runs["sharded"], runs["context"], runs["iteration"]
    before = {name: table(store, name, True) for name in shards.TABLES}
    assert run_stage(EXPERT_STEP_REWARDS, ctx, it) == runs["result"]  # the completion record
    with store.transaction() as con:  # without it, the stage finds every expert step scored
        con.execute("DELETE FROM stage_runs")
    assert run_stage(EXPERT_STEP_REWARDS, ctx, it).queries == 0
    assert len(runs["dask"].computed) == 2
    assert {name: table(store, name, True) for name in shards.TABLES} == before


def copied_shards(runs, tmp_path: Path) -> tuple[RunContext, list[shards.ShardJob]]:
    """A fresh store whose stage reads the fixture's shard files, copied, and never
    computes a shard itself."""
    config = runs["config"]
    scale = config.scale_out.model_copy(update={"shard_dir": tmp_path / "shards"})
    config = config.model_copy(update={"scale_out": scale, "store": tmp_path / "store.duckdb"})
    shutil.copy(runs["experts_only"], config.store)
    shutil.copytree(runs["jobs"][0].directory, shards.shard_directory(config, "expert", 0))
    jobs = shards.plan_shards(config, expert_job(Store(config.store), config, runs["scorer"]), 2)
    scoring = shards.ShardedScoring(2, lambda jobs, label: None)
    return RunContext(config, Store(config.store), quiet, scoring=scoring), jobs


def test_a_missing_shard_is_an_error_naming_the_file_and_nothing_is_written(runs, tmp_path):
    ctx, jobs = copied_shards(runs, tmp_path)
    missing = jobs[1].file("rollouts")
    missing.unlink()
    with pytest.raises(shards.ShardError, match=str(missing)):
        run_stage(EXPERT_STEP_REWARDS, ctx, runs["iteration"])
    store = ctx.store
    assert store.count("step_rewards") == 0 and store.count("rollouts") == 0
    assert store.count("stage_runs") == 0


def test_a_corrupt_shard_is_an_error_naming_the_file(runs, tmp_path):
    ctx, jobs = copied_shards(runs, tmp_path)
    corrupt = jobs[0].file("step_rewards")
    corrupt.write_bytes(corrupt.read_bytes()[: corrupt.stat().st_size // 2])
    with pytest.raises(shards.ShardError, match=f"{corrupt} is not readable Parquet"):
        run_stage(EXPERT_STEP_REWARDS, ctx, runs["iteration"])
    assert not shards.shard_complete(jobs[0]) and shards.shard_complete(jobs[1])


def test_a_shard_of_another_job_is_not_ingested(runs, tmp_path):
    _, jobs = copied_shards(runs, tmp_path)
    with pytest.raises(shards.ShardError, match="written for another job"):
        shards.shard_rows([replace(job, seed=job.seed + 1) for job in jobs])


def test_plan_cuts_the_queries_into_ordered_slices(runs):
    store = Store(runs["experts_only"])
    config = runs["config"]
    job = expert_job(store, config, runs["scorer"])
    for n_shards, sizes in [(3, [3, 4, 3]), (50, [1] * 10)]:
        jobs = shards.plan_shards(config, job, n_shards)
        assert [len(shard.queries) for shard in jobs] == sizes
        assert [q for shard in jobs for q in shard.queries] == list(job.queries)
        assert {shard.count for shard in jobs} == {len(sizes)}


def test_agent_shard_rows_equal_the_in_process_stage(runs, tmp_path):
    """The agent stage's shards: the iteration's explorations, rows under that iteration.
    One shard, computed in this process (the Dask fan-out is the test above)."""
    config = runs["config"].model_copy(
        update={"train_limit": 1, "scale_out": None, "cache_dir": tmp_path}
    )  # 5 explorations: enough here; shards under tmp_path
    shutil.copy(runs["experts_only"], tmp_path / "explored.duckdb")
    explored = Store(tmp_path / "explored.duckdb")
    it = Iteration(1, runs["scorer"], runs["scorer"])
    ctx = RunContext(config.model_copy(update={"store": explored.path}), explored, quiet)
    run_stage(EXPLORE, ctx, it)
    shutil.copy(explored.path, tmp_path / "sharded.duckdb")
    n = run_stage(AGENT_STEP_REWARDS, ctx, it).queries
    sharded = Store(tmp_path / "sharded.duckdb")
    queries = agent_queries(sharded.explorations(config.run_id, 1, ctx.explored()))
    job = ScoringJob(At(config.run_id, 1), "agent", runs["scorer"], tuple(queries), ctx.seed(1), 1)
    (shard,) = shards.plan_shards(config, job, 1)
    assert len(shard.queries) == n > 0 and shard.iteration == 1
    assert shards.compute_shard(shard) and not shards.compute_shard(shard)  # done: not redone
    in_process = shards.ShardedScoring(1, compute_in_process)
    sharded_config = config.model_copy(update={"store": sharded.path})
    assert (
        run_stage(
            AGENT_STEP_REWARDS, RunContext(sharded_config, sharded, quiet, scoring=in_process), it
        ).queries
        == n
    )
    for name in shards.TABLES:
        assert table(sharded, name) == table(explored, name)


def test_bad_scale_out_config_names_the_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("env: twx/arithmetic\nscale_out: {shards: 0}\n")
    with pytest.raises(InputError, match="scale_out.shards"):
        load_config(path)
