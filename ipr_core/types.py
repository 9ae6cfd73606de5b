"""The data model shared by every stage: steps, trajectories, rollouts and pairs."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from ipr_core.envs.base import EnvTask

Message = dict[str, str]
"""A chat message: {"role": "system" | "user" | "assistant", "content": str}."""

RolloutStatus = Literal["ok", "max_steps", "cut", "env_error", "generation_error", "truncated"]
"""ok: the env ended the episode; max_steps: the step bound ended it (its outcome counts);
cut: the run ended it on purpose after the policy's first action (an exploration that took
the expert's own action, `cut_explorations`): no outcome, and not a failure;
env_error: the environment crashed; generation_error: the backend failed;
truncated: the conversation outgrew the model's context. The last three are failures:
they carry no outcome reward and are never averaged as 0."""

FAILED_STATUSES: frozenset[str] = frozenset({"env_error", "generation_error", "truncated"})
NO_OUTCOME_STATUSES: frozenset[str] = FAILED_STATUSES | {"cut"}

SUCCESS_REWARD = 1.0
"""The outcome reward of a completed game: an episode succeeds when it reaches it (rewards
below it are partial credit). Success rates, RFT's successful explorations and the report's
queries all count successes by it."""

Actor = Literal["expert", "agent"]
EXPERT: Actor = "expert"
AGENT: Actor = "agent"
PairLevel = Literal["trajectory", "step"]
TRAJECTORY: PairLevel = "trajectory"
STEP: PairLevel = "step"

BASE_ITERATION = -1
"""Evaluations of the base model are stored as iteration -1; the SFT model is iteration 0."""
EXPERT_ITERATION = 0
"""Expert step rewards are scored once per run and scorer, stored under iteration 0."""


class RolloutKind(StrEnum):
    """What a `rollouts` row is for."""

    __repr__ = str.__repr__  # logs and messages show the name as the string it is

    EXPLORE = "explore"
    MC = "mc"
    """A Monte Carlo sample behind a step reward."""
    EVAL = "eval"


class StageName(StrEnum):
    """The loop's stages as their completion records (`stage_runs`) and costs name them;
    an evaluation's record adds its split (`evaluate-dev`)."""

    __repr__ = str.__repr__  # logs and messages show the name as the string it is

    INGEST = "ingest"
    SFT = "sft"
    EXPERT_STEP_REWARDS = "expert-step-rewards"
    EXPLORE = "explore"
    AGENT_STEP_REWARDS = "agent-step-rewards"
    MINE_PAIRS = "mine-pairs"
    TRAIN_MIXTURE = "train-mixture"
    TRAIN_RFT = "train-rft"
    EVALUATE = "evaluate"


@dataclass(frozen=True)
class Step:
    """One agent turn and the environment's answer."""

    text: str
    """The assistant turn as written or generated ("Thought: ...\\nAction: ...")."""
    action: str
    """The parsed action; empty when the turn did not parse."""
    observation: str


@dataclass(frozen=True)
class Trajectory:
    task: EnvTask
    steps: tuple[Step, ...]
    outcome_reward: float | None
    """None when the rollout failed (see RolloutStatus)."""
    status: RolloutStatus = "ok"


@dataclass(frozen=True)
class Pair:
    """A contrastive pair: the chosen and rejected continuations of one prompt."""

    level: PairLevel
    task_id: str
    prefix_len: int
    prompt: tuple[Message, ...]
    chosen: tuple[Message, ...]
    rejected: tuple[Message, ...]
    chosen_actor: Actor
    chosen_reward: float
    rejected_reward: float
    chosen_outcome: float
    rejected_outcome: float


def is_failed(status: str) -> bool:
    return status in FAILED_STATUSES


def is_success(status: str, outcome_reward: float | None) -> bool:
    """A finished episode that completed its game (`SUCCESS_REWARD`); failed ones never are."""
    return not is_failed(status) and (outcome_reward or 0.0) >= SUCCESS_REWARD


def same_action(a: str, b: str) -> bool:
    """Actions compare equal up to case and whitespace (the env treats them alike)."""
    return " ".join(a.lower().split()) == " ".join(b.lower().split())


@dataclass(frozen=True)
class StoredStepReward:
    """A `step_rewards` row with the expert trajectory of its task."""

    task_id: str
    prefix_len: int
    actor: str
    iteration: int
    action: str
    step_text: str
    mean_reward: float | None
    expert: Trajectory | None
