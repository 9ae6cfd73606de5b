"""`ipr`: the single command-line entry."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from ipr_core.errors import IprError

DEFAULT_STORE = Path(".ipr/ipr.duckdb")


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except IprError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def quiet_libraries() -> None:
    """Progress bars and advice from the ML libraries drown the pipeline's own log."""
    import os
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ipr", description=__doc__)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    ingest = commands.add_parser("ingest", help="store expert trajectories")
    ingest.add_argument("--env", required=True, help="env id, e.g. twx/cookingworld")
    ingest.add_argument("--split", default="train")
    ingest.add_argument("--limit", type=int, default=10, help="trajectories to keep")
    ingest.add_argument("--source", type=Path, help="an IPR/ETO SFT JSON file to import")
    ingest.add_argument("--store", type=Path, default=DEFAULT_STORE)
    ingest.set_defaults(handler=cmd_ingest)

    sql = commands.add_parser("sql", help="run a read-only SQL query on the store")
    sql.add_argument("query")
    sql.add_argument("--store", type=Path, default=DEFAULT_STORE)
    sql.add_argument("--max-rows", type=int, default=50)
    sql.set_defaults(handler=cmd_sql)

    run = commands.add_parser("run", help="run the IPR pipeline of a config")
    run.add_argument("--config", type=Path, required=True)
    run.add_argument("--store", type=Path, help="overrides the config's store")
    run.add_argument("--run-id", help="overrides the config's run id")
    run.set_defaults(handler=cmd_run)

    export = commands.add_parser("export", help="write IPR/ETO JSON from the store")
    export.add_argument("what", choices=["sft", "pairs"])
    export.add_argument("--out", type=Path, required=True)
    export.add_argument("--store", type=Path, default=DEFAULT_STORE)
    export.add_argument("--env", help="sft: the env id")
    export.add_argument("--split", default="train")
    export.add_argument("--run-id", default="default", help="pairs: the run")
    export.add_argument("--iteration", type=int, help="pairs: one iteration (default: all)")
    export.set_defaults(handler=cmd_export)
    return parser


def cmd_ingest(args: argparse.Namespace) -> int:
    from ipr_core.envs import make_env
    from ipr_core.formats import load_sft_file
    from ipr_core.pipeline import ingest_file, ingest_gold
    from ipr_core.store import Store

    store = Store(args.store)
    if args.source is not None:
        make_env(args.env).close()  # an unknown env id fails before anything is read
        trajectories = load_sft_file(args.source, args.env, args.split)
        written = ingest_file(store, trajectories, source=str(args.source))
        print(f"imported {written} expert trajectories from {args.source} into {args.store}")
        return 0
    report = ingest_gold(store, args.env, args.split, args.limit)
    for rejected in report.rejected:
        print(f"skipped {rejected.task_id}: {rejected.reason}")
    print(f"wrote {report.written} expert trajectories of {args.env}/{args.split} to {args.store}")
    return 0 if report.written == args.limit else 1


def cmd_sql(args: argparse.Namespace) -> int:
    from ipr_core.store import Store

    frame = Store(args.store).query(args.query)
    print_table(frame, args.max_rows)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from ipr_core.config import load_config
    from ipr_core.run import run_pipeline

    overrides = {}
    if args.store is not None:
        overrides["store"] = str(args.store)
    if args.run_id is not None:
        overrides["run_id"] = args.run_id
    config = load_config(args.config, overrides)
    summary = run_pipeline(config)
    print_table(summary, max_rows=len(summary))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ipr_core.store import Store

    store = Store(args.store)
    if args.what == "sft":
        from ipr_core.envs import make_env
        from ipr_core.formats import export_sft

        if args.env is None:
            raise IprError("export sft needs --env")
        env = make_env(args.env)
        hint = env.action_hint
        env.close()
        records = export_sft(store.expert_trajectories(args.env, args.split), hint)
    else:
        sql = "SELECT * FROM pairs WHERE run_id = ?"
        params: list[object] = [args.run_id]
        if args.iteration is not None:
            sql += " AND iteration = ?"
            params.append(args.iteration)
        records = [stored_pair_record(row) for row in store.query(sql, params).to_dict("records")]
    args.out.write_text(json.dumps(records, indent=1), encoding="utf-8")
    print(f"wrote {len(records)} records to {args.out}")
    return 0


def stored_pair_record(row: dict) -> dict:
    from ipr_core.formats import pair_record

    key = f"{row['run_id']}/{row['iteration']}/{row['level']}/{row['task_id']}/{row['prefix_len']}"
    sides = [json.loads(row[side]) for side in ("prompt", "chosen", "rejected")]
    return pair_record(key, *sides)


def print_table(frame: pd.DataFrame, max_rows: int) -> None:
    """Plain text, full width: readable in a terminal, a log or a CI transcript."""
    with pd.option_context("display.width", 250, "display.max_columns", None,
                           "display.max_colwidth", 80):  # fmt: skip
        print(frame.head(max_rows).to_string(index=False, na_rep="NULL"))
    if len(frame) > max_rows:
        print(f"({len(frame)} rows, {max_rows} shown)")


if __name__ == "__main__":
    sys.exit(main())
