"""What every backend shares: how a conversation becomes prompt tokens, and request seeds.

All backends render a conversation through the model's own chat template here, so the
transformers, vLLM and HTTP backends prefill exactly the same token ids for the same
conversation (and the same ids the training code scores; see `training.data.render`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from ipr_core.engine.backends.base import Completion, FinishReason, SamplingParams
from ipr_core.types import Message


class BackendError(RuntimeError):
    """A backend could not produce completions; the rollout engine records generation_error."""


def render_prompt(tokenizer: Any, conversation: list[Message]) -> str:
    """The conversation as the model's template writes it, ending with the assistant cue."""
    return tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)


def encode_prompt(tokenizer: Any, conversation: list[Message]) -> list[int]:
    """Prompt ids with the generation prompt."""
    return encode_rendered(tokenizer, render_prompt(tokenizer, conversation))


def encode_rendered(tokenizer: Any, prompt: str) -> list[int]:
    """The ids of a rendered prompt: the template already holds any BOS it wants."""
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


def fits_context(prompt_tokens: int, max_new_tokens: int, max_context: int) -> bool:
    """A request is sent only when the prompt and the longest reply fit the context."""
    return prompt_tokens + max_new_tokens <= max_context


def context_overflow(n: int) -> list[Completion]:
    """The answer for a prompt that does not fit: nothing prefilled, nothing generated."""
    return [Completion("", 0, 0, "context")] * n


def conversation_seeds(
    params: SamplingParams, count: int, seeds: Sequence[int] | None
) -> list[int]:
    """One seed per conversation: the caller's, or else params.seed + its position."""
    if seeds is None:
        return [params.seed + i for i in range(count)]
    if len(seeds) != count:
        raise ValueError(f"{len(seeds)} seeds for {count} conversations")
    return list(seeds)


def request_seed(seed: int) -> int:
    """The 56-bit seed vLLM gets for a conversation seeded `seed`.

    vLLM seeds the k-th of a request's n samples with seed + k, so neighbouring
    conversation seeds (params.seed + i) would repeat each other's samples; hashing
    spreads them. 56 bits stays inside the signed 64-bit range servers validate.
    """
    digest = hashlib.sha256(str(seed).encode()).digest()
    return int.from_bytes(digest[:7], "big")


def finish_reason(engine_reason: str | None, source: str) -> FinishReason:
    """vLLM's finish reason (offline and HTTP use the same words) in this project's terms."""
    if engine_reason == "stop":
        return "stop"
    if engine_reason == "length":
        return "length"
    raise BackendError(f"{source}: generation ended with finish reason {engine_reason!r}")


def samples_to_generate(params: SamplingParams) -> int:
    """Greedy samples are identical: generate one and repeat it."""
    return 1 if params.temperature == 0 else params.n


def vllm_sampling(params: SamplingParams, seed: int) -> dict[str, Any]:
    """vLLM's sampling fields for a conversation seeded `seed`: keywords of the offline
    `vllm.SamplingParams` and fields of a /v1/completions body alike.

    Plain temperature sampling, as in the transformers backend: top-k, top-p, min-p and
    repetition penalty are set explicitly, so defaults a model's generation_config
    suggests to vLLM never apply.
    """
    return {
        "n": samples_to_generate(params),
        "temperature": params.temperature,
        "top_p": 1.0,
        "top_k": 0,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "max_tokens": params.max_new_tokens,
        "stop": list(params.stop),
        "seed": request_seed(seed),
        "skip_special_tokens": True,
    }


def repeat_to_n(completions: list[Completion], params: SamplingParams) -> list[Completion]:
    """The n completions the caller asked for (the greedy one repeated, see samples_to_generate)."""
    if len(completions) == params.n:
        return completions
    if len(completions) == 1 and params.temperature == 0:
        return completions * params.n
    raise BackendError(f"expected {params.n} completions, got {len(completions)}")


def count_prompt_once(completions: list[Completion], computed: int) -> list[Completion]:
    """The interface's accounting: the n samples of a prompt share its prefill, so its
    computed tokens (prompt less cache hits) go on the first completion, 0 on the others."""
    return [replace(c, prompt_tokens=computed if k == 0 else 0) for k, c in enumerate(completions)]
