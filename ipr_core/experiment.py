"""Reproduction experiments: the paper's methods, several seeds, one store.

An experiment runs every (method, seed) of its config as one run of the IPR loop, all
from ONE shared SFT checkpoint (content-addressed: trained once, reused by every run).
Per run: dev evaluation after every iteration, the best iteration picked on dev (never
on test), and that model evaluated on the test split. The `experiment_runs` table says
which runs are finished, so rerunning the experiment skips them.

Work whose inputs are the same in several runs is done once and its rows are copied:
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ipr_core.backends import release_engines
from ipr_core.config import RunConfig, read_yaml_mapping, validate_config
from ipr_core.envs import make_env
from ipr_core.errors import InputError, IprError
from ipr_core.models import resolve_model
from ipr_core.pipeline import EXPERT_ITERATION
from ipr_core.prompts import PromptFormat
from ipr_core.run import (
    BASE_ITERATION,
    ensure_experts,
    evaluate_model,
    prompt_format,
    run_iteration,
)
from ipr_core.store import Store
from ipr_core.training.checkpoints import base_checkpoint, model_id, record_checkpoint
from ipr_core.training.data import load_pairs
from ipr_core.training.mixture import train_mixture, trainable_pairs
from ipr_core.training.sft import train_sft
from ipr_core.types import Trajectory

Log = Callable[[str], None]

TableMethod = Literal["sft", "eto", "ipr", "ipr-no-odpo", "ipr-no-sdpo", "ipr-no-sft"]
METHODS: tuple[TableMethod, ...] = ("sft", "eto", "ipr", "ipr-no-odpo", "ipr-no-sdpo", "ipr-no-sft")
"""The paper's main rows (SFT, ETO, IPR) and its three ablations, in its order."""
PER_RUN_FIELDS = ("run_id", "method", "seed")
"""RunConfig fields the experiment sets for each run; the shared `run` settings leave them out."""
FINISHED = "finished"


class ExperimentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    experiment_id: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    methods: list[TableMethod] = Field(default_factory=lambda: list(METHODS), min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0, 1], min_length=1)
    """Each seed sets the run's sampling seed (Monte Carlo, evaluation) and the mixture
    trainer's seed; the SFT checkpoint is the same for all."""
    explore_limit: int | None = Field(None, gt=0)
    """IPR explores the first `explore_limit` of the `run.train_limit` SFT tasks (all when
    unset): SFT is cheap next to exploration and Monte Carlo scoring on a CPU."""
    test_split: str = "test"
    test_limit: int = Field(8, gt=0)
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


def load_experiment_config(path: Path, store: Path | None = None) -> ExperimentConfig:
    """Read an experiment YAML (`store` overrides `run.store`); errors name file and field."""
    data = read_yaml_mapping(path)
    if store is not None and isinstance(data.get("run"), dict):
        data["run"]["store"] = str(store)
    return validate_config(ExperimentConfig, data, path)


@dataclass(frozen=True)
class Shared:
    """What every run of an experiment uses: experts, the prompt, the base and SFT models."""

    experts: list[Trajectory]
    explored: list[Trajectory]
    prompt: PromptFormat
    base_path: Path
    sft_path: Path
    task_ids: dict[str, list[str]]


def run_experiment(config: ExperimentConfig, log: Log = print) -> pd.DataFrame:
    """Run every (method, seed) not finished yet; returns the experiment's per-run table."""
    store = Store(config.run.store)
    register(store, config)
    started = time.perf_counter()
    shared = prepare(store, config, log)
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
            before = flatten(json.loads(found["config"].iloc[0]))
            now = flatten(json.loads(config.shared_settings()))
            changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
            if changed:
                raise IprError(
                    f"experiment {config.experiment_id!r} exists in {store.path} with other "
                    f"settings ({', '.join(changed)}); use a new experiment_id"
                )
    row = {"experiment_id": config.experiment_id, "config": config.shared_settings()}
    store.write({"experiments": [row]})


