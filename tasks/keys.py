"""Content fingerprints for cache keys: what a stage really reads, hashed.

Each stage's key combines the config fields it uses, the ids of the models it loads
(`model_id`: a checkpoint's content-derived id) and hashes of the store rows it reads.
So a rerun with the same inputs is a cache hit, and a change (new expert data, another
checkpoint, different MC settings) misses exactly in the stages it reaches.
No Prefect import here: the functions are plain and testable.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ipr_core.config import RunConfig
from ipr_core.store import Store
from ipr_core.training.checkpoints import model_id

STORE_SHARED = ("env", "run_id", "store")
ROLLOUT_FIELDS = ("backend", "max_steps", "generation", "prompt")
"""What every rollout reads; `prompt` (the history window) shapes each prompt it generates from."""


def digest(*parts: Any) -> str:
    payload = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def config_fields(config: RunConfig, *fields: str) -> dict[str, Any]:
    """The named fields, JSON-ready; paths are made absolute (they name the data)."""
    data = config.model_dump(mode="json", include=set(fields))
    for name in ("store", "cache_dir"):
        if name in data:
            data[name] = str(Path(data[name]).resolve())
    return data


def model_key(path: str | Path | None) -> str | None:
    return None if path is None else model_id(Path(path))


def rows_hash(store: Store, table: str, columns: str, where: str, params: list[Any]) -> str:
    """A hash of the selected rows in a stable order (an absent table hashes as empty)."""
    if not store.table_exists(table):
        return digest(table, [])
    frame = store.query(f"SELECT {columns} FROM {table} WHERE {where} ORDER BY ALL", params)
    return digest(table, frame.to_json(orient="values", double_precision=15))


def experts_hash(config: RunConfig) -> str:
    """The expert trajectories the run trains on (the same rows ensure_experts returns)."""
    experts = Store(config.store).expert_trajectories(
        config.env, config.train_split, config.train_limit
    )
    return digest(
        [
            [t.task.task_id, t.task.instruction, t.task.initial_observation,
             [s.text for s in t.steps], t.outcome_reward]
            for t in experts
        ]
    )  # fmt: skip


def explorations_hash(config: RunConfig, iteration: int) -> str:
    """The explore rollouts `load_explorations` returns for an iteration."""
    return rows_hash(
        Store(config.store), "rollouts",
        "task_id, prefix_len, sample_idx, policy_id, status, outcome_reward, steps",
        "run_id = ? AND iteration = ? AND kind = 'explore'", [config.run_id, iteration],
    )  # fmt: skip


def step_rewards_hash(config: RunConfig, scorer_id: str, iteration: int, actor: str) -> str:
    return rows_hash(
        Store(config.store), "step_rewards",
        "task_id, prefix_len, action, mean_reward, n_samples, n_failed",
        "run_id = ? AND scorer_id = ? AND iteration = ? AND actor = ?",
        [config.run_id, scorer_id, iteration, actor],
    )  # fmt: skip


def pairs_hash(config: RunConfig, iteration: int) -> str:
    from ipr_core.training.data import load_pairs, pairs_data_hash

    return pairs_data_hash(load_pairs(Store(config.store), config.run_id, iteration))
