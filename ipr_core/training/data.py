"""Store rows -> tokenised training examples, through the one prompt builder.

Every conversation is rendered with the tokenizer's chat template exactly as the rollout
engine renders prompts, and the loss mask marks assistant turns only. The mask is built
by rendering the conversation one message at a time and checking that each rendering
is a prefix of the next: a template that rewrites earlier turns, or tokens that merge
across a turn boundary, raise `TokenizationMismatch` naming the example (the released
pipeline silently masked such examples out).

With a history window, SFT trains each assistant turn on its own example: the windowed
prompt the rollout engine builds before that turn, then the turn; without one, an example
is the whole conversation.

Too-long conversations lose their oldest (assistant, observation) turn pairs after the
task message; the system and task messages and the scored side are never cut. An example
that still does not fit is dropped. Both are counted.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from ipr_core.agent.prompts import PromptFormat, build_conversation, step_messages
from ipr_core.errors import IprError
from ipr_core.types import Message, Pair, Trajectory

HEAD_MESSAGES = 2
"""System and task message: kept in every example."""


class TokenizationMismatch(IprError):
    """The chat template does not tokenise a conversation as a concatenation of its turns."""

    def __init__(self, example: str, message: str):
        self.example = example
        super().__init__(f"example {example!r}: {message}")


@dataclass
class BuildStats:
    n_input: int = 0
    n_truncated: int = 0
    """Examples that lost old turns to fit max_length."""
    n_dropped: int = 0
    """Examples that did not fit even with every droppable turn removed."""
    dropped: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TokenizedConversation:
    input_ids: list[int]
    assistant_mask: list[int]
    """1 on the tokens of scored assistant turns (content and end-of-turn token)."""


def sft_conversations(trajectory: Trajectory, prompt: PromptFormat) -> list[list[Message]]:
    """What SFT trains on: the whole conversation (no observation after the last turn), or
    with a history window one conversation per step, ending in that step's turn."""
    task, steps = trajectory.task, trajectory.steps
    if prompt.history_window is None:
        return [
            build_conversation(task, (), prompt) + step_messages(steps, final_observation=False)
        ]
    return [
        [*build_conversation(task, steps[:t], prompt), {"role": "assistant", "content": step.text}]
        for t, step in enumerate(steps)
    ]


def example_name(kind: str, task_id: str, prefix_len: int = 0) -> str:
    return f"{kind}:{task_id}@{prefix_len}"


def render(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    add_generation_prompt: bool = False,
) -> list[int]:
    if not messages:
        return []
    encoded = tokenizer.apply_chat_template(
        list(messages), tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=True
    )
    return list(encoded["input_ids"])


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    name: str,
    score_from: int = 0,
) -> TokenizedConversation:
    """Tokenise `messages` and mask the assistant turns at index >= `score_from`.

    An assistant turn's tokens are those the full rendering adds after the generation
    prompt, i.e. what the model must generate at inference, less trailing whitespace the
    template puts after the end-of-turn token.
    """
    ids: list[int] = []
    mask: list[int] = []
    for k, message in enumerate(messages):
        if message["role"] == "assistant":
            prompt = render(tokenizer, messages[:k], add_generation_prompt=True)
            _check_prefix(ids, prompt, name, f"the generation prompt before message {k}")
            mask += [0] * (len(prompt) - len(ids))
            ids = prompt
        full = render(tokenizer, messages[: k + 1])
        _check_prefix(ids, full, name, f"message {k} ({message['role']})")
        turn = full[len(ids) :]
        scored = message["role"] == "assistant" and k >= score_from
        if scored:
            end = len(turn)
            while end > 0 and not tokenizer.decode(turn[end - 1 : end]).strip():
                end -= 1
            text = tokenizer.decode(turn[:end])
            if not message["content"].strip() or message["content"].strip() not in text:
                raise TokenizationMismatch(
                    name, f"the masked tokens of assistant message {k} do not contain its text"
                )
            mask += [1] * end + [0] * (len(turn) - end)
        else:
            mask += [0] * len(turn)
        ids = full
    return TokenizedConversation(input_ids=ids, assistant_mask=mask)


def _check_prefix(prefix: list[int], ids: list[int], name: str, what: str) -> None:
    if ids[: len(prefix)] != prefix:
        at = next(i for i, (a, b) in enumerate(zip(prefix, ids, strict=False)) if a != b)
        raise TokenizationMismatch(
            name,
            f"rendering up to {what} changes earlier tokens at position {at}: the chat template "
            "is not a prefix-consistent concatenation of turns",
        )
    if len(ids) < len(prefix):
        raise TokenizationMismatch(name, f"rendering up to {what} is shorter than before it")


