"""`ipr bench rollouts`: what the rollout engine saves over the reference pipeline.

The same Monte Carlo step-reward estimates (every expert prefix of a few tasks, N scorer
samples each) are computed three ways on one model:
  a. engine     -- this project: lock-step batching, prefix cache, shared prefills;
  b. reference  -- the authors' pattern: one request per rollout, the whole conversation
                   re-encoded every turn, samples one after another;
  c. limit      -- the bare model running exactly a's prefill and decode shapes as plain
                   forward passes (random tokens, no environment, no bookkeeping, no
                   padding): what this machine can do for a's work at best.
Then a and b run greedily on the same queries and their outcomes are compared: they must
agree, up to a rare batching near-tie.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import DynamicCache, StaticCache

from ipr_core.config import EnvId, read_yaml_mapping, validate_config
from ipr_core.engine.backends.transformers_backend import TransformersBackend, WorkLog
from ipr_core.engine.models import resolve_model
from ipr_core.engine.rollout import EpisodeSettings, RolloutEngine, RolloutResult
from ipr_core.envs import make_env
from ipr_core.errors import InputError
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
    seed: Seed = 0


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


def run_bench(config: BenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    torch.manual_seed(config.seed)
    model_path = resolve_model(config.model, config.cache_dir)
    queries = _queries(config)
    log(f"{len(queries)} step-reward queries x N={config.n_samples} on {config.env}")

    engine_backend = TransformersBackend(model_path, max_batch_size=config.max_batch_size)
    reference_backend = TransformersBackend(model_path, max_batch_size=1, cache_tokens=0)
    work = engine_backend.work_log = WorkLog()  # a's forward passes, replayed by c

    a, a_greedy = _estimate(config, engine_backend, config.max_live_episodes, queries)
    log(f"a. engine: {a.wall_s:.1f} s")
    b, b_greedy = _estimate(config, reference_backend, 1, queries)
    log(f"b. reference: {b.wall_s:.1f} s")
    c = bare_model_limit(engine_backend, work)
    log(f"c. limit: {c.wall_s:.1f} s")

    agree = [x.outcome_reward == y.outcome_reward for x, y in zip(a_greedy, b_greedy, strict=True)]
    same_actions = [
        [s.action for s in x.trajectory.steps] == [s.action for s in y.trajectory.steps]
        for x, y in zip(a_greedy, b_greedy, strict=True)
    ]
    return {
        "config": json.loads(config.model_dump_json()),
        "queries": len(queries),
        "engine": asdict(a) | {"tokens_per_s": a.tokens_per_s},
        "reference": asdict(b) | {"tokens_per_s": b.tokens_per_s},
        "limit": asdict(c) | {"tokens_per_s": c.tokens_per_s},
        "prefill_tokens_ratio": b.prefill_tokens / a.prefill_tokens,
        "wall_speedup": b.wall_s / a.wall_s,
        "fraction_of_limit": c.wall_s / a.wall_s,
        "greedy_outcome_agreement": sum(agree) / len(agree),
        "greedy_action_agreement": sum(same_actions) / len(same_actions),
        "greedy_rollouts": len(agree),
    }


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


def _estimate(
    config: BenchConfig, backend: TransformersBackend, max_live: int, queries: list[StepQuery]
) -> tuple[Measurement, list[RolloutResult]]:
    """Sampled MC estimates (measured), then greedy rollouts of the same queries."""
    settings = EpisodeSettings(max_live, config.max_new_tokens, config.max_steps)
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
    """Time a's forward passes alone: the same prefill chunks over caches of the same
    lengths, and the same decode batches at their mean context, without padding."""
    model, config = backend.model, backend.model.config
    vocab = config.vocab_size
    heads = config.num_key_value_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    wall = 0.0
    for new, cached in work.prefills:
        cache = DynamicCache()
        if cached:
            for layer in range(config.num_hidden_layers):
                kv = torch.randn(1, heads, cached, dim)
                cache.update(kv, kv.clone(), layer)
        tokens = torch.randint(vocab, (1, new))
        started = time.perf_counter()
        model(input_ids=tokens, past_key_values=cache, use_cache=True, logits_to_keep=1)
        wall += time.perf_counter() - started
    for rows, context in work.decodes:
        cache = StaticCache(config=config, max_cache_len=context)
        kv = torch.randn(rows, heads, context - 1, dim)
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
        prefill_tokens=sum(new for new, _ in work.prefills),
        generated_tokens=sum(rows for rows, _ in work.decodes) + sum(1 for _ in work.prefills),
        env_steps=0,
        rollouts=0,
        wall_s=wall,
    )


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
        f"greedy outcome agreement {report['greedy_outcome_agreement']:.2f} "
        f"(actions {report['greedy_action_agreement']:.2f}, {report['greedy_rollouts']} rollouts)"
    )
    return "\n".join(lines)
