"""Run the IPR data pipeline for a config without an orchestrator.

Ingest -> per iteration: expert step rewards (once per run and scorer) -> explore ->
agent step rewards -> mine pairs. Training plugs in between iterations; until it
does, every iteration explores with the configured model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import ExitStack

import pandas as pd

from ipr_core.backends import PolicyBackend, make_backend
from ipr_core.config import RunConfig
from ipr_core.models import resolve_model
from ipr_core.pipeline import (
    agent_step_rewards,
    expert_step_rewards,
    explore_stage,
    ingest_gold,
    mine_stage,
)
from ipr_core.rollout import RolloutEngine
from ipr_core.store import Store

Log = Callable[[str], None]


def load_backend(spec: str, config: RunConfig) -> PolicyBackend:
    path = resolve_model(spec, config.cache_dir)
    return make_backend(path, kind=config.backend, max_batch_size=config.generation.max_batch_size)


def run_pipeline(config: RunConfig, log: Log = print) -> pd.DataFrame:
    """Run every iteration of `config`; returns the per-iteration summary table."""
    store = Store(config.store)
    store.write({"runs": [{"run_id": config.run_id, "config": config.model_dump_json()}]})
    experts = store.expert_trajectories(config.env, config.train_split, config.train_limit)
    if len(experts) < config.train_limit:
        report = ingest_gold(store, config.env, config.train_split, config.train_limit)
        log(f"ingested {report.written} expert trajectories ({len(report.rejected)} rejected)")
        experts = store.expert_trajectories(config.env, config.train_split, config.train_limit)
    log(f"{len(experts)} expert trajectories, {sum(len(e.steps) for e in experts)} steps")

    policy = load_backend(config.model, config)
    scorer = (
        policy if config.scorer_spec == config.model else load_backend(config.scorer_spec, config)
    )
    gen = config.generation
    with ExitStack() as stack:
        policy_engine = stack.enter_context(
            RolloutEngine(
                config.env, policy, gen.max_live_episodes, gen.max_new_tokens, config.max_steps
            )
        )
        scorer_engine = policy_engine
        if scorer is not policy:
            scorer_engine = stack.enter_context(
                RolloutEngine(
                    config.env, scorer, gen.max_live_episodes, gen.max_new_tokens, config.max_steps
                )
            )
        mc = config.monte_carlo
        for iteration in range(1, config.iterations + 1):
            started = time.perf_counter()
            seed = config.seed * 1000 + iteration
            n_expert = expert_step_rewards(
                store, config.run_id, scorer_engine, scorer.policy_id, experts,
                mc.n_samples, mc.temperature, config.seed,
            )  # fmt: skip
            log(f"iteration {iteration}: scored {n_expert} expert steps")
            explorations = explore_stage(
                store, config.run_id, iteration, policy_engine, experts, seed
            )
            log(f"iteration {iteration}: {len(explorations)} explorations")
            n_agent = agent_step_rewards(
                store, config.run_id, iteration, scorer_engine, scorer.policy_id,
                explorations, mc.n_samples, mc.temperature, seed,
            )  # fmt: skip
            log(f"iteration {iteration}: scored {n_agent} agent steps")
            pairs = mine_stage(
                store, config.run_id, iteration, scorer.policy_id, explorations,
                config.mining, policy_engine.action_hint, config.env,
            )  # fmt: skip
            log(
                f"iteration {iteration}: {len(pairs)} pairs in "
                f"{time.perf_counter() - started:.1f} s"
            )
    return iteration_summary(store, config.run_id)


def iteration_summary(store: Store, run_id: str) -> pd.DataFrame:
    """Per iteration: pairs by level, mean step rewards, rollout and token counts."""
    return store.query(
        """
        WITH r AS (
            SELECT iteration, count(*) AS rollouts,
                   count(*) FILTER (WHERE status IN ('env_error', 'generation_error', 'truncated'))
                       AS failed_rollouts,
                   sum(prefill_tokens) AS prefill_tokens,
                   sum(generated_tokens) AS generated_tokens,
                   sum(env_steps) AS env_steps
            FROM rollouts WHERE run_id = $run GROUP BY iteration),
        s AS (
            SELECT iteration,
                   avg(mean_reward) FILTER (WHERE actor = 'expert') AS expert_step_reward,
                   avg(mean_reward) FILTER (WHERE actor = 'agent') AS agent_step_reward
            FROM step_rewards WHERE run_id = $run GROUP BY iteration),
        p AS (
            SELECT iteration,
                   count(*) FILTER (WHERE level = 'trajectory') AS trajectory_pairs,
                   count(*) FILTER (WHERE level = 'step') AS step_pairs
            FROM pairs WHERE run_id = $run GROUP BY iteration)
        SELECT r.iteration, coalesce(p.trajectory_pairs, 0) AS trajectory_pairs,
               coalesce(p.step_pairs, 0) AS step_pairs,
               round(s.expert_step_reward, 3) AS expert_step_reward,
               round(s.agent_step_reward, 3) AS agent_step_reward,
               r.rollouts, r.failed_rollouts, r.prefill_tokens, r.generated_tokens, r.env_steps
        FROM r LEFT JOIN s USING (iteration) LEFT JOIN p USING (iteration)
        ORDER BY r.iteration
        """,
        {"run": run_id},
    )
