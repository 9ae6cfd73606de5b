"""`ipr`: the commands over the library; `flows.cli` adds the orchestrated `run` and `serve`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import pandas as pd

from ipr_core import OMP_WAIT_FROM_ENVIRONMENT
from ipr_core.config import RunConfig, read_yaml_mapping
from ipr_core.errors import IprError, raised_by_interrupt

RUN_DEFAULTS = RunConfig.model_fields
"""The typed run config is the one source of defaults: a command's option that sets a run
setting defaults to that setting's default."""
DEFAULT_STORE: Path = RUN_DEFAULTS["store"].default


def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    """Run one command; `parser` lets the orchestration layer add its own commands."""
    sys.stdout.reconfigure(line_buffering=True)  # progress lines reach a log file at once
    quiet_libraries()
    parser = parser or build_parser()[0]
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except KeyboardInterrupt:  # Ctrl-C: engines and env processes were closed on the way out
        pass
    except Exception as exc:
        if not raised_by_interrupt(exc):  # else a library's clean-up failed on the way out
            if not isinstance(exc, IprError):
                raise
            print(f"error: {exc}", file=sys.stderr)
            return 2
    print("error: interrupted; the same command resumes from the finished stages", file=sys.stderr)
    return 130


def quiet_libraries() -> None:
    """Progress bars and advice from the ML libraries drown the pipeline's own log."""
    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    warnings.filterwarnings("ignore", category=FutureWarning)
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    disable_progress_bars()
    transformers_logging.disable_progress_bar()


def own_the_cores() -> None:
    """The rollout benchmark measures the engine against the hardware on a quiet machine, so
    its OpenMP threads spin at barriers (ACTIVE) there: ~20% faster than ipr's PASSIVE
    default on cores a process owns (docs/benchmarks.md). A policy the environment chose
    wins; once torch has loaded its OpenMP runtime, the policy it read stays."""
    if not OMP_WAIT_FROM_ENVIRONMENT and "torch" not in sys.modules:
        os.environ["OMP_WAIT_POLICY"] = "ACTIVE"


