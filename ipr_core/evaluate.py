"""Evaluation: greedy episodes on a split, summarised into an `evaluations` row.

Choose the best iteration on `dev`; report on `test`. Failed rollouts are counted in
`n_failed` and left out of the averages, never scored as 0.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ipr_core.pipeline import rollout_row
from ipr_core.rollout import RolloutEngine, RolloutSpec
from ipr_core.store import Store
from ipr_core.types import is_failed


@dataclass(frozen=True)
class Evaluation:
    run_id: str
    iteration: int
    split: str
    policy_id: str
    n_tasks: int
    n_failed: int
    avg_reward: float | None
    success_rate: float | None
    avg_steps: float | None


def evaluate(
    store: Store,
    run_id: str,
    iteration: int,
    engine: RolloutEngine,
    split: str,
    limit: int,
    seed: int = 0,
) -> Evaluation:
    task_ids = engine.task_ids(split)[:limit]
    results = engine.run([RolloutSpec(task_id) for task_id in task_ids], temperature=0.0, seed=seed)
    policy_id = engine.backend.policy_id
    finished = [r for r in results if not is_failed(r.status)]
    outcomes = [r.outcome_reward or 0.0 for r in finished]
    evaluation = Evaluation(
        run_id=run_id,
        iteration=iteration,
        split=split,
        policy_id=policy_id,
        n_tasks=len(results),
        n_failed=len(results) - len(finished),
        avg_reward=_mean(outcomes),
        success_rate=_mean([1.0 if o >= 1.0 else 0.0 for o in outcomes]),
        avg_steps=_mean([float(len(r.trajectory.steps)) for r in finished]),
    )
    store.write(
        {
            "rollouts": [
                rollout_row(r, run_id, iteration, "eval", 0, "agent", policy_id) for r in results
            ],  # fmt: skip
            "evaluations": [asdict(evaluation)],
        }
    )
    return evaluation


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
