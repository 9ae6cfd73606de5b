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
    state = PartialState()
    if state.is_main_process:
        (job.parent / METRICS_FILE).write_text(json.dumps(metrics))
    # Tear the process group down before the interpreter does: a gloo group left to exit
    # aborted one rank now and then ("terminate called without an active exception",
    # SIGABRT), failing a training that had finished.
    state.wait_for_everyone()
    state.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
