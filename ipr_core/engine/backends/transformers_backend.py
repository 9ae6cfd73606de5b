"""A policy backend on plain transformers that reuses KV caches across calls.

Rollouts send the whole conversation every turn. Re-encoding it each time makes prefill
the dominant cost of IPR (it grows with the square of the episode length, times N Monte
Carlo samples). Like vLLM's automatic prefix caching, this backend keeps the KV cache of
recent sequences (prompt + generated tokens) in a `PrefixCache`, and prefills only what
follows the longest cached prefix of a new prompt: the next turn of an episode prefills
just its new observation, the N samples of one prompt share one prefill, and all
episodes share the system prompt. Prompts are always the chat template's tokens, so the
model sees exactly what a re-encoding backend would.

Prefill is batched too: the prompts of a call go through the model together, each
feeding the tail it does not find in the prefix cache (left-padded to the longest tail of
its group) over its cached prefix. A prompt that shares a longer prefix with another
prompt of the same call than with the cache waits one wave, to reuse that prompt's KV.

Decoding is batched over all rows of a call (micro-batches of rows with similar prompt
lengths) in a preallocated `StaticCache`, with each row left-padded; every row samples
from its own seeded generator, so a rollout's tokens do not depend on what else shares
its batch.

On a CPU, prefill attends with SDPA over grouped heads (no copy of each key and value head
per query head); decode steps, with `decode_attention="grouped"`, with two grouped matmuls
rather than SDPA's fused kernel (`attention`: twice as fast for one new token over a long
cache, but not bit-identical across batch layouts).

Prefill and decode each run in their own dtype (`prefill_dtype`, `decode_dtype`): on a CPU
with AVX512-BF16, bfloat16 prefill is about 2x float32 while bfloat16 decode can be slower.
`auto` measures both dtypes on the loaded model at startup (`throughput`) and keeps the
faster one by a clear margin; the KV caches are kept in the decode dtype.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, TypeVar

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, StaticCache

from ipr_core.config import DecodeAttention, DtypeSetting
from ipr_core.engine.backends.attention import (
    GROUPED_DECODE,
    attending_with,
    prefill_attention,
)
from ipr_core.engine.backends.base import Completion, FinishReason, SamplingParams
from ipr_core.engine.backends.chat import (
    context_overflow,
    conversation_seeds,
    encode_prompt,
    fits_context,
)
from ipr_core.engine.backends.throughput import (
    DTYPES,
    decode_rate,
    head_dim,
    in_dtype,
    prefill_rate,
)
from ipr_core.types import Message

DEFAULT_MAX_CONTEXT = 4096
"""Cap on the default context: KV caches for longer prompts do not pay off on CPU."""
DEFAULT_CACHE_TOKENS = 131_072
"""Prefix-cache capacity in tokens (SmolLM2-135M: 46 KB of float32 KV per token, 6 GB): room
for 64 live episodes of ~2,000-token conversations, so no episode re-prefills its history."""
PREFILL_TOKENS_PER_PASS = 8192
"""Prompt tokens (rows x padded tail) of one batched prefill pass: bounds its activations."""
PAD_AT_MOST = 0.15
"""A batched pass pads its rows by at most this share of their cost (`_passes`)."""
LINEAR_COLUMNS = 800
"""What a fed token's linear layers cost, in columns of attention (SmolLM2-135M on this
CPU: prefill 1,390 tokens/s without a cached prefix, 745 over 800 cached tokens)."""
SHARE_AT_LEAST = 32
"""A prompt waits for the next prefill wave when another prompt of the call shares this
many more prefix tokens with it than the prefix cache does."""
AUTO_MARGIN = 1.15
"""`auto` picks bfloat16 only when it is this much faster: close calls keep float32, so a
loaded machine's noise does not flip the choice between runs."""

CONTIGUOUS = torch.contiguous_format
"""Rows copied out of a batch own exactly their tokens (the prefix cache's bound)."""
log = logging.getLogger(__name__)
T = TypeVar("T")


