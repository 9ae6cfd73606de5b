"""The IPR loop, defined once: the stages of a run and of one iteration, and the resume rule.

    ingest -> SFT -> evaluate (base, SFT) -> per iteration k = 1..N:
        explore -> expert step rewards (all once per scorer, or those compared)
        -> agent step rewards -> mine pairs -> mixture training -> evaluate

The scorer and the DPO reference are the SFT model throughout; iteration k's trained model
explores iteration k + 1 (`docs/method.md`). `ipr run --no-prefect`, the Prefect flows and
`ipr experiment` all call `run_iteration`; they differ only in the `Runner` that executes
a stage (a plain call, or a Prefect task around the same call).

One resume rule (`run_stage`): a stage is done when the store holds its completion record
(`stage_runs`) with the fingerprint of what the stage reads now, and the rows it recorded
are still there. The record is written in the transaction that writes the stage's rows and
its cost (`stage_costs`, `ipr_core.run.costs`), so a stage killed mid-write left none of
them and is redone. The rollout stages, hours at an experiment's sizes, commit their rows in
chunks as they go, with a partial record of the fingerprint they were computed for
(`Chunks`): killed, such a stage resumes after its last chunk. A stage whose fingerprint
matches another run's record copies that run's rows instead of recomputing them (every run
of an experiment shares the expert step rewards and the SFT model's greedy exploration, the
methods of one seed share iteration 1's agent step rewards and pairs; a greedy evaluation of
a model is done once).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import pandas as pd

from ipr_core.digest import digest
from ipr_core.engine.backends import release_engines
from ipr_core.method.evaluate import Episode, Evaluation, evaluate, summarize
from ipr_core.method.explore import Exploration, explore
from ipr_core.method.mining import PairContext, mine_pairs
from ipr_core.run import pipeline
from ipr_core.run.context import Chunks, Engines, MissingConfig, RunContext, ScoringJob
from ipr_core.run.costs import Meter, cost_row, training_figures
from ipr_core.run.fingerprints import (
    FINGERPRINT_CHARS,
    ROLLOUT_FIELDS,
    SCORING_FIELDS,
    fingerprinted,
)
from ipr_core.run.manifest import check_resume, run_manifest
from ipr_core.store import scopes
from ipr_core.store.store import (
    At,
    Row,
    RowKey,
    Scope,
    StageRecord,
    expert_from_row,
    manifest_row,
    pair_row,
    partial_name,
    rollout_row,
    training_step_rows,
)
from ipr_core.training.checkpoints import (
    COMPLETE_MARKER,
    TrainResult,
    base_checkpoint,
    checkpoint_row,
    model_id,
)
from ipr_core.training.data import pairs_data_hash
from ipr_core.training.methods import method
from ipr_core.training.mixture import train_mixture, trainable_pairs
from ipr_core.training.sft import train_sft
from ipr_core.types import (
    AGENT,
    BASE_ITERATION,
    EXPERT,
    EXPERT_ITERATION,
    Actor,
    RolloutKind,
    StageName,
    Trajectory,
    is_success,
)

R = TypeVar("R")
Rows = dict[str, list[Row]]
"""A stage's rows by table."""


# -- what stages take and return -----------------------------------------------------------
@dataclass(frozen=True)
class Split:
    """An evaluation's split and how many of its tasks."""

    name: str
    limit: int


@dataclass(frozen=True)
class Iteration:
    """What a stage works on: the iteration, the SFT model (scorer and DPO reference) and
    the policy (the explorer; for `evaluate`, the model evaluated)."""

    number: int
    sft_path: Path
    policy_path: Path
    split: Split | None = None
    """`evaluate` only; None: the config's dev split."""
    scorer: Path | None = None
    """The step scorer's model where it is not the SFT model (one fixed scorer for the
    seeds of an experiment whose seeds train their own SFT models)."""

    @property
    def scorer_path(self) -> Path:
        return self.sft_path if self.scorer is None else self.scorer


@dataclass(frozen=True)
class Ingested:
    experts: int
    steps: int


@dataclass(frozen=True)
class Trained:
    path: str
    checkpoint_id: str
    trained: bool = True
    """False when no pair feeds the loss and the policy stays as it was."""


@dataclass(frozen=True)
class StepsScored:
    queries: int
    scorer_id: str


@dataclass(frozen=True)
class Explored:
    explorations: int
    policy_id: str


@dataclass(frozen=True)
class Mined:
    trajectory: int
    step: int


@dataclass(frozen=True)
class IterationResult:
    expert: StepsScored | None
    """None (and `agent` too) when the method reads no step pair (`Needs.monte_carlo`)."""
    explored: Explored
    agent: StepsScored | None
    mined: Mined | None
    """None when the method trains on no pair (rft)."""
    trained: Trained
    evaluated: Evaluation


@dataclass(frozen=True)
class Output(Generic[R]):
    """A stage's result and the rows it writes (committed with its completion record)."""

    result: R
    rows: dict[str, list[Row]] = field(default_factory=dict)
    figures: dict[str, float] = field(default_factory=dict)
    """What the compute measured itself for its cost row (`ipr_core.run.costs.cost_row`)."""


