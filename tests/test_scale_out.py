"""Sharded Monte Carlo step rewards: a local Dask cluster (2 worker processes) computes
Parquet shards, one ingest writes the store, and the rows equal the in-process stage's."""

import os
import shutil
import tempfile
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

# Prefect reads its settings at import: a private home unless another test module set one.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="ipr-prefect-"))
os.environ.pop("PREFECT_API_URL", None)

import pytest  # noqa: E402

from flows import scale_out  # noqa: E402
from ipr_core import shards  # noqa: E402
from ipr_core.config import (  # noqa: E402
    GenerationConfig,
    MonteCarloConfig,
    RunConfig,
    ScaleOutConfig,
    load_config,
)
from ipr_core.errors import InputError  # noqa: E402
from ipr_core.pipeline import (  # noqa: E402
    agent_step_rewards,
    expert_step_rewards,
    explore_stage,
    ingest_gold,
    pending_expert_queries,
)
from ipr_core.run import load_backend, open_engine  # noqa: E402
from ipr_core.store import Store  # noqa: E402

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


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_path):
    """The expert step rewards of 2 tasks, in process and in 2 shards on 2 Dask workers."""
    root = tmp_path_factory.mktemp("scale-out")
    single = RunConfig(
        run_id="shards", env=ENV, model="tiny-llama", store=root / "single.duckdb",
        cache_dir=root, train_limit=2, max_steps=6, seed=3,
        generation=GenerationConfig(max_new_tokens=16, max_batch_size=32, max_live_episodes=32),
        monte_carlo=MonteCarloConfig(n_samples=2, temperature=1.0),
    )  # fmt: skip
    ingest_gold(Store(single.store), ENV, "train", 2)
    experts_only = root / "experts-only.duckdb"
    shutil.copy(single.store, experts_only)
    shutil.copy(single.store, root / "sharded.duckdb")
    sharded = single.model_copy(
        update={"store": root / "sharded.duckdb", "scale_out": ScaleOutConfig(shards=2, workers=2)}
    )
    store = Store(single.store)
    experts = store.expert_trajectories(ENV, "train", 2)
    with ExitStack() as stack:
        scorer = load_backend(tiny_model_path, single)
        engine = open_engine(stack, scorer, single)
        expert_step_rewards(
            store, single.run_id, engine, scorer.policy_id, experts, 2, 1.0, single.seed
        )
    jobs = shards.plan_step_reward_shards(
        Store(sharded.store), sharded, experts, tiny_model_path, "expert", 1, sharded.seed, 2
    )
    result = scale_out.mc_step_rewards(sharded, str(tiny_model_path), "expert", 1)
    return {
        "single": store,
        "sharded": Store(sharded.store),
        "config": sharded,
        "result": result,
        "jobs": jobs,
        "experts_only": experts_only,
        "scorer": tiny_model_path,
    }


def test_sharded_rows_equal_the_in_process_stage(runs):
    result = runs["result"]
    assert (result["queries"], result["shards"], result["computed"]) == (10, 2, 2)
    assert all(job.file(t).exists() for job in runs["jobs"] for t in shards.TABLES)
    in_process = table(runs["single"], "step_rewards")
    assert len(in_process) == 10
    assert table(runs["sharded"], "step_rewards") == in_process
    rollouts = table(runs["single"], "rollouts")
    assert len(rollouts) > 10  # the non-terminal steps were sampled, N = 2 each
    assert table(runs["sharded"], "rollouts") == rollouts  # the generated turns too


def test_rerun_computes_nothing_and_changes_no_row(runs):
    before = {name: table(runs["sharded"], name, True) for name in shards.TABLES}
    again = shards.ingest_shards(runs["sharded"], runs["jobs"])
    assert again == {"rollouts": 0, "step_rewards": 0}
    result = scale_out.mc_step_rewards(runs["config"], str(runs["scorer"]), "expert", 1)
    assert (result["queries"], result["computed"]) == (0, 0)  # every expert step is scored
    assert {name: table(runs["sharded"], name, True) for name in shards.TABLES} == before


