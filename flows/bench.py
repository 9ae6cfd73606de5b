"""`ipr bench rollouts`: what the rollout engine saves over the reference pipeline.

The same Monte Carlo step-reward estimates (every expert prefix of a few tasks, N scorer
samples each) are computed three ways on one model:
  a. engine     -- this project: lock-step batching, prefix cache, shared prefills;
  b. reference  -- the authors' pattern: one request per rollout, the whole conversation
                   re-encoded every turn, samples one after another;
  c. limit      -- the bare model running exactly a's prefill and decode shapes as plain
                   forward passes (random tokens, no environment, no bookkeeping, no
                   padding): what a's own shapes cost at best;
  d. hardware   -- the bare model's prefill and decode tokens/s at the best batch, dtype
                   and attention of a small sweep (`hardware_rates`): the time
                   those rates need for a's prefilled and generated tokens, over a's wall
                   time, is
                   `fraction_of_hardware`, a limit that does not inherit a's batches. The
                   sweep runs at a's own context lengths (its mean new-token tail over its
                   mean cached prefix, its mean decode context: attention over a long
                   conversation is work the model must do whatever the batch), and again at
                   the fixed `sweep_context` (`fraction_of_hardware_at_fixed_context`).
Then a and b run greedily on the same queries and their outcomes are compared: they must
agree, up to a rare batching near-tie. They run in the order a, d, c, b: the limits right
after the engine, the minutes-long reference last.

On a shared machine the same work takes +-12% from one minute to the next (four back-to-back
engine runs of `configs/bench.yaml`: 53.7-67.1 s), so one a/d pair measures the machine's
drift as much as the engine. With `repeats: k`, a and d run k times in turn, each a on a
fresh backend (a cold prefix cache: the same work), and `fraction_of_hardware` is the lower
median of the k pairs' fractions, every pair reported.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt
from transformers import DynamicCache, StaticCache

from ipr_core.config import DecodeAttention, DtypeSetting, EnvId, read_yaml_mapping, validate_config
from ipr_core.engine.backends.attention import (
    DECODE_ATTENTIONS,
    PREFILL_ATTENTIONS,
    attending_with,
)
from ipr_core.engine.backends.throughput import (
    DTYPES,
    Rate,
    decode_rate,
    head_dim,
    in_dtype,
    prefill_rate,
)
from ipr_core.engine.backends.transformers_backend import TransformersBackend, WorkLog
from ipr_core.engine.models import resolve_model
from ipr_core.engine.rollout import EpisodeConfig, RolloutEngine, RolloutResult
from ipr_core.envs import make_env
from ipr_core.errors import InputError, IprError
from ipr_core.method.expert import build_expert_trajectory
from ipr_core.method.step_rewards import StepQuery, estimate_step_rewards, expert_queries
from ipr_core.training.config import Seed
from ipr_core.types import Trajectory


class BenchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    env: EnvId = "twx/twc"
    model: str = "smollm2-135m-instruct"
    cache_dir: Path = Path(".ipr")
    split: str = "train"
    tasks: int = Field(2, gt=0)
    queries_per_task: int = Field(4, gt=0)
    """Expert prefixes per task (the first ones)."""
    n_samples: int = Field(4, gt=0)
    temperature: float = Field(1.0, gt=0)
    max_steps: int = Field(8, gt=0)
    max_new_tokens: int = Field(40, gt=0)
    max_live_episodes: int = Field(32, gt=0)
    max_batch_size: int = Field(16, gt=0)
    prefill_dtype: DtypeSetting = "float32"
    decode_dtype: DtypeSetting = "float32"
    """The engine's dtypes (the reference stays float32); `auto` measures them at startup."""
    decode_attention: DecodeAttention = "sdpa"
    """The engine's decode attention (`generation.decode_attention`)."""
    seed: Seed = 0
    sweep_rows: tuple[PositiveInt, ...] = (8, 32, 128)
    """Decode batch sizes of the hardware sweep (prefill: PREFILL_ROWS prompts)."""
    sweep_context: int = Field(256, gt=0)
    """Prompt length of the fixed-context sweep's prefills and KV length of its decode steps."""
    reference_tasks: int | None = Field(None, gt=0)
    """b runs the queries of the first k tasks only (it is ~6x slower than a); its time is
    compared with a's per rollout. None: every task."""
    repeats: int = Field(1, gt=0)
    """a and d run this many times in turn; the report keeps the pair at the lower median
    of their fractions of the hardware and lists every pair."""
    compare_rows_per_call: int | None = Field(None, gt=0)
    """`--compare` replays the first k rows of each of a's generate calls and scales its time
    by a's tokens over the replayed ones. None: every row."""


