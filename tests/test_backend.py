"""Model provisioning and the transformers policy backend, on the tiny Llama and SmolLM2."""

import re
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer, LlamaConfig, LlamaForCausalLM, StaticCache

from ipr_core.engine.backends import SamplingParams, make_backend, transformers_backend
from ipr_core.engine.backends.attention import GQA_PREFILL, GROUPED_DECODE
from ipr_core.engine.backends.transformers_backend import TransformersBackend
from ipr_core.engine.models import SMOLLM2, TINY_LLAMA, build_tiny_llama, resolve_model
from ipr_core.errors import InputError
from ipr_core.training.data import render

SYSTEM = {"role": "system", "content": "You are an agent in a text game. Reply with an action."}


def conversation(task: str, turns: int = 0) -> list[dict[str, str]]:
    messages = [SYSTEM, {"role": "user", "content": task}]
    for k in range(turns):
        messages.append({"role": "assistant", "content": f"Thought: step {k}. Action: look"})
        messages.append(
            {"role": "user", "content": f"You are in the kitchen. You see a table {k}."}
        )
    return messages


CONVERSATIONS = [
    conversation("Find the apple."),
    conversation("Put the red potato in the fridge.", turns=3),
    conversation("Cook the yellow pepper.", turns=8),
]


@pytest.fixture(scope="module")
def backend(tiny_model_path: Path) -> TransformersBackend:
    """Micro-batches of 4 sequences, so n=2 over 3 conversations spans two of them."""
    return TransformersBackend(tiny_model_path, max_batch_size=4)


def test_tiny_llama_builds_deterministically(tiny_model_path: Path, tmp_path: Path):
    again = resolve_model(TINY_LLAMA, tmp_path)
    assert again == tmp_path / "models" / TINY_LLAMA
    first, second = (
        load_file(tiny_model_path / "model.safetensors"),
        load_file(again / "model.safetensors"),
    )
    assert first.keys() == second.keys()
    assert all(first[name].equal(second[name]) for name in first)
    tokenizers = [(path / "tokenizer.json").read_text() for path in (tiny_model_path, again)]
    assert tokenizers[0] == tokenizers[1]
    stamp = (again / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_llama(again) == again  # a complete build is reused, not rebuilt
    assert (again / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "models").iterdir()] == [TINY_LLAMA]  # no temp left


def test_tiny_llama_shape_and_tokenizer(tiny_model_path: Path):
    config = AutoConfig.from_pretrained(tiny_model_path)
    assert config.hidden_size // config.num_attention_heads >= 32
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    assert 1000 <= len(tokenizer) <= 2000
    text = "Thought: the apple is on the table.\nAction: take apple from table (ünïcode ok)"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token is not None and tokenizer.pad_token != tokenizer.eos_token
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_n_completions_per_conversation_in_order(tiny_model_path: Path):
    uncached = TransformersBackend(tiny_model_path, max_batch_size=4, cache_tokens=0)
    params = SamplingParams(temperature=1.0, max_new_tokens=8, n=2, seed=1)
    results = uncached.generate(CONVERSATIONS, params)
    assert [len(completions) for completions in results] == [2, 2, 2]
    lengths = [uncached.count_tokens(c) for c in CONVERSATIONS]
    assert len(set(lengths)) == 3
    # the n samples of a prompt share its prefill, counted once
    assert [[c.prompt_tokens for c in completions] for completions in results] == [
        [n, 0] for n in lengths
    ]
    assert uncached.stats["prefill_tokens"] == sum(lengths)
    assert uncached.stats["generated_tokens"] == sum(
        c.generated_tokens for completions in results for c in completions
    )


