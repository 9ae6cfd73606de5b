"""Stage progress: a log line at every tenth of the work, a fresh bar for a new batch."""

from ipr_core.engine.progress import ProgressBar


def test_progress_logs_each_tenth_once():
    lines: list[str] = []
    bar = ProgressBar("explore[1]", lines.append)
    for done in range(1, 41):
        bar(done, 40)
    assert lines == [f"explore[1]: {k}/40 rollouts" for k in (1, *range(4, 41, 4))]


def test_a_new_total_starts_over():
    lines: list[str] = []
    fractions: list[float] = []

    class Recording(ProgressBar):
        def on_fraction(self, fraction: float) -> None:
            fractions.append(fraction)

    bar = Recording("scoring", lines.append, unit="episodes")
    for done, total in [(1, 1), (1, 2), (2, 2), (1, 2), (2, 2)]:  # three batches
        bar(done, total)
    halves = ["scoring: 1/2 episodes", "scoring: 2/2 episodes"]
    assert lines == ["scoring: 1/1 episodes", *halves, *halves]
    assert fractions == [1.0, 0.5, 1.0, 0.5, 1.0]