def build_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """The library's commands, and the subparsers object to add more to."""
    parser = argparse.ArgumentParser(prog="ipr", description=__doc__)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    envs = commands.add_parser(
        "envs",
        help="list env ids, their parameters and step bounds; with env ids, their distinct "
        "games per split",
    )
    envs.add_argument(
        "env_ids", nargs="*", help="settings to count distinct games of, e.g. 'twx/twc?items=1'"
    )
    envs.set_defaults(handler=cmd_envs)

    ingest = commands.add_parser("ingest", help="store expert trajectories")
    ingest.add_argument(
        "--env", required=True, help="env id, e.g. twx/cookingworld or 'twx/twc?items=1'"
    )
    ingest.add_argument("--split", default=RUN_DEFAULTS["train_split"].default)
    ingest.add_argument("--limit", type=int, default=10, help="trajectories to keep")
    ingest.add_argument("--source", type=Path, help="an IPR/ETO SFT JSON file to import")
    ingest.add_argument(
        "--replace", action="store_true", help="replace expert ids the store holds already"
    )
    ingest.add_argument("--store", type=Path, default=DEFAULT_STORE)
    ingest.set_defaults(handler=cmd_ingest)

    sql = commands.add_parser("sql", help="run a read-only SQL query on the store")
    sql.add_argument("query")
    sql.add_argument("--store", type=Path, default=DEFAULT_STORE)
    sql.add_argument("--max-rows", type=int, default=50)
    sql.set_defaults(handler=cmd_sql)

    train = commands.add_parser("train", help="train a model from the store")
    methods = train.add_subparsers(required=True, metavar="METHOD")
    sft = methods.add_parser("sft", help="SFT on the store's expert trajectories")
    sft.add_argument("--config", type=Path, required=True, help="run config (model, env, sft)")
    sft.add_argument("--store", type=Path, help="overrides the config's store")
    add_overrides_argument(sft)
    sft.set_defaults(handler=cmd_train_sft)
    mixture = methods.add_parser("mixture", help="o-DPO + s-DPO + SFT on an iteration's pairs")
    mixture.add_argument("--config", type=Path, required=True)
    mixture.add_argument("--store", type=Path, help="overrides the config's store")
    mixture.add_argument("--iteration", type=int, required=True, help="whose pairs to train on")
    mixture.add_argument("--run-id", help="whose pairs (default: the config's run id)")
    mixture.add_argument("--sft-model", type=Path, required=True, help="reference model folder")
    mixture.add_argument("--policy", type=Path, help="model to train (default: --sft-model)")
    add_overrides_argument(mixture)
    mixture.set_defaults(handler=cmd_train_mixture)

    reward = methods.add_parser("reward-model", help="regress MC step rewards (paper 5.5)")
    reward.add_argument("--config", type=Path, required=True)
    reward.add_argument("--store", type=Path, help="overrides the config's store")
    reward.add_argument("--scorer-id", help="whose step rewards (default: the run's SFT model)")
    reward.add_argument("--epochs", type=float, help="default: the reward model settings'")
    reward.add_argument("--lora", action="store_true", help="train a LoRA adapter + head")
    add_overrides_argument(reward)
    reward.set_defaults(handler=cmd_train_reward_model)

    evaluate = commands.add_parser("evaluate", help="greedy episodes of a model on a split")
    evaluate.add_argument("--config", type=Path, required=True)
    evaluate.add_argument("--model", required=True, help="model spec or folder")
    evaluate.add_argument("--store", type=Path, help="overrides the config's store")
    evaluate.add_argument("--split", default="test")
    evaluate.add_argument("--limit", type=int, default=20)
    evaluate.add_argument("--iteration", type=int, default=0, help="label for the row")
    add_overrides_argument(evaluate)
    evaluate.set_defaults(handler=cmd_evaluate)

    export = commands.add_parser("export", help="write IPR/ETO JSON from the store")
    export.add_argument("what", choices=["sft", "pairs"])
    export.add_argument("--out", type=Path, required=True)
    export.add_argument("--store", type=Path, default=DEFAULT_STORE)
    export.add_argument("--env", help="sft: the env id")
    export.add_argument("--split", default=RUN_DEFAULTS["train_split"].default)
    export.add_argument("--run-id", default=RUN_DEFAULTS["run_id"].default, help="pairs: the run")
    export.add_argument("--iteration", type=int, help="pairs: one iteration (default: all)")
    export.set_defaults(handler=cmd_export)

    bench = commands.add_parser("bench", help="benchmarks that print figures")
    benches = bench.add_subparsers(required=True, metavar="BENCH")
    rollouts = benches.add_parser("rollouts", help="MC step rewards: engine vs reference vs limit")
    rollouts.add_argument("--config", type=Path, default=Path("configs/bench.yaml"))
    rollouts.add_argument("--out", type=Path, required=True, help="JSON report")
    rollouts.add_argument(
        "--compare", metavar="ENGINE", help="also run ENGINE on the same prompts (ctranslate2)"
    )
    rollouts.set_defaults(handler=cmd_bench_rollouts)
    training = benches.add_parser("training", help="SFT and mixture vs the bare-model limit")
    training.add_argument("--config", type=Path, default=Path("configs/bench-training.yaml"))
    training.add_argument("--out", type=Path, required=True, help="JSON report")
    training.set_defaults(handler=cmd_bench_training)

    tokens = commands.add_parser("tokens", help="mean tokens per prompt part of expert episodes")
    tokens.add_argument(
        "--config", type=Path, required=True, help="run or experiment config (env, model, prompt)"
    )
    tokens.add_argument("--store", type=Path, help="overrides the config's store")
    tokens.add_argument(
        "--history-window", type=int, help="overrides the config's prompt.history_window"
    )
    tokens.set_defaults(handler=cmd_tokens)

    report = commands.add_parser("report", help="write an experiment's results as markdown")
    report.add_argument("--experiment", required=True, help="the experiment id")
    report.add_argument("--out", type=Path, required=True, help="e.g. docs/results.md")
    report.add_argument("--store", type=Path, default=DEFAULT_STORE)
    report.set_defaults(handler=cmd_report)
    add_research_commands(commands)
    return parser, commands


