"""Entry point of each launched training process: `python -m ipr_core.training.launch JOB`.

Runs the pickled fit function of JOB (see training.distributed) on the job's folder;
the main process writes the metrics beside the job.
"""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

from accelerate import PartialState

from ipr_core.training.distributed import METRICS_FILE


def main(job: Path) -> None:
    fit = pickle.loads(job.read_bytes())
    metrics = fit(job.parent)
    if PartialState().is_main_process:
        (job.parent / METRICS_FILE).write_text(json.dumps(metrics))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
