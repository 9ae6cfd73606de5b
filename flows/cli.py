"""`ipr`: the library's commands (flows.commands) plus the orchestrated ones, `run` and `serve`."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import pandas as pd

from flows import commands as cli


def main(argv: list[str] | None = None) -> int:
    parser, commands = cli.build_parser()

    run = commands.add_parser("run", help="run the IPR pipeline of a config as the `ipr` flow")
    run.add_argument("--config", type=Path, required=True)
    run.add_argument("--store", type=Path, help="overrides the config's store")
    run.add_argument("--run-id", help="overrides the config's run id")
    run.add_argument(
        "--no-prefect", action="store_true", help="run the stages as plain functions, no flow"
    )
    run.add_argument(
        "--allow-manifest-change",
        action="store_true",
        help="resume a run whose packages, model, splits or prompt differ from its manifest",
    )
    cli.add_overrides_argument(run)
    run.set_defaults(handler=cmd_run)

    experiment = commands.add_parser(
        "experiment",
        help="run every method x seed of an experiment config as the `experiment` flow (resumable)",
    )
    experiment.add_argument("--config", type=Path, required=True, help="e.g. configs/repro.yaml")
    experiment.add_argument("--store", type=Path, help="overrides the config's run.store")
    experiment.add_argument(
        "--no-prefect", action="store_true", help="run the stages as plain functions, no flow"
    )
    cli.add_overrides_argument(experiment)
    experiment.add_argument(
        "--allow-manifest-change",
        action="store_true",
        help="resume runs whose packages, model, splits or prompt differ from their manifest",
    )
    experiment.set_defaults(handler=cmd_experiment)

    serve = commands.add_parser(
        "serve", help="local Prefect server + worker + deployment ipr/iterate (Ctrl-C stops)"
    )
    serve.add_argument("--port", type=int, default=4200)
    serve.add_argument("--pool", default="ipr-local", help="process work pool (created if missing)")
    serve.add_argument(
        "--config",
        type=Path,
        default=Path("configs/smoke.yaml"),
        help="config whose values the printed run command passes",
    )
    serve.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for server")
    serve.set_defaults(handler=cmd_serve)
    return cli.main(argv, parser)


def _under_prefect(module: str, flow: str, *args: object) -> pd.DataFrame | None:
    """Run `module.flow(*args)` under Prefect (ephemeral unless PREFECT_API_URL is set) and
    return its rows; None, with the failed stage on stderr, when a stage failed. The flow's
    module is imported only after Prefect's settings are in the environment."""
    from tasks.settings import configure_prefect_env

    configure_prefect_env()  # before prefect is imported
    from tasks import StageFailed

    try:
        return pd.DataFrame(getattr(importlib.import_module(module), flow)(*args))
    except StageFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def cmd_run(args: argparse.Namespace) -> int:
    config = cli.config_from_args(args)
    if args.no_prefect:
        from ipr_core.run.direct import run_pipeline

        summary = run_pipeline(config, allow_manifest_change=args.allow_manifest_change)
    else:
        summary = _under_prefect("flows.ipr_flow", "ipr", config, args.allow_manifest_change)
        if summary is None:
            return 1
    cli.print_table(summary, max_rows=len(summary))
    from ipr_core.store.store import Store

    costs = Store(config.store).iteration_costs(config.run_id, config.dev_split)
    print("cost by iteration (ipr_core.run.costs; s_per_dev_point: seconds per 0.01 dev reward):")
    cli.print_table(costs, max_rows=len(costs))
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from ipr_core.run.experiment import load_experiment_config, run_experiment

    config = load_experiment_config(args.config, args.overrides, store=args.store)
    if args.no_prefect:
        runs = run_experiment(config, allow_manifest_change=args.allow_manifest_change)
    else:
        runs = _under_prefect("flows.experiment", "experiment", config, args.allow_manifest_change)
        if runs is None:
            return 1
    cli.print_table(runs, max_rows=len(runs))
    return 1 if (runs["status"] != "finished").any() else 0


def cmd_serve(args: argparse.Namespace) -> int:
    from tasks.settings import configure_prefect_env

    configure_prefect_env()
    from flows.serve import serve

    return serve(
        port=args.port, pool=args.pool, config_path=args.config, ready_timeout_s=args.timeout
    )


if __name__ == "__main__":
    sys.exit(main())
