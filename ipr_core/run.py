"""Run IPR end to end for a config, without an orchestrator.

ingest -> SFT -> evaluate (base, SFT) -> per iteration: expert step rewards (once per
run and scorer) -> explore -> agent step rewards -> mine pairs -> mixture training ->
evaluate. The scorer and the DPO reference are the SFT model throughout; each
iteration's trained model explores the next. Every stage is idempotent: checkpoints
are content-addressed and skipped when complete, store writes are upserts.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pandas as pd

from ipr_core.backends import PolicyBackend, make_backend, release_engines
from ipr_core.config import RunConfig
from ipr_core.envs import make_env
from ipr_core.errors import InputError
from ipr_core.evaluate import Evaluation, evaluate
from ipr_core.models import resolve_model
from ipr_core.pipeline import (
    agent_step_rewards,
    expert_step_rewards,
    explore_stage,
    ingest_gold,
    mine_stage,
)
from ipr_core.progress import ProgressBar, ProgressFn
from ipr_core.prompts import PromptFormat
from ipr_core.rollout import RolloutEngine
from ipr_core.store import Store
from ipr_core.training.checkpoints import base_checkpoint, model_id, record_checkpoint
from ipr_core.training.data import load_pairs
from ipr_core.training.mixture import train_mixture
from ipr_core.training.reward_model import RewardModelScorer
from ipr_core.training.sft import train_sft
from ipr_core.types import Trajectory

Log = Callable[[str], None]

BASE_ITERATION = -1
"""Evaluations of the base model are stored as iteration -1; the SFT model is iteration 0."""


def load_backend(path: Path, config: RunConfig) -> PolicyBackend:
    """A backend whose policy id is the model's content id (stable across runs)."""
    return make_backend(
        path, kind=config.backend, policy_id=model_id(path), **backend_options(path, config)
    )


def backend_options(path: Path, config: RunConfig) -> dict[str, Any]:
    """The settings of the configured backend kind."""
    if config.backend == "vllm":
        return {"settings": config.vllm, "enable_lora": config.lora_rank is not None}
    if config.backend == "openai":
        assert config.openai is not None  # the config validates it
        base = resolve_model(config.model, config.cache_dir)
        served = config.openai.model if path.resolve() == base.resolve() else None
        return {"settings": config.openai, "served_model": served}
    return {"max_batch_size": config.generation.max_batch_size}


def open_engine(
    stack: ExitStack, backend: PolicyBackend, config: RunConfig, progress: ProgressFn | None = None
) -> RolloutEngine:
    gen = config.generation
    engine = RolloutEngine(
        config.env,
        backend,
        gen.max_live_episodes,
        gen.max_new_tokens,
        config.max_steps,
        config.step_timeout_s,
        progress,
        config.prompt.history_window,
    )
    return stack.enter_context(engine)


def action_hint(env_id: str) -> str:
    env = make_env(env_id)
    try:
        return env.action_hint
    finally:
        env.close()


def prompt_format(config: RunConfig) -> PromptFormat:
    """The prompt every stage of `config` builds."""
    return PromptFormat(action_hint(config.env), config.prompt.history_window)


def ensure_experts(store: Store, config: RunConfig, log: Log) -> list[Trajectory]:
    experts = store.expert_trajectories(config.env, config.train_split, config.train_limit)
    if len(experts) < config.train_limit:
        report = ingest_gold(store, config.env, config.train_split, config.train_limit)
        log(f"ingested {report.written} expert trajectories ({len(report.rejected)} rejected)")
        experts = store.expert_trajectories(config.env, config.train_split, config.train_limit)
    log(f"{len(experts)} expert trajectories, {sum(len(e.steps) for e in experts)} steps")
    return experts