KV = list[tuple[torch.Tensor, torch.Tensor]]
"""Keys and values of a sequence, per layer, each [kv_heads, length, head_dim]."""


@dataclass(eq=False)
class _Entry:
    tokens: torch.Tensor
    """The token ids whose keys and values `kv` holds, int64 [L]."""
    kv: KV
    last_used: int = 0
    nbytes: int = 0
    """Bytes of the storages its tensors keep alive, counted at insertion."""


class PrefixCache:
    """KV caches of recent sequences, found by longest common token prefix; LRU eviction.

    An entry whose tokens are a prefix of a newer entry's is dropped: the newer one serves
    every lookup it would. The bound is on the memory the entries keep alive:
    `capacity_tokens` tokens' worth, kept as a running sum (entries own their tensors, so
    the sum is exact; were two to share a storage it would overcount and evict early).
    """

    def __init__(self, capacity_tokens: int):
        self.capacity_tokens = capacity_tokens
        self.entries: list[_Entry] = []
        self._clock = 0
        self._bytes = 0

    @property
    def tokens(self) -> int:
        return sum(len(entry.tokens) for entry in self.entries)

    def retained_bytes(self) -> int:
        """Bytes of the tensors the entries keep alive (each storage counted once)."""
        return _storage_bytes([pair for entry in self.entries for pair in entry.kv])

    def longest_prefix(self, tokens: torch.Tensor) -> tuple[_Entry | None, int]:
        best, best_len = None, 0
        for entry in self.entries:
            length = _common_prefix(entry.tokens, tokens)
            if length > best_len:
                best, best_len = entry, length
        if best is not None:
            self._clock += 1
            best.last_used = self._clock
        return best, best_len

    def insert(self, tokens: torch.Tensor, kv: KV) -> None:
        if self.capacity_tokens < len(tokens):
            return
        for entry in [
            entry
            for entry in self.entries
            if len(entry.tokens) <= len(tokens)
            and _common_prefix(entry.tokens, tokens) == len(entry.tokens)
        ]:
            self._drop(entry)
        self._clock += 1
        self.entries.append(_Entry(tokens, kv, self._clock, _storage_bytes(kv)))
        self._bytes += self.entries[-1].nbytes
        capacity_bytes = self.capacity_tokens * _bytes_per_token(kv)
        while self._bytes > capacity_bytes:
            self._drop(min(self.entries, key=lambda entry: entry.last_used))

    def _drop(self, entry: _Entry) -> None:
        self.entries.remove(entry)
        self._bytes -= entry.nbytes


def _storage_bytes(kv: KV) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for p in kv for t in p}
    return sum(storages.values())


def _bytes_per_token(kv: KV) -> int:
    return sum(k[:, 0].nbytes + v[:, 0].nbytes for k, v in kv)


def _common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(len(a), len(b))
    mismatch = (a[:n] != b[:n]).nonzero()
    return int(mismatch[0]) if len(mismatch) else n


def _passes(items: list[T], shapes: list[tuple[int, int]], max_rows: int) -> list[list[T]]:
    """Cut items into batched forward passes of similar shapes; `shapes` holds each item's
    (tokens fed, total length), the total being what its fed tokens attend over.

    A pass pads every row to its longest fed length and its longest total, so a row's cost
    is about (fed tokens) x (LINEAR_COLUMNS + total): a padded token costs what a real one
    does. Items are taken by fed length, then total; a pass closes as soon as the next item
    would raise its padded cost above (1 + PAD_AT_MOST) times the real one, or it has
    `max_rows` rows or PREFILL_TOKENS_PER_PASS fed tokens. Small passes cost little extra
    here (a CPU runs 8 prefill rows at the rate of 125; a decode step's fixed cost is ~35 ms
    against ~2.8 ms per row at 675 tokens), while padding costs in full."""
    passes: list[list[T]] = []
    group: list[T] = []
    real = width = longest = 0
    for fed, total, item in sorted(
        ((*shape, item) for shape, item in zip(shapes, items, strict=True)),
        key=lambda entry: entry[:2],
    ):
        rows, cost = len(group) + 1, fed * (LINEAR_COLUMNS + total)
        padded = rows * max(width, fed) * (LINEAR_COLUMNS + max(longest, total))
        if group and (
            rows > max_rows
            or rows * max(width, fed) > PREFILL_TOKENS_PER_PASS
            or padded > (1 + PAD_AT_MOST) * (real + cost)
        ):
            passes.append(group)
            group, real, width, longest = [], 0, 0, 0
        group.append(item)
        real, width, longest = real + cost, max(width, fed), max(longest, total)
    if group:
        passes.append(group)
    return passes


