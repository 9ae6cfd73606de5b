"""Reproduction experiments: the paper's methods, several seeds, one store.

An experiment runs every (method, seed) of its config as one run of the IPR loop, all
from ONE shared SFT checkpoint (content-addressed: trained once, reused by every run).
Per run: dev evaluation after every iteration, the best iteration picked on dev (never
on test), and that model evaluated on the test split. The `experiment_runs` table says
which runs are finished, so rerunning the experiment skips them.

Every run executes the one loop (`ipr_core.run.loop.run_iteration`); work whose inputs are
the same in several runs is done once because a stage whose fingerprint matches another
run's completion record copies that run's rows:
- evaluations are greedy (temperature 0), so a model's evaluation on a split depends on
  the model, the split and the shared settings alone (the SFT model is evaluated once
  for all runs);
- iteration 1's data (expert step rewards, exploration by the SFT model, agent step
  rewards, pairs) depends on the seed but not on the method, so every method of a seed
  trains on the same pairs: the methods differ in their loss alone (a paired comparison).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import pandas as pd
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from ipr_core.config import (
    RunConfig,
    parse_overrides,
    read_yaml_mapping,
    validate_config,
    with_overrides,
)
from ipr_core.engine.backends import release_engines
from ipr_core.errors import InputError, IprError
from ipr_core.run.context import Log, RunContext
from ipr_core.run.loop import (
    BASE_ITERATION,
    EVALUATE,
    Iteration,
    Split,
    check_split_sizes,
    checked_manifest,
    run_iteration,
    run_stage,
)
from ipr_core.run.pipeline import ensure_experts
from ipr_core.store.store import Store
from ipr_core.training.checkpoints import base_checkpoint, model_id
from ipr_core.training.config import Seed
from ipr_core.training.methods import EXPERIMENT_METHODS
from ipr_core.training.methods import method as method_spec
from ipr_core.training.sft import train_sft

PER_RUN_FIELDS = ("run_id", "method", "seed")
"""RunConfig fields the experiment sets for each run; the shared `run` settings leave them out."""
FINISHED = "finished"


def _experiment_method(name: str) -> str:
    if name not in EXPERIMENT_METHODS:
        known = ", ".join(EXPERIMENT_METHODS)
        raise ValueError(f"unknown method {name!r}; an experiment runs: {known}")
    return name


class ExperimentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    experiment_id: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    methods: list[Annotated[str, AfterValidator(_experiment_method)]] = Field(
        default_factory=lambda: list(EXPERIMENT_METHODS), min_length=1
    )
    """Methods of the registry (`ipr_core.training.methods`) that have a fixed loss."""
    seeds: list[Seed] = Field(default_factory=lambda: [0, 1], min_length=1)
    """Each seed sets the run's sampling seed (Monte Carlo, evaluation) and the mixture
    trainer's seed; the SFT checkpoint is the same for all."""
    tuning: bool = False
    """Dev only: each run picks its best iteration on dev and stops; no test task is ever
    evaluated (`test_split` and `test_limit` are not read)."""
    test_split: str = "test"
    test_limit: int = Field(8, gt=0)
    fallback_to_sft: bool = False
    """The iteration-0 rule, one for every method: whether a trained method may pick its
    iteration 0 (the SFT model) when dev says so; false: it picks among its trained models."""
    run: RunConfig
    """Settings every run shares (without run_id, method and seed)."""

    @field_validator("methods", "seeds")
    @classmethod
    def _unique(cls, values: list[Any]) -> list[Any]:
        if len(set(values)) != len(values):
            raise ValueError(f"lists each entry once (got {values})")
        return values

    @model_validator(mode="before")
    @classmethod
    def _no_per_run_fields(cls, data: Any) -> Any:
        run = data.get("run") if isinstance(data, dict) else None
        if isinstance(run, dict):
            for name in PER_RUN_FIELDS:
                if name in run:
                    raise ValueError(f"run.{name} is set per run by the experiment; remove it")
        return data

    @model_validator(mode="after")
    def _test_is_not_dev(self) -> ExperimentConfig:
        if self.test_split == self.run.dev_split:
            raise ValueError("test_split must differ from run.dev_split (pick on dev, report test)")
        return self

    def run_id(self, method: str, seed: int) -> str:
        return f"{self.experiment_id}-{method}-s{seed}"

    def run_config(self, method: str, seed: int) -> RunConfig:
        mixture = self.run.mixture.model_copy(update={"seed": seed})
        return self.run.model_copy(
            update={
                "run_id": self.run_id(method, seed),
                "method": method,
                "seed": seed,
                "mixture": mixture,
            }
        )

    def shared_settings(self) -> str:
        """The settings a resumed experiment must not change (methods and seeds may grow)."""
        return self.model_dump_json(exclude={"methods", "seeds"})


