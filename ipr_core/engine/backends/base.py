"""The policy backend interface: a batch of conversations in, `n` completions each out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from ipr_core.types import Message

FinishReason = Literal["stop", "length", "context"]
"""stop: a stop string or EOS; length: hit max_new_tokens; context: the prompt did not fit."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    max_new_tokens: int = 128
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int = 0


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    """Prompt tokens computed for this completion: prefix-cache hits are free, and a prompt
    shared by several completions is counted once."""
    generated_tokens: int
    finish_reason: FinishReason


@dataclass
class PolicyBackend(Protocol):
    policy_id: str
    max_context: int
    stats: dict[str, int] = field(default_factory=dict)

    def generate(
        self,
        conversations: list[list[Message]],
        params: SamplingParams,
        seeds: Sequence[int] | None = None,
    ) -> list[list[Completion]]:
        """Return `params.n` completions for each conversation, in order.

        `seeds`, one per conversation, make a sampled completion depend on its own
        conversation, seed and sample index only, not on the rest of the batch.
        """
        ...
