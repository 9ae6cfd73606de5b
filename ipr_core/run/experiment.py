"""Reproduction experiments: the paper's methods, several seeds, one store.

An experiment runs every (method, seed) of its config as one run of the IPR loop
(`ipr_core.run.loop.run_ipr`, the one stage list): SFT, dev evaluation after every
iteration, the best iteration picked on dev (never on test), and that model evaluated on
the test split (a `tuning` experiment stops at dev). Each seed trains its own SFT model
(`sft_per_seed`), which the methods of the seed share: the SFT stage's checkpoint is
content-addressed, so the first run of a seed trains it and the others find it. The
`experiment_runs` table says which runs are finished, so rerunning the experiment skips
them. `ipr experiment` runs this as the `experiment` Prefect flow (`flows/experiment.py`);
`--no-prefect` as plain calls.

Work whose inputs are the same in several runs is done once because a stage whose
fingerprint matches another run's completion record copies that run's rows:
- evaluations are greedy (temperature 0), so a model's evaluation on a split depends on
  the model, the split and the shared settings alone (a seed's SFT model is evaluated
  once for the methods of the seed);
- iteration 1's data (expert step rewards, exploration by the SFT model, agent step
  rewards, pairs) depends on the seed but not on the method, so every method of a seed
  trains on the same pairs: the methods differ in their loss alone (a paired comparison).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import pandas as pd
from pydantic import AfterValidator, Field, field_validator, model_validator

from ipr_core.config import (
    RunConfig,
    parse_overrides,
    read_yaml_mapping,
    validate_config,
    with_overrides,
)
from ipr_core.errors import InputError, IprError
from ipr_core.run import loop
from ipr_core.run.context import Engines, Log, RunContext
from ipr_core.run.costs import Measured, estimate
from ipr_core.run.fingerprints import ADDED_AFTER_STORES
from ipr_core.run.loop import (
    Iterate,
    Iteration,
    Runner,
    Split,
    check_split_sizes,
    run_iteration,
    run_stage,
)
from ipr_core.store.store import Store
from ipr_core.training.checkpoints import model_id
from ipr_core.training.config import Seed, StrictConfig
from ipr_core.training.methods import EXPERIMENT_METHODS
from ipr_core.types import StageName

PER_RUN_FIELDS = ("run_id", "method", "seed")
"""RunConfig fields the experiment sets for each run; the shared `run` settings leave them out."""
FINISHED = "finished"
SCORER_RUN = "scorer"
"""The run (`<experiment_id>-scorer`) whose SFT model is the fixed scorer (`fixed_scorer`)."""
LEGACY_SETTINGS: dict[str, Any] = {
    "sft_per_seed": False,
    "fixed_scorer": False,
    "tuning": False,
    "fallback_to_sft": False,
}
"""What an experiment recorded before these settings existed ran with: one SFT model, a
test evaluation, and a trained method's best iteration picked among its trained models."""


def _experiment_method(name: str) -> str:
    if name not in EXPERIMENT_METHODS:
        known = ", ".join(EXPERIMENT_METHODS)
        raise ValueError(f"unknown method {name!r}; an experiment runs: {known}")
    return name


