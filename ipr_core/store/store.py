"""The DuckDB store: schema, idempotent writes and typed readers.

DuckDB lets one process write a file, and no other process may open it meanwhile.
So every write opens the file, runs one short transaction and closes it again, and
readers (`ipr sql`, a notebook) open it read-only between writes, retrying while a
write holds the lock. Writes are `INSERT OR REPLACE` on natural keys, so a retried
stage never duplicates rows.
"""

from __future__ import annotations

import functools
import json
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, astuple, dataclass
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

from ipr_core.digest import digest
from ipr_core.engine.rollout import RolloutResult, RolloutSpec
from ipr_core.envs import canonical_env_id
from ipr_core.envs.base import EnvTask
from ipr_core.errors import InputError, IprError, UnknownEnvError
from ipr_core.method.explore import Exploration
from ipr_core.method.step_rewards import StepReward
from ipr_core.store.report_queries import TRAINED_PAIRS_SQL
from ipr_core.training.checkpoints import TrainResult, checkpoint_row
from ipr_core.types import (
    AGENT,
    EXPERT,
    FAILED_STATUSES,
    STEP,
    TRAJECTORY,
    Pair,
    RolloutKind,
    Step,
    StoredStepReward,
    Trajectory,
)
from ipr_core.types import StageName as S

SCHEMA: dict[str, str] = {
    "runs": """
        run_id VARCHAR PRIMARY KEY,
        config VARCHAR NOT NULL,
        created_at TIMESTAMP DEFAULT current_timestamp""",
    "expert_trajectories": """
        env_id VARCHAR NOT NULL,
        task_id VARCHAR NOT NULL,
        split VARCHAR NOT NULL,
        source VARCHAR NOT NULL,
        instruction VARCHAR NOT NULL,
        initial_observation VARCHAR NOT NULL,
        steps VARCHAR NOT NULL,
        n_steps INTEGER NOT NULL,
        outcome_reward DOUBLE NOT NULL,
        action_hint VARCHAR,
        created_at TIMESTAMP DEFAULT current_timestamp,
        PRIMARY KEY (env_id, task_id)""",
    "rollouts": """
        run_id VARCHAR NOT NULL,
        iteration INTEGER NOT NULL,
        kind VARCHAR NOT NULL,
        env_id VARCHAR NOT NULL,
        task_id VARCHAR NOT NULL,
        prefix_len INTEGER NOT NULL,
        actor VARCHAR NOT NULL,
        sample_idx INTEGER NOT NULL,
        policy_id VARCHAR NOT NULL,
        status VARCHAR NOT NULL,
        outcome_reward DOUBLE,
        n_steps INTEGER NOT NULL,
        steps VARCHAR NOT NULL,
        prefill_tokens BIGINT NOT NULL,
        generated_tokens BIGINT NOT NULL,
        env_steps INTEGER NOT NULL,
        parse_failures INTEGER NOT NULL,
        error VARCHAR,
        created_at TIMESTAMP DEFAULT current_timestamp,
        PRIMARY KEY (run_id, iteration, kind, policy_id, task_id, prefix_len, actor, sample_idx)""",
    "step_rewards": """
        run_id VARCHAR NOT NULL,
        scorer_id VARCHAR NOT NULL,
        iteration INTEGER NOT NULL,
        env_id VARCHAR NOT NULL,
        task_id VARCHAR NOT NULL,
        prefix_len INTEGER NOT NULL,
        actor VARCHAR NOT NULL,
        action VARCHAR NOT NULL,
        step_text VARCHAR NOT NULL,
        mean_reward DOUBLE,
        n_samples INTEGER NOT NULL,
        n_ok INTEGER NOT NULL,
        n_failed INTEGER NOT NULL,
        terminal BOOLEAN NOT NULL,
        created_at TIMESTAMP DEFAULT current_timestamp,
        PRIMARY KEY (run_id, scorer_id, iteration, task_id, prefix_len, actor)""",
    "pairs": """
        run_id VARCHAR NOT NULL,
        iteration INTEGER NOT NULL,
        level VARCHAR NOT NULL,
        env_id VARCHAR NOT NULL,
        task_id VARCHAR NOT NULL,
        prefix_len INTEGER NOT NULL,
        mode VARCHAR NOT NULL,
        prompt VARCHAR NOT NULL,
        chosen VARCHAR NOT NULL,
        rejected VARCHAR NOT NULL,
        chosen_actor VARCHAR NOT NULL,
        chosen_reward DOUBLE NOT NULL,
        rejected_reward DOUBLE NOT NULL,
        chosen_outcome DOUBLE NOT NULL,
        rejected_outcome DOUBLE NOT NULL,
        created_at TIMESTAMP DEFAULT current_timestamp,
        PRIMARY KEY (run_id, iteration, level, task_id, prefix_len)""",
    "checkpoints": """
        checkpoint_id VARCHAR PRIMARY KEY,
        parent_id VARCHAR,
        kind VARCHAR NOT NULL,
        path VARCHAR NOT NULL,
        run_id VARCHAR,
        iteration INTEGER,
        config VARCHAR NOT NULL,
        metrics VARCHAR,
        created_at TIMESTAMP DEFAULT current_timestamp""",
    "evaluations": """
        run_id VARCHAR NOT NULL,
        iteration INTEGER NOT NULL,
        split VARCHAR NOT NULL,
        policy_id VARCHAR NOT NULL,
        n_tasks INTEGER NOT NULL,
        n_failed INTEGER NOT NULL,
        avg_reward DOUBLE,
        success_rate DOUBLE,
        avg_steps DOUBLE,
        created_at TIMESTAMP DEFAULT current_timestamp,
        PRIMARY KEY (run_id, iteration, split, policy_id)""",
    "experiments": """
        experiment_id VARCHAR PRIMARY KEY,
        config VARCHAR NOT NULL,
        created_at TIMESTAMP DEFAULT current_timestamp""",
    "experiment_runs": """
        experiment_id VARCHAR NOT NULL,
        method VARCHAR NOT NULL,
        seed INTEGER NOT NULL,
        run_id VARCHAR NOT NULL,
        status VARCHAR NOT NULL,
        best_iteration INTEGER,
        test_policy_id VARCHAR,
        created_at TIMESTAMP DEFAULT current_timestamp,
        PRIMARY KEY (experiment_id, method, seed)""",
    "stage_runs": """
        run_id VARCHAR NOT NULL,
        iteration INTEGER NOT NULL,
        stage VARCHAR NOT NULL,
        fingerprint VARCHAR NOT NULL,
        result VARCHAR NOT NULL,
        row_counts VARCHAR NOT NULL,
        created_at TIMESTAMP DEFAULT current_timestamp,
        PRIMARY KEY (run_id, iteration, stage)""",
    "stage_costs": """
        run_id VARCHAR NOT NULL,
        iteration INTEGER NOT NULL,
        stage VARCHAR NOT NULL,
        wall_s DOUBLE NOT NULL,
        cpu_s DOUBLE NOT NULL,
        gpu_s DOUBLE,
        peak_rss_mb DOUBLE,
        prefill_tokens BIGINT NOT NULL,
        generated_tokens BIGINT NOT NULL,
        trained_tokens BIGINT NOT NULL,
        rollouts INTEGER NOT NULL,
        env_steps BIGINT NOT NULL,
        donor_run_id VARCHAR,
        donor_iteration INTEGER,
        created_at TIMESTAMP DEFAULT current_timestamp,
        PRIMARY KEY (run_id, iteration, stage)""",
    "estimates": """
        run_id VARCHAR PRIMARY KEY,
        config VARCHAR NOT NULL,
        predicted_s DOUBLE NOT NULL,
        unmeasured_stages INTEGER NOT NULL,
        stages VARCHAR NOT NULL,
        created_at TIMESTAMP DEFAULT current_timestamp""",
    "run_manifests": """
        run_id VARCHAR NOT NULL,
        manifest_id VARCHAR NOT NULL,
        manifest VARCHAR NOT NULL,
        created_at TIMESTAMP DEFAULT current_timestamp,
        PRIMARY KEY (run_id, manifest_id)""",
    "store_migrations": """
        name VARCHAR PRIMARY KEY,
        created_at TIMESTAMP DEFAULT current_timestamp""",
    "env_id_renames": """
        old_id VARCHAR PRIMARY KEY,
        env_id VARCHAR NOT NULL,
        created_at TIMESTAMP DEFAULT current_timestamp""",
}
"""`stage_runs` is the completion record of the loop's stages (see `ipr_core.run.loop`): written
in the transaction that writes the stage's rows, with the fingerprint of what it read."""
"""`stage_costs` is what a stage's completion cost (`ipr_core.run.costs`), keyed like its
`stage_runs` record and written in the same transaction; a stage copied from a donor run
records the copy's own cost and names the donor. `estimates` holds the last `ipr
estimate` of each run id, which the next estimate compares with the measured costs.
`run_manifests`: what shaped a run's numbers besides its config (`ipr_core.run.manifest`),
one row per distinct manifest the run was started or resumed with. `store_migrations`
names each data migration done to the store (done once); `env_id_renames` maps an env id's
spelling before the full-id migration to its full id (`migrate_to_full_env_ids`)."""

