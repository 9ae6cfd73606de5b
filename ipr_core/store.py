"""The DuckDB store: schema, idempotent writes and typed readers.

DuckDB lets one process write a file, and no other process may open it meanwhile.
So every write opens the file, runs one short transaction and closes it again, and
readers (`ipr sql`, a notebook) open it read-only between writes, retrying while a
write holds the lock. Writes are `INSERT OR REPLACE` on natural keys, so a retried
stage never duplicates rows.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

from ipr_core.envs.base import EnvTask
from ipr_core.errors import IprError
from ipr_core.types import Step, Trajectory

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
}

Row = Mapping[str, Any]


class StoreLocked(IprError):
    """The store stayed locked by another process for longer than the timeout."""


class Store:
    def __init__(self, path: str | Path, lock_timeout_s: float = 120.0):
        self.path = Path(path)
        self.lock_timeout_s = lock_timeout_s

    # -- connections -------------------------------------------------------------------
    @contextmanager
    def _connect(self, read_only: bool) -> Iterator[duckdb.DuckDBPyConnection]:
        if read_only and not self.path.exists():
            raise IprError(f"store {self.path} does not exist")
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.lock_timeout_s
        delay = 0.02
        while True:
            try:
                con = duckdb.connect(str(self.path), read_only=read_only)
                break
            except duckdb.IOException as exc:
                if "lock" not in str(exc).lower() or time.monotonic() > deadline:
                    raise StoreLocked(f"store {self.path}: {exc}") from exc
                time.sleep(delay)  # another process holds the file for a short write
                delay = min(delay * 2, 0.5)
        try:
            yield con
        finally:
            con.close()

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """One short write transaction: all or nothing."""
        with self._connect(read_only=False) as con:
            for table, columns in SCHEMA.items():
                con.execute(f"CREATE TABLE IF NOT EXISTS {table} ({columns})")
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

    def query(
        self, sql: str, params: Sequence[Any] | Mapping[str, Any] | None = None
    ) -> pd.DataFrame:
        """Run a read-only query; returns an empty frame if the store has no tables yet."""
        with self._connect(read_only=True) as con:
            return con.execute(sql, params or []).df()

    def table_exists(self, table: str) -> bool:
        if not self.path.exists():
            return False
        found = self.query(
            "SELECT count(*) AS n FROM information_schema.tables WHERE table_name = ?", [table]
        )
        return bool(found["n"].iloc[0])

    def count(self, table: str, where: str = "TRUE", params: Sequence[Any] | None = None) -> int:
        if not self.table_exists(table):
            return 0
        return int(self.query(f"SELECT count(*) AS n FROM {table} WHERE {where}", params)["n"][0])

    # -- typed readers -----------------------------------------------------------------
    def expert_trajectories(
        self, env_id: str, split: str | None = None, limit: int | None = None
    ) -> list[Trajectory]:
        if not self.table_exists("expert_trajectories"):
            return []
        sql = "SELECT * FROM expert_trajectories WHERE env_id = ?"
        params: list[Any] = [env_id]
        if split is not None:
            sql += " AND split = ?"
            params.append(split)
        sql += " ORDER BY task_id"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [expert_from_row(row) for row in self.query(sql, params).to_dict("records")]


def upsert(con: duckdb.DuckDBPyConnection, table: str, rows: Sequence[Row]) -> int:
    if not rows:
        return 0
    frame = pd.DataFrame(list(rows))
    columns = ", ".join(frame.columns)
    con.register("_batch", frame)  # on failure the transaction and connection are dropped
    con.execute(f"INSERT OR REPLACE INTO {table} ({columns}) SELECT {columns} FROM _batch")
    con.unregister("_batch")
    return len(frame)


# -- row conversion ----------------------------------------------------------------------
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
    }


def expert_from_row(row: Row) -> Trajectory:
    task = EnvTask(
        env_id=row["env_id"],
        task_id=row["task_id"],
        split=row["split"],
        instruction=row["instruction"],
        initial_observation=row["initial_observation"],
    )
    return Trajectory(
        task=task, steps=steps_from_json(row["steps"]), outcome_reward=row["outcome_reward"]
    )
