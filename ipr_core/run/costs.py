"""What each stage cost, and what a run will cost: the `stage_costs` rows and `ipr estimate`.

`loop.run_stage` measures a stage while it computes (`Meter`) and commits the cost row
with the stage's rows and completion record. Measured here: wall seconds, CPU seconds
(this process and the child processes it waited for, e.g. launched training ranks), peak
resident memory (Linux resets the peak per stage through /proc/self/clear_refs; elsewhere
it is the process's peak so far) and GPU seconds (the wall seconds of a stage during which
this process allocated CUDA memory; NULL when it allocated none: on CPU, or when the GPU
belongs to a server or an engine's child process). Counted, not re-measured: tokens
prefilled and generated, rollouts and env steps from the stage's `rollouts` rows, tokens
trained from the training stage's own figures. A stage copied from a donor run records
the copy's cost and names the donor, so summing a run's rows counts the donor's work once.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Mapping, Sequence
from contextlib import suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ipr_core.config import RunConfig
from ipr_core.store.store import Row, StageRecord, Store


def stage_kind(stage: str) -> str:
    """The stage of a record name: `evaluate-dev` is an `evaluate`."""
    return "evaluate" if stage.startswith("evaluate-") else stage


class Meter:
    """Wall, CPU and GPU seconds and peak memory from construction to `figures()`."""

    def __init__(self) -> None:
        with suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak RSS
        self._cuda = _cuda()
        if self._cuda is not None:
            self._cuda.reset_peak_memory_stats()
        self._cpu = _cpu_seconds()
        self._start = time.perf_counter()

    def figures(self) -> dict[str, float | None]:
        wall = time.perf_counter() - self._start
        used_gpu = self._cuda is not None and self._cuda.max_memory_allocated() > 0
        return {
            "wall_s": wall,
            "cpu_s": _cpu_seconds() - self._cpu,
            "gpu_s": wall if used_gpu else None,
            "peak_rss_mb": _peak_rss_mb(),
        }


def _cuda() -> Any:
    """torch.cuda when torch is loaded and a GPU is there (never imports torch itself)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    return torch.cuda


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _peak_rss_mb() -> float:
    with suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


ROLLOUT_COUNTED = ("prefill_tokens", "generated_tokens", "env_steps")
ADDED_UP = ("wall_s", "cpu_s", "rollouts", *ROLLOUT_COUNTED)
"""The figures of a stage committed in chunks that its chunks and attempts add up."""


def rollout_counts(rollouts: Sequence[Row]) -> dict[str, int]:
    """What a stage's `rollouts` rows did: rollouts, tokens prefilled and generated, env steps."""
    return {
        "rollouts": len(rollouts),
        **{key: sum(int(r[key]) for r in rollouts) for key in ROLLOUT_COUNTED},
    }