def evaluate_model(
    store: Store,
    config: RunConfig,
    path: Path,
    iteration: int,
    log: Log,
    progress_bar: Callable[[str], ProgressFn] | None = None,
) -> Evaluation:
    """Greedy episodes on the dev split; `progress_bar(label)` makes the progress display
    (default: a terminal bar plus lines through `log`)."""
    label = f"evaluate[{iteration}]"
    progress = progress_bar(label) if progress_bar else ProgressBar(label, log)
    with ExitStack() as stack:
        engine = open_engine(stack, load_backend(path, config), config, progress)
        result = evaluate(
            store, config.run_id, iteration, engine, config.dev_split, config.dev_limit, config.seed
        )
    log(
        f"iteration {iteration}: {config.dev_split} reward {result.avg_reward}, "
        f"success {result.success_rate}, steps {result.avg_steps} ({result.policy_id})"
    )
    return result


def run_pipeline(config: RunConfig, log: Log = print) -> pd.DataFrame:
    """Run every stage of `config`; returns the per-iteration summary table."""
    store = Store(config.store)
    store.write({"runs": [{"run_id": config.run_id, "config": config.model_dump_json()}]})
    experts = ensure_experts(store, config, log)
    prompt = prompt_format(config)

    base_path = resolve_model(config.model, config.cache_dir)
    record_checkpoint(store, base_checkpoint(base_path), config.run_id)
    sft_path = base_path
    if config.sft is not None:
        if config.evaluate_base:
            evaluate_model(store, config, base_path, BASE_ITERATION, log)
        release_engines()
        sft = train_sft(
            base_path, experts, prompt, config.sft, config.checkpoints_dir, config.compute
        )
        record_checkpoint(store, sft, config.run_id, iteration=0)
        log(f"SFT checkpoint {sft.checkpoint_id} ({sft.summary()})")
        sft_path = sft.path
    evaluate_model(store, config, sft_path, 0, log)

    mixture = config.mixture_settings
    if mixture is None:  # the `sft` row of the paper: no iterations
        return iteration_summary(store, config.run_id, config.dev_split)
    policy_path = sft_path
    for iteration in range(1, config.iterations + 1):
        started = time.perf_counter()
        run_iteration(store, config, experts, prompt, sft_path, policy_path, iteration, log)
        pairs = load_pairs(store, config.run_id, iteration)
        release_engines()
        trained = train_mixture(
            sft_path,
            pairs,
            mixture,
            config.checkpoints_dir,
            parent_path=policy_path if iteration > 1 else None,
            compute=config.compute,
        )
        record_checkpoint(store, trained, config.run_id, iteration)
        log(f"iteration {iteration}: mixture {trained.checkpoint_id} ({trained.summary()})")
        policy_path = trained.path
        evaluate_model(store, config, policy_path, iteration, log)
        log(f"iteration {iteration} done in {time.perf_counter() - started:.0f} s")
    return iteration_summary(store, config.run_id, config.dev_split)


def run_iteration(
    store: Store,
    config: RunConfig,
    experts: list[Trajectory],
    prompt: PromptFormat,
    scorer_path: Path,
    policy_path: Path,
    iteration: int,
    log: Log,
) -> None:
    """The data half of an iteration: step rewards, exploration and pairs in the store."""
    mc = config.monte_carlo
    seed = config.seed * 1000 + iteration
    with ExitStack() as stack:
        scorer = load_backend(scorer_path, config)
        progress = ProgressBar(f"iteration {iteration}", log)
        scorer_engine = open_engine(stack, scorer, config, progress)
        policy_engine = scorer_engine
        if policy_path != scorer_path:
            policy = load_backend(policy_path, config)
            policy_engine = open_engine(stack, policy, config, progress)
        scorer_id, reward_model = step_scorer(config, scorer.policy_id)
        n_expert = expert_step_rewards(
            store, config.run_id, scorer_engine, scorer_id, experts,
            mc.n_samples, mc.temperature, config.seed, reward_model,
        )  # fmt: skip
        log(f"iteration {iteration}: scored {n_expert} expert steps")
        explorations = explore_stage(store, config.run_id, iteration, policy_engine, experts, seed)
        log(f"iteration {iteration}: {len(explorations)} explorations")
        n_agent = agent_step_rewards(
            store, config.run_id, iteration, scorer_engine, scorer_id,
            explorations, mc.n_samples, mc.temperature, seed, reward_model,
        )  # fmt: skip
        log(f"iteration {iteration}: scored {n_agent} agent steps")
        pairs = mine_stage(
            store, config.run_id, iteration, scorer_id, explorations,
            config.mining, prompt, config.env,
        )  # fmt: skip
        log(f"iteration {iteration}: {len(pairs)} pairs")


