"""The rows each loop stage owns in the store, as `Scope`s (`table WHERE ...`): what a stage
replaces when it reruns, counts in its completion record and copies from another run."""

from __future__ import annotations

from collections.abc import Sequence

from ipr_core.store.store import At, Scope

_AT = "run_id = ? AND iteration = ?"


def experts(env_id: str, split: str) -> Scope:
    return Scope("expert_trajectories", "env_id = ? AND split = ?", (env_id, split))


def checkpoint(checkpoint_id: str) -> Scope:
    return Scope("checkpoints", "checkpoint_id = ?", (checkpoint_id,))


def evaluation(at: At, policy_id: str, split: str, task_ids: Sequence[str]) -> list[Scope]:
    """The evaluation row and its episodes (rollouts carry no split: their task ids)."""
    owner = (at.run_id, at.iteration, policy_id)
    return [
        Scope("evaluations", f"{_AT} AND policy_id = ? AND split = ?", (*owner, split)),
        Scope(
            "rollouts",
            f"{_AT} AND policy_id = ? AND kind = 'eval' AND list_contains(?, task_id)",
            (*owner, list(task_ids)),
        ),
    ]


def step_rewards(at: At, actor: str, scorer_id: str) -> list[Scope]:
    """`actor`'s step rewards by a scorer and the MC rollouts behind them (whose policy id
    is the scorer's)."""
    owner = (at.run_id, at.iteration, actor, scorer_id)
    return [
        Scope("step_rewards", f"{_AT} AND actor = ? AND scorer_id = ?", owner),
        Scope("rollouts", f"{_AT} AND actor = ? AND kind = 'mc' AND policy_id = ?", owner),
    ]


def explorations(at: At) -> Scope:
    return Scope("rollouts", f"{_AT} AND kind = 'explore'", (at.run_id, at.iteration))


def pairs(at: At) -> Scope:
    return Scope("pairs", _AT, (at.run_id, at.iteration))
