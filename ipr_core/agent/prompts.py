"""The one prompt builder used by SFT, exploration, Monte Carlo, training and evaluation.

The released IPR pipeline formatted prompts differently per stage (0-shot vs 1-shot);
here every stage turns (task, steps) into chat messages through `build_conversation`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ipr_core.envs.base import EnvTask
from ipr_core.types import Message, Step

SYSTEM_PROMPT = (
    "You are an agent acting in a text-based environment to complete a task. "
    "After each observation, reply with exactly two lines:\n"
    "Thought: <your short reasoning>\n"
    "Action: <one action>\n"
    "{action_hint}"
)
"""Paid again in every prompt of every stage (`ipr tokens`); a 26-token head was measured
but not adopted yet (docs/benchmarks.md, "Tokens per conversation")."""

OBSERVATION_PREFIX = "Observation: "
INVALID_TURN_OBSERVATION = (
    "Your reply could not be parsed. Reply with a line 'Thought: ...' and a line 'Action: ...'."
)
STOP_STRINGS: tuple[str, ...] = ("\nObservation:", "\nObservation", "<|im_end|>")
"""Cut a generated turn where a model starts writing the environment's part."""


@dataclass(frozen=True)
class PromptFormat:
    """How every stage builds its prompts: the env's action hint and the history window."""

    action_hint: str
    history_window: int | None = None
    """Show only the last k (assistant, observation) turns after the task; None: all."""


def system_message(action_hint: str) -> Message:
    return {"role": "system", "content": SYSTEM_PROMPT.format(action_hint=action_hint).strip()}


def task_message(task: EnvTask) -> Message:
    content = task.instruction
    if task.initial_observation:
        content += f"\n\n{OBSERVATION_PREFIX}{task.initial_observation}"
    return {"role": "user", "content": content}


def step_messages(steps: Sequence[Step], final_observation: bool = True) -> list[Message]:
    """Assistant turns with the observations between them (and after the last, if asked)."""
    messages: list[Message] = []
    for i, step in enumerate(steps):
        messages.append({"role": "assistant", "content": step.text})
        if final_observation or i < len(steps) - 1:
            messages.append({"role": "user", "content": OBSERVATION_PREFIX + step.observation})
    return messages


def build_conversation(task: EnvTask, steps: Sequence[Step], prompt: PromptFormat) -> list[Message]:
    """The prompt for the agent's next turn after `steps` (the last k with a window)."""
    window = prompt.history_window
    shown = steps if window is None else steps[max(0, len(steps) - window) :]
    return [system_message(prompt.action_hint), task_message(task), *step_messages(shown)]