def step_scorer(config: RunConfig, mc_scorer_id: str) -> tuple[str, RewardModelScorer | None]:
    """Who scores steps: the config's step reward model, else MC with the SFT model."""
    if config.step_reward_model is None:
        return windowed_scorer_id(config, mc_scorer_id), None
    path = Path(config.step_reward_model)
    if not path.is_dir():
        raise InputError(str(path), "no reward model folder here", field="step_reward_model")
    return windowed_scorer_id(config, model_id(path)), RewardModelScorer(path)


def windowed_scorer_id(config: RunConfig, scorer_model_id: str) -> str:
    """Step rewards are stored under the scorer's model id and the history window it read
    its prompts with, so rewards scored with another window are never reused."""
    window = config.prompt.history_window
    return scorer_model_id if window is None else f"{scorer_model_id}+history{window}"


def iteration_summary(store: Store, run_id: str, dev_split: str = "dev") -> pd.DataFrame:
    """Per iteration (-1 base, 0 SFT and expert scoring, k >= 1 IPR): pairs by level, mean
    step rewards, dev metrics, rollout and token counts."""
    return store.query(
        """
        WITH r AS (
            SELECT iteration, count(*) AS rollouts,
                   count(*) FILTER (WHERE status IN ('env_error', 'generation_error', 'truncated'))
                       AS failed_rollouts,
                   sum(prefill_tokens) AS prefill_tokens,
                   sum(generated_tokens) AS generated_tokens
            FROM rollouts WHERE run_id = $run AND kind <> 'eval' GROUP BY iteration),
        s AS (
            SELECT iteration,
                   avg(mean_reward) FILTER (WHERE actor = 'expert') AS expert_step_reward,
                   avg(mean_reward) FILTER (WHERE actor = 'agent') AS agent_step_reward
            FROM step_rewards WHERE run_id = $run GROUP BY iteration),
        p AS (
            SELECT iteration,
                   count(*) FILTER (WHERE level = 'trajectory') AS trajectory_pairs,
                   count(*) FILTER (WHERE level = 'step') AS step_pairs
            FROM pairs WHERE run_id = $run GROUP BY iteration),
        e AS (
            SELECT iteration, avg_reward AS dev_reward, success_rate, avg_steps
            FROM evaluations WHERE run_id = $run AND split = $dev)
        SELECT iteration, coalesce(p.trajectory_pairs, 0) AS trajectory_pairs,
               coalesce(p.step_pairs, 0) AS step_pairs,
               round(s.expert_step_reward, 3) AS expert_step_reward,
               round(s.agent_step_reward, 3) AS agent_step_reward,
               round(e.dev_reward, 3) AS dev_reward, round(e.success_rate, 3) AS success_rate,
               round(e.avg_steps, 2) AS avg_steps,
               coalesce(r.rollouts, 0) AS rollouts, coalesce(r.failed_rollouts, 0) AS failed,
               r.prefill_tokens, r.generated_tokens
        FROM e FULL JOIN r USING (iteration) FULL JOIN s USING (iteration)
             FULL JOIN p USING (iteration)
        ORDER BY iteration
        """,
        {"run": run_id, "dev": dev_split},
    )