class ExperimentConfig(StrictConfig):
    experiment_id: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    methods: list[Annotated[str, AfterValidator(_experiment_method)]] = Field(
        default_factory=lambda: list(EXPERIMENT_METHODS), min_length=1
    )
    """Methods of the registry (`ipr_core.training.methods`) that have a fixed loss."""
    seeds: list[Seed] = Field(default_factory=lambda: [0, 1], min_length=1)
    """Each seed sets the run's sampling seed (Monte Carlo, evaluation), the mixture
    trainer's seed and, with `sft_per_seed`, the SFT trainer's."""
    sft_per_seed: bool = True
    """True: each seed trains its own SFT model (`run.sft.seed` set to the seed), shared by
    the methods of that seed, so a seed's spread includes SFT's. False: one SFT model (seed
    `run.sft.seed`) for every seed, as the experiments `repro` and `repro-full-sft` ran."""
    fixed_scorer: bool = False
    """True: the Monte Carlo step rewards of every seed come from one scorer, the SFT model
    of seed `run.sft.seed` (trained in run `<experiment_id>-scorer`); each seed's policy and
    DPO reference stay its own SFT model. False: each seed's SFT model scores its steps."""
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
        update: dict[str, Any] = {
            "run_id": self.run_id(method, seed),
            "method": method,
            "seed": seed,
            "mixture": self.run.mixture.model_copy(update={"seed": seed}),
        }
        if self.sft_per_seed and self.run.sft is not None:
            update["sft"] = self.run.sft.model_copy(update={"seed": seed})
        return self.run.model_copy(update=update)

    def scorer_config(self) -> RunConfig | None:
        """The run that trains the fixed scorer, when there is one: the shared settings'
        SFT (the seed of `run.sft`)."""
        if not (self.fixed_scorer and self.sft_per_seed and self.run.sft is not None):
            return None
        return self.run.model_copy(
            update={"run_id": f"{self.experiment_id}-{SCORER_RUN}", "method": "sft"}
        )

    def test(self) -> Split | None:
        """The split each run evaluates its best iteration on; None when tuning."""
        return None if self.tuning else Split(self.test_split, self.test_limit)

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


RunOne = Callable[[ExperimentConfig, str, int, Path | None], None]
"""Runs one (method, seed) given the fixed scorer's model (`run_method`, or a subflow)."""


def run_experiment(
    config: ExperimentConfig,
    log: Log = print,
    allow_manifest_change: bool = False,
    run: Runner = run_stage,
    run_one: RunOne | None = None,
) -> pd.DataFrame:
    """Run every (method, seed) not finished yet; returns the experiment's per-run table.
    `allow_manifest_change`: resume runs whose manifest changed results
    (`ipr_core.run.manifest`). `run` executes a stage and `run_one` a run (the Prefect
    flow passes its tasks and subflows; by default plain calls)."""
    test = config.test()
    check_split_sizes(Engines(config.run), *([] if test is None else [test]))
    store = Store(config.run.store)
    register(store, config)
    started = time.perf_counter()
    scorer = train_scorer(config, store, log, run)
    for seed in config.seeds:
        for method in config.methods:
            if store.experiment_run_status(config.experiment_id, method, seed) == FINISHED:
                log(f"[{config.run_id(method, seed)}] finished before; skipped")
            elif run_one is None:
                run_method(config, method, seed, scorer, log, allow_manifest_change)
            else:
                run_one(config, method, seed, scorer)
    log(f"experiment {config.experiment_id}: done in {time.perf_counter() - started:.0f} s")
    return store.experiment_runs(config.experiment_id)


def register(store: Store, config: ExperimentConfig) -> None:
    """Record the experiment; a resumed one must keep its shared settings."""
    recorded = store.experiment_settings(config.experiment_id)
    if recorded is not None:
        legacy = LEGACY_SETTINGS | flatten({"run": ADDED_AFTER_STORES})
        before = legacy | flatten(json.loads(recorded))
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


def train_scorer(
    config: ExperimentConfig, store: Store, log: Log, run: Runner = run_stage
) -> Path | None:
    """The fixed scorer's model (`fixed_scorer`), trained by the stages of a run of its own;
    None: each seed's SFT model scores its steps."""
    scorer = config.scorer_config()
    if scorer is None:
        return None
    ctx = RunContext(scorer, store, log)
    base = loop.prepare_run(ctx)
    setup = Iteration(0, base, base)
    run(loop.INGEST, ctx, setup)
    return Path(run(loop.SFT, ctx, setup).path)


def run_method(
    config: ExperimentConfig,
    method: str,
    seed: int,
    scorer: Path | None,
    log: Log = print,
    allow_manifest_change: bool = False,
    run: Runner = run_stage,
    iterate: Iterate = run_iteration,
) -> None:
    """One run (`loop.run_ipr`): SFT, its iterations evaluated on dev, the best on test
    (unless tuning)."""
    store = Store(config.run.store)
    run_config = config.run_config(method, seed)
    run_id = run_config.run_id
    key = {"experiment_id": config.experiment_id, "method": method, "seed": seed}

    def run_log(message: str) -> None:
        log(f"[{run_id}] {message}")

    started = time.perf_counter()
    ctx = RunContext(run_config, store, run_log, allow_manifest_change=allow_manifest_change)
    store.write({"experiment_runs": [{**key, "run_id": run_id, "status": "running"}]})
    result = loop.run_ipr(ctx, run, iterate, config.test(), scorer, config.fallback_to_sft)
    finished = {
        **key,
        "run_id": run_id,
        "status": FINISHED,
        "best_iteration": result.best,
        "test_policy_id": model_id(result.policies[result.best]),
    }
    store.write({"experiment_runs": [finished]})
    run_log(
        f"best iteration on dev: {result.best}; finished in {time.perf_counter() - started:.0f} s"
    )