@dataclass(frozen=True)
class Stage(Generic[R]):
    """One stage: what it reads (`fingerprint`), computes and owns in the store (`scopes`)."""

    name: StageName
    compute: Callable[[RunContext, Iteration], Output[R]]
    fingerprint: Callable[[RunContext, Iteration], str]
    scopes: Callable[[At, RunContext, Iteration, R], list[Scope]]
    result_type: type[R]
    label: Callable[[Iteration], str]
    replace: bool = True
    """Delete what the scopes held before writing (False: add to it)."""
    reusable: bool = True
    """Another run's rows with the same fingerprint may be copied."""
    trains: bool = False
    scores_steps: bool = False
    row_iteration: int | None = None
    """The iteration every run of the stage stores its rows under (None: its own)."""
    per_split: bool = False
    """One completion record per evaluated split."""
    chunk_scopes: Callable[[At, RunContext, Iteration], list[Scope]] | None = None
    """Set for a long stage that commits its rows in chunks (`RunContext.chunks`) and
    resumes from the last one: its scopes, known before it computes."""

    def at(self, ctx: RunContext, it: Iteration) -> At:
        return At(ctx.run_id, it.number if self.row_iteration is None else self.row_iteration)

    def record_name(self, ctx: RunContext, it: Iteration) -> str:
        return f"{self.name}-{eval_split(ctx, it).name}" if self.per_split else self.name

    def present(self, result: R) -> bool:
        """Whether what the result names outside the store (a model folder) still exists."""
        if isinstance(result, Trained):
            folder = Path(result.path).parent
            return (folder / COMPLETE_MARKER).exists() if result.trained else folder.exists()
        return True


class Runner(Protocol):
    """Executes one stage: `run_stage` itself, or a Prefect task around it."""

    def __call__(self, stage: Stage[R], ctx: RunContext, it: Iteration) -> R: ...


# -- the resume rule -----------------------------------------------------------------------
def run_stage(stage: Stage[R], ctx: RunContext, it: Iteration) -> R:
    """The stage's recorded result when it is done; else another run's identical rows,
    copied; else computed. Rows and completion record are committed together."""
    fingerprint = stage.fingerprint(ctx, it)
    at, name = stage.at(ctx, it), stage.record_name(ctx, it)
    record = ctx.store.stage_record(at.run_id, at.iteration, name)
    if record is not None and _holds(stage, ctx, it, record, fingerprint):
        ctx.log(f"{stage.label(it)}: done before (run {at.run_id}, fingerprint {fingerprint})")
        return stage.result_type(**record.result)
    meter = Meter()
    donor = _donor(stage, ctx, it, fingerprint) if stage.reusable else None
    new = StageRecord(at.run_id, at.iteration, name, fingerprint, {}, [])
    if donor is not None:
        result = stage.result_type(**donor.result)
        theirs = stage.scopes(At(donor.run_id, donor.iteration), ctx, it, result)
        ours = stage.scopes(at, ctx, it, result)
        cost = {"stage_costs": [cost_row(new, meter.figures(), {}, donor)]}
        ctx.store.copy_stage(
            donor, replace(new, result=donor.result), list(zip(theirs, ours, strict=True)), cost
        )
        ctx.log(
            f"{name} [iteration {at.iteration}]: rows of run {donor.run_id} (iteration "
            f"{donor.iteration}) copied: same inputs"
        )
        return result
    if stage.trains:
        release_engines()  # a GPU inference engine would hold the memory training needs
    chunks = _start_chunks(stage, ctx, it, new, meter) if stage.chunk_scopes else None
    ctx.chunks = chunks
    try:
        output = stage.compute(ctx, it)
    finally:
        ctx.chunks = None
    scopes = stage.scopes(at, ctx, it, output.result)
    figures = {**meter.figures(), **output.figures}
    # the chunks' rows are in: the cost counts them and the attempts before this one
    cost = cost_row(new, figures, output.rows, added=chunks.added() if chunks else None)
    rows = {**output.rows, "stage_costs": [cost]}
    # Committed chunks are the stage's rows: nothing to replace (unless none was committed
    # and an attempt with other inputs left rows to delete).
    keep = chunks is not None and not chunks.stale
    record = replace(new, result=_json(output.result))
    ctx.store.commit_stage(record, scopes, rows, stage.replace and not keep)
    return output.result


def _start_chunks(
    stage: Stage[Any], ctx: RunContext, it: Iteration, new: StageRecord, meter: Meter
) -> Chunks:
    """Resume the chunks an earlier attempt with the same fingerprint committed; otherwise
    start afresh, deleting what an attempt with other inputs left (unless the stage adds
    to its rows rather than replacing them)."""
    assert stage.chunk_scopes is not None
    name = partial_name(new.stage)
    partial = ctx.store.stage_record(new.run_id, new.iteration, name)
    if partial is not None and partial.fingerprint == new.fingerprint:
        done = partial.result.get("units", 0)
        ctx.log(f"{stage.label(it)}: resumes from its committed chunks ({done} done)")
        return Chunks(ctx.store, partial, dict(partial.result), meter)
    at = At(new.run_id, new.iteration)
    stale = stage.chunk_scopes(at, ctx, it) if stage.replace else []
    return Chunks(ctx.store, replace(new, stage=name, result={}), {}, meter, stale)


def _holds(
    stage: Stage[Any], ctx: RunContext, it: Iteration, record: StageRecord, fingerprint: str
) -> bool:
    """The record has this fingerprint and its rows (and model folder) are still there."""
    if record.fingerprint != fingerprint:
        return False
    result = stage.result_type(**record.result)
    scopes = stage.scopes(At(record.run_id, record.iteration), ctx, it, result)
    return ctx.store.scope_counts(scopes) == record.row_counts and stage.present(result)


