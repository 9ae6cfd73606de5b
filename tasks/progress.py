"""Stage progress for the Prefect UI: the core's terminal bar and log lines, plus a progress
artifact on the task run that fills as rollouts finish."""

from __future__ import annotations

from uuid import UUID

from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from ipr_core.engine.progress import ProgressBar


class StageProgress(ProgressBar):
    """A `ProgressBar` whose tenths also move a progress artifact of the current task run."""

    def __init__(self, label: str):
        super().__init__(label, lambda message: get_run_logger().info(message))
        self._artifact: UUID | None = None

    def on_fraction(self, fraction: float) -> None:
        description = f"{self.label}: {self.unit} finished"
        if self._artifact is None:
            self._artifact = create_progress_artifact(100 * fraction, description=description)
        else:
            update_progress_artifact(self._artifact, 100 * fraction, description=description)
