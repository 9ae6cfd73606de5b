"""Where a conversation's tokens go: the parts of the one prompt, counted with a tokenizer.

Each message's tokens are what the chat template adds for it (its markers included), so
the parts add up to the rendered conversation. The system message is split into the
fixed head and the env's action hint, the task message into the task and the first
observation.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
from transformers import PreTrainedTokenizerBase

from ipr_core.prompts import OBSERVATION_PREFIX, step_messages, system_message, task_message
from ipr_core.training.data import render
from ipr_core.types import Trajectory

PARTS = (
    "system prompt",
    "action hint",
    "task",
    "first observation",
    "later observation",
    "assistant turn",
)


def conversation_parts(
    trajectory: Trajectory, action_hint: str, tokenizer: PreTrainedTokenizerBase
) -> list[tuple[str, int]]:
    """(part, tokens) for every part of the whole SFT conversation of `trajectory`."""
    messages = [system_message(action_hint), task_message(trajectory.task)]
    messages += step_messages(trajectory.steps, final_observation=False)
    counts: list[tuple[str, int]] = []
    before = 0
    for k, message in enumerate(messages):
        total = len(render(tokenizer, messages[: k + 1]))
        tokens, before = total - before, total
        if k == 0:
            hint = _count(tokenizer, action_hint)
            counts += [("system prompt", tokens - hint), ("action hint", hint)]
        elif k == 1:
            observation = trajectory.task.initial_observation
            first = (
                _count(tokenizer, f"\n\n{OBSERVATION_PREFIX}{observation}") if observation else 0
            )
            counts += [("task", tokens - first), ("first observation", first)]
        elif message["role"] == "assistant":
            counts.append(("assistant turn", tokens))
        else:
            counts.append(("later observation", tokens))
    return counts


def token_table(
    trajectories: Sequence[Trajectory], action_hint: str, tokenizer: PreTrainedTokenizerBase
) -> pd.DataFrame:
    """Per part: mean tokens per item, mean items and mean tokens per conversation; a total."""
    counts = [conversation_parts(t, action_hint, tokenizer) for t in trajectories]
    n = len(counts)
    rows = []
    for part in PARTS:
        items = [tokens for parts in counts for name, tokens in parts if name == part]
        rows.append(
            {
                "part": part,
                "tokens_per_item": round(sum(items) / len(items), 1) if items else 0.0,
                "items_per_conversation": round(len(items) / n, 2),
                "tokens_per_conversation": round(sum(items) / n, 1),
            }
        )
    total = sum(tokens for parts in counts for _, tokens in parts) / n
    rows.append(
        {
            "part": "total",
            "tokens_per_item": None,
            "items_per_conversation": None,
            "tokens_per_conversation": round(total, 1),
        }
    )
    return pd.DataFrame(rows)


def _count(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])