def _donor(
    stage: Stage[Any], ctx: RunContext, it: Iteration, fingerprint: str
) -> StageRecord | None:
    at = stage.at(ctx, it)
    for record in ctx.store.stage_donors(stage.record_name(ctx, it), fingerprint):
        if (record.run_id, record.iteration) != (at.run_id, at.iteration) and _holds(
            stage, ctx, it, record, fingerprint
        ):
            return record
    return None


def _json(result: Any) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(result), default=str))


# -- long rollout stages in chunks ----------------------------------------------------------
CHUNK_LIVE_SETS = 2
"""The rollout stages (Monte Carlo, exploration, evaluation) commit their rows every this many
live sets of rollouts (`generation.max_live_episodes`): at an experiment's sizes they run
for hours, and a kill then loses one chunk, not the stage. A chunk runs as one batch of
work, so its batches stay full until its last episodes."""


def score_in_chunks(ctx: RunContext, job: ScoringJob, label: str) -> Rows:
    """Score `job`'s queries chunk by chunk. Inside `run_stage` each chunk's rows are
    committed as it finishes (`RunContext.chunks`) and none are returned; called alone, the
    rows are returned. A rollout is seeded by its query and sample, so chunking does not
    change what is sampled. Sharded scoring (`scale_out`) is one chunk: its shard files
    already resume shard by shard."""
    config = ctx.config
    size = max(
        1, CHUNK_LIVE_SETS * config.generation.max_live_episodes // config.monte_carlo.n_samples
    )
    if config.scale_out is not None:
        size = max(size, len(job.queries))
    rows: Rows = {}
    for start in range(0, len(job.queries), size):
        part = slice(start, start + size)
        pairs = None if job.pairs is None else job.pairs[part]
        chunk = ctx.score(replace(job, queries=job.queries[part], pairs=pairs), label)
        keep_chunk(ctx, rows, chunk, len(job.queries[part]))
    return rows


def keep_chunk(ctx: RunContext, kept: Rows, chunk: Rows, units: int) -> None:
    """A finished chunk of a rollout stage: committed inside `run_stage` (`RunContext.chunks`;
    `units`: the work it finished), else added to `kept`, the rows the stage returns."""
    if ctx.chunks is not None:
        ctx.chunks.save(chunk, units)
        return
    for table, table_rows in chunk.items():
        kept.setdefault(table, []).extend(table_rows)


# -- the loop ------------------------------------------------------------------------------
def run_iteration(ctx: RunContext, it: Iteration, run: Runner = run_stage) -> IterationResult:
    """One iteration: THE list of its stages, in order, each run where the method needs it
    (`ipr_core.training.methods`). A method that reads no step pair (ETO, RFT) skips the
    Monte Carlo stages and explores from the start of each task only; RFT mines no pairs and
    trains the SFT objective on the experts and its successful explorations."""
    needs = ctx.config.needs
    explored = run(EXPLORE, ctx, it)
    expert = run(expert_step_rewards(ctx), ctx, it) if needs.monte_carlo else None
    agent = run(AGENT_STEP_REWARDS, ctx, it) if needs.monte_carlo else None
    mined = run(MINE_PAIRS, ctx, it) if needs.pairs else None
    trained = run(TRAIN_MIXTURE if needs.pairs else TRAIN_RFT, ctx, it)
    evaluated = run(EVALUATE, ctx, replace(it, policy_path=Path(trained.path)))
    return IterationResult(expert, explored, agent, mined, trained, evaluated)


Iterate = Callable[[RunContext, Iteration, Runner], IterationResult]


def scores_steps(ctx: RunContext) -> bool:
    """Whether the run's method trains on step pairs, and so needs step rewards."""
    return ctx.config.needs.monte_carlo


@dataclass(frozen=True)
class RunResult:
    """What a run made: its model and dev evaluation per iteration (0: the SFT model), the
    iteration dev picked and, given a test split, that model's test evaluation."""

    policies: dict[int, Path]
    dev: dict[int, Evaluation]
    best: int
    test: Evaluation | None = None


def run_ipr(
    ctx: RunContext,
    run: Runner = run_stage,
    iterate: Iterate = run_iteration,
    test: Split | None = None,
    scorer: Path | None = None,
    fallback_to_sft: bool = False,
) -> RunResult:
    """A whole run: set-up, SFT, its evaluations, then the iterations of a method that
    trains; the iteration with the best dev evaluation (a trained one unless
    `fallback_to_sft`, the iteration-0 rule) and, with `test`, its test evaluation.
    `scorer`: the step scorer's model where it is not the run's SFT model."""
    config = ctx.config
    base = prepare_run(ctx, () if test is None else (test,))
    setup = Iteration(0, base, base)
    run(INGEST, ctx, setup)
    sft = base
    if config.sft is not None:
        if config.evaluate_base:
            run(EVALUATE, ctx, replace(setup, number=BASE_ITERATION))
        sft = Path(run(SFT, ctx, setup).path)
    policies = {0: sft}
    dev = {0: run(EVALUATE, ctx, Iteration(0, sft, sft))}
    trains = method(config.method).trains  # method `sft` stops after stage 1
    if trains:
        for k in range(1, config.iterations + 1):
            result = iterate(ctx, Iteration(k, sft, policies[k - 1], scorer=scorer), run)
            policies[k], dev[k] = Path(result.trained.path), result.evaluated
    first = 1 if trains and not fallback_to_sft else 0
    best = best_iteration({k: e for k, e in dev.items() if k >= first})
    if test is None:
        return RunResult(policies, dev, best)
    tested = run(EVALUATE, ctx, Iteration(best, sft, policies[best], split=test))
    return RunResult(policies, dev, best, tested)


