"""What every stage of a run shares: the config, the store, engines, the scorer and seeds.

A `RunContext` is built once per entry point (`ipr run`, the Prefect flow, an experiment
run) and handed to every stage, so a stage's signature is `(context, iteration)` and the
rules below (which seed an iteration samples with, who scores steps, which prompt the
stages build) exist once. `Engines` is the part a worker needs without the store: a
Parquet shard worker builds one from the config alone.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from ipr_core.agent.prompts import PromptFormat
from ipr_core.config import RunConfig
from ipr_core.engine.backends import PolicyBackend, make_backend
from ipr_core.engine.models import resolve_model
from ipr_core.engine.progress import ProgressBar, ProgressFn
from ipr_core.engine.rollout import EpisodeConfig, RolloutEngine, RolloutResult
from ipr_core.envs import make_env
from ipr_core.errors import InputError, IprError, SplitTooSmall
from ipr_core.method.mining import PairContext, pair_decided
from ipr_core.method.step_rewards import (
    StepQuery,
    StepReward,
    StepRewardModel,
    estimate_step_rewards,
    predict_step_rewards,
)
from ipr_core.run.costs import ADDED_UP, Meter, rollout_counts
from ipr_core.store.store import At, Row, Scope, StageRecord, Store, step_reward_rows
from ipr_core.training.checkpoints import model_id
from ipr_core.training.reward_model import RewardModelScorer
from ipr_core.types import EXPERT_ITERATION, Actor, Trajectory

Log = Callable[[str], None]
ProgressFactory = Callable[[str], ProgressFn]
"""Makes the progress display of a stage from its label."""

EXPERT_SEED = 0
"""The sampling seed of the expert steps' Monte Carlo rollouts, the same for every run: the
scorer (the SFT model) and the expert steps decide what they estimate, so the runs of an
experiment, whatever their seed, compare against one estimate, sampled once and copied."""


class MissingConfig(IprError):
    """A stage needs a config section the run does not have (e.g. `openai`, `mixture`)."""


@dataclass(frozen=True)
class StepScorer:
    """Who scores steps: `scorer_id` names the rows; `reward_model` replaces Monte Carlo."""

    scorer_id: str
    reward_model: StepRewardModel | None


@dataclass(frozen=True)
class ScoringJob:
    """The step rewards one stage asks for: where its rows go, whose steps, the scorer
    model, the queries and the sampling seed."""

    at: At
    actor: Actor
    scorer_path: Path
    queries: tuple[StepQuery, ...]
    seed: int
    iteration: int
    """The loop iteration asking (expert rows go under `at`: iteration 0 whoever asks, or the
    asking iteration with `monte_carlo.expert_steps: compared`)."""
    pairs: tuple[PairContext, ...] | None = None
    """One per query when Monte Carlo may stop early (`monte_carlo.early_stop`)."""


StepRewardsAndSamples = tuple[list[StepReward], list[list[RolloutResult]]]
StepRows = dict[str, list[Row]]
"""`step_rewards` rows and the `rollouts` rows (kind 'mc') behind them."""


class ScoringRunner(Protocol):
    """Computes a scoring job's rows: in this process, or in Parquet shards."""

    def __call__(self, engines: Engines, job: ScoringJob, label: str) -> StepRows: ...