# -- training steps: each optimizer step of a trained checkpoint ----------------------------
TRAINING_STEP_METRICS = (
    "epoch",
    "learning_rate",
    "grad_norm",
    "loss",
    "sft_loss",
    *(
        f"{level}_{name}"
        for level in ("o_dpo", "s_dpo")
        for name in ("pairs", "loss", "margin", "chosen_logratio", "rejected_logratio", "accuracy")
    ),
)
"""The columns of a step's log (`TrainResult.training_steps`, keys with `/` as `_`): the
loss and its SFT term, and per DPO level (o-DPO: trajectory pairs, s-DPO: step pairs) its
pairs in the step and their mean unweighted DPO loss, implicit reward margin β·Δ, chosen
and rejected log-ratios (log πθ - log πref) and accuracy (share with Δ > 0). NULL where a
step had no pair of the level or the trainer has no such term (SFT: the loss is the SFT
term)."""

SCHEMA["training_steps"] = f"""
        checkpoint_id VARCHAR NOT NULL,
        step INTEGER NOT NULL,
        run_id VARCHAR,
        iteration INTEGER,
        kind VARCHAR NOT NULL,
        {", ".join(f"{metric} DOUBLE" for metric in TRAINING_STEP_METRICS)},
        created_at TIMESTAMP DEFAULT current_timestamp,
        PRIMARY KEY (checkpoint_id, step)"""
"""Keyed by checkpoint: a checkpoint's steps never change, so rewriting them (a stage
rerun, a run reusing the checkpoint) leaves no stale row. Written with the checkpoint's
row, in the transaction that records the training stage."""


def training_step_rows(
    result: TrainResult, run_id: str | None = None, iteration: int | None = None
) -> list[dict[str, Any]]:
    rows = []
    for entry in result.training_steps():
        logged = {key.replace("/", "_"): value for key, value in entry.items()}
        if result.kind == "sft":
            logged["sft_loss"] = logged["loss"]
        row = {"checkpoint_id": result.checkpoint_id, "step": int(entry["step"])}
        row |= {"run_id": run_id, "iteration": iteration, "kind": result.kind}
        rows.append(row | {metric: logged.get(metric) for metric in TRAINING_STEP_METRICS})
    return rows


PAIR_KEY = "run_id, iteration, level, task_id, prefix_len"
ROLLOUT_KEY = "run_id, iteration, kind, policy_id, task_id, prefix_len, actor, sample_idx"


def key_id(key: str, alias: str = "") -> str:
    """SQL for a row's short id: the first 12 hex digits of the SHA-256 of its natural key
    columns joined by '/' (for a pair, the record id `ipr export pairs` writes)."""
    columns = ", ".join(alias + column for column in key.split(", "))
    return f"substr(sha256(concat_ws('/', {columns})), 1, 12)"


PAIR_ID = key_id(PAIR_KEY)
ROLLOUT_ID = key_id(ROLLOUT_KEY)


def sql_text(value: str) -> str:
    """A Python constant as a SQL string literal, for the views (which take no parameters)."""
    return "'" + value.replace("'", "''") + "'"


_EXPERT, _AGENT, _MC = sql_text(EXPERT), sql_text(AGENT), sql_text(RolloutKind.MC)
_SCORING = ", ".join(sql_text(s) for s in (S.EXPERT_STEP_REWARDS, S.AGENT_STEP_REWARDS))
_TRAINING = ", ".join(sql_text(s) for s in (S.SFT, S.TRAIN_MIXTURE, S.TRAIN_RFT))

VIEWS: dict[str, str] = {
    "pair_ids": f"SELECT {PAIR_ID} AS pair_id, * FROM pairs",
    "rollout_ids": f"SELECT {ROLLOUT_ID} AS rollout_id, * FROM rollouts",
    "pair_mc_samples": f"""
        SELECT {key_id(PAIR_KEY, "p.")} AS pair_id, s.actor, s.iteration, s.scorer_id,
               s.action, s.mean_reward, s.n_samples, s.n_failed,
               {key_id(ROLLOUT_KEY, "r.")} AS rollout_id, r.sample_idx, r.status,
               r.outcome_reward, r.n_steps
        FROM pairs p
        JOIN step_rewards s ON s.run_id = p.run_id AND s.task_id = p.task_id
             AND s.prefix_len = p.prefix_len
             AND ((s.actor = {_EXPERT} AND s.iteration <= p.iteration)
                  OR (s.actor = {_AGENT} AND s.iteration = p.iteration))
        JOIN rollouts r ON r.run_id = s.run_id AND r.iteration = s.iteration
             AND r.kind = {_MC} AND r.policy_id = s.scorer_id AND r.task_id = s.task_id
             AND r.prefix_len = s.prefix_len AND r.actor = s.actor
        WHERE p.level = {sql_text(STEP)}""",
    "stage_work": f"""
        SELECT *, CASE WHEN stage = {sql_text(S.EXPERT_STEP_REWARDS)} AND iteration = 0 THEN 1
                      ELSE iteration END AS cost_iteration,
               CASE WHEN stage IN ({_SCORING}) THEN {_MC}
                    WHEN stage = {sql_text(S.EXPLORE)} THEN {sql_text(RolloutKind.EXPLORE)}
                    WHEN stage IN ({_TRAINING}) THEN 'train'
                    WHEN stage LIKE {sql_text(S.EVALUATE + "-%")} THEN {sql_text(RolloutKind.EVAL)}
                    ELSE 'other' END AS work
        FROM stage_costs""",
}
"""Views over the tables (made when a writer opens the store): `pair_ids` and `rollout_ids` add the
short ids `ipr show` takes; `pair_mc_samples` is every Monte Carlo sample behind both
step rewards of a step pair (its expert step's, scored under iteration 0, and its agent
step's, scored in the pair's iteration); `stage_work` is `stage_costs` with the kind of
work each stage is (Monte Carlo, exploration, training, evaluation) and the iteration its
cost counts in (the expert steps' scoring, stored under iteration 0 and done once, counts
in iteration 1, the iteration that runs it), for the cost tables of a run and of an
experiment."""

Row = Mapping[str, Any]


@dataclass(frozen=True)
class At:
    """Where a stage's rows live: the run and the iteration they are stored under."""

    run_id: str
    iteration: int


@dataclass(frozen=True)
class RowKey:
    """What a `rollouts` row is for: run, iteration, kind ('explore', 'mc', 'eval'), the
    expert prefix it starts from and whose step it scores."""

    run_id: str
    iteration: int
    kind: str
    prefix_len: int
    actor: str


@dataclass(frozen=True)
class Scope:
    """The rows of one table that a stage owns: `table WHERE where`."""

    table: str
    where: str
    params: tuple[Any, ...] = ()


@dataclass(frozen=True)
class StageRecord:
    """A stage's completion: what it read (fingerprint), returned and left in the store."""

    run_id: str
    iteration: int
    stage: str
    fingerprint: str
    result: dict[str, Any]
    row_counts: list[int]


def partial_name(stage: str) -> str:
    """The `stage_runs` name of a stage's chunks committed before its completion."""
    return f"{stage}.partial"


class StoreLocked(IprError):
    """The store stayed locked by another process for longer than the timeout."""


