"""Evaluation: greedy episodes on a split, summarised into an `evaluations` row.

Choose the best iteration on `dev`; report on `test`. Failed rollouts are counted in
`n_failed` and left out of the averages, never scored as 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ipr_core.engine.rollout import RolloutEngine, RolloutResult, RolloutSpec
from ipr_core.types import is_failed, is_success


@dataclass(frozen=True)
class Evaluation:
    split: str
    policy_id: str
    n_tasks: int
    n_failed: int
    avg_reward: float | None
    success_rate: float | None
    avg_steps: float | None


def evaluate(
    engine: RolloutEngine, split: str, task_ids: Sequence[str], seed: int = 0
) -> tuple[Evaluation, list[RolloutResult]]:
    """One greedy episode per task; the summary and the episodes."""
    results = engine.run([RolloutSpec(task_id) for task_id in task_ids], temperature=0.0, seed=seed)
    episodes = [Episode(r.status, r.outcome_reward, len(r.trajectory.steps)) for r in results]
    return summarize(split, engine.backend.policy_id, episodes), results


@dataclass(frozen=True)
class Episode:
    """What an evaluation reads of an episode (a rollout or its stored row)."""

    status: str
    outcome_reward: float | None
    n_steps: int


def summarize(split: str, policy_id: str, episodes: Sequence[Episode]) -> Evaluation:
    """The evaluation of a model's episodes on a split: failed ones counted, not averaged."""
    finished = [e for e in episodes if not is_failed(e.status)]
    outcomes = [e.outcome_reward or 0.0 for e in finished]
    return Evaluation(
        split=split,
        policy_id=policy_id,
        n_tasks=len(episodes),
        n_failed=len(episodes) - len(finished),
        avg_reward=_mean(outcomes),
        success_rate=_mean(
            [1.0 if is_success(e.status, e.outcome_reward) else 0.0 for e in finished]
        ),
        avg_steps=_mean([float(e.n_steps) for e in finished]),
    )


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