class Engines:
    """Backends, rollout engines and split task ids of one config; needs no store."""

    def __init__(self, config: RunConfig, progress: ProgressFactory | None = None):
        self.config = config
        self.progress = progress
        self._task_ids: dict[str, tuple[str, ...]] = {}

    def task_ids(self, split: str) -> tuple[str, ...]:
        """A split's task ids (an env is started once per split)."""
        if split not in self._task_ids:
            env = make_env(self.config.env)
            try:
                self._task_ids[split] = tuple(env.task_ids(split))
            finally:
                env.close()
        return self._task_ids[split]

    def first_tasks(self, split: str, limit: int, setting: str) -> tuple[str, ...]:
        """The first `limit` distinct games of a split; more than it has is an error naming
        `setting` (the config field asking), never a silent repeat or a shorter list."""
        task_ids = self.task_ids(split)
        if limit > len(task_ids):
            raise SplitTooSmall(
                f"{self.config.env}: split {split!r} has {len(task_ids)} distinct games; "
                f"{setting} asks for {limit}"
            )
        return task_ids[:limit]

    def backend(self, path: Path) -> PolicyBackend:
        """A backend whose policy id is the model's content id (stable across runs)."""
        return make_backend(
            path, kind=self.config.backend, policy_id=model_id(path), **self.backend_options(path)
        )

    def backend_options(self, path: Path) -> dict[str, Any]:
        config = self.config
        if config.backend == "vllm":
            return {"settings": config.vllm, "enable_lora": config.lora_rank is not None}
        if config.backend == "openai":
            if config.openai is None:
                raise MissingConfig("backend 'openai' needs the `openai` settings")
            base = resolve_model(config.model, config.cache_dir)
            served = config.openai.model if path.resolve() == base.resolve() else None
            return {"settings": config.openai, "served_model": served}
        gen = config.generation
        return {
            "max_batch_size": gen.max_batch_size,
            "prefill_dtype": gen.prefill_dtype,
            "decode_dtype": gen.decode_dtype,
            "decode_attention": gen.decode_attention,
        }

    def engine(self, stack: ExitStack, path: Path, label: str | None = None) -> RolloutEngine:
        """A rollout engine on the model at `path`, closed with `stack`."""
        return self.open(stack, self.backend(path), label)

    def open(
        self, stack: ExitStack, backend: PolicyBackend, label: str | None = None
    ) -> RolloutEngine:
        gen, config = self.config.generation, self.config
        progress = self.progress(label) if self.progress and label else None
        settings = EpisodeConfig(
            max_live=gen.max_live_episodes,
            max_new_tokens=gen.max_new_tokens,
            max_steps=config.max_steps,
            step_timeout_s=config.step_timeout_s,
            history_window=config.prompt.history_window,
        )
        engine = RolloutEngine(config.env, backend, settings, progress)
        return stack.enter_context(engine)

    def uses_reward_model(self, iteration: int) -> bool:
        """Whether the step reward model (not MC) scores the steps of loop iteration k."""
        config = self.config
        return config.step_reward_model is not None and iteration >= config.step_reward_model_from

    def scorer_id(self, scorer_path: Path, iteration: int) -> str:
        """The id step rewards are stored under, read without loading a model."""
        if self.uses_reward_model(iteration):
            assert self.config.step_reward_model is not None
            return self.windowed(model_id(Path(self.config.step_reward_model)))
        return self.windowed(model_id(scorer_path))

    def scorer(self, scorer_path: Path, iteration: int) -> StepScorer:
        """Who scores iteration k's steps: the step reward model, else MC with `scorer_path`."""
        if not self.uses_reward_model(iteration):
            return StepScorer(self.scorer_id(scorer_path, iteration), None)
        path = Path(self.config.step_reward_model or "")
        if not path.is_dir():
            raise InputError(str(path), "no reward model folder here", field="step_reward_model")
        return StepScorer(self.scorer_id(scorer_path, iteration), RewardModelScorer(path))

    def windowed(self, scorer_model_id: str) -> str:
        """Step rewards are stored under the scorer's model id and the history window it read
        its prompts with, so rewards scored with another window are never reused."""
        window = self.config.prompt.history_window
        return scorer_model_id if window is None else f"{scorer_model_id}+history{window}"


def score_in_process(engines: Engines, job: ScoringJob, label: str | None = None) -> StepRows:
    """MC estimates (or the step reward model's predictions) in this process."""
    scorer = engines.scorer(job.scorer_path, job.iteration)
    with ExitStack() as stack:
        engine = engines.engine(stack, job.scorer_path, label)
        rewards, rollouts = score_steps(
            engine, job.queries, scorer, engines.config, job.seed, job.pairs
        )
    return step_reward_rows(job.at, engines.config.env, scorer.scorer_id, rewards, rollouts)


def score_steps(
    engine: RolloutEngine,
    queries: Sequence[StepQuery],
    scorer: StepScorer,
    config: RunConfig,
    seed: int,
    pairs: Sequence[PairContext] | None = None,
) -> StepRewardsAndSamples:
    """MC estimates (stopping early where the job carries pair contexts), or the step
    reward model's predictions when there is one."""
    if scorer.reward_model is not None:
        return predict_step_rewards(engine, scorer.reward_model, queries)
    mc = config.monte_carlo
    stops = None
    if pairs is not None:
        stops = [functools.partial(pair_decided, pair, config.mining) for pair in pairs]
    return estimate_step_rewards(engine, queries, mc.n_samples, mc.temperature, seed, stops)