def add_research_commands(commands: argparse._SubParsersAction) -> None:
    """`import-pairs`, `estimate` and `show`: your own data, a run's cost, one episode."""
    pairs = commands.add_parser("import-pairs", help="store an IPR/ETO pair file's pairs")
    pairs.add_argument("file", type=Path, help="JSON list or JSON lines of {id, prompt, ...}")
    pairs.add_argument("--run-id", required=True, help="the run to store them under")
    pairs.add_argument("--iteration", type=int, required=True, help="the iteration to store")
    pairs.add_argument("--env", help="env id of records without an env_id field")
    pairs.add_argument("--replace", action="store_true", help="replace the iteration's pairs")
    pairs.add_argument("--store", type=Path, default=DEFAULT_STORE)
    pairs.set_defaults(handler=cmd_import_pairs)

    estimate = commands.add_parser("estimate", help="predict a run's time from measured costs")
    estimate.add_argument("--config", type=Path, required=True)
    estimate.add_argument(
        "--store", type=Path, help="where the measurements are (default: the config's store)"
    )
    add_overrides_argument(estimate)
    estimate.set_defaults(handler=cmd_estimate)

    checkpoints = commands.add_parser(
        "checkpoints", help="a store's LoRA checkpoints as small files to commit, and back"
    )
    moves = checkpoints.add_subparsers(required=True, metavar="ACTION")
    export = moves.add_parser("export", help="adapters and records of the store's checkpoints")
    export.add_argument("--store", type=Path, required=True)
    export.add_argument("--to", type=Path, required=True, help="folder to commit beside the store")
    export.add_argument(
        "--experiment",
        help="only what resuming this experiment needs (its unfinished runs' checkpoints, each "
        "seed's SFT model, their parents); earlier exports of others are removed from --to",
    )
    export.set_defaults(handler=cmd_checkpoints_export)
    restore = moves.add_parser("import", help="rebuild exported checkpoints this machine lacks")
    restore.add_argument("--store", type=Path, required=True)
    restore.add_argument("--from", dest="source", type=Path, required=True)
    restore.add_argument("--cache-dir", type=Path, default=RUN_DEFAULTS["cache_dir"].default)
    restore.set_defaults(handler=cmd_checkpoints_import)

    snapshot = commands.add_parser(
        "snapshot",
        help="a running store's consistent copy and the checkpoints a resume needs, to commit",
    )
    snapshot.add_argument("--store", type=Path, required=True)
    snapshot.add_argument(
        "--to", type=Path, required=True, help="the copy; checkpoints go to <its name>-checkpoints/"
    )
    snapshot.add_argument(
        "--experiment", help="only the checkpoints resuming this experiment needs"
    )
    snapshot.set_defaults(handler=cmd_snapshot)

    show = commands.add_parser("show", help="a stored rollout or pair as a transcript")
    show.add_argument("what", choices=["rollout", "pair"])
    show.add_argument("id", help="the short id (rollout_ids / pair_ids views, ipr report)")
    show.add_argument("--store", type=Path, default=DEFAULT_STORE)
    show.set_defaults(handler=cmd_show)


def cmd_import_pairs(args: argparse.Namespace) -> int:
    from ipr_core.envs import canonical_env_id
    from ipr_core.store.formats import pair_rows_of_file
    from ipr_core.store.store import At, Store

    env_id = None if args.env is None else canonical_env_id(args.env)
    rows = pair_rows_of_file(args.file, args.run_id, args.iteration, env_id)
    written, held = Store(args.store).import_pairs(
        rows, At(args.run_id, args.iteration), args.replace
    )
    if held and not args.replace:
        raise IprError(
            f"{args.store}: run {args.run_id!r} iteration {args.iteration} holds "
            f"{held} pairs; pass --replace to replace them"
        )
    print(
        f"imported {written} pairs from {args.file} into run {args.run_id!r} iteration "
        f"{args.iteration} of {args.store} (replaced {held})"
    )
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    from ipr_core.run.costs import estimate, format_estimate, record_estimate
    from ipr_core.store.store import Store

    if "experiment_id" in read_yaml_mapping(args.config):
        return _estimate_experiment(args)
    config = config_from_args(args)
    store = Store(config.store)
    made = estimate(store, config)
    print(format_estimate(made, store.previous_estimate()))
    if len(made.unmeasured) < len(made.table):  # a prediction without a rate is not kept
        record_estimate(store, config, made)
    return 0