class Store:
    """A store file, brought up to `SCHEMA` when it opens: every table and view exists
    for every reader and writer after. `read_only`: never written (nor migrated; a store
    of an older schema is refused), for commands that only read, such as `ipr report`."""

    def __init__(self, path: str | Path, lock_timeout_s: float = 120.0, read_only: bool = False):
        self.path = Path(path)
        self.lock_timeout_s = lock_timeout_s
        self.read_only = read_only
        with self._connect(read_only=read_only) as con:
            if read_only:
                _check_current(con, self.path)
            else:
                _migrate(con, self.path)

    # -- connections -------------------------------------------------------------------
    @contextmanager
    def _connect(
        self, read_only: bool, settings: Mapping[str, Any] | None = None
    ) -> Iterator[duckdb.DuckDBPyConnection]:
        if read_only and not self.path.exists():
            raise IprError(f"store {self.path} does not exist")
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.lock_timeout_s
        delay = 0.02
        while True:
            try:
                con = duckdb.connect(str(self.path), read_only=read_only, config=settings or {})
                break
            except duckdb.IOException as exc:
                message = str(exc).splitlines()[0]
                if "not a valid DuckDB database" in message:
                    raise InputError(
                        str(self.path), "not a DuckDB store (left as it is)", field="--store"
                    ) from exc
                if "lock" not in message.lower():
                    raise IprError(f"store {self.path}: {message}") from exc
                if time.monotonic() > deadline:
                    raise StoreLocked(f"store {self.path}: {message}") from exc
                time.sleep(delay)  # another process holds the file for a short write
                delay = min(delay * 2, 0.5)
        try:
            yield con
        finally:
            con.close()

    def copy_to(self, target: str | Path) -> Path:
        """A consistent copy of the store file while another process may be writing it (a
        running experiment): a read-only connection holds writers off (they wait, as for
        any lock) while the file is copied, and no write is half-done when it opens. The
        copy replaces `target` whole, so a copy cut short leaves the previous one."""
        target = Path(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.stem}.partial{target.suffix}")  # git ignores it
        with self._connect(read_only=True):
            if Path(f"{self.path}.wal").exists():
                raise IprError(f"store {self.path}: a write-ahead log is pending; copy it later")
            shutil.copyfile(self.path, partial)
        partial.replace(target)
        return target

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """One short write transaction: all or nothing."""
        if self.read_only:
            raise IprError(f"store {self.path} was opened read-only")
        with self._connect(read_only=False) as con:
            con.execute("BEGIN TRANSACTION")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    # -- generic read/write ------------------------------------------------------------
    def write(self, rows_by_table: Mapping[str, Sequence[Row]]) -> dict[str, int]:
        """Upsert rows into several tables in one transaction; returns rows written per table."""
        with self.transaction() as con:
            return {table: upsert(con, table, rows) for table, rows in rows_by_table.items()}

    def import_experts(self, rows: Sequence[Row], replace: bool) -> tuple[int, list[str]]:
        """Upsert expert rows of one env unless some of their ids are stored and not
        `replace`; returns (rows written, stored ids among them). The check and the write
        share one transaction, so a concurrent import cannot slip between them."""
        with self.transaction() as con:
            existing = [
                task_id
                for (task_id,) in con.execute(
                    "SELECT task_id FROM expert_trajectories WHERE env_id = ? "
                    "AND list_contains(?, task_id) ORDER BY task_id",
                    [stored_env_id(rows[0]["env_id"]), [row["task_id"] for row in rows]],
                ).fetchall()
            ]
            if existing and not replace:
                return 0, existing
            return upsert(con, "expert_trajectories", rows), existing

    def query(
        self, sql: str, params: Sequence[Any] | Mapping[str, Any] | None = None
    ) -> pd.DataFrame:
        """Run a read-only query."""
        with self._connect(read_only=True) as con:
            return con.execute(sql, params or []).df()

    def count(self, table: str, where: str = "TRUE", params: Sequence[Any] | None = None) -> int:
        return int(self.query(f"SELECT count(*) AS n FROM {table} WHERE {where}", params)["n"][0])

    def fingerprint_env_id(self, env_id: str) -> str:
        """The spelling of `env_id` that stage fingerprints hash: the one this store first
        held it under (its spelling before `migrate_to_full_env_ids`, where it has one), so
        stages finished before the migration stay done. A default that changes later
        changes the full id, which then has no old spelling: no stage is taken for done."""
        if not self.path.exists():
            return env_id
        found = self.query(
            "SELECT min(old_id) AS old_id FROM env_id_renames WHERE env_id = ?", [env_id]
        )["old_id"].iloc[0]
        return found if isinstance(found, str) else env_id

    # -- stage completion records ------------------------------------------------------
    def stage_record(self, run_id: str, iteration: int, stage: str) -> StageRecord | None:
        found = self.query(
            "SELECT * FROM stage_runs WHERE run_id = ? AND iteration = ? AND stage = ?",
            [run_id, iteration, stage],
        )
        return None if found.empty else _record(found.iloc[0])

    def stage_donors(self, stage: str, fingerprint: str) -> list[StageRecord]:
        """Every run and iteration whose `stage` completed with this fingerprint, oldest first."""
        found = self.query(
            "SELECT * FROM stage_runs WHERE stage = ? AND fingerprint = ? "
            "ORDER BY created_at, run_id, iteration",
            [stage, fingerprint],
        )
        return [_record(row) for _, row in found.iterrows()]

    def scope_rows(self, scope: Scope, columns: str) -> pd.DataFrame:
        """`columns` of the rows a stage's scope holds, in no particular order."""
        return self.query(f"SELECT {columns} FROM {scope.table} WHERE {scope.where}", scope.params)

    def scope_counts(self, scopes: Sequence[Scope]) -> list[int]:
        with self._connect(read_only=True) as con:
            return [_count(con, scope) for scope in scopes]

    def commit_stage(
        self,
        record: StageRecord,
        scopes: Sequence[Scope],
        rows: Mapping[str, Sequence[Row]],
        replace: bool,
    ) -> StageRecord:
        """The stage's rows and its completion record in one transaction: a stage killed
        before the commit left neither. `replace` first deletes what its scopes held. The
        stage's record of chunks committed so far (`save_chunk`), if any, goes."""
        with self.transaction() as con:
            if replace:
                for scope in scopes:
                    con.execute(f"DELETE FROM {scope.table} WHERE {scope.where}", scope.params)
            for table, table_rows in rows.items():
                upsert(con, table, table_rows)
            _drop_partial(con, record)
            return _write_record(con, record, scopes)

    def save_chunk(
        self, partial: StageRecord, rows: Mapping[str, Sequence[Row]], stale: Sequence[Scope] = ()
    ) -> None:
        """A chunk of a stage's rows with its partial record (named `partial_name(stage)`:
        the fingerprint the chunks are computed for and what they cost so far), in one
        transaction, so a stage killed mid-chunk loses that chunk only. The first chunk of
        an attempt that starts afresh first deletes what `stale` holds (rows an attempt with
        other inputs left)."""
        with self.transaction() as con:
            for scope in stale:
                con.execute(f"DELETE FROM {scope.table} WHERE {scope.where}", scope.params)
            for table, table_rows in rows.items():
                upsert(con, table, table_rows)
            _write_record(con, partial, [])

    def copy_stage(
        self,
        donor: StageRecord,
        record: StageRecord,
        scopes: Sequence[tuple[Scope, Scope]],
        rows: Mapping[str, Sequence[Row]],
    ) -> StageRecord:
        """Copy a donor's scoped rows, relabelled to `record`'s run and iteration, and write
        `record` and `rows` (its cost), in one transaction. `scopes` pairs each donor scope
        with its own."""
        relabel = "* REPLACE (?::VARCHAR AS run_id, ?::INTEGER AS iteration)"
        with self.transaction() as con:
            for theirs, ours in scopes:
                con.execute(f"DELETE FROM {ours.table} WHERE {ours.where}", ours.params)
                con.execute(
                    f"INSERT OR REPLACE INTO {ours.table} SELECT {relabel} FROM {theirs.table} "
                    f"WHERE {theirs.where}",
                    [record.run_id, record.iteration, *theirs.params],
                )
            for table, table_rows in rows.items():
                upsert(con, table, table_rows)
            _drop_partial(con, record)
            return _write_record(con, record, [ours for _, ours in scopes])

    def record_checkpoint(
        self, result: TrainResult, run_id: str | None = None, iteration: int | None = None
    ) -> None:
        """Write the checkpoint's row and its training steps (idempotent: keyed by its id)."""
        self.write(
            {
                "checkpoints": [checkpoint_row(result, run_id, iteration)],
                "training_steps": training_step_rows(result, run_id, iteration),
            }
        )

    # -- typed readers -----------------------------------------------------------------
    def rows_hash(self, table: str, columns: str, where: str, params: list[Any]) -> str:
        """A hash of the selected rows in a stable order."""
        frame = self.query(f"SELECT {columns} FROM {table} WHERE {where} ORDER BY ALL", params)
        return digest([table, frame.to_json(orient="values", double_precision=15)], 32)

    def step_rewards_hash(self, at: At, actor: str, scorer_id: str) -> str:
        """What iteration `at.iteration` reads of a run's step rewards by an actor and a scorer
        (`step_reward_map`): mining's input, and a stage fingerprint's."""
        where, params = _step_rewards_at(at, actor, scorer_id)
        return self.rows_hash(
            "step_rewards",
            "task_id, prefix_len, action, mean_reward, n_samples, n_failed",
            where,
            params,
        )

    def explorations_hash(self, at: At) -> str:
        """What `explorations` returns for a (run, iteration)."""
        return self.rows_hash(
            "rollouts",
            "task_id, prefix_len, sample_idx, policy_id, status, outcome_reward, steps",
            "run_id = ? AND iteration = ? AND kind = ?",
            [at.run_id, at.iteration, RolloutKind.EXPLORE],
        )

    def step_reward_map(
        self, at: At, actor: str, scorer_id: str
    ) -> dict[tuple[str, int], float | None]:
        """(task, prefix length) -> mean reward (None: every rollout failed) of the step
        rewards iteration `at.iteration` reads."""
        where, params = _step_rewards_at(at, actor, scorer_id)
        frame = self.query(
            f"SELECT task_id, prefix_len, mean_reward FROM step_rewards WHERE {where}", params
        )
        return _reward_map(frame)

    def explorations(
        self, run_id: str, iteration: int, experts: Sequence[Trajectory]
    ) -> list[Exploration]:
        """The stored exploration rollouts of an iteration, rejoined with their experts."""
        by_task = {expert.task.task_id: expert for expert in experts}
        frame = self.query(
            "SELECT * FROM rollouts WHERE run_id = ? AND iteration = ? AND kind = ? "
            "ORDER BY task_id, prefix_len",
            [run_id, iteration, RolloutKind.EXPLORE],
        )
        explorations = []
        for row in frame.to_dict("records"):
            expert = by_task.get(row["task_id"])
            if expert is None:
                continue
            j = int(row["prefix_len"])
            prefix = tuple(step.text for step in expert.steps[:j])
            reward = None if _is_null(row["outcome_reward"]) else row["outcome_reward"]
            steps = steps_from_json(row["steps"])
            trajectory = Trajectory(expert.task, steps, reward, row["status"])
            spec = RolloutSpec(expert.task.task_id, prefix)
            explorations.append(
                Exploration(expert, j, RolloutResult(spec=spec, trajectory=trajectory))
            )
        return explorations

    def pairs(self, run_id: str, iteration: int) -> list[Pair]:
        """The pairs one iteration mined, in a stable order."""
        frame = self.query(
            "SELECT * FROM pairs WHERE run_id = ? AND iteration = ? "
            "ORDER BY level, task_id, prefix_len",
            [run_id, iteration],
        )
        return [pair_from_row(row) for row in frame.to_dict("records")]

    def scored_steps(self, run_id: str, scorer_id: str) -> list[StoredStepReward]:
        """Every scored step of (`run_id`, `scorer_id`), all iterations and actors, stably
        ordered, with the expert trajectory of its task (None when the store has none)."""
        frame = self.query(
            "SELECT s.task_id, s.prefix_len, s.actor, s.iteration, s.action, s.step_text, "
            "s.mean_reward, e.env_id AS e_env_id, e.task_id AS e_task_id, e.split, "
            "e.instruction, e.initial_observation, e.steps "
            "FROM step_rewards s LEFT JOIN expert_trajectories e "
            "ON e.env_id = s.env_id AND e.task_id = s.task_id "
            "WHERE s.run_id = ? AND s.scorer_id = ? "
            "ORDER BY s.task_id, s.prefix_len, s.iteration, s.actor",
            [run_id, scorer_id],
        )
        steps = []
        for row in frame.to_dict("records"):
            expert = None
            if not _is_null(row["e_task_id"]):
                expert_row = {"env_id": row["e_env_id"], "task_id": row["e_task_id"]}
                expert = expert_from_row({**row, **expert_row, "outcome_reward": 0.0})
            reward = None if _is_null(row["mean_reward"]) else float(row["mean_reward"])
            steps.append(
                StoredStepReward(
                    task_id=row["task_id"],
                    prefix_len=int(row["prefix_len"]),
                    actor=row["actor"],
                    iteration=int(row["iteration"]),
                    action=row["action"],
                    step_text=row["step_text"],
                    mean_reward=reward,
                    expert=expert,
                )
            )
        return steps

    def iteration_summary(self, run_id: str, dev_split: str = "dev") -> pd.DataFrame:
        """Per iteration (-1 base, 0 SFT and expert scoring, k >= 1 IPR): pairs by level, mean
        step rewards, dev metrics, rollout and token counts."""
        return self.query(SUMMARY_SQL, {"run": run_id, "dev": dev_split, **_SUMMARY_NAMES})

    def mixture_steps(self, run_id: str, iteration: int) -> pd.DataFrame:
        """The per-step log of the iteration's mixture training (`training_steps`): of the
        checkpoint its stage record names, not every checkpoint trained under the run and
        iteration (a stage redone with other inputs leaves the old one's steps)."""
        return self.query(
            "SELECT t.* FROM stage_runs s JOIN training_steps t "
            "ON t.checkpoint_id = s.result->>'checkpoint_id' "
            "WHERE s.run_id = ? AND s.iteration = ? AND s.stage = ? ORDER BY t.step",
            [run_id, iteration, S.TRAIN_MIXTURE],
        )

    def expert_trajectories(self, env_id: str, split: str | None = None) -> list[Trajectory]:
        """The env's stored experts by task id (which of them a run trains on is
        `run.context.select_experts`: the split's first games, not the first task ids)."""
        sql = "SELECT * FROM expert_trajectories WHERE env_id = ?"
        params: list[Any] = [stored_env_id(env_id)]
        if split is not None:
            sql += " AND split = ?"
            params.append(split)
        sql += " ORDER BY task_id"
        return [expert_from_row(row) for row in self.query(sql, params).to_dict("records")]

    # -- costs, estimates, pair import and transcripts (`ipr_core.run.costs`, `ipr show`) -------
    def measured_stage_costs(self) -> pd.DataFrame:
        """The cost rows of stages computed here (not copied from a donor run), and of
        stages still computing what their committed chunks cost so far (`complete` false):
        a stage of hours is measured from its first chunk, not only once it completes."""
        return self.query(
            f"SELECT * EXCLUDE (copied) FROM ({COSTS_SO_FAR_SQL}) WHERE NOT copied ORDER BY ALL",
            [partial_name("%")],
        )

    def run_wall_seconds(self) -> dict[str, float]:
        """run id -> the wall seconds its stages have taken so far: every cost row (a copied
        stage's is the copy's own) and the committed chunks of a stage still computing."""
        frame = self.query(
            f"SELECT run_id, sum(wall_s) AS wall_s FROM ({COSTS_SO_FAR_SQL}) GROUP BY run_id",
            [partial_name("%")],
        )
        return dict(zip(frame["run_id"], frame["wall_s"], strict=True))

    def trained_pairs(self) -> pd.DataFrame:
        """run_id, iteration, n_pairs: the pairs each completed mixture stage trained on
        (`TRAINED_PAIRS_SQL`; an estimate does without the NULLs)."""
        return self.query(
            f"SELECT run_id, iteration, n_pairs FROM ({TRAINED_PAIRS_SQL}) ORDER BY ALL"
        )

    def run_configs(self) -> dict[str, str]:
        """run id -> its config (JSON) as `loop.prepare_run` recorded it."""
        frame = self.query("SELECT run_id, config FROM runs")
        return dict(zip(frame["run_id"], frame["config"], strict=True))

    def previous_estimate(self) -> pd.DataFrame:
        """The newest stored estimate of a run that has measured costs, with the measured
        wall seconds of that run (one row, or none)."""
        return self.query(
            "SELECT e.run_id, e.created_at, e.predicted_s, e.unmeasured_stages, "
            "sum(c.wall_s) AS measured_s, "
            "count(*) AS measured_stages FROM estimates e JOIN stage_costs c USING (run_id) "
            "GROUP BY ALL ORDER BY e.created_at DESC, e.run_id LIMIT 1"
        )

    def iteration_costs(self, run_id: str, dev_split: str = "dev") -> pd.DataFrame:
        """Per iteration and in total: what the stages cost, per pair mined and per point
        (0.01) of dev reward gained, and the shares of time by kind of work."""
        kinds = {kind.name.lower(): kind for kind in RolloutKind}
        return self.query(RUN_COSTS_SQL, {"run": run_id, "dev": dev_split, **kinds})

    def step_reward_quantiles(self, run_id: str) -> pd.DataFrame:
        """Quantiles of the expert and agent step rewards and of their margin (expert minus
        agent at the same prefix), over the run's scored agent steps."""
        return self.query(STEP_REWARD_QUANTILES_SQL, {"run": run_id, **_QUANTILE_NAMES})

    def import_pairs(self, rows: Sequence[Row], at: At, replace: bool) -> tuple[int, int]:
        """Upsert imported pair rows into (run, iteration) unless it holds pairs already
        and not `replace` (then they are deleted first); returns (written, held before)."""
        with self.transaction() as con:
            held = _count(con, Scope("pairs", "run_id = ? AND iteration = ?", astuple(at)))
            if held and not replace:
                return 0, held
            con.execute("DELETE FROM pairs WHERE run_id = ? AND iteration = ?", astuple(at))
            return upsert(con, "pairs", rows), held

    def pair_rows(self, run_id: str, iteration: int | None = None) -> list[dict[str, Any]]:
        """The `pairs` rows of a run (one iteration, or all), in a stable order."""
        sql = "SELECT * FROM pairs WHERE run_id = ?"
        params: list[Any] = [run_id]
        if iteration is not None:
            sql += " AND iteration = ?"
            params.append(iteration)
        return self.query(sql + " ORDER BY iteration, level, task_id, prefix_len", params).to_dict(
            "records"
        )

    def pair_by_id(self, pair_id: str) -> dict[str, Any] | None:
        """The pair whose short id (`PAIR_ID`) is `pair_id`, with that id."""
        return self._by_id("pairs", PAIR_ID, pair_id)

    def rollout_by_id(self, rollout_id: str) -> dict[str, Any] | None:
        """The rollout whose short id (`ROLLOUT_ID`) is `rollout_id`, with that id."""
        return self._by_id("rollouts", ROLLOUT_ID, rollout_id)

    def _by_id(self, table: str, id_sql: str, short_id: str) -> dict[str, Any] | None:
        found = self.query(
            f"SELECT {id_sql} AS id, * FROM {table} WHERE {id_sql} = ?", [short_id]
        ).to_dict("records")
        return found[0] if found else None

    def example_pairs(self, run_id: str, iteration: int, limit: int) -> list[dict[str, Any]]:
        """A few of an iteration's pairs with their short ids: step pairs with the widest
        reward gap first, then trajectory pairs."""
        return self.query(
            f"SELECT {PAIR_ID} AS id, * FROM pairs WHERE run_id = ? AND iteration = ? "
            "ORDER BY level = ?, chosen_reward - rejected_reward DESC, task_id, prefix_len "
            "LIMIT ?",
            [run_id, iteration, TRAJECTORY, limit],
        ).to_dict("records")

    def task_step_rewards(self, run_id: str, task_id: str) -> pd.DataFrame:
        """Every step reward of a task in a run (all scorers, iterations and actors)."""
        return self.query(
            "SELECT iteration, actor, prefix_len, scorer_id, action, mean_reward, n_samples, "
            "n_failed FROM step_rewards WHERE run_id = ? AND task_id = ? ORDER BY ALL",
            [run_id, task_id],
        )

    def pair_mc_samples(self, pair_id: str) -> pd.DataFrame:
        """The Monte Carlo samples behind both step rewards of a step pair (its rows of the
        `pair_mc_samples` view), each scorer's together: a run's steps may be scored by
        several (step rewards are stored per scorer id), whose sample indices coincide."""
        return self.query(
            "SELECT * EXCLUDE (pair_id) FROM pair_mc_samples WHERE pair_id = ? "
            "ORDER BY actor, scorer_id, sample_idx",
            [pair_id],
        )

    # -- experiments (`ipr_core.run.experiment`) ---------------------------------------
    def experiment_settings(self, experiment_id: str) -> str | None:
        """The shared settings (JSON) the experiment was recorded with; None if unknown."""
        found = self.query(
            "SELECT config FROM experiments WHERE experiment_id = ?", [experiment_id]
        )
        return None if found.empty else str(found["config"].iloc[0])

    def experiment_run_status(self, experiment_id: str, method: str, seed: int) -> str | None:
        found = self.query(
            "SELECT status FROM experiment_runs WHERE experiment_id = ? AND method = ? "
            "AND seed = ?",
            [experiment_id, method, seed],
        )
        return None if found.empty else str(found["status"].iloc[0])

    def experiment_runs(self, experiment_id: str) -> pd.DataFrame:
        """Per run: method, seed, status, best iteration, its dev and test reward."""
        return self.query(EXPERIMENT_RUNS_SQL, [experiment_id])

    def resume_checkpoint_roots(self, experiment_id: str) -> list[str]:
        """The checkpoints the experiment's unfinished work starts from: those of its runs
        that have not finished, and each seed's SFT model (the seed's later methods start
        from it), without their parents."""
        return sorted(
            self.query(
                "SELECT c.checkpoint_id FROM checkpoints c JOIN experiment_runs x USING (run_id) "
                "WHERE x.experiment_id = $exp AND x.status <> 'finished' "
                "UNION SELECT test_policy_id FROM experiment_runs "
                "WHERE experiment_id = $exp AND method = 'sft' AND test_policy_id IS NOT NULL",
                {"exp": experiment_id},
            )["checkpoint_id"]
        )

    def checkpoint_records(self) -> pd.DataFrame:
        """Every checkpoint the store names (the base models too): id, parent, kind, path;
        parents before their children."""
        return self.query(CHECKPOINTS_PARENTS_FIRST_SQL)

    def scorer_ids(self, run_id: str) -> list[str]:
        """The scorers whose step rewards a run holds."""
        found = self.query(
            "SELECT DISTINCT scorer_id FROM step_rewards WHERE run_id = ? ORDER BY ALL", [run_id]
        )
        return found["scorer_id"].tolist()

    # -- a user's SQL (`ipr sql`) ------------------------------------------------------
    def user_query(self, sql: str) -> pd.DataFrame:
        """A user's query on a read-only connection that reaches nothing but the store: no
        file reads or writes (COPY, read_csv, read_text, ATTACH), no extension install or
        load, and the configuration locked so that SET cannot undo it. A failed query is
        one line: DuckDB's message."""
        with self._connect(read_only=True, settings=SANDBOX) as con:
            try:
                return con.execute(sql).df()
            except duckdb.Error as exc:
                raise IprError(f"query failed: {str(exc).splitlines()[0]}") from exc

    # -- run manifests -----------------------------------------------------------------
    def run_manifests(self, run_id: str) -> list[dict[str, Any]]:
        """The manifests a run was started and resumed with, oldest first."""
        found = self.query(
            "SELECT manifest FROM run_manifests WHERE run_id = ? ORDER BY created_at, manifest_id",
            [run_id],
        )
        return [json.loads(text) for text in found["manifest"]]