def test_the_prefix_cache_prefills_only_new_turns_and_changes_nothing(tiny_model_path: Path):
    """Three turns of one episode, greedy: the same text as re-encoding every turn, for a
    fraction of the prefill."""
    cached = TransformersBackend(tiny_model_path)
    uncached = TransformersBackend(tiny_model_path, cache_tokens=0)
    params = SamplingParams(max_new_tokens=12, stop=("Observation",))
    messages = conversation("Put the red potato in the fridge.", turns=2)
    previous_length = 0
    for turn in range(3):
        (with_cache,), (without,) = (b.generate([messages], params)[0] for b in (cached, uncached))
        assert with_cache.text == without.text, turn
        assert without.prompt_tokens == uncached.count_tokens(messages)
        if turn > 0:  # at most the tokens this turn added: the last reply is cached
            assert with_cache.prompt_tokens <= without.prompt_tokens - previous_length
        previous_length = uncached.count_tokens(messages)
        messages = messages + [
            {"role": "assistant", "content": with_cache.text.strip()},
            {"role": "user", "content": f"You see a door {turn}."},
        ]
    assert cached.stats["prefill_tokens"] < uncached.stats["prefill_tokens"] / 2
    assert cached.stats["cached_tokens"] > 0


def test_a_full_prefix_cache_evicts_and_outputs_stay_the_same(tiny_model_path: Path):
    capacity = 5000  # tokens: more than one round (9 rows x ~340 tokens), less than four
    small = TransformersBackend(tiny_model_path, cache_tokens=capacity)
    uncached = TransformersBackend(tiny_model_path, cache_tokens=0)
    config = small.model.config
    bytes_per_token = (
        config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * 4
    )
    params = SamplingParams(temperature=1.0, max_new_tokens=16, n=3)
    for round_ in range(4):
        seeds = [round_ * 10 + k for k in range(len(CONVERSATIONS))]
        assert [[c.text for c in cs] for cs in small.generate(CONVERSATIONS, params, seeds)] == [
            [c.text for c in cs] for cs in uncached.generate(CONVERSATIONS, params, seeds)
        ]
        assert small.prefix_cache.tokens > 0
        assert small.prefix_cache.retained_bytes() <= capacity * bytes_per_token
    assert small.stats["cached_tokens"] > 0


def test_a_batch_of_episodes_is_cached_row_by_row(tiny_model_path: Path):
    """Lock-step episodes decode in one batch; each row's finished sequence must be cached
    on its own, not as a view that holds (and is charged for) the whole batch's padded
    cache, or the capacity fills and the next turn re-prefills the other histories."""
    episodes = [conversation(f"Put the item {k} away.", turns=k) for k in range(8)]
    backend = TransformersBackend(tiny_model_path, max_batch_size=8)
    backend.generate(episodes, SamplingParams(max_new_tokens=16))
    cache = backend.prefix_cache
    assert len(cache.entries) == len(episodes)  # one history per episode, none evicted
    config = backend.model.config
    bytes_per_token = (
        config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * 4
    )
    assert cache.retained_bytes() == cache.tokens * bytes_per_token


def test_a_seeded_sample_does_not_depend_on_its_batch(backend: TransformersBackend):
    params = SamplingParams(temperature=1.0, max_new_tokens=12)
    together = backend.generate(CONVERSATIONS, params, seeds=[5, 6, 7])
    alone = backend.generate(CONVERSATIONS[2:], params, seeds=[7])
    assert together[2][0].text == alone[0][0].text
    reseeded = backend.generate(CONVERSATIONS[2:], params, seeds=[8])
    assert reseeded[0][0].text != alone[0][0].text


def test_sampling_draws_from_the_tempered_distribution(backend: TransformersBackend):
    """Inverse-CDF sampling: token frequencies match softmax(logits / T); tokens of
    probability zero are never drawn."""
    logits = torch.full((4000, 50), float("-inf"))
    logits[:, [3, 17, 42]] = torch.tensor([0.7, 0.2, 0.1]).log()
    rows = [SimpleNamespace(generator=torch.Generator().manual_seed(k)) for k in range(4000)]
    tokens = backend._sample(logits, rows, SamplingParams(temperature=1.0))
    counts = Counter(tokens)
    assert set(counts) <= {3, 17, 42}
    for token, p in [(3, 0.7), (17, 0.2), (42, 0.1)]:
        assert abs(counts[token] / 4000 - p) < 0.03, (token, counts)
    hot = backend._sample(logits[:2000], rows[:2000], SamplingParams(temperature=4.0))
    assert abs(Counter(hot)[42] / 2000 - 0.262) < 0.03  # 0.1**0.25 / sum(p**0.25)