def _drop_oldest_turns(messages: list[Message], keep_tail: int) -> list[Message] | None:
    """Remove the oldest (assistant, observation) pair after the head; None when none is left."""
    if len(messages) - HEAD_MESSAGES - keep_tail < 2:
        return None
    return messages[:HEAD_MESSAGES] + messages[HEAD_MESSAGES + 2 :]


# -- SFT ---------------------------------------------------------------------------------
def build_sft_examples(
    trajectories: Iterable[Trajectory],
    prompt: PromptFormat,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
) -> tuple[list[dict[str, Any]], BuildStats]:
    """Rows of `input_ids` and `assistant_masks`, the columns SFTTrainer turns into labels."""
    stats = BuildStats()
    rows: list[dict[str, Any]] = []
    examples = [
        (example_name("sft", trajectory.task.task_id, t), messages)
        for trajectory in trajectories
        for t, messages in enumerate(sft_conversations(trajectory, prompt))
    ]
    for name, messages in examples:
        stats.n_input += 1
        truncated = False
        while len(render(tokenizer, messages)) > max_length:
            shorter = _drop_oldest_turns(messages, keep_tail=1)
            if shorter is None:
                break
            messages, truncated = shorter, True
        score_from = HEAD_MESSAGES if prompt.history_window is None else len(messages) - 1
        tokenized = tokenize_conversation(tokenizer, messages, name, score_from)
        if len(tokenized.input_ids) > max_length:
            stats.n_dropped += 1
            stats.dropped.append(name)
            continue
        stats.n_truncated += truncated
        rows.append({"input_ids": tokenized.input_ids, "assistant_masks": tokenized.assistant_mask})
    return rows, stats


# -- pairs -------------------------------------------------------------------------------
def build_pair_examples(
    pairs: Iterable[Pair], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> tuple[list[dict[str, Any]], BuildStats]:
    """Rows of prompt/chosen/rejected ids, assistant masks of both sides and the pair level.

    Chosen and rejected sides may hold observations between assistant turns (suffix
    pairs); those tokens are context, not scored.
    """
    stats = BuildStats()
    rows: list[dict[str, Any]] = []
    for pair in pairs:
        stats.n_input += 1
        name = example_name(pair.level, pair.task_id, pair.prefix_len)
        for side in (pair.chosen, pair.rejected):
            if not side or side[0]["role"] != "assistant" or side[-1]["role"] != "assistant":
                raise TokenizationMismatch(
                    name, "a pair side must start and end with an assistant turn"
                )
        prompt = list(pair.prompt)
        truncated = False
        while _pair_length(tokenizer, prompt, pair) > max_length:
            shorter = _drop_oldest_turns(prompt, keep_tail=0)
            if shorter is None:
                break
            prompt, truncated = shorter, True
        if _pair_length(tokenizer, prompt, pair) > max_length:
            stats.n_dropped += 1
            stats.dropped.append(name)
            continue
        stats.n_truncated += truncated
        prompt_ids = render(tokenizer, prompt, add_generation_prompt=True)
        row: dict[str, Any] = {"prompt_ids": prompt_ids, "is_step_level": pair.level == "step"}
        for key, side in (("chosen", pair.chosen), ("rejected", pair.rejected)):
            tokenized = tokenize_conversation(tokenizer, prompt + list(side), name, len(prompt))
            if tokenized.input_ids[: len(prompt_ids)] != prompt_ids:
                raise TokenizationMismatch(name, f"the prompt is not a prefix of prompt + {key}")
            row[f"{key}_ids"] = tokenized.input_ids[len(prompt_ids) :]
            row[f"{key}_mask"] = tokenized.assistant_mask[len(prompt_ids) :]
        rows.append(row)
    return rows, stats


def _pair_length(tokenizer: PreTrainedTokenizerBase, prompt: list[Message], pair: Pair) -> int:
    return max(len(render(tokenizer, prompt + list(side))) for side in (pair.chosen, pair.rejected))


# -- content hashes ----------------------------------------------------------------------
def sft_data_hash(trajectories: Sequence[Trajectory], prompt: PromptFormat) -> str:
    """Hash of what SFT trains on: the rendered-to-messages conversations."""
    return _hash_json([sft_conversations(t, prompt) for t in trajectories])


def pairs_data_hash(pairs: Sequence[Pair]) -> str:
    return _hash_json([[p.level, p.prompt, p.chosen, p.rejected] for p in pairs])


def _hash_json(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()