def _estimate_experiment(args: argparse.Namespace) -> int:
    from ipr_core.run.experiment import estimate_experiment, load_experiment_config
    from ipr_core.store.store import Store

    config = load_experiment_config(args.config, args.overrides, args.store)
    runs = estimate_experiment(Store(config.run.store, read_only=True), config)
    total, measured = runs["predicted_s"].sum(), runs["measured_s"].sum()
    finished = runs["status"] == "finished"
    # a running run's measured seconds are done work; a run past its prediction leaves none
    left = (runs.loc[~finished, "predicted_s"] - runs.loc[~finished, "measured_s"]).clip(lower=0)
    print(
        f"experiment {config.experiment_id!r}: predicted {total:,.0f} s ({total / 3600:.1f} h) "
        f"on this machine, {len(runs)} runs (the stages runs of one SFT model share counted "
        "once; test evaluations included)"
    )
    print(
        f"measured so far: {measured:,.0f} s ({measured / 3600:.1f} h); the {finished.sum()} "
        f"finished runs predicted {runs.loc[finished, 'predicted_s'].sum():,.0f} s, measured "
        f"{runs.loc[finished, 'measured_s'].sum():,.0f} s; left: {left.sum():,.0f} s "
        f"({left.sum() / 3600:.1f} h) predicted for the {(~finished).sum()} unfinished runs"
    )
    print(runs.to_string(index=False, float_format=lambda v: f"{v:,.0f}"))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from ipr_core.store.store import Store
    from ipr_core.store.transcripts import pair_transcript, rollout_transcript

    store = Store(args.store, read_only=True)
    if args.what == "pair":
        row = store.pair_by_id(args.id)
        if row is None:
            raise IprError(f"{args.store}: no pair with id {args.id!r} (see the pair_ids view)")
        print(pair_transcript(row, store.pair_mc_samples(args.id)))
        return 0
    row = store.rollout_by_id(args.id)
    if row is None:
        raise IprError(f"{args.store}: no rollout with id {args.id!r} (see the rollout_ids view)")
    experts = {t.task.task_id: t for t in store.expert_trajectories(row["env_id"])}
    rewards = store.task_step_rewards(row["run_id"], row["task_id"])
    print(rollout_transcript(row, experts.get(row["task_id"]), rewards))
    return 0


def cmd_envs(args: argparse.Namespace) -> int:
    from ipr_core.envs import describe_envs, describe_games

    print(describe_games(args.env_ids) if args.env_ids else describe_envs())
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from ipr_core.envs import canonical_env_id, make_env
    from ipr_core.run.pipeline import ingest_file, ingest_gold
    from ipr_core.store.formats import load_sft_file
    from ipr_core.store.store import Store

    env_id = canonical_env_id(args.env)  # a bad env id fails before the store is opened
    if args.source is not None:
        make_env(env_id).close()  # nor is anything read for an env that cannot start
        trajectories = load_sft_file(args.source, env_id, args.split)  # a bad file: no store
        written, replaced = ingest_file(
            Store(args.store), trajectories, str(args.source), args.replace
        )
        print(
            f"imported {written} expert trajectories from {args.source} into {args.store}"
            f" (replaced {replaced})"
        )
        return 0
    report = ingest_gold(Store(args.store), env_id, args.split, args.limit, args.replace)
    for rejected in report.rejected:
        print(f"skipped {rejected.task_id}: {rejected.reason}")
    print(f"wrote {report.written} expert trajectories of {env_id} {args.split} to {args.store}")
    return 0 if report.written == args.limit else 1


def cmd_bench_rollouts(args: argparse.Namespace) -> int:
    own_the_cores()
    from flows.bench import format_table, load_bench_config, run_bench

    report = run_bench(load_bench_config(args.config), args.compare)
    return _write_bench_report(report, format_table(report), args.out)


def cmd_bench_training(args: argparse.Namespace) -> int:
    from flows.bench_training import (
        format_table,
        load_training_bench_config,
        run_training_bench,
    )

    report = run_training_bench(load_training_bench_config(args.config))
    return _write_bench_report(report, format_table(report), args.out)


def _write_bench_report(report: dict, table: str, out: Path) -> int:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(table)
    print(f"wrote {out}")
    return 0


def cmd_checkpoints_export(args: argparse.Namespace) -> int:
    from ipr_core.run.portable import export_checkpoints
    from ipr_core.store.store import Store

    store = Store(args.store, read_only=True)
    exported, skipped = export_checkpoints(store, args.to, args.experiment)
    print(f"{len(exported)} checkpoints in {args.to}: {' '.join(exported)}")
    print_not_exported(skipped)
    return 0


def print_not_exported(skipped: list[str]) -> None:
    if skipped:
        print(f"not exported (not on this machine, or no adapter): {' '.join(skipped)}")


