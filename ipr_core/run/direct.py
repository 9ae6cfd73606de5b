"""Run IPR end to end for a config, without an orchestrator: `ipr run --no-prefect`.

The loop itself is `ipr_core.run.loop`; this entry point executes its stages as plain calls.
"""

from __future__ import annotations

import pandas as pd

from ipr_core.config import RunConfig
from ipr_core.run.context import Log, RunContext
from ipr_core.run.loop import run_ipr
from ipr_core.store.store import Store


def run_pipeline(
    config: RunConfig, log: Log = print, allow_manifest_change: bool = False
) -> pd.DataFrame:
    """Run every stage of `config`; returns the per-iteration summary table."""
    ctx = RunContext(config, Store(config.store), log, allow_manifest_change=allow_manifest_change)
    run_ipr(ctx)
    return ctx.store.iteration_summary(config.run_id, config.dev_split)