def row_seed(seed: int, sample: int) -> int:
    """The generator seed of sample `sample` of a conversation given `seed`."""
    digest = hashlib.blake2b(f"{seed}/{sample}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass(eq=False)
class _Prompt:
    tokens: torch.Tensor
    kv: KV | None = None
    """Keys and values of all prompt tokens, after prefill."""
    first_logits: torch.Tensor | None = None
    computed: int = 0
    """Prompt tokens prefilled (not found in the prefix cache)."""


@dataclass(eq=False)
class _Row:
    prompt: _Prompt
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    finish: FinishReason | None = None
    text: str = ""


class CacheMemory:
    """The memory of the batch caches, kept from one forward pass to the next.

    Every prefill pass and decode batch fills a fresh `StaticCache` with its rows' keys and
    values. Allocated anew each time, those buffers (hundreds of MB: 128 rows x 700 tokens
    is 2.2 GB of bfloat16 KV for SmolLM2-135M) are fresh pages the kernel zero-fills on
    first touch; in the bench's rollouts building them took 8.3 of 63 s. Reused, they cost
    only the copy. One byte buffer per layer and side (keys, values) serves both dtypes;
    only one batch cache lives at a time (a backend prefills, then decodes, one pass after
    the other), and nothing keeps a view of it: rows leave it by copy."""

    def __init__(self, device: str) -> None:
        self.device = device
        self._buffers: dict[tuple[int, int], torch.Tensor] = {}

    def take(
        self, layer: int, side: int, shape: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor:
        """A contiguous, uninitialised tensor of `shape` in this layer's and side's memory;
        it overwrites what the last one held."""
        size = torch.Size(shape).numel() * dtype.itemsize
        buffer = self._buffers.get((layer, side))
        if buffer is None or buffer.numel() < size:
            buffer = torch.empty(size + size // 4, dtype=torch.uint8, device=self.device)
            self._buffers[layer, side] = buffer
        return buffer[:size].view(dtype).view(shape)

    @property
    def bytes(self) -> int:
        return sum(buffer.numel() for buffer in self._buffers.values())


class PrefillPass(NamedTuple):
    """The shape of one batched prefill pass."""

    rows: int
    tail: int
    """Tokens fed per row (the longest uncached tail; shorter ones left-padded)."""
    width: int
    """Cached tokens before the tail, padded to the row with the most."""
    computed: int
    """Prompt tokens it had to compute, over all rows."""
    cached: int
    """Cached tokens of its rows, unpadded, over all rows."""


@dataclass
class WorkLog:
    """Shapes of the forward passes run, for the benchmark's bare-model limit."""

    prefills: list[PrefillPass] = field(default_factory=list)
    decodes: list[tuple[int, int]] = field(default_factory=list)
    """(rows, mean context length) per decode step."""
    calls: list[list[tuple[list[int], int]]] = field(default_factory=list)
    """Per generate call, each row's (prompt token ids, tokens generated): the same work for
    another engine (`ipr bench rollouts --compare`)."""


class TransformersBackend:
    """Batched generation with a prefix cache, stop strings, per-row seeds and token counts."""

    def __init__(
        self,
        model_path: Path,
        policy_id: str | None = None,
        max_batch_size: int = 16,
        max_context: int | None = None,
        device: str = "cpu",
        cache_tokens: int = DEFAULT_CACHE_TOKENS,
        prefill_dtype: DtypeSetting = "float32",
        decode_dtype: DtypeSetting = "float32",
        decode_attention: DecodeAttention = "sdpa",
    ):
        model_path = Path(model_path)
        self.policy_id = policy_id or model_path.name
        self.max_batch_size = max_batch_size
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        # float32 on CPU unless a setting says (or measures) otherwise; bfloat16 on a GPU.
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        loaded = AutoModelForCausalLM.from_pretrained(
            model_path,
            dtype=dtype,
            attn_implementation=prefill_attention(device),
            local_files_only=True,
        ).to(device)
        self.decode_attention = GROUPED_DECODE if decode_attention == "grouped" else "sdpa"
        loaded.eval()
        self.prefill_dtype = self._choose("prefill", prefill_dtype, loaded)
        self.decode_dtype = self._choose("decode", decode_dtype, loaded)
        self.model = in_dtype(loaded, self.decode_dtype)
        """The decode model (its config and name also describe the prefill model)."""
        self.prefill_model = in_dtype(self.model, self.prefill_dtype)
        self.max_context = max_context or min(
            self.model.config.max_position_embeddings, DEFAULT_MAX_CONTEXT
        )
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [] if eos is None else [eos]
        self.eos_token_ids = sorted({*eos, self.tokenizer.eos_token_id})
        self.prefix_cache = PrefixCache(cache_tokens)
        self.cache_memory = CacheMemory(device)
        self.work_log: WorkLog | None = None
        """Set to a WorkLog to record forward-pass shapes."""
        self.stats = {"prefill_tokens": 0, "cached_tokens": 0, "generated_tokens": 0}

    def _choose(self, phase: str, setting: DtypeSetting, model: torch.nn.Module) -> str:
        """The dtype of a phase: the setting, or for `auto` the faster one measured here
        (on a GPU, bfloat16 without measuring)."""
        if setting != "auto":
            return setting
        if self.device != "cpu":
            return "bfloat16"
        rates = {}
        for dtype in DTYPES:
            candidate = in_dtype(model, dtype)
            if phase == "prefill":
                rates[dtype] = prefill_rate(candidate, 4, 128).tokens_per_s
            else:
                with attending_with(candidate, self.decode_attention):
                    rate = decode_rate(candidate, self.max_batch_size, 256, 4)
                rates[dtype] = rate.tokens_per_s
        chosen = "bfloat16" if rates["bfloat16"] > AUTO_MARGIN * rates["float32"] else "float32"
        log.info("%s dtype %s, tokens/s %s", phase, chosen, {k: int(v) for k, v in rates.items()})
        return chosen

    def encode(self, conversation: list[Message]) -> list[int]:
        return encode_prompt(self.tokenizer, conversation)

    def count_tokens(self, conversation: list[Message]) -> int:
        return len(self.encode(conversation))

    @torch.inference_mode()
    def generate(
        self,
        conversations: list[list[Message]],
        params: SamplingParams,
        seeds: Sequence[int] | None = None,
    ) -> list[list[Completion]]:
        """Return `params.n` completions for each conversation, in order.

        `seeds` (one per conversation) make each completion depend only on its
        conversation, seed and sample index; without them, seeds follow the batch order.
        A completion's `prompt_tokens` counts the prompt tokens prefilled for it: cache hits
        are free, and a prompt shared by n samples is counted once, on the first.
        """
        seeds = conversation_seeds(params, len(conversations), seeds)
        prompts: dict[tuple[int, ...], _Prompt] = {}
        rows: list[tuple[int, _Row]] = []
        results: list[list[Completion]] = [[] for _ in conversations]
        for i, conversation in enumerate(conversations):
            ids = self.encode(conversation)
            if not fits_context(len(ids), params.max_new_tokens, self.max_context):
                results[i] = context_overflow(params.n)
                continue
            prompt = prompts.setdefault(tuple(ids), _Prompt(torch.tensor(ids)))
            for k in range(params.n):
                generator = None
                if params.temperature > 0:
                    generator = torch.Generator().manual_seed(row_seed(seeds[i], k))
                rows.append((i, _Row(prompt, generator)))
        self._prefill_all(list(prompts.values()))
        batch = [row for _, row in rows]
        shapes = [(1, len(row.prompt.tokens) + params.max_new_tokens) for row in batch]
        with attending_with(self.model, self.decode_attention):
            for group in _passes(batch, shapes, self.max_batch_size):
                self._decode(group, params)
        if self.work_log is not None:
            self.work_log.calls.append(
                [(row.prompt.tokens.tolist(), len(row.generated)) for _, row in rows]
            )
        counted: set[int] = set()
        for i, row in rows:
            first = id(row.prompt) not in counted
            counted.add(id(row.prompt))
            prefilled = row.prompt.computed if first else 0
            results[i].append(Completion(row.text, prefilled, len(row.generated), row.finish))
            self.stats["generated_tokens"] += len(row.generated)
        return results

    # -- prefill -------------------------------------------------------------------------
    def _prefill_all(self, prompts: list[_Prompt]) -> None:
        """KV and first logits of every prompt, in waves of batched passes.

        A prompt joins the current wave unless another prompt of the wave shares a much
        longer prefix with it than the prefix cache holds: it then waits for the next wave,
        where that prompt's KV is in the cache (an episode's N samples and the expert
        prefixes of one task share most of their tokens)."""
        waiting = sorted(prompts, key=lambda prompt: len(prompt.tokens))
        while waiting:
            wave: list[tuple[_Prompt, _Entry | None, int]] = []
            later: list[_Prompt] = []
            for prompt in waiting:
                entry, reuse = self.prefix_cache.longest_prefix(prompt.tokens)
                reuse = min(reuse, len(prompt.tokens) - 1)  # the last token's logits are needed
                shared = max(
                    (_common_prefix(other.tokens, prompt.tokens) for other, _, _ in wave),
                    default=0,
                )
                if shared >= reuse + SHARE_AT_LEAST:
                    later.append(prompt)
                else:
                    wave.append((prompt, entry if reuse > 0 else None, reuse))
            shapes = [(len(prompt.tokens) - reuse, len(prompt.tokens)) for prompt, _, reuse in wave]
            for group in _passes(wave, shapes, self.max_batch_size):
                self._prefill_pass(group)
            waiting = later

    def _prefill_pass(self, group: list[tuple[_Prompt, _Entry | None, int]]) -> None:
        """One forward over the prompts of `group`: each row feeds its last `tail` tokens
        (the longest uncached tail of the group; shorter prompts are left-padded) over a
        left-padded cache of the rest of its prompt, taken from its prefix-cache entry."""
        prompts = [prompt for prompt, _, _ in group]
        lengths = [len(prompt.tokens) for prompt in prompts]
        tail = max(length - reuse for length, (_, _, reuse) in zip(lengths, group, strict=True))
        past = [max(length - tail, 0) for length in lengths]
        width = max(past)
        rows = len(group)
        ids = torch.full((rows, tail), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros((rows, width + tail), dtype=torch.long)
        positions = torch.zeros((rows, tail), dtype=torch.long)
        for r, (prompt, length, cached) in enumerate(zip(prompts, lengths, past, strict=True)):
            fed = prompt.tokens[cached:]
            ids[r, tail - len(fed) :] = fed
            mask[r, width - cached :] = 1
            mask[r, width : width + tail - len(fed)] = 0
            positions[r, tail - len(fed) :] = torch.arange(cached, length)
        # One buffer per layer for the cached prefix and the fed tail: the model writes the
        # tail in place, where a DynamicCache would copy the whole prefix again to append it.
        prefixes = [
            [(k[:, :cached], v[:, :cached]) for k, v in entry.kv] if cached else None
            for (_, entry, _), cached in zip(group, past, strict=True)
        ]
        cache = self._right_aligned(prefixes, width, width + tail, self.prefill_dtype)
        out = self.prefill_model(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device),
            past_key_values=cache,
            cache_position=torch.arange(width, width + tail, device=self.device),
            use_cache=True,
            logits_to_keep=1,
        )
        dtype = DTYPES[self.decode_dtype]
        computed = 0
        for r, ((prompt, _, reuse), length) in enumerate(zip(group, lengths, strict=True)):
            start = width + tail - length
            prompt.kv = [
                (
                    layer.keys[r, :, start:].to(dtype, memory_format=CONTIGUOUS, copy=True),
                    layer.values[r, :, start:].to(dtype, memory_format=CONTIGUOUS, copy=True),
                )
                for layer in cache.layers
            ]
            prompt.first_logits = out.logits[r, -1].float()
            prompt.computed = length - reuse
            computed += prompt.computed
            self.prefix_cache.insert(prompt.tokens, prompt.kv)  # later waves share it
            self.stats["prefill_tokens"] += prompt.computed
            self.stats["cached_tokens"] += reuse
        if self.work_log is not None:
            self.work_log.prefills.append(PrefillPass(rows, tail, width, computed, sum(past)))

    # -- decode --------------------------------------------------------------------------
    def _decode(self, rows: list[_Row], params: SamplingParams) -> None:
        """Generate every row to EOS, a stop string or max_new_tokens, in one static cache.

        Rows are left-padded to the longest prompt; once a quarter of them are finished,
        the finished ones leave the batch.
        """
        lengths = [len(row.prompt.tokens) for row in rows]
        width = max(lengths)
        cache, mask = self._static_cache(rows, lengths, width + params.max_new_tokens)
        positions = torch.tensor(lengths)
        batch = list(range(len(rows)))
        """batch[j] is the index in `rows` of the cache's j-th row."""
        for r, row in enumerate(rows):
            assert row.prompt.first_logits is not None
            self._append(row, self._sample(row.prompt.first_logits[None], [row], params)[0], params)
            if row.finish is not None:
                self._remember(row, cache, r, width - lengths[r])
        for step in range(params.max_new_tokens - 1):
            live = [j for j, r in enumerate(batch) if rows[r].finish is None]
            if not live:
                break
            if len(live) <= 0.75 * len(batch):
                for layer in cache.layers:  # in place: live rows move up, in order
                    for side in (layer.keys, layer.values):
                        for j, row in enumerate(live):
                            if j != row:
                                side[j] = side[row]
                    layer.keys, layer.values = layer.keys[: len(live)], layer.values[: len(live)]
                keep = torch.tensor(live)
                mask, positions = mask[keep], positions[keep]
                batch, live = [batch[j] for j in live], list(range(len(live)))
            mask[:, width + step] = 1
            out = self.model(
                input_ids=torch.tensor([[rows[r].generated[-1]] for r in batch]).to(self.device),
                attention_mask=mask.to(self.device),
                position_ids=positions[:, None].to(self.device),
                past_key_values=cache,
                cache_position=torch.tensor([width + step], device=self.device),
                use_cache=True,
            )
            positions = positions + 1
            if self.work_log is not None:
                self.work_log.decodes.append((len(batch), int(positions.float().mean())))
            live_rows = [rows[batch[j]] for j in live]
            tokens = self._sample(out.logits[live, -1], live_rows, params)
            for j, row, token in zip(live, live_rows, tokens, strict=True):
                self._append(row, token, params)
                if row.finish is not None:
                    self._remember(row, cache, j, width - lengths[batch[j]])

    def _static_cache(
        self, rows: list[_Row], lengths: list[int], total: int
    ) -> tuple[StaticCache, torch.Tensor]:
        """A cache holding every row's prompt KV, right-aligned; its attention mask."""
        width = max(lengths)
        cache = self._right_aligned(
            [row.prompt.kv for row in rows], width, total, self.decode_dtype
        )
        mask = torch.zeros((len(rows), total), dtype=torch.long)
        for r, length in enumerate(lengths):
            mask[r, width - length : width] = 1
        return cache, mask

    def _right_aligned(
        self, kvs: list[KV | None], width: int, total: int, dtype: str
    ) -> StaticCache:
        """A static cache of `total` positions per row in `dtype`, row r holding `kvs[r]`
        (if any) so that it ends at `width`; the model writes what it feeds from `width` on.

        Its buffers are not zero-filled whole (in a profile of a 100-game evaluation at
        ~1,500-token contexts, zero-filling took 35 of 393 s): only
        what attention reads and no row writes, the left pads and the columns ahead, which
        must hold finite numbers (a masked score weighs a value by 0, and 0 x NaN is NaN)."""
        config = self.model.config
        cache = StaticCache(config=config, max_cache_len=total)
        shape = (len(kvs), config.num_key_value_heads, total, head_dim(config))
        shortest = min((0 if kv is None else kv[0][0].shape[1] for kv in kvs), default=0)
        for layer, buffer in enumerate(cache.layers):
            keys, values = (
                self.cache_memory.take(layer, side, shape, DTYPES[dtype]) for side in (0, 1)
            )
            buffer.lazy_initialization(keys[:0], values[:0])  # no rows: allocates nothing
            buffer.keys, buffer.values, buffer.batch_size = keys, values, len(kvs)
            buffer.cumulative_length.fill_(width)
            for tensor in (keys, values):
                tensor[:, :, : width - shortest] = 0
                tensor[:, :, width:] = 0
            for r, kv in enumerate(kvs):
                if kv is not None:
                    layer_keys, layer_values = kv[layer]
                    keys[r, :, width - layer_keys.shape[1] : width] = layer_keys
                    values[r, :, width - layer_values.shape[1] : width] = layer_values
        return cache

    def _remember(self, row: _Row, cache: StaticCache, j: int, start: int) -> None:
        """Put a finished row's sequence in the prefix cache: its prompt and every generated
        token fed back to the model (all but the last).

        The row's keys and values are copied out of the batch's static cache: a view would
        keep the whole batch alive and count as all of it against the capacity, evicting
        the other episodes' histories (they were then prefilled again every turn)."""
        fed = len(row.generated) - 1
        end = start + len(row.prompt.tokens) + fed
        tokens = torch.cat([row.prompt.tokens, torch.tensor(row.generated[:fed], dtype=torch.long)])
        kv = [
            (layer.keys[j, :, start:end].clone(), layer.values[j, :, start:end].clone())
            for layer in cache.layers
        ]
        self.prefix_cache.insert(tokens, kv)

    def _sample(self, logits: torch.Tensor, rows: list[_Row], params: SamplingParams) -> list[int]:
        """Greedy, or inverse-CDF sampling of the whole batch at once, each row drawing its
        uniform from its own generator (so a row's token does not depend on its batch).
        Probabilities are float32 whatever the logits' dtype; at temperature 1 the softmax
        converts as it reads (the same numbers as converting first, one pass fewer over the
        vocabulary per row and step)."""
        if params.temperature == 0:
            return logits.argmax(dim=-1).tolist()
        if params.temperature != 1.0:
            logits = logits.float() / params.temperature
        cdf = torch.softmax(logits, dim=-1, dtype=torch.float32).cumsum(dim=-1)
        draws = torch.cat([torch.rand(1, generator=row.generator) for row in rows])
        draws = draws.to(cdf.device)  # CPU generators: the same draws on any device
        targets = (draws * cdf[:, -1])[:, None]  # cdf[:, -1] is 1 up to rounding
        tokens = torch.searchsorted(cdf, targets, right=True)[:, 0]
        return tokens.clamp(max=cdf.shape[-1] - 1).tolist()

    def _append(self, row: _Row, token: int, params: SamplingParams) -> None:
        """Add a sampled token; decide whether the row is finished and what its text is."""
        row.generated.append(token)
        if token in self.eos_token_ids:
            row.finish, row.text = "stop", self._decode_text(row.generated[:-1])
            return
        text = self._decode_text(row.generated)
        cuts = [text.find(s) for s in params.stop if s in text]
        if cuts:
            row.finish, row.text = "stop", text[: min(cuts)]
        elif len(row.generated) >= params.max_new_tokens:
            row.finish, row.text = "length", text

    def _decode_text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)