def cmd_checkpoints_import(args: argparse.Namespace) -> int:
    from ipr_core.run.portable import import_checkpoints
    from ipr_core.store.store import Store

    store = Store(args.store, read_only=True)
    rebuilt = import_checkpoints(store, args.source, args.cache_dir)
    print(f"{len(rebuilt)} checkpoints rebuilt in {args.cache_dir}: {' '.join(rebuilt)}")
    return 0


def cmd_snapshot(args: argparse.Namespace) -> int:
    from ipr_core.run.portable import snapshot
    from ipr_core.store.store import Store

    store = Store(args.store, read_only=True)
    folder, exported, skipped = snapshot(store, args.to, args.experiment)
    print(f"copied {args.store} to {args.to}; {len(exported)} checkpoints in {folder}")
    print_not_exported(skipped)
    return 0


def cmd_sql(args: argparse.Namespace) -> int:
    from ipr_core.store.store import Store

    frame = Store(args.store, read_only=True).user_query(args.query)
    print_table(frame, args.max_rows)
    return 0


def add_overrides_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set one setting of the config, a dotted key and a YAML value, e.g. "
        "mixture.lr=5.0e-5 (repeatable)",
    )


def config_from_args(args: argparse.Namespace):
    """The config of `--config`, with `--set`, `--store` and `--run-id` where given."""
    from ipr_core.config import load_config, parse_overrides

    overrides = parse_overrides(args.overrides)
    if getattr(args, "store", None) is not None:
        overrides["store"] = str(args.store)
    if getattr(args, "run_id", None) is not None:
        overrides["run_id"] = args.run_id
    return load_config(args.config, overrides)


def cmd_train_sft(args: argparse.Namespace) -> int:
    """The run's SFT stage (`ipr_core.run.loop.SFT`): recorded, costed, skipped when done."""
    from ipr_core.run import loop
    from ipr_core.run.context import RunContext
    from ipr_core.store.store import Store

    config = config_from_args(args)
    if config.sft is None:
        raise IprError(f"{args.config}: the config has no sft settings")
    store = Store(config.store)
    if not store.expert_trajectories(config.env, config.train_split):
        raise IprError(f"{config.store}: no expert trajectories of {config.env}; run ipr ingest")
    ctx = RunContext(config, store)
    base = ctx.base_path()
    trained = loop.run_stage(loop.SFT, ctx, loop.Iteration(0, base, base))
    print(f"SFT checkpoint {trained.checkpoint_id}: {trained.path}")
    return 0


def cmd_train_mixture(args: argparse.Namespace) -> int:
    """The run's mixture stage of `--iteration` (`ipr_core.run.loop.TRAIN_MIXTURE`)."""
    from ipr_core.run import loop
    from ipr_core.run.context import RunContext
    from ipr_core.store.store import Store

    config = config_from_args(args)
    if config.mixture_settings is None:
        raise IprError(f"{args.config}: method 'sft' trains no mixture")
    store = Store(config.store)
    if not store.pairs(config.run_id, args.iteration):
        raise IprError(f"{config.store}: run {config.run_id!r} has no pairs in {args.iteration}")
    it = loop.Iteration(args.iteration, args.sft_model, args.policy or args.sft_model)
    trained = loop.run_stage(loop.TRAIN_MIXTURE, RunContext(config, store), it)
    print(f"mixture checkpoint {trained.checkpoint_id}: {trained.path}")
    return 0