def load_bench_config(path: Path) -> BenchConfig:
    return validate_config(BenchConfig, read_yaml_mapping(path), path)


@dataclass
class Measurement:
    prefill_tokens: int
    generated_tokens: int
    env_steps: int
    rollouts: int
    wall_s: float

    @property
    def tokens_per_s(self) -> float:
        return (self.prefill_tokens + self.generated_tokens) / self.wall_s


COMPARE_ENGINES = ("ctranslate2",)


def run_bench(
    config: BenchConfig, compare: str | None = None, log: Callable[[str], None] = print
) -> dict[str, Any]:
    torch.manual_seed(config.seed)
    if compare is not None:
        check_engine(compare)
    model_path = resolve_model(config.model, config.cache_dir)
    queries = _queries(config)
    log(f"{len(queries)} step-reward queries x N={config.n_samples} on {config.env}")

    # The limits run right after the engine, the minutes-long reference last: on a machine
    # whose speed drifts, a fraction of two phases minutes apart measures the drift too.
    pairs: list[EnginePair] = []
    for _ in range(config.repeats):
        engine_backend = None  # the last repeat's caches go before the next backend loads
        engine_backend = _engine_backend(config, model_path)  # a cold cache: the same work
        pairs.append(_engine_and_hardware(config, engine_backend, queries, log))
    a, a_greedy, work, hardware, fixed = pair = _lower_median(pairs)
    c = bare_model_limit(engine_backend, work)
    log(f"c. limit: {c.wall_s:.1f} s")
    reference_queries = _reference_queries(config, queries)
    reference_backend = TransformersBackend(model_path, max_batch_size=1, cache_tokens=0)
    b, b_greedy = _estimate(config, reference_backend, 1, reference_queries)
    log(f"b. reference: {b.wall_s:.1f} s for {b.rollouts} rollouts")

    compared = None
    if compare is not None:
        compared = ctranslate2_replay(model_path, config, work)
        log(f"e. {compare} int8: {compared['scaled_wall_s']:.1f} s")
    a_greedy = a_greedy[: len(b_greedy)]  # b's queries are a's first ones
    agree = [x.outcome_reward == y.outcome_reward for x, y in zip(a_greedy, b_greedy, strict=True)]
    same_actions = [
        [s.action for s in x.trajectory.steps] == [s.action for s in y.trajectory.steps]
        for x, y in zip(a_greedy, b_greedy, strict=True)
    ]
    return {
        "config": json.loads(config.model_dump_json()),
        "queries": len(queries),
        # how OpenMP threads waited at barriers: ~20% of the engine's time on a machine it
        # has to itself (`ipr bench rollouts` runs ACTIVE unless the environment says)
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "engine": asdict(a) | {"tokens_per_s": a.tokens_per_s},
        "reference": asdict(b) | {"tokens_per_s": b.tokens_per_s},
        "limit": asdict(c) | {"tokens_per_s": c.tokens_per_s},
        "prefill_tokens_ratio": (b.prefill_tokens / b.rollouts) / (a.prefill_tokens / a.rollouts),
        "wall_speedup": (b.wall_s / b.rollouts) / (a.wall_s / a.rollouts),
        "fraction_of_limit": c.wall_s / a.wall_s,
        "work_contexts": dict(
            zip(("prefill_tail", "prefill_cached", "decode"), work_contexts(work), strict=True)
        ),
        "hardware": hardware,
        "fraction_of_hardware": pair.fraction,
        "repeats": [
            {
                "engine_wall_s": p.a.wall_s,
                "hardware_wall_s": p.hardware["wall_s"],
                "fraction_of_hardware": p.fraction,
                "engine_tokens": p.a.prefill_tokens + p.a.generated_tokens,
            }
            for p in pairs
        ],
        "hardware_at_fixed_context": fixed,
        "fraction_of_hardware_at_fixed_context": fixed["wall_s"] / a.wall_s,
        "compare": compared,
        "engine_speedup_over_compare": (
            None if compared is None else compared["scaled_wall_s"] / a.wall_s
        ),
        "greedy_outcome_agreement": sum(agree) / len(agree),
        "greedy_action_agreement": sum(same_actions) / len(same_actions),
        "greedy_rollouts": len(agree),
    }


