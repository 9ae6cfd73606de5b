"""The bare model's prefill and decode tokens/s on this machine, at shapes and dtypes given.

Two users: `ipr bench rollouts` sweeps batch sizes and dtypes for the hardware's own limit
(`fraction_of_hardware`), and the transformers backend measures its dtypes at startup when
a setting is `auto` (bfloat16 prefill is 2x faster than float32 on a CPU with AVX512-BF16,
while bfloat16 decode can be slower: measured, not assumed).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel, StaticCache

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Rate:
    """Tokens per second of one phase at one shape and dtype."""

    phase: str
    """prefill (`rows` prompts ending at `tokens` tokens: new ones over a cached prefix) or
    decode (`rows` rows over a KV cache of `tokens` tokens)."""
    dtype: str
    attention: str
    """The model's attention implementation (`sdpa`, or the grouped decode attention)."""
    rows: int
    tokens: int
    tokens_per_s: float


def in_dtype(model: PreTrainedModel, dtype: str) -> PreTrainedModel:
    """The model in `dtype`: itself when it already is, else a copy."""
    if model.dtype == DTYPES[dtype]:
        return model
    return copy.deepcopy(model).to(DTYPES[dtype])


@torch.inference_mode()
def prefill_rate(model: PreTrainedModel, rows: int, length: int, cached: int = 0) -> Rate:
    """One forward over `rows` random prompts of `length` tokens (after a short warm-up),
    each over `cached` tokens of keys and values already in the cache (a later turn's
    prompt: its new tokens attend over the conversation so far)."""
    tokens = torch.randint(model.config.vocab_size, (rows, length), device=model.device)
    model(input_ids=tokens[:, :8], use_cache=True, logits_to_keep=1)
    cache = DynamicCache()
    if cached:
        config = model.config
        kv = torch.randn(
            rows, config.num_key_value_heads, cached, head_dim(config), dtype=model.dtype
        )
        for layer in range(config.num_hidden_layers):
            cache.update(kv, kv.clone(), layer)
    started = time.perf_counter()
    model(input_ids=tokens, past_key_values=cache, use_cache=True, logits_to_keep=1)
    wall = time.perf_counter() - started
    return Rate(
        "prefill", _name(model), _attention(model), rows, cached + length, rows * length / wall
    )


@torch.inference_mode()
def decode_rate(model: PreTrainedModel, rows: int, context: int, steps: int = 8) -> Rate:
    """`steps` decode steps of `rows` rows over a static cache holding `context` tokens."""
    config = model.config
    heads = config.num_key_value_heads
    cache = StaticCache(config=config, max_cache_len=context + steps + 1)
    kv = torch.randn(rows, heads, context, head_dim(config), dtype=model.dtype, device=model.device)
    for layer in range(config.num_hidden_layers):
        cache.update(kv, kv, layer)
    tokens = torch.randint(config.vocab_size, (rows, 1), device=model.device)
    wall = 0.0
    for step in range(steps + 1):  # step 0 warms up
        started = time.perf_counter()
        model(
            input_ids=tokens,
            past_key_values=cache,
            cache_position=torch.tensor([context + step], device=model.device),
            use_cache=True,
        )
        wall += (time.perf_counter() - started) if step else 0.0
    return Rate("decode", _name(model), _attention(model), rows, context, rows * steps / wall)


def head_dim(config: Any) -> int:
    """Width of one attention head's keys and values."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _name(model: PreTrainedModel) -> str:
    return str(model.dtype).removeprefix("torch.")


def _attention(model: PreTrainedModel) -> str:
    return model.config._attn_implementation
