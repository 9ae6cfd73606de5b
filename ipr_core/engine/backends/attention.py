"""Attention for the transformers backend on a CPU, registered with transformers'
AttentionInterface (the public way to plug one in): each phase with what runs it fastest.

- Decode: a decode step's attention reads every row's whole KV cache for one new token: it
  is bound by memory, not arithmetic. On a CPU, PyTorch's fused SDPA kernel runs that shape
  at half the speed of a plain `q @ K^T`, softmax, `@ V` (SmolLM2-135M, bfloat16, 128 rows
  over 700 tokens, 2 AVX512-BF16 cores: 8.8 ms vs 4.2 ms per layer; in the bench's rollouts
  SDPA was 41 of 92 s). The query heads of one key/value head are stacked into one matrix,
  so the cache is read once per KV head, never copied per query head.
- Prefill: SDPA itself, told the heads are grouped (`GQA_PREFILL`).
A backend loads its model with the prefill attention and switches to the decode one (the
`generation.decode_attention` setting) for its decode steps (`attending_with`): bfloat16
scores rounded before the softmax move logits by a few hundredths (KL to float32 no larger
than SDPA's in bfloat16), and a prompt must get the same first logits whether it was
prefilled whole or its last token alone. The grouped decode's rounding depends on how far a
row is left-padded (its softmax and `@ V` sum over the padded length), so unlike SDPA it does
not give a row bit-identical tokens in every batch: it is opt-in.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

GROUPED_DECODE = "ipr_grouped_decode"
"""The decode attention's name in transformers' registries."""
GQA_PREFILL = "ipr_gqa_prefill"
"""Prefill attention: PyTorch's SDPA told the heads are grouped (`enable_gqa`), where
transformers copies every key and value head once per query head (`repeat_kv`) before SDPA
when there is a mask. On this CPU, 32 prompts of 45 new tokens over 1,000 cached tokens
prefill at 625 tokens/s instead of 455 (bfloat16); over 300 cached, 1,020 instead of 980."""


def grouped_decode_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Query [B, H, 1, D] over keys and values [B, KV, L, D]; mask boolean [B, 1, 1, L]
    (True: attend). Returns [B, 1, H, D], as every transformers attention function."""
    batch, heads, q_length, dim = query.shape
    if q_length != 1 or dropout > 0:
        return gqa_prefill_attention(module, query, key, value, attention_mask, dropout, scaling)
    kv_heads = key.shape[1]
    scale = dim**-0.5 if scaling is None else scaling
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim) * scale
    scores = torch.matmul(grouped, key.transpose(-1, -2))
    if attention_mask is not None:
        visible = attention_mask[..., : key.shape[-2]]
        scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    return torch.matmul(probs, value).reshape(batch, 1, heads, dim), None


def gqa_prefill_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """SDPA over keys and values with fewer heads than the query (no copies per query
    head); causal by itself when there is no mask and more than one query token."""
    if attention_mask is not None:
        attention_mask = attention_mask[..., : key.shape[-2]]
    out = torch.nn.functional.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        scale=scaling,
        is_causal=attention_mask is None and query.shape[2] > 1,
        enable_gqa=True,
    )
    return out.transpose(1, 2).contiguous(), None


for _name, _function in (
    (GROUPED_DECODE, grouped_decode_attention),
    (GQA_PREFILL, gqa_prefill_attention),
):
    AttentionInterface.register(_name, _function)
    AttentionMaskInterface.register(_name, sdpa_mask)  # boolean masks, as SDPA's


DECODE_ATTENTIONS = ("sdpa", GROUPED_DECODE)
PREFILL_ATTENTIONS = ("sdpa", GQA_PREFILL)
"""The implementations the benchmark's hardware sweep measures each phase with."""


def prefill_attention(device: str) -> str:
    """The implementation a backend prefills with: grouped SDPA on a CPU; on an
    accelerator transformers' SDPA (a masked `enable_gqa` falls back to its math kernel)."""
    return GQA_PREFILL if device == "cpu" else "sdpa"


@contextmanager
def attending_with(model: PreTrainedModel, implementation: str) -> Iterator[PreTrainedModel]:
    """The model with `implementation` as its attention for the block, then as it was."""
    loaded = model.config._attn_implementation
    model.set_attn_implementation(implementation)
    try:
        yield model
    finally:
        model.set_attn_implementation(loaded)