def test_bfloat16_logits_sample_the_tokens_of_their_float32_values(backend: TransformersBackend):
    """A bfloat16 decode hands its logits to sampling unconverted: the draws must be those
    of the same logits in float32, at temperature 1 and at any other."""
    logits = (torch.randn(256, 500, generator=torch.Generator().manual_seed(0)) * 4).bfloat16()
    for temperature in (1.0, 0.7, 0.0):
        params = SamplingParams(temperature=temperature)
        draws = []
        for values in (logits, logits.float()):
            rows = [SimpleNamespace(generator=torch.Generator().manual_seed(k)) for k in range(256)]
            draws.append(backend._sample(values, rows, params))
        assert draws[0] == draws[1], temperature


def test_greedy_is_identical_across_samples_and_calls(backend: TransformersBackend):
    params = SamplingParams(temperature=0.0, max_new_tokens=12, n=3)
    # the module's backend may or may not hold these prompts already (test order): one call
    # first, so both compared calls find the same cache and count the same prefilled tokens
    backend.generate(CONVERSATIONS, params)
    first = backend.generate(CONVERSATIONS, params)
    second = backend.generate(CONVERSATIONS, params)
    assert first == second
    for completions in first:
        assert len({c.text for c in completions}) == 1
    assert len({completions[0].text for completions in first}) == 3  # the prompt matters


def test_sampling_follows_the_seed(backend: TransformersBackend):
    def texts(seed: int) -> list[str]:
        params = SamplingParams(temperature=1.0, max_new_tokens=12, n=2, seed=seed)
        return [c.text for cs in backend.generate(CONVERSATIONS, params) for c in cs]

    assert texts(7) == texts(7)
    assert texts(7) != texts(8)
    assert len(set(texts(7))) > 1  # the n samples of one call differ too


