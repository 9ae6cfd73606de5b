"""Monte Carlo step rewards in shards: many workers compute, ONE process writes the store.

DuckDB lets a single process write the store file, and the step reward stages are where
IPR spends its rollouts. So for scale-out the stage's queries are cut into shards; a
worker (a Dask process, possibly on another machine) loads the scorer itself, runs the
rollouts of its shard and writes the shard's `step_rewards` and `rollouts` rows as
Parquet files. Workers never open the store. The stage then commits every shard's rows
with its completion record in one transaction (`ipr_core.run.loop`): whether a stage is done
is decided by that record alone.

Every shard file carries the fingerprint of the job that wrote it (Parquet key-value
metadata), so within an unfinished stage a finished shard is not recomputed, and a stale
file left by another job is never read.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ipr_core.config import RunConfig
from ipr_core.digest import digest
from ipr_core.errors import IprError
from ipr_core.method.mining import PairContext
from ipr_core.method.step_rewards import StepQuery
from ipr_core.run.context import Engines, ScoringJob, StepRows, score_steps
from ipr_core.run.fingerprints import FINGERPRINT_CHARS, SCORING_FIELDS
from ipr_core.store.store import At, step_reward_rows, table_columns
from ipr_core.types import Actor

TABLES = ("rollouts", "step_rewards")
FINGERPRINT_KEY = b"ipr.shard_fingerprint"


class ShardError(IprError):
    """A shard file is missing, unreadable, stale or inconsistent; the message names it."""


@dataclass(frozen=True)
class ShardJob:
    """One shard's work: everything a worker needs; it never opens the store."""

    config: RunConfig
    scorer_path: str
    scorer_id: str
    iteration: int
    """The iteration the rows are stored under (0 for expert steps)."""
    loop_iteration: int
    """The loop iteration asking (it decides MC or the step reward model)."""
    seed: int
    queries: tuple[StepQuery, ...]
    pairs: tuple[PairContext, ...] | None
    """The queries' pair contexts when Monte Carlo may stop early."""
    index: int
    count: int
    directory: str

    @property
    def run_id(self) -> str:
        return self.config.run_id

    @property
    def name(self) -> str:
        return f"shard-{self.index:03d}-of-{self.count:03d}"

    def file(self, table: str) -> Path:
        return Path(self.directory) / f"{self.name}.{table}.parquet"

    @functools.cached_property
    def fingerprint(self) -> str:
        payload = [
            self.config.model_dump(mode="json", include={"run_id", *SCORING_FIELDS}),
            self.scorer_id,
            self.iteration,
            self.seed,
            [asdict(query) for query in self.queries],
            None if self.pairs is None else [asdict(pair) for pair in self.pairs],
        ]
        return digest(payload, FINGERPRINT_CHARS)


def shard_directory(config: RunConfig, actor: Actor, iteration: int) -> Path:
    """`<shard_dir>/<run>/<actor>-<iteration>`: one folder per stage of a run."""
    scale = config.scale_out
    root = scale.shard_dir if scale is not None and scale.shard_dir else config.cache_dir / "shards"
    return root.resolve() / config.run_id / f"{actor}-{iteration}"


def plan_shards(config: RunConfig, job: ScoringJob, n_shards: int) -> list[ShardJob]:
    """A scoring job cut into at most `n_shards` ordered slices of its queries."""
    queries = job.queries
    count = min(n_shards, len(queries))
    bounds = [round(i * len(queries) / count) for i in range(count + 1)] if count else []
    directory = str(shard_directory(config, job.actor, job.at.iteration))
    return [
        ShardJob(
            config=config,
            scorer_path=str(job.scorer_path),
            scorer_id=Engines(config).scorer_id(job.scorer_path, job.iteration),
            iteration=job.at.iteration,
            loop_iteration=job.iteration,
            seed=job.seed,
            queries=tuple(queries[bounds[i] : bounds[i + 1]]),
            pairs=None if job.pairs is None else job.pairs[bounds[i] : bounds[i + 1]],
            index=i,
            count=count,
            directory=directory,
        )
        for i in range(count)
    ]


RunShards = Callable[[list["ShardJob"], str], None]
"""Computes the given shards somewhere (a Dask cluster, this process); `str` labels them."""


class ShardedScoring:
    """Step scoring in Parquet shards: plan, compute the unfinished shards with `run`, then
    return every shard's rows for the stage to commit with its completion record."""

    def __init__(self, n_shards: int, run: RunShards):
        self.n_shards = n_shards
        self.run = run

    def __call__(self, engines: Engines, job: ScoringJob, label: str) -> StepRows:
        jobs = plan_shards(engines.config, job, self.n_shards)
        pending = [shard for shard in jobs if not shard_complete(shard)]
        if pending:
            self.run(pending, label)
        return shard_rows(jobs)