def load_experiment_config(
    path: Path, overrides: Sequence[str] = (), store: Path | None = None
) -> ExperimentConfig:
    """Read an experiment YAML with the command line's `--set` items (`run.mixture.lr=...`)
    and `store` (`run.store`) applied; errors name file and field."""
    settings = parse_overrides(overrides)
    if store is not None:
        settings["run.store"] = str(store)
    data = with_overrides(read_yaml_mapping(path), settings, path)
    return validate_config(ExperimentConfig, data, path)


@dataclass(frozen=True)
class Shared:
    """What every run of an experiment uses: the base and the one SFT model, the base
    model's id (for the runs' manifests) and whether a changed manifest may resume."""

    base_path: Path
    sft_path: Path
    base_id: str
    allow_manifest_change: bool


def run_experiment(
    config: ExperimentConfig, log: Log = print, allow_manifest_change: bool = False
) -> pd.DataFrame:
    """Run every (method, seed) not finished yet; returns the experiment's per-run table.
    `allow_manifest_change`: resume runs whose manifest changed results
    (`ipr_core.run.manifest`)."""
    store = Store(config.run.store)
    tests = () if config.tuning else (Split(config.test_split, config.test_limit),)
    check_split_sizes(RunContext(config.run, store, log), *tests)
    register(store, config)
    started = time.perf_counter()
    shared = prepare(store, config, log, allow_manifest_change)
    for seed in config.seeds:
        for method in config.methods:
            run_method(store, config, shared, method, seed, log)
    log(f"experiment {config.experiment_id}: done in {time.perf_counter() - started:.0f} s")
    return experiment_runs(store, config.experiment_id)


def register(store: Store, config: ExperimentConfig) -> None:
    """Record the experiment; a resumed one must keep its shared settings."""
    if store.table_exists("experiments"):
        found = store.query(
            "SELECT config FROM experiments WHERE experiment_id = ?", [config.experiment_id]
        )
        if len(found):
            before = flatten(stored_settings(found["config"].iloc[0]))
            now = flatten(json.loads(config.shared_settings()))
            changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
            if changed:
                raise IprError(
                    f"experiment {config.experiment_id!r} exists in {store.path} with other "
                    f"settings ({', '.join(changed)}); use a new experiment_id"
                )
    row = {"experiment_id": config.experiment_id, "config": config.shared_settings()}
    store.write({"experiments": [row]})


def stored_settings(text: str) -> dict[str, Any]:
    """A stored experiment's shared settings as this version reads them: a setting added
    since it was recorded counts at its default (resuming it changes nothing)."""
    stored = json.loads(text)
    try:
        return json.loads(ExperimentConfig.model_validate(stored).shared_settings())
    except ValueError:  # settings this version no longer reads: compare them as stored
        return stored


