"""One thin Prefect task per IPR stage, each calling the ipr_core function of that stage.

Tasks exchange paths, ids and small dicts; the data stays in the DuckDB store and in
content-addressed checkpoint folders. Every cached task's key is
`TASK_SOURCE + <stage key>`, where the stage key hashes exactly what the stage reads
(see `tasks.keys`). A cached result is only trusted while its output is still in the
store: `still_valid(task, config, result)` checks that, and the flow recomputes the stage
(`refresh_cache=True`) when the store was deleted or rolled back.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE, TASK_SOURCE, CacheKeyFnPolicy, CachePolicy

from ipr_core import pipeline, run
from ipr_core.backends import release_engines
from ipr_core.config import RunConfig
from ipr_core.models import resolve_model
from ipr_core.store import Store
from ipr_core.training.checkpoints import (
    COMPLETE_MARKER,
    base_checkpoint,
    model_id,
    record_checkpoint,
)
from ipr_core.training.data import load_pairs
from ipr_core.training.mixture import train_mixture as _train_mixture
from ipr_core.training.sft import train_sft as _train_sft
from tasks import keys
from tasks.progress import StageProgress

F = TypeVar("F", bound=Callable[..., Any])
SHARED = keys.STORE_SHARED
ROLLOUT = keys.ROLLOUT_FIELDS


class StageFailed(RuntimeError):
    """A stage's error, named by stage, run and iteration, with the cause chained."""


def stage(name: str) -> Callable[[F], F]:
    """Log and re-raise a stage's failure as one line naming the stage and the cause."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                config = kwargs.get("config", args[0] if args else None)
                where = f"run {getattr(config, 'run_id', '?')!r}"
                if "iteration" in kwargs:
                    where += f", iteration {kwargs['iteration']}"
                message = f"stage {name!r} failed ({where}): {type(exc).__name__}: {exc}"
                get_run_logger().error(message)
                raise StageFailed(message) from exc

        return wrapper  # type: ignore[return-value]

    return wrap


def _key(fn: Callable[..., str]) -> CachePolicy:
    """TASK_SOURCE plus a content key computed from the task's parameters."""
    return TASK_SOURCE + CacheKeyFnPolicy(cache_key_fn=lambda _ctx, params: fn(**params))


def _log(message: str) -> None:
    get_run_logger().info(message)


def _experts(config: RunConfig):
    return Store(config.store).expert_trajectories(
        config.env, config.train_split, config.train_limit
    )


# -- run set-up (not cached: cheap, and it records the run's config) -------------------------
@task(name="prepare", cache_policy=NO_CACHE)
@stage("prepare")
def prepare(config: RunConfig) -> str:
    """Record the run, resolve the base model (built once into the cache); its path."""
    store = Store(config.store)
    store.write({"runs": [{"run_id": config.run_id, "config": config.model_dump_json()}]})
    base = resolve_model(config.model, config.cache_dir)
    record_checkpoint(store, base_checkpoint(base), config.run_id)
    return str(base)


# -- ingest --------------------------------------------------------------------------------
def _ingest_key(config: RunConfig) -> str:
    return keys.digest("ingest", keys.config_fields(config, "store", "env", "train_split",
                                                    "train_limit"))  # fmt: skip


@task(name="ingest", cache_policy=_key(_ingest_key))
@stage("ingest")
def ingest(config: RunConfig) -> dict[str, Any]:
    experts = run.ensure_experts(Store(config.store), config, _log)
    return {
        "experts": len(experts),
        "steps": sum(len(e.steps) for e in experts),
        "experts_hash": keys.experts_hash(config),
    }


# -- SFT -----------------------------------------------------------------------------------
def _sft_key(config: RunConfig, base_path: str) -> str:
    return keys.digest(
        "sft", keys.model_key(base_path), keys.experts_hash(config),
        keys.config_fields(
            config, "env", "sft", "prompt", "cache_dir", "train_split", "train_limit"
        ),
    )  # fmt: skip