def cmd_train_reward_model(args: argparse.Namespace) -> int:
    from ipr_core.run.context import RunContext
    from ipr_core.store.store import Store
    from ipr_core.training.config import LoraConfig
    from ipr_core.training.reward_model import (
        RewardModelConfig,
        step_reward_examples,
        train_reward_model,
    )

    config = config_from_args(args)
    store = Store(config.store)
    scorer_id = args.scorer_id
    if scorer_id is None:
        found = store.scorer_ids(config.run_id)
        if len(found) != 1:
            raise IprError(f"run {config.run_id!r} has scorers {found}; pass --scorer-id")
        scorer_id = found[0]
    ctx = RunContext(config, store)
    examples = step_reward_examples(store.scored_steps(config.run_id, scorer_id), ctx.prompt)
    if not examples:
        raise IprError(f"{config.store}: no step rewards of run {config.run_id!r} to learn from")
    epochs = {} if args.epochs is None else {"epochs": args.epochs}
    settings = RewardModelConfig(**epochs, lora=LoraConfig(enabled=args.lora))
    result = train_reward_model(ctx.base_path(), examples, settings, config.checkpoints_dir)
    store.record_checkpoint(result, config.run_id)
    metrics = result.metrics
    print(
        f"reward model {result.checkpoint_id}: held-out MSE {metrics['heldout_mse']:.4f} "
        f"(predicting the mean: {metrics['heldout_baseline_mse']:.4f}); {result.path}"
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ipr_core.engine.models import resolve_model
    from ipr_core.run.context import RunContext
    from ipr_core.run.loop import EVALUATE, Iteration, Split, run_stage
    from ipr_core.store.store import Store

    config = config_from_args(args)
    path = resolve_model(args.model, config.cache_dir)
    split = Split(args.split, args.limit)
    ctx = RunContext(config, Store(config.store))
    run_stage(EVALUATE, ctx, Iteration(args.iteration, path, path, split))
    return 0


def cmd_tokens(args: argparse.Namespace) -> int:
    from ipr_core.run.context import RunContext
    from ipr_core.run.pipeline import ensure_experts
    from ipr_core.store.store import Store
    from ipr_core.training.runtime import load_tokenizer
    from ipr_core.training.tokens import token_table, turn_table

    config = tokens_config(args)
    ctx = RunContext(config, Store(config.store))
    experts = ensure_experts(ctx)
    tokenizer = load_tokenizer(ctx.base_path())
    print(f"history window: {config.prompt.history_window}; {len(experts)} expert conversations")
    print(token_table(experts, ctx.prompt, tokenizer).to_string(index=False))
    print()
    print(turn_table(experts, ctx.prompt, tokenizer).to_string(index=False))
    return 0


def tokens_config(args: argparse.Namespace):
    """A run config, or an experiment config's shared `run:` settings, with the command's
    overrides applied before validation (a bad window names `prompt.history_window`)."""
    from ipr_core.config import RunConfig, read_yaml_mapping, validate_config, with_overrides

    data = read_yaml_mapping(args.config)
    if isinstance(data.get("run"), dict):
        data = data["run"]
    overrides: dict[str, object] = {}
    if args.store is not None:
        overrides["store"] = str(args.store)
    if args.history_window is not None:
        overrides["prompt.history_window"] = args.history_window
    return validate_config(RunConfig, with_overrides(data, overrides, args.config), args.config)


def cmd_export(args: argparse.Namespace) -> int:
    from ipr_core.store.store import Store

    store = Store(args.store, read_only=True)
    if args.what == "sft":
        from ipr_core.envs import canonical_env_id, make_env
        from ipr_core.store.formats import export_sft

        if args.env is None:
            raise IprError("export sft needs --env")
        env_id = canonical_env_id(args.env)
        env = make_env(env_id)
        hint = env.action_hint
        env.close()
        records = export_sft(store.expert_trajectories(env_id, args.split), hint)
    else:
        rows = store.pair_rows(args.run_id, args.iteration)
        records = [stored_pair_record(row) for row in rows]
    args.out.write_text(json.dumps(records, indent=1), encoding="utf-8")
    print(f"wrote {len(records)} records to {args.out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from flows.report import write_report
    from ipr_core.store.store import Store

    figures = write_report(Store(args.store, read_only=True), args.experiment, args.out)
    print(f"wrote {args.out} and {', '.join(str(figure) for figure in figures)}")
    return 0


def stored_pair_record(row: dict) -> dict:
    from ipr_core.store.formats import PAIR_REWARDS, pair_record

    key = f"{row['run_id']}/{row['iteration']}/{row['level']}/{row['task_id']}/{row['prefix_len']}"
    sides = [json.loads(row[side]) for side in ("prompt", "chosen", "rejected")]
    names = ("level", "task_id", "prefix_len", "env_id", "mode", "chosen_actor", *PAIR_REWARDS)
    return pair_record(key, sides, {name: row[name] for name in names})


def print_table(frame: pd.DataFrame, max_rows: int) -> None:
    """Plain text, full width: readable in a terminal, a log or a CI transcript."""
    with pd.option_context(
        "display.width", 250, "display.max_columns", None, "display.max_colwidth", 80
    ):
        print(frame.head(max_rows).to_string(index=False, na_rep="NULL"))
    if len(frame) > max_rows:
        print(f"({len(frame)} rows, {max_rows} shown)")


if __name__ == "__main__":
    sys.exit(main())
