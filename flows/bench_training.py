"""`ipr bench training`: how close SFT and the mixture trainer come to this machine's limit.

On a fixed set of real examples (expert trajectories of a TextWorldExpress game), for
LoRA and for full fine-tuning:
  a. sft      -- `train_sft`, exactly as the pipeline calls it;
  b. mixture  -- `train_mixture`, exactly as the pipeline calls it, on pairs cut from the
                 same trajectories (see `bench_pairs`);
  c. limit    -- the bare model (the same LoRA wrapping, the same precision) doing plain
                 forward + backward passes over as many tokens, the loss on the same
                 share of them, in the best of a few batch shapes without padding: what
                 the machine can do at best.
`fraction_of_limit` is a trainer's real tokens per second over the limit's.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import torch
from peft import get_peft_model
from pydantic import BaseModel, ConfigDict, Field, PositiveInt
from trl.trainer.utils import add_fused_lm_head

from flows.bench import gold_trajectories
from ipr_core.agent.prompts import PromptFormat, build_conversation, step_messages
from ipr_core.config import EnvId, read_yaml_mapping, validate_config
from ipr_core.engine.models import resolve_model
from ipr_core.errors import InputError
from ipr_core.training.config import (
    IN_PROCESS,
    LoraConfig,
    MixtureConfig,
    Seed,
    SFTConfig,
)
from ipr_core.training.mixture import train_mixture
from ipr_core.training.precision import detect_precision
from ipr_core.training.runtime import (
    load_model,
    lora_config,
    peak_rss_mb,
)
from ipr_core.training.sft import train_sft
from ipr_core.training.trl_adapter import project_only_scored_positions
from ipr_core.types import Pair, Trajectory

Mode = Literal["lora", "full"]
TrainerName = Literal["sft", "mixture"]


class TrainingBenchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    env: EnvId = "twx/twc"
    model: str = "smollm2-135m-instruct"
    cache_dir: Path = Path(".ipr")
    examples: int = Field(8, gt=0)
    """Expert trajectories of the train split: the SFT examples, and the source of pairs."""
    pairs: int = Field(8, gt=0)
    batch_size: int = Field(4, gt=0)
    """Examples (SFT) or pairs (mixture) per optimizer step; one epoch over each set."""
    micro_batch_size: dict[Mode, dict[TrainerName, PositiveInt]] = {}
    """Examples (SFT) or pairs (mixture) per forward pass, per mode and trainer, as a run
    config's `sft.micro_batch_size` and `mixture.micro_batch_size` would set them; left
    out: 1, the trainers' default. A pair is two rows (its two sides)."""
    max_length: int = Field(1024, gt=0)
    lora_rank: int = Field(16, gt=0)
    modes: tuple[Mode, ...] = ("lora", "full")
    limit_batch_shapes: tuple[PositiveInt, ...] = (1, 2, 4)
    """Rows per forward pass tried for the limit (each row as long as a mean example); 2 is
    the mixture's own shape (a pair's two sides)."""
    seed: Seed = 0


def load_training_bench_config(path: Path) -> TrainingBenchConfig:
    return validate_config(TrainingBenchConfig, read_yaml_mapping(path), path)


def bench_pairs(experts: list[Trajectory], prompt: PromptFormat, count: int) -> list[Pair]:
    """Pairs with real tokens and real shapes, cut from expert trajectories.

    A benchmark needs the shapes of mined pairs, not their meaning: a step pair at step j
    chooses the expert suffix from j over the suffix from j + 1 (a skipped step); a
    trajectory pair chooses the episode over the episode without its first step.
    """
    pairs: list[Pair] = []
    for expert in experts:
        for j in range(len(expert.steps) - 1):
            level = "trajectory" if j == 0 else "step"
            pairs.append(
                Pair(
                    level=level,
                    task_id=expert.task.task_id,
                    prefix_len=j,
                    prompt=tuple(build_conversation(expert.task, expert.steps[:j], prompt)),
                    chosen=tuple(step_messages(expert.steps[j:], final_observation=False)),
                    rejected=tuple(step_messages(expert.steps[j + 1 :], final_observation=False)),
                    chosen_actor="expert",
                    chosen_reward=1.0,
                    rejected_reward=0.0,
                    chosen_outcome=1.0,
                    rejected_outcome=0.0,
                )
            )
    if len(pairs) < count:
        raise InputError("bench config", f"only {len(pairs)} pairs can be cut", field="pairs")
    return pairs[:count]