@dataclass
class Chunks:
    """The chunks a long stage has committed (`Stage.chunk_scopes`, `loop.run_stage`): its
    rows go to the store as they are computed, with a partial record of what they cost, so
    a stage killed after hours resumes from its last chunk. `earlier`: what the attempts
    before this one committed (their seconds and rollout counts, and `units` of work)."""

    store: Store
    partial: StageRecord
    earlier: dict[str, float]
    meter: Meter
    """The stage's own meter: this attempt's seconds."""
    stale: list[Scope] = field(default_factory=list)
    """Deleted with the first chunk of an attempt that starts afresh."""
    counted: dict[str, int] = field(default_factory=dict)
    """This attempt's committed rollouts: how many, their tokens and env steps."""
    units: int = 0

    def save(self, rows: dict[str, list[Row]], units: int) -> None:
        """Commit a chunk of the stage's rows; `units`: the work it finished (e.g. queries)."""
        for key, value in rollout_counts(rows.get("rollouts", [])).items():
            self.counted[key] = self.counted.get(key, 0) + value
        self.units += units
        seconds = self.meter.figures()  # wall and CPU seconds of this attempt so far
        total = {key: value + (seconds.get(key) or 0) for key, value in self.added().items()}
        self.partial = replace(self.partial, result={**total, "units": self.done_units})
        self.store.save_chunk(self.partial, rows, self.stale)
        self.stale = []

    @property
    def resumed(self) -> bool:
        """Whether an earlier attempt with the same inputs committed chunks."""
        return bool(self.earlier)

    @property
    def done_units(self) -> int:
        """The units committed by every attempt so far."""
        return int(self.earlier.get("units", 0)) + self.units

    def added(self) -> dict[str, float]:
        """What the stage's cost adds to this attempt's measured seconds: the earlier
        attempts' figures and this attempt's committed rollouts."""
        return {k: self.earlier.get(k, 0) + self.counted.get(k, 0) for k in ADDED_UP}


@dataclass
class RunContext:
    """One run's shared objects; stages take it with the `Iteration` they work on."""

    config: RunConfig
    store: Store
    log: Log = print
    progress: ProgressFactory | None = None
    """Default: a terminal bar plus lines through `log`."""
    scoring: ScoringRunner = score_in_process
    allow_manifest_change: bool = False
    """Resume a run whose packages, model, splits or prompt changed (`ipr_core.run.manifest`)."""
    chunks: Chunks | None = None
    """Set by `loop.run_stage` while a stage that commits in chunks computes."""
    engines: Engines = field(init=False)

    def __post_init__(self) -> None:
        self.engines = Engines(self.config, self.progress or self._bar)

    def _bar(self, label: str) -> ProgressFn:
        return ProgressBar(label, self.log)

    @property
    def run_id(self) -> str:
        return self.config.run_id

    def score(self, job: ScoringJob, label: str) -> StepRows:
        return self.scoring(self.engines, job, label)

    def seed(self, iteration: int) -> int:
        """The sampling seed of an iteration: `EXPERT_SEED` for the expert steps (whichever
        iteration scores them), `seed * 1000 + k` for iteration k's agent steps."""
        if iteration == EXPERT_ITERATION:
            return EXPERT_SEED
        return self.config.seed * 1000 + iteration

    def experts(self) -> list[Trajectory]:
        """The expert trajectories SFT trains on: all the store holds for the train split,
        or where it holds more than `train_limit`, `select_experts` (which starts an env
        for the split's order)."""
        config = self.config
        stored = self.store.expert_trajectories(config.env, config.train_split)
        if len(stored) <= config.train_limit:
            return stored
        split = self.engines.task_ids(config.train_split)
        return select_experts(stored, split, config.train_limit)

    def explored(self) -> list[Trajectory]:
        """The experts exploration starts from (and whose steps are scored)."""
        return self.experts()[: self.config.explore_limit]

    @functools.cached_property
    def prompt(self) -> PromptFormat:
        """The prompt every stage builds, with the action hint the expert rows carry (an
        env is started for it only when the store's rows predate the hint column)."""
        stored = [e.task.action_hint for e in self.experts() if e.task.action_hint]
        hint = stored[0] if stored else action_hint(self.config.env)
        return PromptFormat(hint, self.config.prompt.history_window)

    def base_path(self) -> Path:
        return resolve_model(self.config.model, self.config.cache_dir)


def select_experts(
    stored: Sequence[Trajectory], split_task_ids: Sequence[str], limit: int
) -> list[Trajectory]:
    """A run's experts: of those stored for its train split, the first `limit` in the
    split's own order (ingestion stores the split's first games), listed by task id. Rows the
    store holds beyond them (another run's larger `train_limit`) do not change which: a run's
    training data does not depend on what else shares its store."""
    rank = {task_id: i for i, task_id in enumerate(split_task_ids)}
    first = sorted(stored, key=lambda e: (rank.get(e.task.task_id, len(rank)), e.task.task_id))
    return sorted(first[:limit], key=lambda e: e.task.task_id)


def action_hint(env_id: str) -> str:
    env = make_env(env_id)
    try:
        return env.action_hint
    finally:
        env.close()