def flatten(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as {'run.dev_limit': 4, ...}, to name what changed."""
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def prepare(
    store: Store, config: ExperimentConfig, log: Log, allow_manifest_change: bool
) -> Shared:
    """Experts, base model and the one SFT checkpoint (trained here only if missing)."""
    ctx = RunContext(config.run, store, log)
    experts = ensure_experts(store, config.run, log)
    base_path = ctx.base_path()
    base = base_checkpoint(base_path)
    store.record_checkpoint(base)
    sft_path = base_path
    if config.run.sft is not None:
        release_engines()  # a GPU inference engine would hold the memory training needs
        run = config.run
        sft = train_sft(base_path, experts, ctx.prompt, run.sft, run.checkpoints_dir, run.compute)
        store.record_checkpoint(sft, iteration=0)
        log(f"shared SFT checkpoint {sft.checkpoint_id} ({sft.summary()})")
        sft_path = sft.path
    return Shared(base_path, sft_path, base.checkpoint_id, allow_manifest_change)


def run_method(
    store: Store, config: ExperimentConfig, shared: Shared, method: str, seed: int, log: Log
) -> None:
    """One run: SFT model evaluated, iterations trained and evaluated on dev, best on test."""
    run = config.run_config(method, seed)
    key = {"experiment_id": config.experiment_id, "method": method, "seed": seed}
    if run_status(store, config.experiment_id, method, seed) == FINISHED:
        log(f"[{run.run_id}] finished before; skipped")
        return

    def run_log(message: str) -> None:
        log(f"[{run.run_id}] {message}")

    started = time.perf_counter()
    ctx = RunContext(
        run,
        store,
        run_log,
        allow_manifest_change=shared.allow_manifest_change,
    )
    splits = (run.train_split, run.dev_split, *([] if config.tuning else [config.test_split]))
    store.write(
        {
            "runs": [{"run_id": run.run_id, "config": run.model_dump_json()}],
            "experiment_runs": [{**key, "run_id": run.run_id, "status": "running"}],
            "run_manifests": [checked_manifest(ctx, shared.base_id, splits)],
        }
    )
    sft = shared.sft_path
    if run.evaluate_base and run.sft is not None:
        run_stage(EVALUATE, ctx, Iteration(BASE_ITERATION, sft, shared.base_path))
    run_stage(EVALUATE, ctx, Iteration(0, sft, sft))
    policies = {0: sft}
    trains = method_spec(method).trains
    if trains:
        for k in range(1, run.iterations + 1):
            result = run_iteration(ctx, Iteration(k, sft, policies[k - 1]))
            policies[k] = Path(result.trained.path)
    first = 1 if trains and not config.fallback_to_sft else 0
    best = best_iteration(store, run.run_id, run.dev_split, first)
    if not config.tuning:
        test = Split(config.test_split, config.test_limit)
        run_stage(EVALUATE, ctx, Iteration(best, sft, policies[best], split=test))
    store.write(
        {
            "experiment_runs": [
                {
                    **key,
                    "run_id": run.run_id,
                    "status": FINISHED,
                    "best_iteration": best,
                    "test_policy_id": model_id(policies[best]),
                }
            ]
        }
    )
    run_log(f"best iteration on dev: {best}; finished in {time.perf_counter() - started:.0f} s")


def run_status(store: Store, experiment_id: str, method: str, seed: int) -> str | None:
    if not store.table_exists("experiment_runs"):
        return None
    found = store.query(
        "SELECT status FROM experiment_runs WHERE experiment_id = ? AND method = ? AND seed = ?",
        [experiment_id, method, seed],
    )
    return None if found.empty else str(found["status"].iloc[0])


def best_iteration(store: Store, run_id: str, dev_split: str, first: int) -> int:
    """The iteration >= `first` with the highest dev reward (then success rate; ties go to
    the earliest, the least trained model)."""
    found = store.query(
        "SELECT iteration FROM evaluations WHERE run_id = ? AND split = ? AND iteration >= ? "
        "ORDER BY avg_reward DESC NULLS LAST, success_rate DESC NULLS LAST, iteration LIMIT 1",
        [run_id, dev_split, first],
    )
    if found.empty:
        raise IprError(f"run {run_id!r} has no {dev_split} evaluation to select an iteration by")
    return int(found["iteration"].iloc[0])


def experiment_runs(store: Store, experiment_id: str) -> pd.DataFrame:
    """Per run: method, seed, status, best iteration, its dev and test reward."""
    return store.query(
        """
        SELECT x.method, x.seed, x.run_id, x.status, x.best_iteration,
               round(d.avg_reward, 3) AS dev_reward, round(t.avg_reward, 3) AS test_reward,
               round(t.success_rate, 3) AS test_success, round(t.avg_steps, 2) AS test_steps
        FROM experiment_runs x
        JOIN experiments e USING (experiment_id)
        LEFT JOIN runs r USING (run_id)
        LEFT JOIN evaluations d ON d.run_id = x.run_id AND d.iteration = x.best_iteration
             AND d.split = json_extract_string(r.config, '$.dev_split')
        LEFT JOIN evaluations t ON t.run_id = x.run_id AND t.iteration = x.best_iteration
             AND t.policy_id = x.test_policy_id
             AND t.split = json_extract_string(e.config, '$.test_split')
        WHERE x.experiment_id = ?
        ORDER BY x.seed, x.method
        """,
        [experiment_id],
    )


def ensure_known(store: Store, experiment_id: str) -> None:
    if store.count("experiments", "experiment_id = ?", [experiment_id]) == 0:
        raise InputError(str(store.path), "no such experiment", record=experiment_id)