# Training tasks do not turn prints into logs: `datasets` (through dill) reads `dis` output
# by capturing stdout, which Prefect's print patching would send to the log instead.
@task(name="sft", cache_policy=_key(_sft_key), log_prints=False)
@stage("sft")
def sft(config: RunConfig, base_path: str) -> dict[str, Any]:
    assert config.sft is not None
    release_engines()
    result = _train_sft(
        Path(base_path), _experts(config), run.prompt_format(config), config.sft,
        config.checkpoints_dir, config.compute,
    )  # fmt: skip
    record_checkpoint(Store(config.store), result, config.run_id, iteration=0)
    _log(f"SFT checkpoint {result.checkpoint_id} ({result.summary()})")
    return {"path": str(result.path), "checkpoint_id": result.checkpoint_id}


# -- evaluation ----------------------------------------------------------------------------
def _evaluate_key(config: RunConfig, model_path: str, iteration: int) -> str:
    return keys.digest(
        "evaluate", keys.model_key(model_path), iteration,
        keys.config_fields(config, *SHARED, *ROLLOUT, "dev_split", "dev_limit", "seed"),
    )  # fmt: skip


@task(name="evaluate", cache_policy=_key(_evaluate_key), task_run_name="evaluate[{iteration}]")
@stage("evaluate")
def evaluate(config: RunConfig, model_path: str, iteration: int) -> dict[str, Any]:
    result = run.evaluate_model(
        Store(config.store), config, Path(model_path), iteration, _log, StageProgress
    )
    return asdict(result)


# -- Monte Carlo step rewards of the expert steps (once per run and scorer) -----------------
def _expert_rewards_key(config: RunConfig, scorer_path: str) -> str:
    return keys.digest(
        "expert_step_rewards", keys.model_key(scorer_path), keys.experts_hash(config),
        keys.config_fields(config, *SHARED, *ROLLOUT, "monte_carlo", "seed"),
        _reward_model_key(config),
    )  # fmt: skip


def _reward_model_key(config: RunConfig) -> str | None:
    return (
        None if config.step_reward_model is None else keys.model_key(str(config.step_reward_model))
    )


@task(name="expert-step-rewards", cache_policy=_key(_expert_rewards_key))
@stage("expert step rewards")
def expert_step_rewards(config: RunConfig, scorer_path: str) -> dict[str, Any]:
    store, mc = Store(config.store), config.monte_carlo
    experts = _experts(config)
    with ExitStack() as stack:
        scorer = run.load_backend(Path(scorer_path), config)
        engine = run.open_engine(stack, scorer, config, StageProgress("expert step rewards"))
        scorer_id, reward_model = run.step_scorer(config, scorer.policy_id)
        computed = pipeline.expert_step_rewards(
            store, config.run_id, engine, scorer_id, experts,
            mc.n_samples, mc.temperature, config.seed, reward_model,
        )  # fmt: skip
    _log(f"scored {computed} expert steps ({sum(len(e.steps) for e in experts)} in all)")
    return {"computed": computed, "scored": sum(len(e.steps) for e in experts)}


# -- exploration ---------------------------------------------------------------------------
def iteration_seed(config: RunConfig, iteration: int) -> int:
    """The seed `ipr_core.run.run_iteration` uses for an iteration's sampling."""
    return config.seed * 1000 + iteration


def _explore_key(config: RunConfig, policy_path: str, iteration: int) -> str:
    return keys.digest(
        "explore", keys.model_key(policy_path), keys.experts_hash(config), iteration,
        keys.config_fields(config, *SHARED, *ROLLOUT, "seed"),
    )  # fmt: skip


@task(name="explore", cache_policy=_key(_explore_key), task_run_name="explore[{iteration}]")
@stage("explore")
def explore(config: RunConfig, policy_path: str, iteration: int) -> dict[str, Any]:
    with ExitStack() as stack:
        policy = run.load_backend(Path(policy_path), config)
        engine = run.open_engine(stack, policy, config, StageProgress(f"explore[{iteration}]"))
        explorations = pipeline.explore_stage(
            Store(config.store), config.run_id, iteration, engine, _experts(config),
            iteration_seed(config, iteration),
        )  # fmt: skip
    _log(f"iteration {iteration}: {len(explorations)} explorations")
    return {"explorations": len(explorations), "policy_id": engine.backend.policy_id}


