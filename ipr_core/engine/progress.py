"""Progress of long stages: a tqdm bar on the terminal and a count line in the log.

The rollout engine reports `(done, total)` after every finished episode; whoever opened the
engine decides what to show. The terminal bar is for a person watching a shell; the log lines
(every tenth of the way) are what the Prefect UI shows, since it cannot render a tty bar.
"""

from __future__ import annotations

from collections.abc import Callable

from tqdm import tqdm

ProgressFn = Callable[[int, int], None]
"""Called with (finished, total) items of one batch of work."""


class ProgressBar:
    """A tqdm bar plus a log line at every tenth of `total`; a new total starts a new bar."""

    def __init__(self, label: str, log: Callable[[str], None], unit: str = "rollouts"):
        self.label = label
        self.unit = unit
        self._log = log
        self._bar: tqdm | None = None
        self._total = 0
        self._done = 0
        self._logged_tenths = -1

    def __call__(self, done: int, total: int) -> None:
        if self._bar is None or total != self._total or done < self._done:
            self._start(total)
        assert self._bar is not None
        self._bar.update(done - self._done)
        self._done = done
        tenths = 10 * done // max(total, 1)
        if tenths > self._logged_tenths:
            self._logged_tenths = tenths
            self._log(f"{self.label}: {done}/{total} {self.unit}")
            self.on_fraction(done / max(total, 1))
        if done >= total:
            self._bar.close()

    def on_fraction(self, fraction: float) -> None:
        """Hook for another display of the same progress (the flows' UI artifact)."""

    def _start(self, total: int) -> None:
        if self._bar is not None:
            self._bar.close()
        self._bar = tqdm(  # disable=None: no bar when stderr is not a terminal (log files)
            total=total, desc=self.label, unit=" " + self.unit, leave=False, disable=None
        )
        self._total, self._done, self._logged_tenths = total, 0, -1
