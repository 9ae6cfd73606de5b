"""Prefect tasks: one per stage of the IPR loop, thin wrappers over `ipr_core.run.loop`."""

from tasks.settings import configure_prefect_env

configure_prefect_env()  # before the first `import prefect`

from tasks.stages import StageFailed, run_task  # noqa: E402

__all__ = ["StageFailed", "run_task"]
