"""Prefect's environment for this project, set in one place before `prefect` is imported.

Prefect reads its settings from the environment when it is first imported, so every
entry point that uses Prefect (the `tasks` and `flows` packages, `ipr run`, `ipr serve`)
calls `configure_prefect_env()` first. Values the user already set are kept.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PREFECT_HOME = REPO_ROOT / ".ipr" / "prefect"

DEFAULTS = {
    "PREFECT_HOME": str(DEFAULT_PREFECT_HOME),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    # the 20 s default times out while two busy cores also import torch
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}


def configure_prefect_env() -> None:
    for name, value in DEFAULTS.items():
        os.environ.setdefault(name, value)
    # Prefect creates only the last folder of its home; a fresh clone has no .ipr/ yet.
    Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)
    if "prefect" in sys.modules and os.environ["PREFECT_HOME"] != _imported_home():
        warnings.warn(
            "prefect was imported before tasks.settings.configure_prefect_env(); "
            "PREFECT_HOME may not apply",
            stacklevel=2,
        )


def _imported_home() -> str:
    from prefect.settings import get_current_settings

    return str(get_current_settings().home)