def flatten(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as {'run.dev_limit': 4, ...}, to name what changed."""
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def prepare(store: Store, config: ExperimentConfig, log: Log) -> Shared:
    """Experts, base model and the one SFT checkpoint (trained here only if missing)."""
    run = config.run
    experts = ensure_experts(store, run, log)
    prompt = prompt_format(run)
    base_path = resolve_model(run.model, run.cache_dir)
    record_checkpoint(store, base_checkpoint(base_path))
    sft_path = base_path
    if run.sft is not None:
        release_engines()  # a GPU inference engine would hold the memory training needs
        sft = train_sft(base_path, experts, prompt, run.sft, run.checkpoints_dir, run.compute)
        record_checkpoint(store, sft, iteration=0)
        log(f"shared SFT checkpoint {sft.checkpoint_id} ({sft.summary()})")
        sft_path = sft.path
    env = make_env(run.env)
    try:
        task_ids = {split: env.task_ids(split) for split in (run.dev_split, config.test_split)}
    finally:
        env.close()
    explored = experts[: config.explore_limit]
    return Shared(experts, explored, prompt, base_path, sft_path, task_ids)


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
    store.write(
        {
            "runs": [{"run_id": run.run_id, "config": run.model_dump_json()}],
            "experiment_runs": [{**key, "run_id": run.run_id, "status": "running"}],
        }
    )
    if run.evaluate_base and run.sft is not None:
        evaluate_once(store, config, shared, run, shared.base_path, BASE_ITERATION, "dev", run_log)
    evaluate_once(store, config, shared, run, shared.sft_path, 0, "dev", run_log)
    policies = {0: shared.sft_path}
    if run.mixture_settings is not None:
        for iteration in range(1, run.iterations + 1):
            policies[iteration] = run_iteration_once(
                store, config, shared, run, policies[iteration - 1], iteration, run_log
            )
    first = 0 if run.mixture_settings is None else 1  # trained methods pick a trained model
    best = best_iteration(store, run.run_id, run.dev_split, first)
    best_path = policies[best]
    evaluate_once(store, config, shared, run, best_path, best, "test", run_log)
    store.write(
        {
            "experiment_runs": [
                {
                    **key,
                    "run_id": run.run_id,
                    "status": FINISHED,
                    "best_iteration": best,
                    "test_policy_id": model_id(best_path),
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


def run_iteration_once(
    store: Store,
    config: ExperimentConfig,
    shared: Shared,
    run: RunConfig,
    policy_path: Path,
    iteration: int,
    log: Log,
) -> Path:
    """Data, training and dev evaluation of one iteration; returns the iteration's model.

    An iteration whose dev evaluation is stored is complete (it is written last): a
    resumed run takes its model from the store. An iteration without a pair that the
    method's loss uses keeps the previous model (recorded by its dev evaluation's
    policy id), so one empty iteration does not end the whole experiment.
    """
    done = stored_policy(store, run.run_id, iteration, run.dev_split)
    if done is not None:
        log(f"iteration {iteration}: complete in the store")
        return done
    donor = data_donor(store, config, run) if iteration == 1 else None
    if donor is not None:
        copy_iteration_data(store, donor, run.run_id)
        log(f"iteration 1: data shared with {donor} (same seed, same SFT explorer and scorer)")
    else:
        run_iteration(
            store, run, shared.explored, shared.prompt, shared.sft_path, policy_path, iteration, log
        )
    settings = run.mixture_settings
    assert settings is not None  # callers train only methods with a mixture
    pairs = load_pairs(store, run.run_id, iteration)
    if not trainable_pairs(pairs, settings.weights):
        log(f"iteration {iteration}: no pair for the {run.method} loss; the model stays as it was")
        new_path = policy_path
    else:
        release_engines()
        trained = train_mixture(
            shared.sft_path,
            pairs,
            settings,
            run.checkpoints_dir,
            parent_path=None if policy_path == shared.sft_path else policy_path,
            compute=run.compute,
        )
        record_checkpoint(store, trained, run.run_id, iteration)
        log(f"iteration {iteration}: checkpoint {trained.checkpoint_id} "
            f"({trained.summary()}; {len(pairs)} pairs mined)")  # fmt: skip
        new_path = trained.path
    evaluate_once(store, config, shared, run, new_path, iteration, "dev", log)
    return new_path


def stored_policy(store: Store, run_id: str, iteration: int, split: str) -> Path | None:
    """The model folder of a stored evaluation, if the evaluation exists."""
    found = store.query(
        "SELECT c.path FROM evaluations e JOIN checkpoints c ON c.checkpoint_id = e.policy_id "
        "WHERE e.run_id = ? AND e.iteration = ? AND e.split = ?",
        [run_id, iteration, split],
    )
    return None if found.empty else Path(found["path"].iloc[0])


def data_donor(store: Store, config: ExperimentConfig, run: RunConfig) -> str | None:
    """Another run of this experiment and seed whose iteration 1 is complete."""
    found = store.query(
        "SELECT x.run_id FROM experiment_runs x JOIN evaluations e "
        "ON e.run_id = x.run_id AND e.iteration = 1 AND e.split = ? "
        "WHERE x.experiment_id = ? AND x.seed = ? AND x.run_id <> ? ORDER BY x.run_id LIMIT 1",
        [run.dev_split, config.experiment_id, run.seed, run.run_id],
    )
    return None if found.empty else str(found["run_id"].iloc[0])


def copy_iteration_data(store: Store, donor: str, run_id: str) -> None:
    """Copy iteration 1's data (and the expert step rewards) of `donor` to `run_id`,
    replacing whatever an interrupted attempt of `run_id` left, in one transaction."""
    iterations = [EXPERT_ITERATION, 1]
    with store.transaction() as con:
        for table, where in (
            ("rollouts", "iteration IN (?, ?) AND kind IN ('mc', 'explore')"),
            ("step_rewards", "iteration IN (?, ?)"),
            ("pairs", "iteration IN (?, ?)"),
        ):
            con.execute(f"DELETE FROM {table} WHERE run_id = ? AND {where}", [run_id, *iterations])
            con.execute(
                f"INSERT INTO {table} SELECT * REPLACE (?::VARCHAR AS run_id) FROM {table} "
                f"WHERE run_id = ? AND {where}",
                [run_id, donor, *iterations],
            )


def evaluate_once(
    store: Store,
    config: ExperimentConfig,
    shared: Shared,
    run: RunConfig,
    model_path: Path,
    iteration: int,
    split: str,
    log: Log,
) -> None:
    """Evaluate a model on `split` ('dev' or 'test') for this run and iteration, copying
    the rows of an earlier evaluation of the same model in this experiment if there is one
    (evaluation is greedy, so it would give the same episodes)."""
    split_name = run.dev_split if split == "dev" else config.test_split
    limit = run.dev_limit if split == "dev" else config.test_limit
    task_ids = shared.task_ids[split_name][:limit]
    policy_id = model_id(model_path)
    earlier = store.query(
        "SELECT e.run_id, e.iteration FROM evaluations e JOIN experiment_runs x USING (run_id) "
        "WHERE x.experiment_id = ? AND e.split = ? AND e.policy_id = ? AND e.n_tasks = ? "
        "ORDER BY e.run_id = ? DESC, e.created_at LIMIT 1",
        [config.experiment_id, split_name, policy_id, len(task_ids), run.run_id],
    )
    if earlier.empty:
        settings = run.model_copy(update={"dev_split": split_name, "dev_limit": limit})
        evaluate_model(store, settings, model_path, iteration, log)
        return
    donor, donor_iteration = str(earlier["run_id"].iloc[0]), int(earlier["iteration"].iloc[0])
    if (donor, donor_iteration) == (run.run_id, iteration):
        return  # this very evaluation is stored already
    copy_evaluation(store, donor, donor_iteration, run.run_id, iteration, split_name, policy_id,
                    task_ids)  # fmt: skip
    log(f"iteration {iteration}: {split_name} evaluation of {policy_id} copied from {donor}")


def copy_evaluation(
    store: Store,
    donor: str,
    donor_iteration: int,
    run_id: str,
    iteration: int,
    split: str,
    policy_id: str,
    task_ids: Sequence[str],
) -> None:
    """The evaluation row and its episodes, relabelled to (run_id, iteration), atomically."""
    relabel = "* REPLACE (?::VARCHAR AS run_id, ?::INTEGER AS iteration)"
    with store.transaction() as con:
        con.execute(
            f"INSERT OR REPLACE INTO evaluations SELECT {relabel} FROM evaluations "
            "WHERE run_id = ? AND iteration = ? AND split = ? AND policy_id = ?",
            [run_id, iteration, donor, donor_iteration, split, policy_id],
        )
        con.execute(
            f"INSERT OR REPLACE INTO rollouts SELECT {relabel} FROM rollouts "
            "WHERE run_id = ? AND iteration = ? AND kind = 'eval' AND policy_id = ? "
            "AND list_contains(?, task_id)",
            [run_id, iteration, donor, donor_iteration, policy_id, list(task_ids)],
        )


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
