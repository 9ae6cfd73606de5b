"""Prefect flows: `ipr` (deployment `iterate`), its `iteration` subflow, and `evaluate`."""

import tasks  # noqa: F401  (sets Prefect's environment before prefect is imported)
from flows.ipr_flow import evaluate_flow, ipr, iteration

__all__ = ["evaluate_flow", "ipr", "iteration"]