# -- the worker side -----------------------------------------------------------------------
def shard_complete(job: ShardJob) -> bool:
    """Whether every file of the shard exists and was written by this very job."""
    for table in TABLES:
        try:
            metadata = pq.read_schema(job.file(table)).metadata or {}
        except (OSError, pa.ArrowException):
            return False
        if metadata.get(FINGERPRINT_KEY, b"").decode() != job.fingerprint:
            return False
    return True


def compute_shard(job: ShardJob) -> bool:
    """Run a shard's rollouts and write its files; False when they were already written."""
    if shard_complete(job):
        return False
    config = job.config
    engines = Engines(config)
    scorer = engines.scorer(Path(job.scorer_path), job.loop_iteration)
    if scorer.scorer_id != job.scorer_id:
        raise ShardError(
            f"{job.name}: this worker's scorer is {scorer.scorer_id}, the plan was made "
            f"for {job.scorer_id} (are the model folders shared with the workers?)"
        )
    with ExitStack() as stack:
        engine = engines.engine(stack, Path(job.scorer_path))
        rewards, rollouts = score_steps(engine, job.queries, scorer, config, job.seed, job.pairs)
    at = At(job.run_id, job.iteration)
    rows = step_reward_rows(at, config.env, job.scorer_id, rewards, rollouts)
    _write_parquet(job, "rollouts", pa.Table.from_pylist(rows["rollouts"]))
    _write_parquet(job, "step_rewards", pa.Table.from_pylist(rows["step_rewards"]))
    return True


def _write_parquet(job: ShardJob, table: str, data: pa.Table) -> None:
    """Write under a temporary name, then rename: a shard file is always whole."""
    metadata = {**(data.schema.metadata or {}), FINGERPRINT_KEY: job.fingerprint.encode()}
    target = job.file(table)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    pq.write_table(data.replace_schema_metadata(metadata), partial)
    os.replace(partial, target)


# -- back to the one writer ---------------------------------------------------------------
def shard_rows(jobs: Sequence[ShardJob]) -> StepRows:
    """Every shard's rows, each file checked to be whole, from its job and complete; the
    stage writes them with its completion record, in one transaction."""
    rows: StepRows = {table: [] for table in TABLES}
    for job in jobs:
        data = {table: read_shard_file(job, table) for table in TABLES}
        _check_rows(job, data["step_rewards"], data["rollouts"])
        for table in TABLES:
            rows[table] += data[table].to_pylist()
    return rows


def read_shard_file(job: ShardJob, table: str) -> pa.Table:
    """A shard's file for `table`, checked to be whole, from this job, with the table's columns."""
    path = job.file(table)
    if not path.exists():
        raise ShardError(f"shard file {path} is missing ({job.name} did not finish)")
    try:
        data = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise ShardError(f"shard file {path} is not readable Parquet: {exc}") from exc
    found = (data.schema.metadata or {}).get(FINGERPRINT_KEY, b"").decode()
    if found != job.fingerprint:
        raise ShardError(
            f"shard file {path} was written for another job (fingerprint {found or 'none'}, "
            f"expected {job.fingerprint}); delete it to recompute the shard"
        )
    required, optional = table_columns(table)
    missing = sorted(set(required) - set(data.column_names))
    unknown = sorted(set(data.column_names) - set(required) - set(optional))
    if missing or unknown:
        raise ShardError(
            f"shard file {path}: missing columns {missing or 'none'}, "
            f"unknown columns {unknown or 'none'}"
        )
    return data


def _check_rows(job: ShardJob, rewards: pa.Table, rollouts: pa.Table) -> None:
    """One step reward per query of the job, and every rollout behind them."""
    expected = sorted((q.task_id, q.prefix_len, q.actor) for q in job.queries)
    keys = rewards.select(["task_id", "prefix_len", "actor"]).to_pylist()
    found = sorted((k["task_id"], k["prefix_len"], k["actor"]) for k in keys)
    if found != expected:
        raise ShardError(
            f"shard file {job.file('step_rewards')}: holds {len(found)} step rewards that "
            f"do not match the shard's {len(expected)} queries"
        )
    n_samples = sum(rewards.column("n_samples").to_pylist())
    if rollouts.num_rows != n_samples:
        raise ShardError(
            f"shard file {job.file('rollouts')}: {rollouts.num_rows} rollouts, "
            f"but its step rewards count {n_samples} samples"
        )