SANDBOX: dict[str, Any] = {
    "enable_external_access": False,
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    "allow_community_extensions": False,
    "lock_configuration": True,
}
"""DuckDB's settings for untrusted SQL (docs: operations_manual/securing_duckdb): the store
file opened at connect is the only file the connection reaches."""


ADDED_COLUMNS = {"expert_trajectories": {"action_hint": "VARCHAR"}}
"""Columns added since the first schema: a store created before gets them (NULL) when a
writer opens it."""


def _migrate(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    """Bring a store up to SCHEMA where that is safe: missing tables are created, the
    `ADDED_COLUMNS` added and the VIEWS (re)made. A table lacking any other column is
    refused before anything is written (its rows could not be read back as this code
    expects)."""
    found = _columns(con)
    for table, expected in _schema_columns().items():
        missing = sorted(expected - found[table] - set(ADDED_COLUMNS.get(table, {})))
        if found[table] and missing:
            raise InputError(
                str(path),
                f"a store of an older schema: table {table} lacks {', '.join(missing)}; "
                "ipr adds only new tables and the columns it knows (use a new store)",
                field="--store",
            )
    for table, columns in SCHEMA.items():
        con.execute(f"CREATE TABLE IF NOT EXISTS {table} ({columns})")
    for table, added in ADDED_COLUMNS.items():
        for name, kind in added.items():
            if found[table] and name not in found[table]:  # a table created before it
                con.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")
    for view, select in VIEWS.items():
        con.execute(f"CREATE OR REPLACE VIEW {view} AS {select}")
    migrate_to_full_env_ids(con)


FULL_ENV_IDS = "full-env-ids"
ENV_ID_COLUMNS = ("expert_trajectories", "rollouts", "step_rewards", "pairs")
"""Tables with an `env_id` column."""
ENV_ID_IN_CONFIGS = {"runs": ("env",), "estimates": ("env",), "experiments": ("run", "env")}
"""Tables whose JSON `config` holds an env id, and its keys there."""


def migrate_to_full_env_ids(con: duckdb.DuckDBPyConnection) -> None:
    """Rewrite the env ids of a store written when ids left parameters at their default
    out (`twx/twc?locations=1`) to the full canonical id, in every table that holds one,
    in one transaction, once. Each old spelling is kept in `env_id_renames`: stage
    fingerprints hash it (`Store.fingerprint_env_id`), so finished stages stay done. An id
    the registry does not know is left as it is."""
    done = "SELECT count(*) FROM store_migrations WHERE name = ?"
    if con.execute(done, [FULL_ENV_IDS]).fetchone()[0]:
        return
    con.execute("BEGIN TRANSACTION")
    try:
        configs = {
            table: con.execute(f"SELECT rowid, config FROM {table}").fetchall()
            for table in ENV_ID_IN_CONFIGS
        }
        stored = {
            old
            for table in ENV_ID_COLUMNS
            for (old,) in con.execute(f"SELECT DISTINCT env_id FROM {table}").fetchall()
        }
        for table, keys in ENV_ID_IN_CONFIGS.items():
            stored |= {_dig(json.loads(config), keys) for _, config in configs[table]}
        found = {old for old in stored if isinstance(old, str)}
        renames = {old: new for old in found if (new := stored_env_id(old)) != old}
        for old, new in sorted(renames.items()):
            for table in ENV_ID_COLUMNS:
                con.execute(f"UPDATE {table} SET env_id = ? WHERE env_id = ?", [new, old])
            con.execute("INSERT INTO env_id_renames (old_id, env_id) VALUES (?, ?)", [old, new])
        for table, keys in ENV_ID_IN_CONFIGS.items():
            for rowid, config in configs[table]:
                data = json.loads(config)
                if _dig(data, keys) in renames:
                    _dig(data, keys[:-1])[keys[-1]] = renames[_dig(data, keys)]
                    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
                    con.execute(f"UPDATE {table} SET config = ? WHERE rowid = ?", [text, rowid])
        con.execute("INSERT INTO store_migrations (name) VALUES (?)", [FULL_ENV_IDS])
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


@functools.lru_cache(maxsize=256)
def stored_env_id(env_id: str) -> str:
    """The one spelling of an env id in the store (`canonical_env_id`), which every row
    written (`upsert`) and every query by env id goes through; an id the registry does not
    know is kept as it is."""
    try:
        return canonical_env_id(env_id)
    except UnknownEnvError:
        return env_id


def _dig(data: Any, keys: Sequence[str]) -> Any:
    """`data[k1][k2]...`, or None where a key is missing."""
    for key in keys:
        data = data.get(key) if isinstance(data, dict) else None
    return data


def _check_current(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    """Refuse a store some table, column or view of `SCHEMA`/`VIEWS` is missing from."""
    found = _columns(con)
    missing = [
        f"{table}.{column}"
        for table, expected in _schema_columns().items()
        for column in sorted(expected - found[table])
    ]
    views = {name for (name,) in con.execute("SELECT view_name FROM duckdb_views()").fetchall()}
    missing += sorted(set(VIEWS) - views)
    if not missing:
        done = "SELECT count(*) FROM store_migrations WHERE name = ?"
        if not con.execute(done, [FULL_ENV_IDS]).fetchone()[0]:
            missing.append(f"migration {FULL_ENV_IDS}")
    if missing:
        raise InputError(
            str(path),
            f"a store of an older schema (no {', '.join(missing[:3])}); a command that "
            "writes to it (e.g. ipr ingest) migrates it",
            field="--store",
        )


def _columns(con: duckdb.DuckDBPyConnection) -> dict[str, set[str]]:
    rows = con.execute(
        "SELECT table_name, column_name FROM information_schema.columns "
        "WHERE table_schema = 'main' AND table_catalog = current_database()"
    ).fetchall()
    found: dict[str, set[str]] = {table: set() for table in SCHEMA}
    for table, column in rows:
        found.setdefault(table, set()).add(column)
    return found


@functools.cache
def _schema_columns() -> dict[str, set[str]]:
    """Each SCHEMA table's columns, as DuckDB parses them."""
    with duckdb.connect(":memory:") as con:
        for table, columns in SCHEMA.items():
            con.execute(f"CREATE TABLE {table} ({columns})")
        return {table: found for table, found in _columns(con).items() if table in SCHEMA}


@functools.cache
def table_columns(table: str) -> tuple[list[str], list[str]]:
    """A `SCHEMA` table's columns: (those a row must give, those the store's defaults fill)."""
    con = duckdb.connect()
    try:
        con.execute(f"CREATE TABLE t ({SCHEMA[table]})")
        described = con.execute("DESCRIBE t").df()
    finally:
        con.close()
    has_default = described["default"].notna()
    return (
        described.loc[~has_default, "column_name"].tolist(),
        described.loc[has_default, "column_name"].tolist(),
    )


def _count(con: duckdb.DuckDBPyConnection, scope: Scope) -> int:
    sql = f"SELECT count(*) FROM {scope.table} WHERE {scope.where}"
    return int(con.execute(sql, scope.params).fetchall()[0][0])


def _drop_partial(con: duckdb.DuckDBPyConnection, record: StageRecord) -> None:
    """A completed stage keeps no record of the chunks it committed on the way."""
    con.execute(
        "DELETE FROM stage_runs WHERE run_id = ? AND iteration = ? AND stage = ?",
        [record.run_id, record.iteration, partial_name(record.stage)],
    )


def _write_record(
    con: duckdb.DuckDBPyConnection, record: StageRecord, scopes: Sequence[Scope]
) -> StageRecord:
    counts = [_count(con, scope) for scope in scopes]
    row = {
        "run_id": record.run_id,
        "iteration": record.iteration,
        "stage": record.stage,
        "fingerprint": record.fingerprint,
        "result": json.dumps(record.result, sort_keys=True),
        "row_counts": json.dumps(counts),
    }
    upsert(con, "stage_runs", [row])
    return StageRecord(**{**asdict(record), "row_counts": counts})


def _record(row: Any) -> StageRecord:
    return StageRecord(
        run_id=row["run_id"],
        iteration=int(row["iteration"]),
        stage=row["stage"],
        fingerprint=row["fingerprint"],
        result=json.loads(row["result"]),
        row_counts=json.loads(row["row_counts"]),
    )


def upsert(con: duckdb.DuckDBPyConnection, table: str, rows: Sequence[Row]) -> int:
    """Insert or replace `rows`; every env id in them is written in its stored spelling."""
    if not rows:
        return 0
    frame = pd.DataFrame(list(rows))
    if "env_id" in frame:
        frame["env_id"] = frame["env_id"].map(stored_env_id)
    columns = ", ".join(frame.columns)
    con.register("_batch", frame)  # on failure the transaction and connection are dropped
    con.execute(f"INSERT OR REPLACE INTO {table} ({columns}) SELECT {columns} FROM _batch")
    con.unregister("_batch")
    return len(frame)


COSTS_SO_FAR_SQL = """
SELECT run_id, iteration, stage, wall_s, rollouts, env_steps, trained_tokens,
       donor_run_id IS NOT NULL AS copied, true AS complete
FROM stage_costs
UNION ALL
SELECT run_id, iteration, left(stage, length(stage) - length('.partial')),
       CAST(result->>'wall_s' AS DOUBLE), CAST(result->>'rollouts' AS BIGINT),
       CAST(result->>'env_steps' AS BIGINT), 0, false, false
FROM stage_runs WHERE stage LIKE ?
"""
"""Every stage's cost so far: the cost rows of finished stages (a copied stage's is the
copy's own) and the partial records of stages still computing (their committed chunks)."""

# Rows written in one transaction share `created_at`, so parents come first by their depth
# in the tree (a base model, or a parent the store does not name, is depth 0).
CHECKPOINTS_PARENTS_FIRST_SQL = """
WITH RECURSIVE tree(checkpoint_id, depth) AS (
    SELECT checkpoint_id, 0 FROM checkpoints
    WHERE parent_id IS NULL OR parent_id NOT IN (SELECT checkpoint_id FROM checkpoints)
    UNION ALL
    SELECT c.checkpoint_id, t.depth + 1
    FROM checkpoints c JOIN tree t ON c.parent_id = t.checkpoint_id
)
SELECT checkpoint_id, parent_id, kind, path
FROM checkpoints JOIN tree USING (checkpoint_id)
ORDER BY depth, created_at, checkpoint_id
"""

EXPERIMENT_RUNS_SQL = """
SELECT x.method, x.seed, x.run_id, x.status, x.best_iteration,
       round(d.avg_reward, 3) AS dev_reward, round(t.avg_reward, 3) AS test_reward,
       round(t.success_rate, 3) AS test_success, round(t.avg_steps, 2) AS test_steps
FROM experiment_runs x
JOIN experiments e USING (experiment_id)
LEFT JOIN runs r USING (run_id)
LEFT JOIN evaluations d ON d.run_id = x.run_id AND d.iteration = x.best_iteration
     AND d.policy_id = x.test_policy_id AND d.split = json_extract_string(r.config, '$.dev_split')
LEFT JOIN evaluations t ON t.run_id = x.run_id AND t.iteration = x.best_iteration
     AND t.policy_id = x.test_policy_id
     AND t.split = json_extract_string(e.config, '$.test_split')
WHERE x.experiment_id = ?
ORDER BY x.seed, x.method
"""

SUMMARY_SQL = """
WITH r AS (
    SELECT iteration, count(*) AS rollouts,
           count(*) FILTER (WHERE list_contains($failed, status)) AS failed_rollouts,
           sum(prefill_tokens) AS prefill_tokens,
           sum(generated_tokens) AS generated_tokens
    FROM rollouts WHERE run_id = $run AND kind <> $eval GROUP BY iteration),
s AS (
    SELECT iteration,
           avg(mean_reward) FILTER (WHERE actor = $expert) AS expert_step_reward,
           avg(mean_reward) FILTER (WHERE actor = $agent) AS agent_step_reward
    FROM step_rewards WHERE run_id = $run GROUP BY iteration),
p AS (
    SELECT iteration,
           count(*) FILTER (WHERE level = $trajectory) AS trajectory_pairs,
           count(*) FILTER (WHERE level = $step) AS step_pairs
    FROM pairs WHERE run_id = $run GROUP BY iteration),
e AS (  -- the evaluation of the model the iteration's stage record names: evaluations are
        -- kept per model, and a stage redone with another model leaves the old one's
    SELECT v.iteration, v.avg_reward AS dev_reward, v.success_rate, v.avg_steps
    FROM evaluations v
    JOIN stage_runs g ON g.run_id = v.run_id AND g.iteration = v.iteration
         AND g.stage = $evaluate || '-' || v.split AND g.result->>'policy_id' = v.policy_id
    WHERE v.run_id = $run AND v.split = $dev)
SELECT iteration, coalesce(p.trajectory_pairs, 0) AS trajectory_pairs,
       coalesce(p.step_pairs, 0) AS step_pairs,
       round(s.expert_step_reward, 3) AS expert_step_reward,
       round(s.agent_step_reward, 3) AS agent_step_reward,
       round(e.dev_reward, 3) AS dev_reward, round(e.success_rate, 3) AS success_rate,
       round(e.avg_steps, 2) AS avg_steps,
       coalesce(r.rollouts, 0) AS rollouts, coalesce(r.failed_rollouts, 0) AS failed,
       r.prefill_tokens, r.generated_tokens
FROM e FULL JOIN r USING (iteration) FULL JOIN s USING (iteration)
     FULL JOIN p USING (iteration)
ORDER BY iteration
"""
_SUMMARY_NAMES = {
    "failed": sorted(FAILED_STATUSES),
    "evaluate": S.EVALUATE,
    "eval": RolloutKind.EVAL,
    "expert": EXPERT,
    "agent": AGENT,
    "trajectory": TRAJECTORY,
    "step": STEP,
}


RUN_COSTS_SQL = """
WITH c AS (
    SELECT cost_iteration AS iteration, wall_s, cpu_s, gpu_s, peak_rss_mb, prefill_tokens,
           generated_tokens, trained_tokens, rollouts, env_steps, work
    FROM stage_work WHERE run_id = $run),
by_iteration AS (
    SELECT iteration, sum(wall_s) AS wall_s, sum(cpu_s) AS cpu_s, sum(gpu_s) AS gpu_s,
           max(peak_rss_mb) AS peak_rss_mb,
           CAST(sum(prefill_tokens) AS BIGINT) AS prefill_tokens,
           CAST(sum(generated_tokens) AS BIGINT) AS generated_tokens,
           CAST(sum(trained_tokens) AS BIGINT) AS trained_tokens,
           CAST(sum(rollouts) AS BIGINT) AS rollouts, CAST(sum(env_steps) AS BIGINT) AS env_steps,
           sum(wall_s) FILTER (WHERE work = $mc) AS mc_s,
           sum(wall_s) FILTER (WHERE work = $explore) AS explore_s,
           sum(wall_s) FILTER (WHERE work = 'train') AS train_s,
           sum(wall_s) FILTER (WHERE work = $eval) AS eval_s
    FROM c GROUP BY GROUPING SETS ((iteration), ())),
p AS (SELECT iteration, count(*) AS pairs FROM pairs WHERE run_id = $run
      GROUP BY GROUPING SETS ((iteration), ())),
d AS (SELECT iteration, avg(avg_reward) AS dev_reward FROM evaluations
      WHERE run_id = $run AND split = $dev GROUP BY iteration),
gain AS (
    SELECT iteration, dev_reward - lag(dev_reward) OVER (ORDER BY iteration) AS dev_gain
    FROM d
    UNION ALL
    SELECT NULL, arg_max(dev_reward, iteration) - arg_min(dev_reward, iteration) FROM d)
SELECT coalesce(CAST(b.iteration AS VARCHAR), 'total') AS iteration,
       round(b.wall_s, 1) AS wall_s, round(b.cpu_s, 1) AS cpu_s, round(b.gpu_s, 1) AS gpu_s,
       round(b.peak_rss_mb) AS peak_rss_mb, b.prefill_tokens, b.generated_tokens,
       b.trained_tokens, b.rollouts, b.env_steps, coalesce(p.pairs, 0) AS pairs,
       round(b.wall_s / nullif(p.pairs, 0), 2) AS s_per_pair,
       round(g.dev_gain, 3) AS dev_gain,
       CASE WHEN g.dev_gain > 0 THEN round(b.wall_s / (100 * g.dev_gain), 1) END
           AS s_per_dev_point,
       round(100 * coalesce(b.mc_s, 0) / nullif(b.wall_s, 0)) AS mc_pct,
       round(100 * coalesce(b.explore_s, 0) / nullif(b.wall_s, 0)) AS explore_pct,
       round(100 * coalesce(b.train_s, 0) / nullif(b.wall_s, 0)) AS train_pct,
       round(100 * coalesce(b.eval_s, 0) / nullif(b.wall_s, 0)) AS eval_pct
FROM by_iteration b
LEFT JOIN p ON p.iteration IS NOT DISTINCT FROM b.iteration
LEFT JOIN gain g ON g.iteration IS NOT DISTINCT FROM b.iteration
ORDER BY b.iteration NULLS LAST
"""
"""`ipr_core.run.costs`' table of a run (over the `stage_work` view); a point of dev reward is
0.01 (the total's gain is the last iteration's dev reward minus the first's)."""

STEP_REWARD_QUANTILES_SQL = """
WITH a AS (
    SELECT a.mean_reward AS agent, e.mean_reward AS expert
    FROM step_rewards a
    JOIN step_rewards e ON e.run_id = a.run_id AND e.scorer_id = a.scorer_id
         AND e.actor = $expert AND e.task_id = a.task_id
         AND e.prefix_len = a.prefix_len
    WHERE a.run_id = $run AND a.actor = $agent),
v AS (
    SELECT $expert AS reward, mean_reward AS value FROM step_rewards
    WHERE run_id = $run AND actor = $expert
    UNION ALL SELECT $agent, agent FROM a
    UNION ALL SELECT 'margin (expert - agent)', expert - agent FROM a)
SELECT reward, count(value) AS n, round(min(value), 3) AS min,
       round(quantile_cont(value, 0.1), 3) AS p10, round(quantile_cont(value, 0.25), 3) AS p25,
       round(median(value), 3) AS p50, round(quantile_cont(value, 0.75), 3) AS p75,
       round(quantile_cont(value, 0.9), 3) AS p90, round(max(value), 3) AS max,
       round(avg(value), 3) AS mean
FROM v GROUP BY reward ORDER BY list_position([$expert, $agent], reward) NULLS LAST
"""
_QUANTILE_NAMES = {"expert": EXPERT, "agent": AGENT}
"""Every expert step reward, every agent step reward and the margin at each agent step
(the expert's step reward at the same prefix minus the agent's)."""


# -- row conversion ----------------------------------------------------------------------
def _step_rewards_at(at: At, actor: str, scorer_id: str) -> tuple[str, list[Any]]:
    """The step rewards of an actor an iteration reads: the agent's are its own iteration's;
    the expert's are scored once, under iteration 0 (`monte_carlo.expert_steps: all`) or under
    the iteration that first compared an agent step with them (`compared`), so every later
    iteration reads them too."""
    iteration = "iteration <= ?" if actor == EXPERT else "iteration = ?"
    where = f"run_id = ? AND {iteration} AND actor = ? AND scorer_id = ?"
    return where, [at.run_id, at.iteration, actor, scorer_id]


def _reward_map(frame: pd.DataFrame) -> dict[tuple[str, int], float | None]:
    """(task, prefix length) -> mean reward (None: every rollout failed)."""
    return {
        (row.task_id, int(row.prefix_len)): None if _is_null(row.mean_reward) else row.mean_reward
        for row in frame.itertuples()
    }


def _is_null(value: object) -> bool:
    return value is None or (isinstance(value, float) and value != value)


def manifest_row(run_id: str, manifest: Mapping[str, Any]) -> dict[str, Any]:
    text = json.dumps(manifest, sort_keys=True)
    return {"run_id": run_id, "manifest_id": digest([text], 32), "manifest": text}


def rollout_row(result: RolloutResult, key: RowKey, policy_id: str) -> dict[str, Any]:
    trajectory = result.trajectory
    return {
        "run_id": key.run_id,
        "iteration": key.iteration,
        "kind": key.kind,
        "env_id": trajectory.task.env_id,
        "task_id": result.spec.task_id,
        "prefix_len": key.prefix_len,
        "actor": key.actor,
        "sample_idx": result.spec.sample_idx,
        "policy_id": policy_id,
        "status": result.status,
        "outcome_reward": result.outcome_reward,
        "n_steps": len(trajectory.steps),
        "steps": steps_to_json(trajectory.steps),
        "prefill_tokens": result.prefill_tokens,
        "generated_tokens": result.generated_tokens,
        "env_steps": result.env_steps,
        "parse_failures": result.parse_failures,
        "error": result.error,
    }


def step_reward_rows(
    at: At,
    env_id: str,
    scorer_id: str,
    rewards: Sequence[StepReward],
    rollouts: Sequence[Sequence[RolloutResult]],
) -> dict[str, list[dict[str, Any]]]:
    """The `step_rewards` rows and the `rollouts` rows (kind 'mc') behind them."""
    reward_rows: list[dict[str, Any]] = []
    rollout_rows: list[dict[str, Any]] = []
    for reward, results in zip(rewards, rollouts, strict=True):
        query = reward.query
        reward_rows.append(
            {
                "run_id": at.run_id,
                "scorer_id": scorer_id,
                "iteration": at.iteration,
                "env_id": env_id,
                "task_id": query.task_id,
                "prefix_len": query.prefix_len,
                "actor": query.actor,
                "action": reward.action,
                "step_text": query.step_text,
                "mean_reward": reward.mean_reward,
                "n_samples": reward.n_samples,
                "n_ok": reward.n_ok,
                "n_failed": reward.n_failed,
                "terminal": reward.terminal,
            }
        )
        key = RowKey(at.run_id, at.iteration, RolloutKind.MC, query.prefix_len, query.actor)
        rollout_rows += [rollout_row(r, key, scorer_id) for r in results]
    return {"rollouts": rollout_rows, "step_rewards": reward_rows}


def pair_row(pair: Pair, run_id: str, iteration: int, env_id: str, mode: str) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "iteration": iteration,
        "level": pair.level,
        "env_id": env_id,
        "task_id": pair.task_id,
        "prefix_len": pair.prefix_len,
        "mode": mode if pair.level == "step" else "trajectory",
        "prompt": json.dumps(pair.prompt),
        "chosen": json.dumps(pair.chosen),
        "rejected": json.dumps(pair.rejected),
        "chosen_actor": pair.chosen_actor,
        "chosen_reward": pair.chosen_reward,
        "rejected_reward": pair.rejected_reward,
        "chosen_outcome": pair.chosen_outcome,
        "rejected_outcome": pair.rejected_outcome,
    }


def pair_from_row(row: Row) -> Pair:
    """A `pairs` table row (JSON-encoded message lists) as a `Pair`."""
    return Pair(
        level=row["level"],
        task_id=row["task_id"],
        prefix_len=int(row["prefix_len"]),
        prompt=tuple(json.loads(row["prompt"])),
        chosen=tuple(json.loads(row["chosen"])),
        rejected=tuple(json.loads(row["rejected"])),
        chosen_actor=row["chosen_actor"],
        chosen_reward=float(row["chosen_reward"]),
        rejected_reward=float(row["rejected_reward"]),
        chosen_outcome=float(row["chosen_outcome"]),
        rejected_outcome=float(row["rejected_outcome"]),
    )


def steps_to_json(steps: Sequence[Step]) -> str:
    return json.dumps([asdict(step) for step in steps])


def steps_from_json(text: str) -> tuple[Step, ...]:
    return tuple(Step(**step) for step in json.loads(text))


def expert_to_row(trajectory: Trajectory, source: str) -> dict[str, Any]:
    task = trajectory.task
    return {
        "env_id": task.env_id,
        "task_id": task.task_id,
        "split": task.split,
        "source": source,
        "instruction": task.instruction,
        "initial_observation": task.initial_observation,
        "steps": steps_to_json(trajectory.steps),
        "n_steps": len(trajectory.steps),
        "outcome_reward": trajectory.outcome_reward,
        "action_hint": task.action_hint or None,
    }


def expert_from_row(row: Row) -> Trajectory:
    task = EnvTask(
        env_id=row["env_id"],
        task_id=row["task_id"],
        split=row["split"],
        instruction=row["instruction"],
        initial_observation=row["initial_observation"],
        action_hint=hint if isinstance(hint := row.get("action_hint"), str) else "",
    )
    return Trajectory(
        task=task, steps=steps_from_json(row["steps"]), outcome_reward=row["outcome_reward"]
    )