# -- Monte Carlo step rewards of the agent's own first actions -----------------------------
def _agent_rewards_key(config: RunConfig, scorer_path: str, iteration: int) -> str:
    return keys.digest(
        "agent_step_rewards", keys.model_key(scorer_path), keys.experts_hash(config),
        keys.explorations_hash(config, iteration), iteration,
        keys.config_fields(config, *SHARED, *ROLLOUT, "monte_carlo", "seed"),
        _reward_model_key(config),
    )  # fmt: skip


@task(
    name="agent-step-rewards",
    cache_policy=_key(_agent_rewards_key),
    task_run_name="agent-step-rewards[{iteration}]",
)
@stage("agent step rewards")
def agent_step_rewards(config: RunConfig, scorer_path: str, iteration: int) -> dict[str, Any]:
    store, mc = Store(config.store), config.monte_carlo
    explorations = pipeline.load_explorations(store, config.run_id, iteration, _experts(config))
    with ExitStack() as stack:
        scorer = run.load_backend(Path(scorer_path), config)
        progress = StageProgress(f"agent step rewards[{iteration}]")
        engine = run.open_engine(stack, scorer, config, progress)
        scorer_id, reward_model = run.step_scorer(config, scorer.policy_id)
        queries = pipeline.agent_step_rewards(
            store, config.run_id, iteration, engine, scorer_id, explorations,
            mc.n_samples, mc.temperature, iteration_seed(config, iteration), reward_model,
        )  # fmt: skip
    _log(f"iteration {iteration}: scored {queries} agent steps")
    return {"queries": queries, "scorer_id": scorer_id}


# -- pairs ---------------------------------------------------------------------------------
def _mine_key(config: RunConfig, scorer_id: str, iteration: int) -> str:
    return keys.digest(
        "mine_pairs", scorer_id, iteration, keys.experts_hash(config),
        keys.explorations_hash(config, iteration),
        keys.step_rewards_hash(config, scorer_id, pipeline.EXPERT_ITERATION, "expert"),
        keys.step_rewards_hash(config, scorer_id, iteration, "agent"),
        keys.config_fields(config, *SHARED, "mining", "prompt"),
    )  # fmt: skip


@task(name="mine-pairs", cache_policy=_key(_mine_key), task_run_name="mine-pairs[{iteration}]")
@stage("mine pairs")
def mine_pairs(config: RunConfig, scorer_id: str, iteration: int) -> dict[str, Any]:
    store = Store(config.store)
    explorations = pipeline.load_explorations(store, config.run_id, iteration, _experts(config))
    pairs = pipeline.mine_stage(
        store, config.run_id, iteration, scorer_id, explorations, config.mining,
        run.prompt_format(config), config.env,
    )  # fmt: skip
    counts = {"trajectory": 0, "step": 0}
    for pair in pairs:
        counts[pair.level] += 1
    _log(f"iteration {iteration}: {counts['trajectory']} trajectory, {counts['step']} step pairs")
    return counts


# -- mixture training ----------------------------------------------------------------------
def _mixture_key(config: RunConfig, sft_path: str, policy_path: str | None, iteration: int) -> str:
    settings = config.mixture_settings
    return keys.digest(
        "train_mixture", keys.model_key(sft_path), keys.model_key(policy_path),
        keys.pairs_hash(config, iteration), iteration,
        None if settings is None else settings.model_dump(mode="json"),
        keys.config_fields(config, "cache_dir", "run_id", "store"),
    )  # fmt: skip