def run_training_bench(config: TrainingBenchConfig, log=print) -> dict[str, Any]:
    torch.manual_seed(config.seed)
    model_path = resolve_model(config.model, config.cache_dir)
    experts, action_hint = gold_trajectories(config.env, "train", config.examples)
    hint = PromptFormat(action_hint)
    pairs = bench_pairs(experts, hint, config.pairs)
    precision = detect_precision(IN_PROCESS)
    log(f"{len(experts)} SFT examples, {len(pairs)} pairs on {config.env}; {precision}")
    report: dict[str, Any] = {
        "config": json.loads(config.model_dump_json()),
        "precision": {"device": precision.device, "bf16": precision.bf16},
        "threads": torch.get_num_threads(),
        "results": [],
    }
    for mode in config.modes:
        lora = LoraConfig(enabled=mode == "lora", r=config.lora_rank, alpha=2 * config.lora_rank)
        shared = {
            "epochs": 1,
            "lr": 1e-4,
            "batch_size": config.batch_size,
            "max_length": config.max_length,
            "lora": lora,
            "seed": config.seed,
        }
        micro = {"sft": 1, "mixture": 1, **config.micro_batch_size.get(mode, {})}
        sft_settings = SFTConfig(**shared, micro_batch_size=micro["sft"])
        mixture_settings = MixtureConfig(**shared, micro_batch_size=micro["mixture"])
        with tempfile.TemporaryDirectory() as tmp:
            # One untimed optimizer step first: the first trainer of a mode pays first-call
            # set-up (oneDNN primitives, TRL), which a real run's many steps amortize and the
            # two timed steps here would not.
            warm_up = sft_settings.model_copy(update={"batch_size": micro["sft"]})
            train_sft(model_path, experts[: micro["sft"]], hint, warm_up, Path(tmp) / "w")
            start = time.perf_counter()
            sft = train_sft(model_path, experts, hint, sft_settings, Path(tmp) / "sft")
            sft_wall = time.perf_counter() - start
            start = time.perf_counter()
            mix = train_mixture(model_path, pairs, mixture_settings, Path(tmp) / "mix")
            mix_wall = time.perf_counter() - start
        runs = (("sft", sft, sft_wall, len(experts)), ("mixture", mix, mix_wall, 2 * len(pairs)))
        for name, result, wall, sequences in runs:
            metrics = result.metrics
            length = round(metrics["tokens"] / sequences)
            scored = metrics["scored_tokens"] / metrics["tokens"]
            limit = bare_limit(model_path, lora, metrics["tokens"], length, scored, config, log)
            row = {
                "trainer": name,
                "mode": mode,
                "micro_batch_size": micro[name],
                "optimizer_steps": metrics["steps"],
                "tokens": metrics["tokens"],
                "scored_tokens": metrics["scored_tokens"],
                "padding_tokens": metrics["padding_tokens"],
                "train_seconds": metrics["seconds"],
                "wall_seconds": wall,
                "tokens_per_s": metrics["tokens_per_second"],
                "peak_rss_mb": metrics["peak_rss_mb"],
                "limit_tokens_per_s": limit["tokens_per_s"],
                "limit_batch_shape": limit["shape"],
                "limitpeak_rss_mb": limit["peak_rss_mb"],
                "fraction_of_limit": metrics["tokens_per_second"] / limit["tokens_per_s"],
            }
            report["results"].append(row)
            log(format_row(row))
    return report


def bare_limit(
    model_path: Path,
    lora: LoraConfig,
    tokens: int,
    length: int,
    scored: float,
    config: TrainingBenchConfig,
    log,
) -> dict[str, Any]:
    """Plain forward + backward passes over `tokens` random tokens, best batch shape.

    Rows are `length` tokens (the trainer's mean sequence); the loss is the summed log-prob
    of each row's last `scored` share of positions through the trainers' own LM head (TRL's
    fused head, projecting only scored positions), so the limit does the trainers' model
    work and nothing else: no optimizer step, no data pipeline, no padding, no metrics.
    Each shape runs one untimed pass first (oneDNN's first-call set-up is not the limit's).
    """
    precision = detect_precision(IN_PROCESS)
    project_only_scored_positions()
    model = load_model(model_path)
    add_fused_lm_head(model)
    if lora.enabled:
        model = get_peft_model(model, lora_config(lora))
    model.train()
    keep = max(1, min(length - 1, round(scored * length)))
    best: dict[str, Any] = {}
    for rows in config.limit_batch_shapes:
        passes = max(1, math.ceil(tokens / (rows * length)))
        ids = torch.randint(0, model.config.vocab_size, (rows, length))
        labels = ids.clone()
        labels[:, : length - keep] = -100
        for timed in (False, True):
            start = time.perf_counter()
            for _ in range(passes if timed else 1):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision.bf16):
                    out = model(input_ids=ids, labels=labels, fused_lm_head=True, use_cache=False)
                (-out.log_probs.sum()).backward()
                model.zero_grad(set_to_none=True)
        rate = passes * rows * length / (time.perf_counter() - start)
        log(f"  limit {rows} x {length}: {rate:.0f} tokens/s")
        if rate > best.get("tokens_per_s", 0):
            best = {"tokens_per_s": rate, "shape": [rows, length]}
    best["peak_rss_mb"] = peak_rss_mb()
    return best


COLUMNS = (
    "trainer",
    "mode",
    "micro_batch_size",
    "optimizer_steps",
    "tokens",
    "scored_tokens",
    "padding_tokens",
    "train_seconds",
    "tokens_per_s",
    "limit_tokens_per_s",
    "fraction_of_limit",
    "peak_rss_mb",
)


def format_row(row: dict[str, Any]) -> str:
    return " | ".join(
        f"{row[c]:.2f}" if isinstance(row[c], float) else str(row[c]) for c in COLUMNS
    )


def format_table(report: dict[str, Any]) -> str:
    lines = [" | ".join(COLUMNS), " | ".join("---" for _ in COLUMNS)]
    lines += [format_row(row) for row in report["results"]]
    return "\n".join(f"| {line} |" for line in lines)
