"""The IPR data stages as plain functions over the store.

Each stage reads what it needs from the store and writes its results in one
transaction, so stages can run (and be retried, cached and resumed) independently;
the Prefect tasks in `tasks/` wrap exactly these functions.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ipr_core.envs import make_env
from ipr_core.errors import InputError
from ipr_core.expert import Rejected, gold_trajectories
from ipr_core.explore import Exploration, explore
from ipr_core.mining import MiningConfig, StepKey, mine_pairs
from ipr_core.prompts import PromptFormat
from ipr_core.rollout import RolloutEngine, RolloutResult, RolloutSpec
from ipr_core.step_rewards import (
    StepQuery,
    StepReward,
    StepScorer,
    estimate_step_rewards,
    expert_queries,
    predict_step_rewards,
)
from ipr_core.store import Store, expert_to_row, steps_from_json, steps_to_json, upsert
from ipr_core.types import Pair, Trajectory

EXPERT_ITERATION = 0
"""Expert step rewards depend only on the fixed scorer: stored once, under iteration 0."""


@dataclass(frozen=True)
class IngestReport:
    written: int
    rejected: list[Rejected]


def ingest_gold(store: Store, env_id: str, split: str, limit: int) -> IngestReport:
    """Build `limit` verified expert trajectories of a split from the env's gold actions."""
    env = make_env(env_id)
    kept: list[Trajectory] = []
    rejected: list[Rejected] = []
    try:
        for built in gold_trajectories(env, split):
            if isinstance(built, Rejected):
                rejected.append(built)
            else:
                kept.append(built)
            if len(kept) >= limit:
                break
    finally:
        env.close()
    store.write({"expert_trajectories": [expert_to_row(t, source="gold") for t in kept]})
    return IngestReport(written=len(kept), rejected=rejected)


def ingest_file(
    store: Store, trajectories: Sequence[Trajectory], source: str, replace: bool = False
) -> tuple[int, int]:
    """Store imported expert trajectories (already validated whole) in one transaction;
    returns (written, replaced).

    Ids the store already holds for the env are refused unless `replace`: a silent
    overwrite would change what every later run of the env trains on."""
    rows = [expert_to_row(t, source=source) for t in trajectories]
    if not rows:
        return 0, 0
    with store.transaction() as con:
        existing = [
            task_id
            for (task_id,) in con.execute(
                "SELECT task_id FROM expert_trajectories WHERE env_id = ? "
                "AND list_contains(?, task_id) ORDER BY task_id",
                [rows[0]["env_id"], [row["task_id"] for row in rows]],
            ).fetchall()
        ]
        if existing and not replace:
            shown = ", ".join(repr(task_id) for task_id in existing[:5])
            more = f" and {len(existing) - 5} more" if len(existing) > 5 else ""
            raise InputError(
                source,
                f"the store already holds {len(existing)} of these ids for "
                f"{rows[0]['env_id']} ({shown}{more}); pass --replace to replace them",
                field="id",
            )
        return upsert(con, "expert_trajectories", rows), len(existing)


# -- Monte Carlo step rewards --------------------------------------------------------------
def expert_step_rewards(
    store: Store,
    run_id: str,
    engine: RolloutEngine,
    scorer_id: str,
    experts: Sequence[Trajectory],
    n_samples: int,
    temperature: float,
    seed: int,
    reward_model: StepScorer | None = None,
) -> int:
    """Score every expert step once per (run, scorer); returns how many were computed now.

    With `reward_model`, its predictions replace the Monte Carlo estimate."""
    queries = pending_expert_queries(store, run_id, scorer_id, experts)
    if queries:
        rewards, rollouts = score_steps(engine, queries, n_samples, temperature, seed, reward_model)
        _write_step_rewards(store, run_id, EXPERT_ITERATION, engine, scorer_id, rewards, rollouts)
    return len(queries)


def agent_step_rewards(
    store: Store,
    run_id: str,
    iteration: int,
    engine: RolloutEngine,
    scorer_id: str,
    explorations: Sequence[Exploration],
    n_samples: int,
    temperature: float,
    seed: int,
    reward_model: StepScorer | None = None,
) -> int:
    """Score the agent's first own action of every exploration that differs from the expert's."""
    queries = agent_queries(explorations)
    rewards, rollouts = score_steps(engine, queries, n_samples, temperature, seed, reward_model)
    _write_step_rewards(store, run_id, iteration, engine, scorer_id, rewards, rollouts)
    return len(queries)


def pending_expert_queries(
    store: Store, run_id: str, scorer_id: str, experts: Sequence[Trajectory]
) -> list[StepQuery]:
    """The expert steps this (run, scorer) has not scored yet."""
    done = _step_reward_keys(store, run_id, scorer_id, EXPERT_ITERATION, "expert")
    return [
        query
        for expert in experts
        for query in expert_queries(expert)
        if (query.task_id, query.prefix_len) not in done
    ]


def agent_queries(explorations: Sequence[Exploration]) -> list[StepQuery]:
    """The agent's first own action of every exploration that differs from the expert's."""
    return [q for e in explorations if (q := e.agent_step_query()) is not None]


def score_steps(
    engine: RolloutEngine,
    queries: Sequence[StepQuery],
    n_samples: int,
    temperature: float,
    seed: int,
    reward_model: StepScorer | None,
) -> tuple[list[StepReward], list[list[RolloutResult]]]:
    """MC estimates, or the step reward model's predictions when there is one."""
    if reward_model is not None:
        return predict_step_rewards(engine, reward_model, queries)
    return estimate_step_rewards(engine, queries, n_samples, temperature, seed)


