"""Where a conversation's tokens go: the parts of the one prompt, counted with a tokenizer.

Each message's tokens are what the chat template adds for it (its markers included), so
the parts add up to the rendered conversation. The system message is split into the
fixed head and the env's action hint, the task message into the task and the first
observation. A conversation is counted as SFT trains on it (`sft_conversations`): one
example without a history window, one per assistant turn with one. The turn summary
counts the prompts rollouts send before each turn of the same conversation.
"""

from __future__ import annotations

from collections.abc import Sequence
from os.path import commonprefix

import pandas as pd
from transformers import PreTrainedTokenizerBase

from ipr_core.agent.prompts import OBSERVATION_PREFIX, PromptFormat, build_conversation
from ipr_core.envs.base import EnvTask
from ipr_core.training.data import render, sft_conversations
from ipr_core.types import Message, Trajectory

PARTS = (
    "system prompt",
    "action hint",
    "task",
    "first observation",
    "later observation",
    "assistant turn",
)


def message_parts(
    messages: Sequence[Message], task: EnvTask, action_hint: str, tokenizer: PreTrainedTokenizerBase
) -> list[tuple[str, int]]:
    """(part, tokens) for every message of one conversation that starts with the system
    and task messages."""
    counts: list[tuple[str, int]] = []
    before = 0
    for k, message in enumerate(messages):
        total = len(render(tokenizer, messages[: k + 1]))
        tokens, before = total - before, total
        if k == 0:
            hint = _count(tokenizer, action_hint)
            counts += [("system prompt", tokens - hint), ("action hint", hint)]
        elif k == 1:
            observation = task.initial_observation
            first = (
                _count(tokenizer, f"\n\n{OBSERVATION_PREFIX}{observation}") if observation else 0
            )
            counts += [("task", tokens - first), ("first observation", first)]
        elif message["role"] == "assistant":
            counts.append(("assistant turn", tokens))
        else:
            counts.append(("later observation", tokens))
    return counts


def conversation_parts(
    trajectory: Trajectory, prompt: PromptFormat, tokenizer: PreTrainedTokenizerBase
) -> list[tuple[str, int]]:
    """(part, tokens) over the SFT examples of `trajectory` (a part counts in each example
    that shows it)."""
    return [
        part
        for messages in sft_conversations(trajectory, prompt)
        for part in message_parts(messages, trajectory.task, prompt.action_hint, tokenizer)
    ]


def token_table(
    trajectories: Sequence[Trajectory], prompt: PromptFormat, tokenizer: PreTrainedTokenizerBase
) -> pd.DataFrame:
    """Per part: mean tokens per item, mean items and mean tokens per conversation; a total."""
    counts = [conversation_parts(t, prompt, tokenizer) for t in trajectories]
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


def turn_prompts(
    trajectory: Trajectory, prompt: PromptFormat, tokenizer: PreTrainedTokenizerBase
) -> list[tuple[int, int]]:
    """(prompt tokens, prefilled tokens) before each turn of `trajectory`, as a rollout
    replaying it would send them; prefilled counts what follows the longest prefix shared
    with the previous prompt and its turn (a prefix cache holding the episode so far)."""
    task, steps = trajectory.task, trajectory.steps
    cached: list[int] = []
    rows = []
    for t, step in enumerate(steps):
        messages = build_conversation(task, steps[:t], prompt)
        ids = render(tokenizer, messages, add_generation_prompt=True)
        rows.append((len(ids), len(ids) - len(commonprefix([ids, cached]))))
        cached = render(tokenizer, [*messages, {"role": "assistant", "content": step.text}])
    return rows


def turn_table(
    trajectories: Sequence[Trajectory], prompt: PromptFormat, tokenizer: PreTrainedTokenizerBase
) -> pd.DataFrame:
    """Mean and longest prompt per turn; per episode, prompt tokens sent and prefilled."""
    episodes = [turn_prompts(t, prompt, tokenizer) for t in trajectories]
    sent = [tokens for turns in episodes for tokens, _ in turns]
    n = len(episodes)
    measures = {
        "prompt per turn (mean)": sum(sent) / len(sent),
        "prompt per turn (longest)": max(sent),
        "prompt tokens per episode": sum(sent) / n,
        "prefilled per episode, prefix cache": sum(p for e in episodes for _, p in e) / n,
    }
    return pd.DataFrame(
        {"measure": list(measures), "tokens": [round(v, 1) for v in measures.values()]}
    )


def _count(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])
