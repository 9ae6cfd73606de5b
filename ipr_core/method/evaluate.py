"""Evaluation: greedy episodes on a split, summarised into an `evaluations` row.

Choose the best iteration on `dev`; report on `test`. Failed rollouts are counted in
`n_failed` and left out of the averages, never scored as 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ipr_core.engine.rollout import RolloutEngine, RolloutResult, RolloutSpec
from ipr_core.types import is_failed


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
    finished = [r for r in results if not is_failed(r.status)]
    outcomes = [r.outcome_reward or 0.0 for r in finished]
    evaluation = Evaluation(
        split=split,
        policy_id=engine.backend.policy_id,
        n_tasks=len(results),
        n_failed=len(results) - len(finished),
        avg_reward=_mean(outcomes),
        success_rate=_mean([1.0 if o >= 1.0 else 0.0 for o in outcomes]),
        avg_steps=_mean([float(len(r.trajectory.steps)) for r in finished]),
    )
    return evaluation, results


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