def best_iteration(dev: dict[int, Evaluation]) -> int:
    """The iteration with the highest dev reward, then success rate (a missing figure
    ranks last); ties go to the earliest, the least trained model."""

    def rank(k: int) -> tuple[bool, float, bool, float, int]:
        e = dev[k]
        reward, success = e.avg_reward, e.success_rate
        return (reward is not None, reward or 0.0, success is not None, success or 0.0, -k)

    return max(dev, key=rank)


def prepare_run(ctx: RunContext, more_splits: Sequence[Split] = ()) -> Path:
    """Record the run, its manifest (over the train, dev and `more_splits` splits) and its
    base model (built once into the cache); the base model. A split with fewer distinct
    games than asked, or a resumed run whose manifest changes results, is refused first."""
    check_split_sizes(ctx.engines, *more_splits)
    base = ctx.base_path()
    checkpoint = base_checkpoint(base)
    splits = (ctx.config.train_split, ctx.config.dev_split, *(s.name for s in more_splits))
    row = {"run_id": ctx.run_id, "config": ctx.config.model_dump_json()}
    ctx.store.write(
        {
            "runs": [row],
            "checkpoints": [checkpoint_row(checkpoint)],
            "run_manifests": [checked_manifest(ctx, checkpoint.checkpoint_id, splits)],
        }
    )
    return base


def checked_manifest(ctx: RunContext, base_id: str, splits: Sequence[str]) -> Row:
    """The run's manifest row (`ipr_core.run.manifest`), computed once where the run starts and
    checked against the manifest the run was started with (`check_resume`)."""
    config = ctx.config
    split_ids = {split: ctx.engines.task_ids(split) for split in splits}
    now = run_manifest(config.env, config.backend, base_id, split_ids, ctx.prompt)
    stored = ctx.store.run_manifests(ctx.run_id)
    if stored:
        check_resume(ctx.run_id, stored[-1], now, ctx.allow_manifest_change, ctx.log)
    return manifest_row(ctx.run_id, now)


def eval_split(ctx: RunContext, it: Iteration) -> Split:
    return it.split or Split(ctx.config.dev_split, ctx.config.dev_limit)


def check_split_sizes(engines: Engines, *splits: Split) -> None:
    """Fail before a run writes anything (its store included) when the dev split (or one
    of `splits`) has fewer distinct games than the config asks for."""
    config = engines.config
    for split in (Split(config.dev_split, config.dev_limit), *splits):
        split_tasks(engines, split)


def split_tasks(engines: Engines, split: Split) -> tuple[str, ...]:
    """The distinct games an evaluation of `split` plays (too few is an error)."""
    setting = "dev_limit" if split.name == engines.config.dev_split else "test_limit"
    return engines.first_tasks(split.name, split.limit, setting)


# -- fingerprints: what each stage reads, hashed -------------------------------------------


def config_fields(ctx: RunContext, *fields: str) -> dict[str, Any]:
    """The named config fields, JSON-ready; `cache_dir` made absolute (it names the data),
    `env` spelt as the store first held it (`Store.fingerprint_env_id`)."""
    data = fingerprinted(ctx.config, set(fields))
    if "cache_dir" in data:
        data["cache_dir"] = str(Path(data["cache_dir"]).resolve())
    if "env" in data:
        data["env"] = ctx.store.fingerprint_env_id(data["env"])
    return data


def experts_hash(ctx: RunContext, explored: bool = True) -> str:
    experts = ctx.explored() if explored else ctx.experts()
    return digest(
        [
            [
                [t.task.task_id, t.task.instruction, t.task.initial_observation]
                + [[s.text for s in t.steps], t.outcome_reward]
                for t in experts
            ]
        ],
        FINGERPRINT_CHARS,
    )


def _scorer_fields(ctx: RunContext, it: Iteration) -> list[Any]:
    scorer_id = ctx.engines.scorer_id(it.scorer_path, it.number)
    return [model_id(it.scorer_path), scorer_id, config_fields(ctx, *SCORING_FIELDS)]


# -- ingest --------------------------------------------------------------------------------
def _ingest(ctx: RunContext, it: Iteration) -> Output[Ingested]:
    rows = pipeline.missing_expert_rows(ctx.store, ctx.config, ctx.log)
    experts = [expert_from_row(r) for r in rows] if rows else ctx.experts()
    steps = sum(len(e.steps) for e in experts)
    ctx.log(f"{len(experts)} expert trajectories, {steps} steps")
    return Output(Ingested(len(experts), steps), {"expert_trajectories": rows})


INGEST: Stage[Ingested] = Stage(
    name=StageName.INGEST,
    compute=_ingest,
    fingerprint=lambda ctx, it: digest(
        ["ingest", config_fields(ctx, "env", "train_split", "train_limit")], FINGERPRINT_CHARS
    ),
    scopes=lambda at, ctx, it, r: [scopes.experts(ctx.config.env, ctx.config.train_split)],
    result_type=Ingested,
    label=lambda it: "ingest",
    replace=False,
    reusable=False,
)


# -- SFT -----------------------------------------------------------------------------------
def _sft(ctx: RunContext, it: Iteration) -> Output[Trained]:
    config = ctx.config
    if config.sft is None:
        raise MissingConfig("the SFT stage needs the config's `sft` settings")
    result = train_sft(
        it.policy_path,
        ctx.experts(),
        ctx.prompt,
        config.sft,
        config.checkpoints_dir,
        config.compute,
    )
    ctx.log(f"SFT checkpoint {result.checkpoint_id} ({result.summary()})")
    return _trained_output(ctx, it, result)