def _write_step_rewards(
    store: Store,
    run_id: str,
    iteration: int,
    engine: RolloutEngine,
    scorer_id: str,
    rewards: Sequence[StepReward],
    rollouts: Sequence[Sequence[RolloutResult]],
) -> None:
    reward_rows, rollout_rows = step_reward_rows(
        run_id, iteration, engine.env_id, scorer_id, rewards, rollouts
    )
    store.write({"rollouts": rollout_rows, "step_rewards": reward_rows})


def step_reward_rows(
    run_id: str,
    iteration: int,
    env_id: str,
    scorer_id: str,
    rewards: Sequence[StepReward],
    rollouts: Sequence[Sequence[RolloutResult]],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The `step_rewards` rows and the `rollouts` rows (kind 'mc') behind them."""
    reward_rows: list[dict[str, Any]] = []
    rollout_rows: list[dict[str, Any]] = []
    for reward, results in zip(rewards, rollouts, strict=True):
        query = reward.query
        reward_rows.append(
            {
                "run_id": run_id,
                "scorer_id": scorer_id,
                "iteration": iteration,
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
        rollout_rows += [
            rollout_row(r, run_id, iteration, "mc", query.prefix_len, query.actor, scorer_id)
            for r in results
        ]
    return reward_rows, rollout_rows


def _step_reward_keys(
    store: Store, run_id: str, scorer_id: str, iteration: int, actor: str
) -> set[StepKey]:
    return set(step_reward_map(store, run_id, scorer_id, iteration, actor))


def step_reward_map(
    store: Store, run_id: str, scorer_id: str, iteration: int, actor: str
) -> dict[StepKey, float | None]:
    if not store.table_exists("step_rewards"):
        return {}
    frame = store.query(
        "SELECT task_id, prefix_len, mean_reward FROM step_rewards "
        "WHERE run_id = ? AND scorer_id = ? AND iteration = ? AND actor = ?",
        [run_id, scorer_id, iteration, actor],
    )
    return {
        (row.task_id, int(row.prefix_len)): None if _is_null(row.mean_reward) else row.mean_reward
        for row in frame.itertuples()
    }


# -- exploration ---------------------------------------------------------------------------
def explore_stage(
    store: Store,
    run_id: str,
    iteration: int,
    engine: RolloutEngine,
    experts: Sequence[Trajectory],
    seed: int,
) -> list[Exploration]:
    """Greedy exploration from every expert prefix; rollouts stored as kind 'explore'."""
    explorations = explore(engine, experts, temperature=0.0, seed=seed)
    policy_id = engine.backend.policy_id
    rows = [
        rollout_row(e.rollout, run_id, iteration, "explore", e.prefix_len, "agent", policy_id)
        for e in explorations
    ]
    with store.transaction() as con:  # a rerun with another policy replaces, never mixes
        con.execute(
            "DELETE FROM rollouts WHERE run_id = ? AND iteration = ? AND kind = 'explore'",
            [run_id, iteration],
        )
        upsert(con, "rollouts", rows)
    return explorations


def load_explorations(
    store: Store, run_id: str, iteration: int, experts: Sequence[Trajectory]
) -> list[Exploration]:
    """The stored exploration rollouts of an iteration, rejoined with their experts."""
    by_task = {expert.task.task_id: expert for expert in experts}
    frame = store.query(
        "SELECT * FROM rollouts WHERE run_id = ? AND iteration = ? AND kind = 'explore' "
        "ORDER BY task_id, prefix_len",
        [run_id, iteration],
    )
    explorations = []
    for row in frame.to_dict("records"):
        expert = by_task.get(row["task_id"])
        if expert is None:
            continue
        j = int(row["prefix_len"])
        prefix = tuple(step.text for step in expert.steps[:j])
        reward = None if _is_null(row["outcome_reward"]) else row["outcome_reward"]
        trajectory = Trajectory(expert.task, steps_from_json(row["steps"]), reward, row["status"])
        result = RolloutResult(spec=RolloutSpec(expert.task.task_id, prefix), trajectory=trajectory)
        explorations.append(Exploration(expert, j, result))
    return explorations


# -- pairs ---------------------------------------------------------------------------------
def mine_stage(
    store: Store,
    run_id: str,
    iteration: int,
    scorer_id: str,
    explorations: Sequence[Exploration],
    config: MiningConfig,
    prompt: PromptFormat,
    env_id: str,
) -> list[Pair]:
    """Mine an iteration's pairs and replace whatever that iteration had stored before."""
    expert_rewards = step_reward_map(store, run_id, scorer_id, EXPERT_ITERATION, "expert")
    agent_rewards = step_reward_map(store, run_id, scorer_id, iteration, "agent")
    pairs = mine_pairs(explorations, expert_rewards, agent_rewards, config, prompt)
    rows = [pair_row(p, run_id, iteration, env_id, config.step_mode) for p in pairs]
    with store.transaction() as con:
        con.execute("DELETE FROM pairs WHERE run_id = ? AND iteration = ?", [run_id, iteration])
        upsert(con, "pairs", rows)
    return pairs


# -- rows ----------------------------------------------------------------------------------
def rollout_row(
    result: RolloutResult,
    run_id: str,
    iteration: int,
    kind: str,
    prefix_len: int,
    actor: str,
    policy_id: str,
) -> dict[str, Any]:
    trajectory = result.trajectory
    return {
        "run_id": run_id,
        "iteration": iteration,
        "kind": kind,
        "env_id": trajectory.task.env_id,
        "task_id": result.spec.task_id,
        "prefix_len": prefix_len,
        "actor": actor,
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


def _is_null(value: object) -> bool:
    return value is None or (isinstance(value, float) and value != value)