def test_stop_strings_cut_the_text(backend: TransformersBackend):
    full = backend.generate(CONVERSATIONS[:1], SamplingParams(max_new_tokens=32))[0][0]
    words = re.findall(r"[A-Za-z]{3,}", full.text[len(full.text) // 3 :])
    assert words, f"no word to stop on in {full.text!r}"
    stop = words[0]
    params = SamplingParams(max_new_tokens=32, stop=("never-generated", stop))
    cut = backend.generate(CONVERSATIONS[:1], params)[0][0]
    assert cut.text == full.text[: full.text.index(stop)]
    assert cut.finish_reason == "stop"
    assert 0 < cut.generated_tokens < full.generated_tokens
    # generated_tokens ends on the stop string's last token.
    for k, holds_stop in ((cut.generated_tokens, True), (cut.generated_tokens - 1, False)):
        prefix = backend.generate(CONVERSATIONS[:1], SamplingParams(max_new_tokens=k))[0][0]
        assert (stop in prefix.text) == holds_stop


def test_token_counts_are_consistent(tiny_model_path: Path):
    backend = TransformersBackend(tiny_model_path, cache_tokens=0)
    params = SamplingParams(max_new_tokens=10)
    for messages, (completion,) in zip(
        CONVERSATIONS, backend.generate(CONVERSATIONS, params), strict=True
    ):
        assert completion.prompt_tokens == backend.count_tokens(messages)
        # The same ids as the training code's rendering: no BOS added twice.
        assert backend.encode(messages) == render(
            backend.tokenizer, messages, add_generation_prompt=True
        )
        assert 0 < completion.generated_tokens <= params.max_new_tokens
        if completion.finish_reason == "length":
            assert completion.generated_tokens == params.max_new_tokens


def test_a_prompt_that_does_not_fit_is_not_generated(tiny_model_path: Path):
    backend = TransformersBackend(tiny_model_path, max_context=96)
    assert backend.count_tokens(CONVERSATIONS[2]) + 8 > 96
    short, long_ = backend.generate(
        [CONVERSATIONS[0], CONVERSATIONS[2]], SamplingParams(max_new_tokens=8, n=2)
    )
    assert all(c.finish_reason != "context" and c.generated_tokens > 0 for c in short)
    assert all(c.finish_reason == "context" for c in long_)
    assert all(c.text == "" and c.generated_tokens == 0 for c in long_)


def test_batched_greedy_equals_unbatched(backend: TransformersBackend):
    """Left padding must not change the output: attention mask and position ids are right."""
    params = SamplingParams(max_new_tokens=16)
    batched = TransformersBackend(backend.model.name_or_path, max_batch_size=16)
    together = batched.generate(CONVERSATIONS, params)
    alone = [backend.generate([messages], params)[0] for messages in CONVERSATIONS]

    def outputs(results: list) -> list:
        return [(c.text, c.generated_tokens, c.finish_reason) for cs in results for c in cs]

    assert outputs(together) == outputs(alone)


def test_unknown_model_spec_and_backend_kind(tmp_path: Path):
    with pytest.raises(InputError, match="no-such-model") as error:
        resolve_model("no-such-model", tmp_path)
    assert TINY_LLAMA in str(error.value) and SMOLLM2 in str(error.value)
    with pytest.raises(InputError, match="sglang") as error:
        make_backend(tmp_path, kind="sglang")
    assert all(kind in str(error.value) for kind in ("transformers", "vllm", "openai"))


def test_an_incomplete_cache_folder_is_not_mistaken_for_a_model(tmp_path: Path):
    partial = tmp_path / "models" / TINY_LLAMA
    partial.mkdir(parents=True)
    (partial / "config.json").write_text("{}")
    with pytest.raises(InputError, match="no complete model"):
        resolve_model(TINY_LLAMA, tmp_path)


def test_smollm2_from_the_wheel(tmp_path: Path):
    started = time.perf_counter()
    path = resolve_model(SMOLLM2, tmp_path)
    built = time.perf_counter() - started
    assert "quantization_config" not in (path / "config.json").read_text()
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert resolve_model(SMOLLM2, tmp_path) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rebuilt

    backend = make_backend(path)
    assert backend.policy_id == SMOLLM2
    assert backend.tokenizer.chat_template and backend.tokenizer.eos_token == "<|im_end|>"
    started = time.perf_counter()
    (reply,) = backend.generate(
        [[{"role": "user", "content": "What is the capital of France?"}]],
        SamplingParams(max_new_tokens=16),
    )[0]
    generated = time.perf_counter() - started
    print(f"SmolLM2: dequantise+save {built:.1f}s, 16-token reply {generated:.1f}s")
    assert "Paris" in reply.text
    assert reply.finish_reason == "stop"


def test_a_prompt_extending_another_of_its_call_prefills_only_its_tail(tiny_model_path: Path):
    """One batched call with an episode's early and late prompts: the late one waits a wave
    and reuses the early one's KV, so together they cost the late prompt's tokens once."""
    backend = TransformersBackend(tiny_model_path, max_batch_size=8)
    short, long_ = (
        conversation("Cook the yellow pepper.", 1),
        conversation("Cook the yellow pepper.", 6),
    )
    params = SamplingParams(max_new_tokens=4)
    together = backend.generate([long_, short], params)
    assert backend.stats["prefill_tokens"] == backend.count_tokens(long_)
    assert together[0][0].prompt_tokens + together[1][0].prompt_tokens == backend.count_tokens(
        long_
    )
    alone = TransformersBackend(tiny_model_path, cache_tokens=0)
    assert [cs[0].text for cs in together] == [
        alone.generate([m], params)[0][0].text for m in (long_, short)
    ]


def test_bfloat16_prefill_keeps_the_cache_in_the_decode_dtype(tiny_model_path: Path):
    """Mixed dtypes: prompts prefilled in bfloat16, decoded in float32; the prefix cache
    holds float32 KV, and a seeded sample still does not depend on its batch."""
    mixed = TransformersBackend(
        tiny_model_path, max_batch_size=4, prefill_dtype="bfloat16", decode_dtype="float32"
    )
    assert mixed.prefill_model.dtype == torch.bfloat16 and mixed.model.dtype == torch.float32
    params = SamplingParams(temperature=1.0, max_new_tokens=8)
    together = mixed.generate(CONVERSATIONS, params, seeds=[5, 6, 7])
    alone = mixed.generate(CONVERSATIONS[2:], params, seeds=[7])
    assert together[2][0].text == alone[0][0].text
    assert all(k.dtype == torch.float32 for e in mixed.prefix_cache.entries for k, _ in e.kv)


def test_auto_dtypes_are_measured_choices(tiny_model_path: Path):
    auto = TransformersBackend(tiny_model_path, prefill_dtype="auto", decode_dtype="auto")
    assert {auto.prefill_dtype, auto.decode_dtype} <= {"float32", "bfloat16"}
    assert str(auto.model.dtype) == f"torch.{auto.decode_dtype}"
    [[completion]] = auto.generate([CONVERSATIONS[0]], SamplingParams(max_new_tokens=4))
    assert completion.generated_tokens > 0


def test_batched_passes_bound_their_padding_and_rows():
    """Rows of a pass are padded to its longest fed length and total: a pass never pads its
    rows by more than PAD_AT_MOST of their cost, holds at most max_rows rows, and every
    item lands in exactly one pass (a mix of short and long tails, as later turns make)."""
    generator = torch.Generator().manual_seed(0)
    shapes = [
        (int(torch.randint(20, 160, (1,), generator=generator)),
         int(torch.randint(300, 1500, (1,), generator=generator)))
        for _ in range(300)
    ]  # fmt: skip
    items = list(range(len(shapes)))
    passes = transformers_backend._passes(items, shapes, max_rows=32)
    assert sorted(i for group in passes for i in group) == items
    columns, pad = transformers_backend.LINEAR_COLUMNS, transformers_backend.PAD_AT_MOST
    for group in passes:
        assert len(group) <= 32
        fed = max(shapes[i][0] for i in group)
        total = max(shapes[i][1] for i in group)
        real = sum(shapes[i][0] * (columns + shapes[i][1]) for i in group)
        if len(group) > 1:
            assert len(group) * fed * (columns + total) <= (1 + pad) * real
    # later turns of an episode feed tails of similar length: they still share passes
    turns = [(40 + i % 5, 600 + (i * 37) % 200) for i in range(300)]
    assert len(transformers_backend._passes(list(range(300)), turns, max_rows=32)) <= 20


def test_decode_rows_of_similar_length_share_a_pass():
    shapes = [(1, 300)] * 10 + [(1, 2000)] * 10  # decode: one fed token over the context
    passes = transformers_backend._passes(list(range(20)), shapes, max_rows=64)
    assert sorted(map(sorted, passes)) == [list(range(10)), list(range(10, 20))]


def test_the_cpu_attentions_equal_sdpa_on_a_padded_gqa_batch():
    """The CPU backend's prefill (grouped SDPA) and decode (grouped matmuls) attentions
    compute what transformers' SDPA does: two query heads per key/value head, rows
    left-padded by different amounts."""
    config = LlamaConfig(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(100, (3, 12))
    mask = torch.ones(3, 13, dtype=torch.long)
    mask[1, :4] = mask[2, :9] = 0
    logits = {}
    with torch.inference_mode():
        for prefill, decode in (("sdpa", "sdpa"), (GQA_PREFILL, GROUPED_DECODE)):
            model.set_attn_implementation(prefill)
            cache = StaticCache(config=config, max_cache_len=16)
            first = model(input_ids=ids, attention_mask=mask[:, :12], past_key_values=cache)
            model.set_attn_implementation(decode)
            step = model(
                input_ids=ids[:, -1:], attention_mask=mask, past_key_values=cache,
                cache_position=torch.tensor([12]),
            )  # fmt: skip
            logits[decode] = torch.stack([first.logits[:, -1], step.logits[:, -1]])
    assert torch.allclose(logits["sdpa"], logits[GROUPED_DECODE], atol=1e-5)
    assert not torch.allclose(logits["sdpa"][:, 1], logits["sdpa"][:, 2])  # padding mattered


def test_the_cpu_backend_prefills_and_decodes_each_with_its_attention(tiny_model_path: Path):
    """Prefill with grouped SDPA; decode with SDPA, or the grouped matmuls when asked."""
    for setting, expected in (("sdpa", "sdpa"), ("grouped", GROUPED_DECODE)):
        backend = TransformersBackend(tiny_model_path, decode_attention=setting)
        seen = []
        forward = backend.model.forward

        def recording(forward=forward, backend=backend, seen=seen, **kwargs):
            seen.append((kwargs["input_ids"].shape[1], backend.model.config._attn_implementation))
            return forward(**kwargs)

        backend.model.forward = recording
        backend.generate([CONVERSATIONS[1]], SamplingParams(max_new_tokens=4))
        assert {attention for width, attention in seen if width > 1} == {GQA_PREFILL}
        assert {attention for width, attention in seen if width == 1} == {expected}
        assert backend.model.config._attn_implementation == GQA_PREFILL


def test_a_right_aligned_cache_is_zero_wherever_attention_reads_and_no_row_wrote(
    backend: TransformersBackend, monkeypatch: pytest.MonkeyPatch
):
    """The cache's buffers are not zero-filled whole: where attention reads but no row's
    keys and values went (left pads, columns ahead of the prompts) must still be zero, or a
    masked column's 0 weight times garbage (NaN) poisons the row. Fresh memory is made NaN
    here (every byte 0xFF), so a region left unwritten shows."""
    config = backend.model.config
    heads, dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    layers = config.num_hidden_layers

    def kv(length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(torch.randn(heads, length, dim), torch.randn(heads, length, dim))] * layers

    rows = [kv(3), kv(5), None]
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(255))
    monkeypatch.setattr(backend, "cache_memory", transformers_backend.CacheMemory("cpu"))
    cache = backend._right_aligned(rows, 6, 9, "float32")
    monkeypatch.undo()
    for layer in cache.layers:
        for tensor, index in ((layer.keys, 0), (layer.values, 1)):
            assert not tensor.isnan().any()
            assert torch.equal(tensor[0, :, 3:6], rows[0][0][index])
            assert torch.equal(tensor[1, :, 1:6], rows[1][0][index])
            assert not tensor[0, :, :3].any() and not tensor[1, :, :1].any()
            assert not tensor[2].any() and not tensor[:, :, 6:].any()


def test_reused_cache_memory_leaks_nothing_from_the_batch_it_held_before(
    tiny_model_path: Path,
):
    """Batch caches live in memory kept across passes: a small call after a large one
    reuses it without growing it, and writes every position it reads. Stale keys and
    values (NaN here) would change the small call's tokens against a fresh backend's."""
    params = SamplingParams(temperature=1.0, max_new_tokens=12)
    fresh = TransformersBackend(tiny_model_path, max_batch_size=4)
    expected = [c.text for cs in fresh.generate(CONVERSATIONS, params, seeds=[5, 6, 7]) for c in cs]

    used = TransformersBackend(tiny_model_path, max_batch_size=4)
    large = [conversation(f"Put the item {k} away.", turns=9) for k in range(8)]
    used.generate(large, params, seeds=list(range(8)))
    held = used.cache_memory.bytes
    with torch.inference_mode():  # the backend's buffers are inference tensors
        for buffer in used.cache_memory._buffers.values():
            buffer.fill_(255)  # every float NaN
    again = used.generate(CONVERSATIONS, params, seeds=[5, 6, 7])
    assert [c.text for cs in again for c in cs] == expected
    assert used.cache_memory.bytes == held
