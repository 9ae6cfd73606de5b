"""Prefect tasks: one per IPR stage, thin wrappers over `ipr_core` (see `tasks.stages`)."""

from tasks.settings import configure_prefect_env

configure_prefect_env()  # before the first `import prefect`

from tasks.stages import (  # noqa: E402
    StageFailed,
    agent_step_rewards,
    evaluate,
    expert_step_rewards,
    explore,
    ingest,
    mine_pairs,
    prepare,
    sft,
    still_valid,
    train_mixture,
)

__all__ = [
    "StageFailed",
    "agent_step_rewards",
    "evaluate",
    "expert_step_rewards",
    "explore",
    "ingest",
    "mine_pairs",
    "prepare",
    "sft",
    "still_valid",
    "train_mixture",
]