def copied_jobs(runs, tmp_path: Path) -> list[shards.ShardJob]:
    shutil.copytree(runs["jobs"][0].directory, tmp_path / "shards")
    return [replace(job, directory=str(tmp_path / "shards")) for job in runs["jobs"]]


def fresh_store(runs, tmp_path: Path) -> Store:
    shutil.copy(runs["experts_only"], tmp_path / "store.duckdb")
    return Store(tmp_path / "store.duckdb")


def test_a_missing_shard_is_an_error_naming_the_file_and_nothing_is_written(runs, tmp_path):
    jobs = copied_jobs(runs, tmp_path)
    missing = jobs[1].file("rollouts")
    missing.unlink()
    store = fresh_store(runs, tmp_path)
    with pytest.raises(shards.ShardError, match=str(missing)):
        shards.ingest_shards(store, jobs)
    assert store.count("step_rewards") == 0 and store.count("rollouts") == 0


def test_a_corrupt_shard_is_an_error_naming_the_file(runs, tmp_path):
    jobs = copied_jobs(runs, tmp_path)
    corrupt = jobs[0].file("step_rewards")
    corrupt.write_bytes(corrupt.read_bytes()[: corrupt.stat().st_size // 2])
    with pytest.raises(shards.ShardError, match=f"{corrupt} is not readable Parquet"):
        shards.ingest_shards(fresh_store(runs, tmp_path), jobs)
    assert not shards.shard_complete(jobs[0]) and shards.shard_complete(jobs[1])


def test_a_shard_of_another_job_is_not_ingested(runs, tmp_path):
    jobs = [replace(job, seed=job.seed + 1) for job in copied_jobs(runs, tmp_path)]
    with pytest.raises(shards.ShardError, match="written for another job"):
        shards.ingest_shards(fresh_store(runs, tmp_path), jobs)


def test_plan_cuts_the_queries_into_ordered_slices(runs):
    store = Store(runs["experts_only"])
    config = runs["config"]
    experts = store.expert_trajectories(ENV, "train", 2)
    queries = pending_expert_queries(store, config.run_id, runs["jobs"][0].scorer_id, experts)
    for n_shards, sizes in [(3, [3, 4, 3]), (50, [1] * 10)]:
        jobs = shards.plan_step_reward_shards(
            store, config, experts, runs["scorer"], "expert", 1, 0, n_shards
        )
        assert [len(job.queries) for job in jobs] == sizes
        assert [q for job in jobs for q in job.queries] == queries
        assert {job.count for job in jobs} == {len(sizes)}


def test_agent_shard_rows_equal_the_in_process_stage(runs, tmp_path):
    """The agent stage's plan: the iteration's explorations, rows under that iteration.
    One shard, computed in this process (the Dask fan-out is the test above)."""
    config, seed = runs["config"], 42
    explored = fresh_store(runs, tmp_path)
    experts = explored.expert_trajectories(ENV, "train", 1)  # 5 explorations: enough here
    with ExitStack() as stack:
        scorer = load_backend(runs["scorer"], config)
        engine = open_engine(stack, scorer, config)
        explorations = explore_stage(explored, config.run_id, 1, engine, experts, seed=7)
        shutil.copy(explored.path, tmp_path / "sharded.duckdb")
        n = agent_step_rewards(
            explored, config.run_id, 1, engine, scorer.policy_id, explorations, 2, 1.0, seed
        )
    sharded = Store(tmp_path / "sharded.duckdb")
    config = config.model_copy(update={"cache_dir": tmp_path})  # shards under tmp_path
    (job,) = shards.plan_step_reward_shards(
        sharded, config, experts, runs["scorer"], "agent", 1, seed, 1
    )
    assert len(job.queries) == n > 0 and job.iteration == 1
    assert shards.compute_shard(job) and not shards.compute_shard(job)  # done: not redone
    assert shards.ingest_shards(sharded, [job])["step_rewards"] == n
    for name in shards.TABLES:
        assert table(sharded, name) == table(explored, name)


def test_bad_scale_out_config_names_the_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("env: twx/arithmetic\nscale_out: {shards: 0}\n")
    with pytest.raises(InputError, match="scale_out.shards"):
        load_config(path)