def _trained_output(ctx: RunContext, it: Iteration, result: TrainResult) -> Output[Trained]:
    row = checkpoint_row(result, ctx.run_id, it.number)
    trained = Trained(str(result.path), result.checkpoint_id)
    figures = {} if result.skipped else training_figures(result.metrics)
    steps = training_step_rows(result, ctx.run_id, it.number)
    return Output(trained, {"checkpoints": [row], "training_steps": steps}, figures)


def _checkpoint_scope(at: At, ctx: RunContext, it: Iteration, r: Trained) -> list[Scope]:
    return [scopes.checkpoint(r.checkpoint_id)] if r.trained else []


SFT: Stage[Trained] = Stage(
    name=StageName.SFT,
    compute=_sft,
    fingerprint=lambda ctx, it: digest(
        [
            "sft",
            model_id(it.policy_path),
            experts_hash(ctx, explored=False),
            config_fields(ctx, "env", "sft", "prompt", "cache_dir"),
        ],
        FINGERPRINT_CHARS,
    ),
    scopes=_checkpoint_scope,
    result_type=Trained,
    label=lambda it: "sft",
    reusable=False,
    trains=True,
)


# -- evaluation ----------------------------------------------------------------------------
def _evaluate(ctx: RunContext, it: Iteration) -> Output[Evaluation]:
    split = eval_split(ctx, it)
    task_ids = split_tasks(ctx.engines, split)
    policy_id = model_id(it.policy_path)  # the backend's policy id
    episodes = _evaluation_scopes(At(ctx.run_id, it.number), ctx, it)[1]
    columns = "task_id, status, outcome_reward, n_steps"
    todo = task_ids
    if ctx.chunks is not None and ctx.chunks.resumed:  # the committed chunks' tasks are done
        done = set(ctx.store.scope_rows(episodes, "task_id")["task_id"])
        todo = [task_id for task_id in task_ids if task_id not in done]
    key = RowKey(ctx.run_id, it.number, RolloutKind.EVAL, 0, AGENT)
    size = CHUNK_LIVE_SETS * ctx.config.generation.max_live_episodes
    kept: Rows = {}
    with ExitStack() as stack:
        engine = ctx.engines.engine(stack, it.policy_path, f"evaluate[{it.number}]")
        for start in range(0, len(todo), size):
            _, rollouts = evaluate(engine, split.name, todo[start : start + size], ctx.config.seed)
            chunk = [rollout_row(r, key, engine.backend.policy_id) for r in rollouts]
            keep_chunk(ctx, kept, {"rollouts": chunk}, len(chunk))
    stored = ctx.store.scope_rows(episodes, columns).to_dict("records") if ctx.chunks else []
    rows = stored + kept.get("rollouts", [])
    result = summarize(
        split.name,
        policy_id,
        [Episode(r["status"], _float(r["outcome_reward"]), r["n_steps"]) for r in rows],
    )
    ctx.log(
        f"iteration {it.number}: {split.name} reward {result.avg_reward}, "
        f"success {result.success_rate}, steps {result.avg_steps} ({result.policy_id})"
    )
    evaluation = {"run_id": ctx.run_id, "iteration": it.number, **asdict(result)}
    return Output(result, {"evaluations": [evaluation], **kept})


def _float(value: Any) -> float | None:
    """A stored outcome: NULL (a failed episode) comes back as NaN or None."""
    return None if value is None or pd.isna(value) else float(value)


def _evaluation_scopes(at: At, ctx: RunContext, it: Iteration) -> list[Scope]:
    """The evaluation row and episodes of the model `it` evaluates (every backend takes the
    model's content id as its policy id)."""
    split = eval_split(ctx, it)
    task_ids = split_tasks(ctx.engines, split)
    return scopes.evaluation(at, model_id(it.policy_path), split.name, task_ids)


EVALUATE: Stage[Evaluation] = Stage(
    name=StageName.EVALUATE,
    compute=_evaluate,
    # greedy episodes: the model, the split and the rollout settings decide them, so the
    # iteration (a label) and the seed are left out and equal evaluations are done once
    fingerprint=lambda ctx, it: digest(
        [
            "evaluate",
            model_id(it.policy_path),
            asdict(eval_split(ctx, it)),
            config_fields(ctx, *ROLLOUT_FIELDS),
        ],
        FINGERPRINT_CHARS,
    ),
    scopes=lambda at, ctx, it, r: _evaluation_scopes(at, ctx, it),
    result_type=Evaluation,
    label=lambda it: f"evaluate[{it.number}]",
    per_split=True,
    chunk_scopes=_evaluation_scopes,
)


# -- Monte Carlo step rewards of the expert steps -----------------------------------------
def _expert_step_rewards(ctx: RunContext, it: Iteration) -> Output[StepsScored]:
    scorer_id = ctx.engines.scorer_id(it.scorer_path, it.number)
    at, experts = _expert_at(ctx, it), ctx.explored()
    compared = pipeline.compared_steps(ctx.store, at, experts) if _compares_only(ctx) else None
    queries = pipeline.pending_expert_queries(ctx.store, at, scorer_id, experts, compared)
    # seeded as iteration 0 whoever asks: a step's samples do not depend on when it is scored
    seed = ctx.seed(EXPERT_ITERATION)
    job = ScoringJob(at, EXPERT, it.scorer_path, tuple(queries), seed, it.number)
    rows = score_in_chunks(ctx, job, expert_step_rewards(ctx).label(it))
    scored = ctx.chunks.done_units if ctx.chunks else len(queries)  # by every attempt
    ctx.log(f"scored {scored} expert steps")
    return Output(StepsScored(scored, scorer_id), rows)