class EnginePair(NamedTuple):
    """One run of a, then d's two sweeps, on a backend of its own."""

    a: Measurement
    greedy: list[RolloutResult]
    work: WorkLog
    hardware: dict[str, Any]
    fixed: dict[str, Any]

    @property
    def fraction(self) -> float:
        return self.hardware["wall_s"] / self.a.wall_s


def _engine_backend(config: BenchConfig, model_path: Path) -> TransformersBackend:
    return TransformersBackend(
        model_path,
        max_batch_size=config.max_batch_size,
        prefill_dtype=config.prefill_dtype,
        decode_dtype=config.decode_dtype,
        decode_attention=config.decode_attention,
    )


def _engine_and_hardware(
    config: BenchConfig,
    backend: TransformersBackend,
    queries: list[StepQuery],
    log: Callable[[str], None],
) -> EnginePair:
    log(f"engine dtypes: prefill {backend.prefill_dtype}, decode {backend.decode_dtype}")
    work = backend.work_log = WorkLog()  # a's forward passes, replayed by c
    a, greedy = _estimate(config, backend, config.max_live_episodes, queries)
    log(f"a. engine: {a.wall_s:.1f} s")
    tail, cached, context = work_contexts(work)
    hardware = hardware_limit(backend, a, config.sweep_rows, (tail, cached), context)
    log(f"d. hardware at a's contexts: {hardware['wall_s']:.1f} s")
    fixed = hardware_limit(
        backend, a, config.sweep_rows, (config.sweep_context, 0), config.sweep_context
    )
    log(f"d. hardware at {config.sweep_context} tokens: {fixed['wall_s']:.1f} s")
    return EnginePair(a, greedy, work, hardware, fixed)


