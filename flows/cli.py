"""`ipr`: the library's commands (flows.commands) plus the orchestrated ones, `run` and `serve`."""

from __future__ import annotations

import argparse
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


def cmd_run(args: argparse.Namespace) -> int:
    config = cli.config_from_args(args)
    if args.no_prefect:
        from ipr_core.run.direct import run_pipeline

        summary = run_pipeline(config, allow_manifest_change=args.allow_manifest_change)
    else:
        from tasks.settings import configure_prefect_env

        configure_prefect_env()  # before prefect is imported
        from flows.ipr_flow import ipr
        from tasks import StageFailed

        try:
            # ephemeral Prefect unless PREFECT_API_URL is set
            summary = pd.DataFrame(ipr(config, args.allow_manifest_change))
        except StageFailed as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    cli.print_table(summary, max_rows=len(summary))
    from ipr_core.store.store import Store

    costs = Store(config.store).iteration_costs(config.run_id, config.dev_split)
    print("cost by iteration (ipr_core.run.costs; s_per_dev_point: seconds per 0.01 dev reward):")
    cli.print_table(costs, max_rows=len(costs))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from tasks.settings import configure_prefect_env

    configure_prefect_env()
    from flows.serve import serve

    return serve(
        port=args.port, pool=args.pool, config_path=args.config, ready_timeout_s=args.timeout
    )


if __name__ == "__main__":
    sys.exit(main())