def _step_reward_scopes(
    actor: Actor,
) -> Callable[[At, RunContext, Iteration, StepsScored], list[Scope]]:
    """The step rewards of `actor` by the stage's scorer, and the MC rollouts behind them."""

    def owned(at: At, ctx: RunContext, it: Iteration, r: StepsScored) -> list[Scope]:
        return scopes.step_rewards(at, actor, r.scorer_id)

    return owned


def _scorer_scopes(actor: Actor) -> Callable[[At, RunContext, Iteration], list[Scope]]:
    """The same scopes before the stage computes: the scorer id is known from the model."""

    def owned(at: At, ctx: RunContext, it: Iteration) -> list[Scope]:
        return scopes.step_rewards(at, actor, ctx.engines.scorer_id(it.scorer_path, it.number))

    return owned


def _run_scope(owned: Callable[[At], Scope]) -> Callable[..., list[Scope]]:
    """The one scope of a stage in its (run, iteration)."""

    def scope(at: At, ctx: RunContext, it: Iteration, r: object) -> list[Scope]:
        return [owned(at)]

    return scope


def _compares_only(ctx: RunContext) -> bool:
    return ctx.config.monte_carlo.expert_steps == "compared"


def _expert_at(ctx: RunContext, it: Iteration) -> At:
    """Where expert step rewards are stored: iteration 0, or (`compared`) the iteration that
    first compared an agent step with them."""
    return At(ctx.run_id, it.number if _compares_only(ctx) else EXPERT_ITERATION)


def _expert_fingerprint(ctx: RunContext, it: Iteration) -> str:
    inputs = [
        "expert-step-rewards",
        *_scorer_fields(ctx, it),
        experts_hash(ctx),
        ctx.seed(EXPERT_ITERATION),
    ]
    if _compares_only(ctx):  # the steps compared, and those scored before (skipped)
        scorer_id = ctx.engines.scorer_id(it.scorer_path, it.number)
        earlier = At(ctx.run_id, it.number - 1)
        inputs += [
            ctx.store.explorations_hash(At(ctx.run_id, it.number)),
            ctx.store.step_rewards_hash(earlier, EXPERT, scorer_id),
        ]
    return digest(inputs, FINGERPRINT_CHARS)


EXPERT_STEP_REWARDS: Stage[StepsScored] = Stage(
    name=StageName.EXPERT_STEP_REWARDS,
    compute=_expert_step_rewards,
    fingerprint=_expert_fingerprint,
    scopes=_step_reward_scopes(EXPERT),
    result_type=StepsScored,
    label=lambda it: "expert step rewards",
    replace=False,
    scores_steps=True,
    row_iteration=EXPERT_ITERATION,
    chunk_scopes=_scorer_scopes(EXPERT),
)
"""Every expert step, once per run and scorer, under iteration 0 (`expert_steps: all`); it
adds to its rows, so a run that explores more tasks scores only their steps."""

COMPARED_EXPERT_STEP_REWARDS: Stage[StepsScored] = replace(
    EXPERT_STEP_REWARDS,
    label=lambda it: f"expert step rewards[{it.number}]",
    replace=True,
    row_iteration=None,
)
"""`expert_steps: compared`: each iteration's stage owns the expert steps it scored first."""


def expert_step_rewards(ctx: RunContext) -> Stage[StepsScored]:
    """The expert stage of the run's `monte_carlo.expert_steps`."""
    return COMPARED_EXPERT_STEP_REWARDS if _compares_only(ctx) else EXPERT_STEP_REWARDS


# -- exploration ---------------------------------------------------------------------------
def _explore(ctx: RunContext, it: Iteration) -> Output[Explored]:
    # greedy: the policy alone decides the episodes, so the seed is not fingerprinted and
    # the runs of every seed copy iteration 1's exploration of the SFT model
    from_start_only = not scores_steps(ctx)
    experts = ctx.explored()
    todo = experts
    if ctx.chunks is not None and ctx.chunks.resumed:  # the committed chunks' experts are done
        stored = ctx.store.explorations(ctx.run_id, it.number, experts)
        done = {e.expert.task.task_id for e in stored}
        todo = [expert for expert in experts if expert.task.task_id not in done]
    size = CHUNK_LIVE_SETS * ctx.config.generation.max_live_episodes
    kept: Rows = {}
    with ExitStack() as stack:
        engine = ctx.engines.engine(stack, it.policy_path, f"explore[{it.number}]")
        for chunk in _expert_chunks(todo, size, from_start_only):
            explorations = explore(engine, chunk, from_start_only, ctx.config.cut_explorations)
            chunk_rows = [
                rollout_row(
                    e.rollout,
                    RowKey(ctx.run_id, it.number, RolloutKind.EXPLORE, e.prefix_len, AGENT),
                    engine.backend.policy_id,
                )
                for e in explorations
            ]
            keep_chunk(ctx, kept, {"rollouts": chunk_rows}, len(chunk))
        policy_id = engine.backend.policy_id
    total = len(experts) if from_start_only else sum(len(e.steps) for e in experts)
    ctx.log(f"iteration {it.number}: {total} explorations")
    return Output(Explored(total, policy_id), kept)


