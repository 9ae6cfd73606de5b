"""The environment protocol every adapter implements.

An adapter instance holds at most one live episode; the rollout engine keeps a pool of
instances so many episodes run in lock-step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class EnvTask:
    """One task of an environment: what the agent is told before its first action."""

    env_id: str
    task_id: str
    split: str
    instruction: str
    initial_observation: str
    action_hint: str = ""
    """The env's action hint (the system prompt's), carried with the task so that a stored
    expert trajectory builds its prompt without starting the env."""


@dataclass(frozen=True)
class StepResult:
    observation: str
    done: bool
    reward: float
    """Outcome reward so far, normalised to [0, 1]; final when `done`."""


class EnvCrashed(Exception):
    """The environment itself failed (not the agent): the rollout is recorded as env_error."""


class Env(Protocol):
    env_id: str
    max_steps: int
    action_hint: str
    """One short paragraph telling the agent what actions look like (goes in the system prompt)."""

    def task_ids(self, split: str) -> list[str]:
        """Task ids of a split ('train', 'dev', 'test'), in a stable order."""
        ...

    def reset(self, task_id: str) -> EnvTask:
        """Start the episode of `task_id`; deterministic per task id."""
        ...

    def step(self, action: str) -> StepResult:
        """Execute one action. An invalid action gets an observation, never an exception."""
        ...

    def gold_actions(self) -> list[str] | None:
        """The expert action sequence of the current task, where the env has one."""
        ...

    def close(self) -> None: ...