def ensure_known(store: Store, experiment_id: str) -> None:
    if store.experiment_settings(experiment_id) is None:
        raise InputError(str(store.path), "no such experiment", record=experiment_id)


# -- ipr estimate of a whole experiment ------------------------------------------------------
TEST = "test"
"""`shared_key`'s name for a run's test evaluation, which the plan adds beside its stages."""


def shared_key(stage: str, config: ExperimentConfig, run: RunConfig) -> tuple[Any, ...] | None:
    """What a planned stage's first run (its only run, or iteration 1; for `evaluate`, the
    SFT model's dev evaluation; `test`, the test evaluation) depends on: two runs of an
    experiment with the same key share that first run (the later one copies its rows at
    ~0 s, as the stage fingerprints in `loop` decide). None: the stage is the run's own."""
    sft_model = run.seed if config.sft_per_seed else None
    if stage in (StageName.INGEST, StageName.SFT, StageName.EVALUATE):
        return (stage, sft_model)
    if stage == TEST:  # greedy: only the SFT method's test model is the shared SFT model
        return None if run.needs.exploration else (stage, sft_model)
    if stage == StageName.EXPLORE:  # greedy: the SFT policy and where episodes start decide it
        return (stage, sft_model, run.needs.monte_carlo, run.cut_explorations)
    if stage == StageName.AGENT_STEP_REWARDS:  # the shared exploration, the run's sampling seed
        return (stage, sft_model, run.seed)
    if stage == StageName.EXPERT_STEP_REWARDS:
        if run.monte_carlo.expert_steps == "compared":  # the steps iteration 1 compared
            return (stage, sft_model)
        return (stage, SCORER_RUN if config.scorer_config() else sft_model)
    return None  # pairs and training follow the method


def estimate_experiment(store: Store, config: ExperimentConfig) -> pd.DataFrame:
    """Predicted seconds of every (method, seed) run of `config`, from the store's measured
    rates (`costs.estimate`), with its test evaluation added (unless tuning) and the first
    run of each stage that runs of one SFT model share (`shared_key`) counted once. Beside
    each: the run's status in the store and the wall seconds it has measured so far (what
    the prediction is checked on)."""
    rows = []
    seen: set[tuple[Any, ...]] = set()

    def done_before(key: tuple[Any, ...] | None) -> bool:
        """Whether an earlier run did the work of `key` (and from now on, that one did)."""
        if key is None:
            return False
        known = key in seen
        seen.add(key)
        return known

    wall = store.run_wall_seconds()
    measured = Measured.read(store)  # once: every run's estimate reads the same rates
    for seed in config.seeds:
        for method in config.methods:
            run = config.run_config(method, seed)
            made = estimate(store, run, measured)
            table = made.table.set_index("stage").fillna({"seconds": 0.0, "rate_s": 0.0})
            seconds = 0.0
            for stage, row in table.iterrows():
                seconds += row["seconds"]
                if done_before(shared_key(str(stage), config, run)):  # copied at ~0 s
                    seconds -= row["units"] * row["rate_s"]
            test = config.test()
            if test is not None and not done_before(shared_key(TEST, config, run)):
                seconds += test.limit * table.loc["evaluate", "rate_s"]
            run_id = config.run_id(method, seed)
            status = store.experiment_run_status(config.experiment_id, method, seed)
            rows.append(
                {
                    "run_id": run_id,
                    "predicted_s": seconds,
                    "status": status or "not started",
                    "measured_s": wall.get(run_id, 0.0),
                    "unmeasured": ", ".join(made.unmeasured),
                }
            )
    return pd.DataFrame(rows)