def _expert_chunks(
    experts: Sequence[Trajectory], size: int, from_start_only: bool
) -> list[list[Trajectory]]:
    """Whole experts per chunk, about `size` episodes each (one per explored prefix)."""
    chunks: list[list[Trajectory]] = [[]]
    episodes = 0
    for expert in experts:
        if chunks[-1] and episodes >= size:
            chunks.append([])
            episodes = 0
        chunks[-1].append(expert)
        episodes += 1 if from_start_only else len(expert.steps)
    return [chunk for chunk in chunks if chunk]


EXPLORE: Stage[Explored] = Stage(
    name=StageName.EXPLORE,
    compute=_explore,
    fingerprint=lambda ctx, it: digest(
        [
            "explore",
            model_id(it.policy_path),
            experts_hash(ctx),
            it.number,
            scores_steps(ctx),
            config_fields(ctx, *ROLLOUT_FIELDS, "cut_explorations"),
        ],
        FINGERPRINT_CHARS,
    ),
    scopes=_run_scope(scopes.explorations),
    result_type=Explored,
    label=lambda it: f"explore[{it.number}]",
    chunk_scopes=lambda at, ctx, it: [scopes.explorations(at)],
)


# -- Monte Carlo step rewards of the agent's own first actions -----------------------------
def _agent_step_rewards(ctx: RunContext, it: Iteration) -> Output[StepsScored]:
    explorations = ctx.store.explorations(ctx.run_id, it.number, ctx.explored())
    queries = pipeline.agent_queries(explorations)
    at = At(ctx.run_id, it.number)
    scorer_id = ctx.engines.scorer_id(it.scorer_path, it.number)
    pairs = _pair_contexts(ctx, it, explorations, scorer_id) if _stops_early(ctx) else None
    todo = range(len(queries))
    if ctx.chunks is not None and ctx.chunks.resumed:  # the committed chunks' steps are done
        done = ctx.store.step_reward_map(At(ctx.run_id, it.number), AGENT, scorer_id)
        todo = [i for i, q in enumerate(queries) if (q.task_id, q.prefix_len) not in done]
    job = ScoringJob(
        at,
        AGENT,
        it.scorer_path,
        tuple(queries[i] for i in todo),
        ctx.seed(at.iteration),
        it.number,
        None if pairs is None else tuple(pairs[i] for i in todo),
    )
    rows = score_in_chunks(ctx, job, f"agent step rewards[{it.number}]")
    ctx.log(f"iteration {it.number}: scored {len(queries)} agent steps")
    return Output(StepsScored(len(queries), scorer_id), rows)


def _stops_early(ctx: RunContext) -> bool:
    return ctx.config.monte_carlo.early_stop


def _pair_contexts(
    ctx: RunContext, it: Iteration, explorations: Sequence[Exploration], scorer_id: str
) -> tuple[PairContext, ...]:
    """What each agent query's pair decision knows before sampling (`pipeline.agent_queries`
    order): the expert step's reward, both outcomes, whether a step pair is mined there."""
    experts = ctx.store.step_reward_map(At(ctx.run_id, it.number), EXPERT, scorer_id)
    suffix = ctx.config.mining.step_mode == "suffix"
    return tuple(
        PairContext(
            expert_reward=experts.get((e.expert.task.task_id, e.prefix_len)),
            expert_outcome=e.expert.outcome_reward,
            agent_outcome=e.rollout.outcome_reward,
            makes_step_pair=not (suffix and e.prefix_len == 0),
        )
        for e in explorations
        if e.agent_step_query() is not None
    )


AGENT_STEP_REWARDS: Stage[StepsScored] = Stage(
    name=StageName.AGENT_STEP_REWARDS,
    compute=_agent_step_rewards,
    fingerprint=lambda ctx, it: digest(
        [
            "agent-step-rewards",
            *_scorer_fields(ctx, it),
            ctx.store.explorations_hash(At(ctx.run_id, it.number)),
            it.number,
            ctx.seed(it.number),
            *(_early_stop_inputs(ctx, it) if _stops_early(ctx) else ()),
        ],
        FINGERPRINT_CHARS,
    ),
    scopes=_step_reward_scopes(AGENT),
    result_type=StepsScored,
    label=lambda it: f"agent step rewards[{it.number}]",
    scores_steps=True,
    chunk_scopes=_scorer_scopes(AGENT),
)


def _early_stop_inputs(ctx: RunContext, it: Iteration) -> list[Any]:
    """What early stopping reads besides the explorations: the mining rule and the expert
    step rewards."""
    scorer_id = ctx.engines.scorer_id(it.scorer_path, it.number)
    expert = ctx.store.step_rewards_hash(At(ctx.run_id, it.number), EXPERT, scorer_id)
    return [config_fields(ctx, "mining"), expert]


# -- pairs ---------------------------------------------------------------------------------
def _mine(ctx: RunContext, it: Iteration) -> Output[Mined]:
    scorer_id = ctx.engines.scorer_id(it.scorer_path, it.number)
    explorations = ctx.store.explorations(ctx.run_id, it.number, ctx.explored())
    expert_rewards = ctx.store.step_reward_map(At(ctx.run_id, it.number), EXPERT, scorer_id)
    agent_rewards = ctx.store.step_reward_map(At(ctx.run_id, it.number), AGENT, scorer_id)
    mining = ctx.config.mining
    pairs = mine_pairs(explorations, expert_rewards, agent_rewards, mining, ctx.prompt)
    counts = {"trajectory": 0, "step": 0}
    for pair in pairs:
        counts[pair.level] += 1
    ctx.log(
        f"iteration {it.number}: {counts['trajectory']} trajectory, {counts['step']} step pairs"
    )
    rows = [pair_row(p, ctx.run_id, it.number, ctx.config.env, mining.step_mode) for p in pairs]
    return Output(Mined(**counts), {"pairs": rows})


