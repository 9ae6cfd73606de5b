"""The policy backend interface: a batch of conversations in, `n` completions each out;
or, where a backend decodes continuously, a stream of turns in and completions out."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field, replace
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


TurnKey = Hashable
"""The caller's name for a submitted turn; its completion comes back under it."""


class TurnStream(Protocol):
    """Continuous generation: turns go in as they become ready, completions come out as
    each one finishes, so a caller can act on a finished turn (step its environment) and
    submit the next while the others are still decoding."""

    def submit(self, key: TurnKey, conversation: list[Message], seed: int) -> None:
        """Queue one completion of `conversation`, sampled with `seed` (as `generate`'s
        per-conversation seeds, sample 0)."""
        ...

    def step(self) -> list[tuple[TurnKey, Completion]]:
        """Advance generation a little (one decode step, or one batch of generate calls);
        return the turns that finished."""
        ...


class LockStepStream:
    """A `TurnStream` over any backend's `generate`: each step generates every turn
    submitted since the last one, as one batch (one round of lock-step rollouts)."""

    def __init__(self, backend: PolicyBackend, params: SamplingParams):
        self.backend, self.params = backend, params
        self.turns: list[tuple[TurnKey, list[Message], int]] = []

    def submit(self, key: TurnKey, conversation: list[Message], seed: int) -> None:
        self.turns.append((key, conversation, seed))

    def step(self) -> list[tuple[TurnKey, Completion]]:
        turns, self.turns = self.turns, []
        if not turns:
            return []
        outputs = self.backend.generate(
            [conversation for _, conversation, _ in turns],
            replace(self.params, n=1),
            [seed for _, _, seed in turns],
        )
        return [(key, out[0]) for (key, _, _), out in zip(turns, outputs, strict=True)]


def open_stream(backend: PolicyBackend, params: SamplingParams) -> TurnStream:
    """The backend's own continuous stream where its class has one (`stream`), else
    lock-step rounds of `generate` (remote engines, and wrappers that only forward it)."""
    if callable(getattr(type(backend), "stream", None)):
        return backend.stream(params)  # type: ignore[attr-defined]
    return LockStepStream(backend, params)