def _lower_median(pairs: list[EnginePair]) -> EnginePair:
    """The pair whose fraction of the hardware is the lower median of all pairs'."""
    return sorted(pairs, key=lambda pair: pair.fraction)[(len(pairs) - 1) // 2]


def gold_trajectories(env_id: str, split: str, count: int) -> tuple[list[Trajectory], str]:
    """The first `count` gold trajectories of a split and the env's action hint: the
    benchmarks' fixed, real examples."""
    env = make_env(env_id)
    try:
        experts: list[Trajectory] = []
        for task_id in env.task_ids(split)[:count]:
            expert = build_expert_trajectory(env, task_id)
            if not isinstance(expert, Trajectory):
                raise InputError(env_id, f"no expert trajectory for task {task_id}")
            experts.append(expert)
        return experts, env.action_hint
    finally:
        env.close()


def _queries(config: BenchConfig) -> list[StepQuery]:
    experts, _ = gold_trajectories(config.env, config.split, config.tasks)
    return [q for expert in experts for q in expert_queries(expert)[: config.queries_per_task]]


def _reference_queries(config: BenchConfig, queries: list[StepQuery]) -> list[StepQuery]:
    if config.reference_tasks is None:
        return queries
    tasks = list(dict.fromkeys(query.task_id for query in queries))[: config.reference_tasks]
    return [query for query in queries if query.task_id in tasks]


def _estimate(
    config: BenchConfig, backend: TransformersBackend, max_live: int, queries: list[StepQuery]
) -> tuple[Measurement, list[RolloutResult]]:
    """Sampled MC estimates (measured), then greedy rollouts of the same queries."""
    settings = EpisodeConfig(max_live, config.max_new_tokens, config.max_steps)
    with RolloutEngine(config.env, backend, settings) as engine:
        started = time.perf_counter()
        _, rollouts = estimate_step_rewards(
            engine, queries, config.n_samples, config.temperature, config.seed
        )
        wall = time.perf_counter() - started
        flat = [r for group in rollouts for r in group]
        measured = Measurement(
            prefill_tokens=sum(r.prefill_tokens for r in flat),
            generated_tokens=sum(r.generated_tokens for r in flat),
            env_steps=sum(r.env_steps for r in flat),
            rollouts=len(flat),
            wall_s=wall,
        )
        backend.work_log = None
        _, greedy = estimate_step_rewards(engine, queries, 1, 0.0, config.seed)
    return measured, [group[0] for group in greedy]


@torch.inference_mode()
def bare_model_limit(backend: TransformersBackend, work: WorkLog) -> Measurement:
    """Time a's forward passes alone: the same prefill batches over caches of the same
    lengths, and the same decode batches at their mean context."""
    config = backend.model.config
    vocab = config.vocab_size
    heads = config.num_key_value_heads
    dim = head_dim(config)
    wall = 0.0
    for rows, new, cached, *_ in work.prefills:
        model = backend.prefill_model
        cache = DynamicCache()
        if cached:
            for layer in range(config.num_hidden_layers):
                kv = torch.randn(rows, heads, cached, dim, dtype=model.dtype)
                cache.update(kv, kv.clone(), layer)
        tokens = torch.randint(vocab, (rows, new))
        started = time.perf_counter()
        model(input_ids=tokens, past_key_values=cache, use_cache=True, logits_to_keep=1)
        wall += time.perf_counter() - started
    with attending_with(backend.model, backend.decode_attention) as model:
        for rows, context in work.decodes:
            cache = StaticCache(config=config, max_cache_len=context)
            kv = torch.randn(rows, heads, context - 1, dim, dtype=model.dtype)
            for layer in range(config.num_hidden_layers):
                cache.update(kv, kv, layer)
            tokens = torch.randint(vocab, (rows, 1))
            started = time.perf_counter()
            model(
                input_ids=tokens,
                past_key_values=cache,
                cache_position=torch.tensor([context - 1]),
                use_cache=True,
            )
            wall += time.perf_counter() - started
    return Measurement(
        prefill_tokens=sum(p.computed for p in work.prefills),
        generated_tokens=sum(rows for rows, _ in work.decodes) + sum(p.rows for p in work.prefills),
        env_steps=0,
        rollouts=0,
        wall_s=wall,
    )


PREFILL_ROWS = (1, 8, 32)
"""Prompts per prefill pass in the hardware sweep."""


def work_contexts(work: WorkLog) -> tuple[int, int, int]:
    """a's mean prefill tail and mean cached prefix under it (per prefilled row) and its
    mean decode context (per decoded row): the context lengths the hardware sweep uses."""
    rows = sum(p.rows for p in work.prefills) or 1
    tail = sum(p.computed for p in work.prefills) / rows
    cached = sum(p.cached for p in work.prefills) / rows
    decoded = sum(n for n, _ in work.decodes) or 1
    context = sum(n * length for n, length in work.decodes) / decoded
    return max(round(tail), 1), round(cached), max(round(context), 1)


def hardware_rates(
    model: torch.nn.Module, rows: Sequence[int], prefill: tuple[int, int], context: int
) -> list[Rate]:
    """The bare model's prefill tokens/s (PREFILL_ROWS prompts of `prefill` = (new tokens,
    cached tokens)) and decode tokens/s (`rows` rows over `context` tokens), with each
    attention implementation of the phase, in float32 and bfloat16: where this machine runs
    the model fastest."""
    rates = []
    for dtype in DTYPES:
        candidate = in_dtype(model, dtype)
        for attention in PREFILL_ATTENTIONS:
            with attending_with(candidate, attention):
                rates += [prefill_rate(candidate, prompts, *prefill) for prompts in PREFILL_ROWS]
        for attention in DECODE_ATTENTIONS:
            with attending_with(candidate, attention):
                rates += [decode_rate(candidate, batch, context) for batch in rows]
    return rates


def hardware_limit(
    backend: TransformersBackend,
    a: Measurement,
    rows: Sequence[int],
    prefill: tuple[int, int],
    context: int,
) -> dict[str, Any]:
    """The time the sweep's best prefill and decode rates need for a's tokens."""
    rates = hardware_rates(backend.model, rows, prefill, context)
    fastest_prefill, fastest_decode = best(rates, "prefill"), best(rates, "decode")
    wall = (
        a.prefill_tokens / fastest_prefill.tokens_per_s
        + a.generated_tokens / fastest_decode.tokens_per_s
    )
    return {
        "sweep": [asdict(rate) for rate in rates],
        "best_prefill": asdict(fastest_prefill),
        "best_decode": asdict(fastest_decode),
        "wall_s": wall,
    }


def best(rates: Sequence[Rate], phase: str) -> Rate:
    return max((rate for rate in rates if rate.phase == phase), key=lambda rate: rate.tokens_per_s)


def check_engine(name: str) -> None:
    """Refuse at once (before minutes of measuring) an engine that is not installed."""
    if name not in COMPARE_ENGINES:
        raise IprError(f"--compare: unknown engine {name!r}; expected one of {COMPARE_ENGINES}")
    if importlib.util.find_spec(name) is None:
        raise IprError(f"--compare {name}: {name} is not installed (pip install 'ipr[bench]')")


def ctranslate2_replay(model_path: Path, config: BenchConfig, work: WorkLog) -> dict[str, Any]:
    """a's generate calls through CTranslate2 int8: every row's prompt, and exactly as many
    sampled tokens as a generated for it. CTranslate2 keeps no cache across calls, so it
    encodes each whole prompt: what it would cost as this engine's backend."""
    import ctranslate2
    from ctranslate2.converters import TransformersConverter
    from transformers import AutoTokenizer

    converted = config.cache_dir / "ctranslate2" / f"{model_path.name}-int8"
    if not (converted / "model.bin").exists():
        TransformersConverter(str(model_path), low_cpu_mem_usage=True).convert(
            str(converted), quantization="int8", force=True
        )
    generator = ctranslate2.Generator(str(converted), device="cpu", compute_type="int8")
    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    prompt_tokens = generated = 0
    wall = 0.0
    every_row = sum(len(ids) + n for call in work.calls for ids, n in call)
    replayed = 0
    for whole_call in work.calls:
        call = whole_call[: config.compare_rows_per_call]
        replayed += sum(len(ids) + n for ids, n in call)
        for start in range(0, len(call), config.max_batch_size):
            rows = call[start : start + config.max_batch_size]
            longest = max(n for _, n in rows)
            prompts = [tokenizer.convert_ids_to_tokens(ids) for ids, _ in rows]
            started = time.perf_counter()
            results = generator.generate_batch(
                prompts,
                max_length=longest,
                min_length=longest,
                sampling_temperature=config.temperature,
                sampling_topk=0,
                include_prompt_in_result=False,
            )
            wall += time.perf_counter() - started
            prompt_tokens += sum(len(ids) for ids, _ in rows)
            generated += sum(len(r.sequences_ids[0]) for r in results)
    return {
        "engine": f"ctranslate2 {ctranslate2.__version__} int8",
        "prompt_tokens": prompt_tokens,
        "generated_tokens": generated,
        "wall_s": wall,
        "tokens_per_s": (prompt_tokens + generated) / wall,
        "replayed_share": replayed / every_row,
        "scaled_wall_s": wall * every_row / replayed,
    }


def format_table(report: dict[str, Any]) -> str:
    lines = [
        f"{'':<10} {'prefill tok':>12} {'gen tok':>9} {'env steps':>10} {'wall s':>8} {'tok/s':>8}"
    ]
    for name in ("engine", "reference", "limit"):
        m = report[name]
        lines.append(
            f"{name:<10} {m['prefill_tokens']:>12} {m['generated_tokens']:>9} "
            f"{m['env_steps']:>10} {m['wall_s']:>8.1f} {m['tokens_per_s']:>8.0f}"
        )
    lines.append(
        f"prefill_tokens_ratio {report['prefill_tokens_ratio']:.1f}  "
        f"wall_speedup {report['wall_speedup']:.1f}  "
        f"fraction_of_limit {report['fraction_of_limit']:.2f}  "
        f"fraction_of_hardware {report['fraction_of_hardware']:.2f} "
        f"(at {report['config']['sweep_context']} tokens: "
        f"{report['fraction_of_hardware_at_fixed_context']:.2f})  "
        f"greedy outcome agreement {report['greedy_outcome_agreement']:.2f} "
        f"(actions {report['greedy_action_agreement']:.2f}, {report['greedy_rollouts']} rollouts)"
    )
    if len(report["repeats"]) > 1:
        runs = ", ".join(
            f"{r['fraction_of_hardware']:.2f} "
            f"({r['hardware_wall_s']:.1f} / {r['engine_wall_s']:.1f} s)"
            for r in report["repeats"]
        )
        lines.append(f"fraction_of_hardware per repeat (d / a): {runs}; reported: the lower median")
    if report["compare"] is not None:
        other = report["compare"]
        lines.append(
            f"{other['engine']}: {other['prompt_tokens']} prompt + {other['generated_tokens']} "
            f"generated tokens in {other['wall_s']:.1f} s ({other['replayed_share']:.0%} of the "
            f"engine's calls; all of them: {other['scaled_wall_s']:.1f} s); the engine is "
            f"{report['engine_speedup_over_compare']:.2f}x as fast"
        )
    return "\n".join(lines)