def _mine_fingerprint(ctx: RunContext, it: Iteration) -> str:
    scorer_id = ctx.engines.scorer_id(it.scorer_path, it.number)
    return digest(
        [
            "mine-pairs",
            scorer_id,
            it.number,
            experts_hash(ctx),
            ctx.store.explorations_hash(At(ctx.run_id, it.number)),
            ctx.store.step_rewards_hash(At(ctx.run_id, it.number), EXPERT, scorer_id),
            ctx.store.step_rewards_hash(At(ctx.run_id, it.number), AGENT, scorer_id),
            ctx.prompt.action_hint,
            config_fields(ctx, "env", "mining", "prompt"),
        ],
        FINGERPRINT_CHARS,
    )


MINE_PAIRS: Stage[Mined] = Stage(
    name=StageName.MINE_PAIRS,
    compute=_mine,
    fingerprint=_mine_fingerprint,
    scopes=_run_scope(scopes.pairs),
    result_type=Mined,
    label=lambda it: f"mine-pairs[{it.number}]",
)


# -- mixture training ----------------------------------------------------------------------
def _train(ctx: RunContext, it: Iteration) -> Output[Trained]:
    """o-DPO + s-DPO + SFT on the iteration's pairs, from the policy (the SFT model first),
    reference = SFT. Without a pair the method's loss uses, the policy stays as it was."""
    settings = ctx.config.mixture_settings
    if settings is None:
        raise MissingConfig(f"method {ctx.config.method!r} trains no mixture")
    pairs = ctx.store.pairs(ctx.run_id, it.number)
    if not trainable_pairs(pairs, settings.weights):
        method = ctx.config.method
        ctx.log(f"iteration {it.number}: no pair for the {method} loss; the model stays")
        return Output(Trained(str(it.policy_path), model_id(it.policy_path), trained=False))
    result = train_mixture(
        it.sft_path,
        pairs,
        settings,
        ctx.config.checkpoints_dir,
        parent_path=None if it.policy_path == it.sft_path else it.policy_path,
        compute=ctx.config.compute,
    )
    ctx.log(f"iteration {it.number}: mixture {result.checkpoint_id} ({result.summary()})")
    return _trained_output(ctx, it, result)


def _train_fingerprint(ctx: RunContext, it: Iteration) -> str:
    settings = ctx.config.mixture_settings
    return digest(
        [
            "train-mixture",
            model_id(it.sft_path),
            model_id(it.policy_path),
            pairs_data_hash(ctx.store.pairs(ctx.run_id, it.number)),
            it.number,
            None if settings is None else settings.model_dump(mode="json"),
            config_fields(ctx, "cache_dir"),
        ],
        FINGERPRINT_CHARS,
    )


TRAIN_MIXTURE: Stage[Trained] = Stage(
    name=StageName.TRAIN_MIXTURE,
    compute=_train,
    fingerprint=_train_fingerprint,
    scopes=_checkpoint_scope,
    result_type=Trained,
    label=lambda it: f"train-mixture[{it.number}]",
    reusable=False,
    trains=True,
)


# -- rejection-sampling fine-tuning (rft) ---------------------------------------------------
def rft_examples(
    experts: Sequence[Trajectory], explored: Sequence[Exploration]
) -> list[Trajectory]:
    """What RFT trains on: the expert trajectories, then the explorations from the start of
    a task that succeeded (`is_success`; step-level explorations left out)."""
    successes = [
        e.rollout.trajectory
        for e in explored
        if e.prefix_len == 0 and is_success(e.rollout.status, e.rollout.outcome_reward)
    ]
    return [*experts, *successes]


def _train_rft(ctx: RunContext, it: Iteration) -> Output[Trained]:
    """The SFT objective, from the policy, on `rft_examples` (the SFT settings)."""
    config = ctx.config
    if config.sft is None:
        raise MissingConfig("rft trains with the config's `sft` settings")
    explored = ctx.store.explorations(ctx.run_id, it.number, ctx.explored())
    examples = rft_examples(ctx.experts(), explored)
    result = train_sft(
        it.policy_path, examples, ctx.prompt, config.sft, config.checkpoints_dir, config.compute
    )
    ctx.log(
        f"iteration {it.number}: rft {result.checkpoint_id} on {len(examples)} trajectories "
        f"({len(examples) - len(ctx.experts())} explored) ({result.summary()})"
    )
    return _trained_output(ctx, it, result)


TRAIN_RFT: Stage[Trained] = Stage(
    name=StageName.TRAIN_RFT,
    compute=_train_rft,
    fingerprint=lambda ctx, it: digest(
        [
            "train-rft",
            model_id(it.policy_path),
            experts_hash(ctx, explored=False),
            ctx.store.explorations_hash(At(ctx.run_id, it.number)),
            it.number,
            config_fields(ctx, "env", "sft", "prompt", "cache_dir"),
        ],
        FINGERPRINT_CHARS,
    ),
    scopes=_checkpoint_scope,
    result_type=Trained,
    label=lambda it: f"train-rft[{it.number}]",
    reusable=False,
    trains=True,
)


def iteration_summary(ctx: RunContext) -> pd.DataFrame:
    return ctx.store.iteration_summary(ctx.run_id, ctx.config.dev_split)