def cost_row(
    record: StageRecord,
    figures: Mapping[str, float | None],
    rows: Mapping[str, Sequence[Row]],
    donor: StageRecord | None = None,
    added: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """A `stage_costs` row: the measured `figures` (training's own figures may add
    `trained_tokens` and a larger `peak_rss_mb`) and the counts of the stage's rollouts,
    plus `added` (a stage committed in chunks: what its chunks and earlier attempts did)."""
    counts = rollout_counts(rows.get("rollouts", []))
    peaks = [p for p in (figures["peak_rss_mb"], figures.get("train_peak_rss_mb")) if p]
    row = {
        "run_id": record.run_id,
        "iteration": record.iteration,
        "stage": record.stage,
        "wall_s": figures["wall_s"],
        "cpu_s": figures["cpu_s"],
        "gpu_s": figures["gpu_s"],
        "peak_rss_mb": max(peaks) if peaks else None,
        "prefill_tokens": counts["prefill_tokens"],
        "generated_tokens": counts["generated_tokens"],
        "trained_tokens": int(figures.get("trained_tokens") or 0),
        "rollouts": counts["rollouts"],
        "env_steps": counts["env_steps"],
        "donor_run_id": None if donor is None else donor.run_id,
        "donor_iteration": None if donor is None else donor.iteration,
    }
    for key, value in (added or {}).items():
        if key in ADDED_UP:
            row[key] = type(row[key])(row[key] + value)
    return row


def training_figures(metrics: Mapping[str, float]) -> dict[str, float]:
    """A training stage's own figures for its cost row: tokens trained and peak memory
    (of the training ranks when training was launched in other processes)."""
    return {"trained_tokens": metrics["tokens"], "train_peak_rss_mb": metrics["peak_rss_mb"]}


# -- ipr estimate ------------------------------------------------------------------------------
DEFAULT_STEPS_PER_TASK = 8.0
"""Expert steps per task when the store holds no expert trajectory of the env yet (TWC's
gold paths are 6-9 steps); labelled as a default wherever it is used."""


@dataclass(frozen=True)
class Scale:
    """What a run's work scales with beyond its config, measured in the store where it can
    be, each with the sentence `ipr estimate` prints about where it came from."""

    steps_per_task: float
    steps_source: str = "given"
    scored_share: float = 1.0
    """The share of explored steps whose agent step gets Monte Carlo samples."""
    share_source: str = "every explored step's agent step scored (an upper bound: none measured)"
    pairs_per_task: float = 1.0
    """Pairs a mixture iteration trains on per explored task."""
    pairs_source: str = "one pair per explored task (DEFAULT: none measured)"


@dataclass(frozen=True)
class Work:
    """One stage of the planned run: how many times it runs and its units each time."""

    stage: str
    runs: int
    units: float
    unit: str


def planned_work(config: RunConfig, scale: Scale) -> list[Work]:
    """The stages `loop.run_ipr` runs for `config` and their work: rollouts for the stages
    that roll out (MC: one per expert step and sample, or per sample of the scored share of
    explored steps where only compared expert steps are scored, and per sample of the scored
    share for the agent steps), pair x epoch for the mixture (its steps are batches of pairs), task
    x epoch for SFT and RFT."""
    tasks, dev, explored = config.train_limit, config.dev_limit, explored_tasks(config)
    steps = explored * scale.steps_per_task
    samples = config.monte_carlo.n_samples
    work = [Work("ingest", 1, 1, "run")]
    evaluations = 1
    if config.sft is not None:
        evaluations += int(config.evaluate_base)
        work.append(Work("sft", 1, tasks * config.sft.epochs, "task x epoch"))
    needs, mixture = config.needs, config.mixture_settings
    if needs.exploration:
        k = config.iterations
        evaluations += k
        if needs.monte_carlo:
            scored = steps * samples * scale.scored_share
            # `expert_steps: compared` scores, per iteration, at most the steps it compares
            compared = config.monte_carlo.expert_steps == "compared"
            work += [
                Work("explore", k, steps, "rollout"),
                Work("expert-step-rewards", k, scored, "rollout")
                if compared
                else Work("expert-step-rewards", 1, steps * samples, "rollout"),
                Work("agent-step-rewards", k, scored, "rollout"),
            ]
        else:  # trajectory pairs or successes only (ETO, RFT): each task explored from its start
            work.append(Work("explore", k, explored, "rollout"))
        if mixture is not None:
            work += [
                Work("mine-pairs", k, 1, "iteration"),
                Work(
                    "train-mixture",
                    k,
                    explored * scale.pairs_per_task * mixture.epochs,
                    "pair x epoch",
                ),
            ]
        elif config.sft is not None:
            work.append(Work("train-rft", k, rft_tasks(config) * config.sft.epochs, "task x epoch"))
    work.insert(1, Work("evaluate", evaluations, dev, "rollout"))
    return work


def scored_share(measured: Measured, like: RunConfig) -> tuple[float, str]:
    """The share of explored steps whose agent step gets Monte Carlo samples: only an action
    that differs from the expert's is scored (`pipeline.agent_queries`), so it is measured, over
    the store's completed iterations of runs of `like`'s model and env (every such iteration's
    agent-step rollouts over its explorations x N); 1.0, an upper bound, when none is stored."""
    costs = measured.costs[measured.costs["complete"]]
    rollouts = costs.pivot_table(
        index=["run_id", "iteration"], columns="stage", values="rollouts", aggfunc="sum"
    )
    same = measured.runs_like(like)
    scored = explored = 0.0
    for (run_id, _), row in rollouts.iterrows():
        if run_id not in same:
            continue
        if row.get("agent-step-rewards", 0) > 0 and row.get("explore", 0) > 0:
            scored += row["agent-step-rewards"]
            explored += row["explore"] * measured.configs[run_id].monte_carlo.n_samples
    if explored == 0:
        return 1.0, Scale.share_source
    share = scored / explored
    return share, f"{share:.0%} of explored steps' agent steps scored (measured)"


def pairs_per_task(measured: Measured, like: RunConfig) -> tuple[float, str]:
    """Pairs a mixture iteration trains on per explored task, measured over the store's
    mixture stages of runs of `like`'s model and env that mine the same kinds of pairs
    (with step pairs or without: in the decisive experiment IPR's first mixture trained on
    116 pairs of 32 explored tasks, ETO's on 31); one per task when none is stored."""
    same, steps = measured.runs_like(like), like.needs.monte_carlo
    pairs = tasks = mixtures = 0
    for run_id, n_pairs in measured.pairs.dropna()[["run_id", "n_pairs"]].itertuples(index=False):
        config = measured.configs.get(run_id)
        if run_id in same and config is not None and config.needs.monte_carlo == steps:
            pairs, tasks, mixtures = pairs + n_pairs, tasks + explored_tasks(config), mixtures + 1
    if tasks == 0:
        return 1.0, Scale.pairs_source
    return (
        pairs / tasks,
        f"{pairs / tasks:.2f} pairs per explored task ({mixtures} mixtures measured)",
    )


def rft_tasks(config: RunConfig) -> int:
    """RFT's training set at most: the experts and one success per explored task."""
    return config.train_limit + explored_tasks(config)


def explored_tasks(config: RunConfig) -> int:
    """The tasks IPR explores per iteration: the first `explore_limit` of the SFT tasks."""
    if config.explore_limit is None:
        return config.train_limit
    return min(config.explore_limit, config.train_limit)


@dataclass(frozen=True)
class Measured:
    """What a store has measured, read once for every estimate made from it: the cost rows
    of its computed stages, a running stage's chunks included (`Store.measured_stage_costs`),
    every run's config (None where it is of an older schema) and the pairs each mixture
    trained on (`Store.trained_pairs`)."""

    costs: pd.DataFrame
    configs: dict[str, RunConfig | None]
    pairs: pd.DataFrame

    @classmethod
    def read(cls, store: Store) -> Measured:
        configs = {run: _config(text) for run, text in store.run_configs().items()}
        return cls(store.measured_stage_costs(), configs, store.trained_pairs())

    def runs_like(self, like: RunConfig) -> set[str]:
        """The runs of `like`'s model and env (whose rates carry over without a note)."""
        return {run for run, c in self.configs.items() if c and _model(c) == _model(like)}


def measured_rates(measured: Measured, like: RunConfig | None = None) -> pd.DataFrame:
    """Seconds per unit of each stage, from the store's computed (not copied) stages:
    per rollout where a stage rolls out, per pair x epoch for the mixture and task x epoch
    for SFT and RFT (from the run's config), per run or iteration otherwise; with the
    measured s per env step and per trained token beside them. With `like`, only runs of
    its model and env count when the store holds any."""
    costs, configs = measured.costs, measured.configs
    if like is not None and not costs.empty:
        same = measured.runs_like(like)
        if costs["run_id"].isin(same).any():
            costs = costs[costs["run_id"].isin(same)]
    if costs.empty:
        return pd.DataFrame(columns=["stage", "rate_s", "measured_s", "units", "runs"])
    costs = costs.assign(stage=costs["stage"].map(stage_kind))
    pairs = {(run, it): n for run, it, n in measured.pairs.dropna().itertuples(index=False)}
    costs["units"] = [
        _measured_units(
            row, configs.get(row["run_id"]), pairs.get((row["run_id"], row["iteration"]))
        )
        for row in costs.to_dict("records")
    ]
    costs = costs[costs["units"] > 0]
    rates = costs.groupby("stage").agg(
        measured_s=("wall_s", "sum"),
        units=("units", "sum"),
        env_steps=("env_steps", "sum"),
        trained_tokens=("trained_tokens", "sum"),
        runs=("run_id", "nunique"),
    )
    rates["rate_s"] = rates["measured_s"] / rates["units"]
    rates["s_per_env_step"] = rates["measured_s"] / rates["env_steps"].where(rates["env_steps"] > 0)
    rates["s_per_trained_token"] = rates["measured_s"] / rates["trained_tokens"].where(
        rates["trained_tokens"] > 0
    )
    return rates.reset_index()


def _model(config: RunConfig) -> tuple[str, str]:
    return config.model, config.env


def _config(text: str) -> RunConfig | None:
    try:
        return RunConfig.from_record(text)
    except ValueError:  # a config of an older schema: its training rows have no units
        return None


def _measured_units(
    row: Mapping[str, Any], config: RunConfig | None, trained_pairs: int | None
) -> float:
    """A cost row's units of work; 0 where they are unknown (the row then sets no rate)."""
    kind = row["stage"]
    if kind in ("sft", "train-mixture", "train-rft"):
        if config is None:
            return 0.0
        if kind == "sft":
            settings, items = config.sft, config.train_limit
        elif kind == "train-rft":
            settings, items = config.sft, rft_tasks(config)
        else:
            settings, items = config.mixture_settings, trained_pairs or 0
        return float(items * settings.epochs) if settings is not None else 0.0
    if kind in ("ingest", "mine-pairs"):
        return 1.0
    return float(row["rollouts"])


STANDS_IN = {
    "agent-step-rewards": "expert-step-rewards",
    "expert-step-rewards": "agent-step-rewards",
    "train-rft": "sft",
}
"""A stage the store has not measured takes the rate of one doing the same work per unit:
both step scorings roll a step's N samples out from a replayed prefix to the episode's end;
RFT trains SFT's objective with SFT's settings."""


@dataclass(frozen=True)
class Estimate:
    run_id: str
    table: pd.DataFrame
    """Per stage: runs, units, unit, rate_s (seconds per unit; NaN: never measured),
    rate_of (the stage it was measured on: itself, or one in `STANDS_IN`), seconds, and
    the measured seconds per env step and per trained token beside them."""
    predicted_s: float
    unmeasured: list[str]
    scale: Scale
    """Expert steps per task, the share of explored steps scored and pairs per explored task
    the plan took, with where each came from."""
    sources: str
    """The measured runs the rates come from, and a warning when their model or env is
    not the config's (rates carry over between models only roughly)."""


def estimate(store: Store, config: RunConfig, measured: Measured | None = None) -> Estimate:
    """The predicted seconds of `config`'s run from the store's measured rates (`measured`:
    what the store has measured, when the caller has read it already)."""
    # The mean over every stored expert of the split estimates the run's own experts' (the
    # split's first games) without starting the env to learn the split's order.
    experts = store.expert_trajectories(config.env, config.train_split)
    if experts:
        steps_per_task = sum(len(e.steps) for e in experts) / len(experts)
        steps_source = (
            f"{steps_per_task:.1f} expert steps per task (mean of {len(experts)} stored experts)"
        )
    else:
        steps_per_task = DEFAULT_STEPS_PER_TASK
        steps_source = f"{steps_per_task:.1f} expert steps per task (DEFAULT: none stored)"
    measured = measured or Measured.read(store)
    scale = Scale(
        steps_per_task,
        steps_source,
        *scored_share(measured, config),
        *pairs_per_task(measured, config),
    )
    rates = measured_rates(measured, config).set_index("stage")
    sources = _sources(measured, config)
    rows = []
    for work in planned_work(config, scale):
        source = work.stage if work.stage in rates.index else STANDS_IN.get(work.stage)
        row = rates.loc[source] if source in rates.index else {}
        rate = row.get("rate_s", float("nan"))
        rows.append(
            {
                **asdict(work),
                "rate_s": rate,
                "rate_of": source if source in rates.index else None,
                "seconds": work.runs * work.units * rate,
                "s_per_env_step": row.get("s_per_env_step", float("nan")),
                "s_per_trained_token": row.get("s_per_trained_token", float("nan")),
            }
        )
    table = pd.DataFrame(rows)
    unmeasured = table.loc[table["rate_s"].isna(), "stage"].tolist()
    predicted = float(table["seconds"].fillna(0).sum())
    return Estimate(config.run_id, table, predicted, unmeasured, scale, sources)


def _sources(measured: Measured, config: RunConfig) -> str:
    with_costs = set(measured.costs["run_id"])
    runs = {run: c for run, c in measured.configs.items() if run in with_costs}
    if not runs:
        return "no measured run in the store"
    like = measured.runs_like(config)
    same = {run: c for run, c in runs.items() if run in like}
    runs = same or runs
    named = [
        f"{run} ({'?' if c is None else c.model}, {'?' if c is None else c.env})"
        for run, c in sorted(runs.items())
    ]
    line = f"rates measured in runs {', '.join(named)}"
    if not same:
        line += (
            f"; NOTE: none of them ran model {config.model} on {config.env}, so the "
            "prediction carries their rates over (a first run of this config measures its own)"
        )
    return line


def record_estimate(store: Store, config: RunConfig, made: Estimate) -> None:
    stages = made.table.astype(object).where(made.table.notna(), None).to_dict("records")
    store.write(
        {
            "estimates": [
                {
                    "run_id": made.run_id,
                    "config": config.model_dump_json(),
                    "predicted_s": made.predicted_s,
                    "unmeasured_stages": len(made.unmeasured),
                    "stages": json.dumps(stages),
                }
            ]
        }
    )


def format_estimate(made: Estimate, previous: pd.DataFrame) -> str:
    """The prediction, how it was made, and how far the last measured prediction was off."""
    if len(made.unmeasured) == len(made.table):
        headline = f"run {made.run_id!r}: no prediction: the store has measured no stage"
    else:
        headline = (
            f"run {made.run_id!r}: predicted {made.predicted_s:,.0f} s "
            f"({made.predicted_s / 60:.1f} min) on this machine"
        )
        if made.unmeasured:
            headline += f", without the {len(made.unmeasured)} stages it has no rate for"
    lines = [
        headline,
        f"from {made.scale.steps_source}, {made.scale.share_source}, "
        f"{made.scale.pairs_source}, and the store's measured seconds per unit;",
        made.sources + ":",
        made.table.to_string(index=False, na_rep="NULL", float_format=lambda v: f"{v:.3g}"),
    ]
    if made.unmeasured:
        lines.append(
            f"no measurement of {', '.join(made.unmeasured)} in the store: those stages are "
            "left out of the total (run a small config first, e.g. configs/smoke.yaml)"
        )
    if previous.empty:
        lines.append("no earlier prediction of a measured run to compare with")
    else:
        last = previous.iloc[0]
        off = last["measured_s"] - last["predicted_s"]
        share = f", {off / last['predicted_s']:+.0%}" if last["predicted_s"] > 0 else ""
        lines.append(
            f"last prediction of a measured run: {last['run_id']!r} predicted "
            f"{last['predicted_s']:,.0f} s ({last['unmeasured_stages']} stages unpredicted), "
            f"measured {last['measured_s']:,.0f} s over {last['measured_stages']} stages: "
            f"off by {off:+,.0f} s{share}"
        )
    return "\n".join(lines)
