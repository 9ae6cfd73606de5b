"""Training past one process: the same fit function, run under `accelerate launch`.

A trainer's fit function (`fit_sft`, `fit_mixture`) takes its inputs and a work folder
and saves the model there. In process it is called directly; with `distributed` set it
is pickled into the work folder and every launched process runs it
(`python -m ipr_core.training.launch`); the main process writes its metrics beside it.
The job, metrics and shared dataset are removed afterwards, so the checkpoint folder,
its result and its store row are those of a run in one process.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from accelerate import PartialState
from datasets import Dataset, load_from_disk

import ipr_core
from ipr_core.errors import IprError
from ipr_core.training.config import ComputeConfig, DistributedConfig, LayoutError, Strategy
from ipr_core.training.precision import Precision

Fit = Callable[[Path], dict[str, float]]

JOB_FILE = "job.pkl"
"""The pickled fit function: the inputs are this project's frozen dataclasses, and
the launched processes import the same code, so pickle restores them exactly."""
METRICS_FILE = "metrics.json"
DATASET_DIR = "dataset"

STRATEGY_FLAGS: dict[Strategy, tuple[str, ...]] = {
    "ddp": ("--multi_gpu",),
    "fsdp": (
        "--use_fsdp",
        "--fsdp_sharding_strategy",
        "FULL_SHARD",
        "--fsdp_auto_wrap_policy",
        "TRANSFORMER_BASED_WRAP",
        "--fsdp_state_dict_type",
        "FULL_STATE_DICT",
    ),
    "deepspeed-zero2": ("--use_deepspeed", "--zero_stage", "2"),
    "deepspeed-zero3": ("--use_deepspeed", "--zero_stage", "3", "--zero3_save_16bit_model", "true"),
}
"""accelerate launch's flags per strategy. On CPU `--multi_gpu` starts torch's elastic
launcher all the same, and the processes meet over gloo. ZeRO-3 gathers its shards for
saving only with `zero3_save_16bit_model`, which saves 16-bit weights."""


class LaunchError(IprError):
    """The launched training exited with an error (its output says why)."""


def world_size() -> int:
    """Processes training together: accelerate launch sets WORLD_SIZE; 1 in process."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def shared_dataset(rows: list[dict[str, Any]], work: Path) -> Dataset:
    """`rows` as a dataset; launched processes share one saved in `work`.

    TRL's reference precompute writes its result beside the dataset's file on the main
    process and the others read it from there; an in-memory dataset has a random cache
    path per process, so they would not find it.
    """
    if world_size() == 1:
        return Dataset.from_list(rows)
    folder = work / DATASET_DIR
    with PartialState().main_process_first():
        if PartialState().is_main_process:
            Dataset.from_list(rows).save_to_disk(folder)
        return load_from_disk(folder)


def launched(fit: Fit, compute: ComputeConfig, precision: Precision) -> Fit:
    """`fit` itself, or `fit` run by `compute.distributed`'s processes.

    FSDP and DeepSpeed run on GPUs only (accelerate refuses them on CPU)."""
    if compute.distributed is None:
        return fit
    strategy = compute.distributed.strategy
    if precision.use_cpu and strategy != "ddp":
        raise LayoutError(f"strategy {strategy} needs CUDA devices; on CPU use ddp")
    return partial(_launch, fit, compute.distributed, precision)


def launch_command(distributed: DistributedConfig, precision: Precision, job: Path) -> list[str]:
    """The `accelerate launch` command line of `job` (this interpreter, so the same venv)."""
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        str(distributed.num_processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "bf16" if precision.bf16 else "no",
        "--dynamo_backend",
        "no",
        *STRATEGY_FLAGS[distributed.strategy],
    ]
    if distributed.main_process_port is not None:
        command += ["--main_process_port", str(distributed.main_process_port)]
    return [*command, "-m", "ipr_core.training.launch", str(job)]


def _launch(
    fit: Fit, distributed: DistributedConfig, precision: Precision, work: Path
) -> dict[str, float]:
    job, metrics = work / JOB_FILE, work / METRICS_FILE
    job.write_bytes(pickle.dumps(fit))
    package_root = str(Path(ipr_core.__file__).parents[1])  # the code this process runs
    path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    done = subprocess.run(launch_command(distributed, precision, job), env=env, check=False)
    if done.returncode != 0:
        raise LaunchError(
            f"accelerate launch of {distributed.num_processes} {distributed.strategy} "
            f"processes exited with status {done.returncode}"
        )
    result = json.loads(metrics.read_text())
    job.unlink()
    metrics.unlink()
    shutil.rmtree(work / DATASET_DIR, ignore_errors=True)
    return result