@task(
    name="train-mixture",
    cache_policy=_key(_mixture_key),
    task_run_name="train-mixture[{iteration}]",
    log_prints=False,
)
@stage("mixture training")
def train_mixture(
    config: RunConfig, sft_path: str, policy_path: str | None, iteration: int
) -> dict[str, Any]:
    """o-DPO + s-DPO + SFT on the iteration's pairs; `policy_path` None trains from SFT."""
    settings = config.mixture_settings
    assert settings is not None
    store = Store(config.store)
    release_engines()
    result = _train_mixture(
        Path(sft_path), load_pairs(store, config.run_id, iteration), settings,
        config.checkpoints_dir, parent_path=None if policy_path is None else Path(policy_path),
        compute=config.compute,
    )  # fmt: skip
    record_checkpoint(store, result, config.run_id, iteration)
    _log(f"mixture checkpoint {result.checkpoint_id} ({result.summary()})")
    return {"path": str(result.path), "checkpoint_id": result.checkpoint_id}


# -- is a cached result still backed by the store? -----------------------------------------
def _count(config: RunConfig, table: str, where: str, params: list[Any]) -> int:
    return Store(config.store).count(table, where, params)


def _checkpoint_ok(config: RunConfig, result: dict[str, Any]) -> bool:
    folder = Path(result["path"]).parent
    recorded = _count(config, "checkpoints", "checkpoint_id = ?", [result["checkpoint_id"]])
    return (folder / COMPLETE_MARKER).exists() and recorded == 1


def _valid_evaluation(config: RunConfig, r: dict[str, Any]) -> bool:
    where = "run_id = ? AND iteration = ? AND split = ? AND policy_id = ?"
    params = [config.run_id, r["iteration"], r["split"], r["policy_id"]]
    return _count(config, "evaluations", where, params) == 1


def _valid_expert_rewards(config: RunConfig, r: dict[str, Any]) -> bool:
    where = "run_id = ? AND iteration = ? AND actor = 'expert'"
    n = _count(config, "step_rewards", where, [config.run_id, pipeline.EXPERT_ITERATION])
    return n >= r["scored"]


def _valid_explore(config: RunConfig, r: dict[str, Any], iteration: int) -> bool:
    where = "run_id = ? AND iteration = ? AND kind = 'explore' AND policy_id = ?"
    return (
        _count(config, "rollouts", where, [config.run_id, iteration, r["policy_id"]])
        == r["explorations"]
    )


def _valid_agent_rewards(config: RunConfig, r: dict[str, Any], iteration: int) -> bool:
    where = "run_id = ? AND scorer_id = ? AND iteration = ? AND actor = 'agent'"
    n = _count(config, "step_rewards", where, [config.run_id, r["scorer_id"], iteration])
    return n >= r["queries"]


def _valid_pairs(config: RunConfig, r: dict[str, Any], iteration: int) -> bool:
    where = "run_id = ? AND iteration = ? AND level = ?"
    return all(
        _count(config, "pairs", where, [config.run_id, iteration, level]) == n
        for level, n in r.items()
    )


VALIDATORS: dict[str, Callable[..., bool]] = {
    "ingest": lambda config, r, **_: keys.experts_hash(config) == r["experts_hash"],
    "sft": lambda config, r, **_: _checkpoint_ok(config, r),
    "evaluate": lambda config, r, **_: _valid_evaluation(config, r),
    "expert-step-rewards": lambda config, r, **_: _valid_expert_rewards(config, r),
    "explore": lambda config, r, iteration, **_: _valid_explore(config, r, iteration),
    "agent-step-rewards": lambda config, r, iteration, **_: _valid_agent_rewards(
        config, r, iteration
    ),
    "mine-pairs": lambda config, r, iteration, **_: _valid_pairs(config, r, iteration),
    "train-mixture": lambda config, r, **_: _checkpoint_ok(config, r),
}


def still_valid(task_name: str, config: RunConfig, result: Any, **params: Any) -> bool:
    """Whether a cached result's output is still in the store and checkpoint folders."""
    check = VALIDATORS.get(task_name)
    return check is None or bool(check(config, result, **params))


__all__ = [
    "StageFailed",
    "agent_step_rewards",
    "evaluate",
    "expert_step_rewards",
    "explore",
    "ingest",
    "mine_pairs",
    "model_id",
    "prepare",
    "sft",
    "still_valid",
    "train_mixture",
]
