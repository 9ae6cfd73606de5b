"""Device and precision choice, and training under `accelerate launch` on 2 CPU processes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_cli_train import ENV, write_config
from test_training import PROMPT, _expert, _pairs

from flows.commands import main
from ipr_core.config import RunConfig
from ipr_core.store.store import Store
from ipr_core.training.config import (
    BatchSplitError,
    ComputeSettings,
    LayoutError,
    MixtureSettings,
    SFTSettings,
    micro_batches,
    per_process_batch,
)
from ipr_core.training.distributed import JOB_FILE, launch_command, launched
from ipr_core.training.mixture import train_mixture
from ipr_core.training.precision import (
    CPU_FLOAT32,
    DeviceUnavailableError,
    Machine,
    Precision,
    training_precision,
)
from ipr_core.training.runtime import trainer_arguments
from ipr_core.training.sft import train_sft

TWO_PROCESSES = ComputeSettings(device="cpu", bf16=False, distributed={"num_processes": 2})
ONE_PROCESS = ComputeSettings(device="cpu", bf16=False)
"""float32 in both, so 1 and 2 processes can agree to 1e-5 (bf16 rounds differently)."""


# -- device and precision ---------------------------------------------------------------------
GPU_BF16 = Machine(cuda=True, cuda_bf16=True, cpu_bf16=False)
OLD_GPU = Machine(cuda=True, cuda_bf16=False, cpu_bf16=True)
BF16_CPU = Machine(cuda=False, cuda_bf16=False, cpu_bf16=True)
OLD_CPU = Machine(cuda=False, cuda_bf16=False, cpu_bf16=False)


@pytest.mark.parametrize(
    ("device", "bf16", "machine", "expected"),
    [
        ("auto", None, OLD_CPU, CPU_FLOAT32),
        ("auto", None, BF16_CPU, Precision("cpu", bf16=True)),
        ("auto", False, BF16_CPU, CPU_FLOAT32),
        ("cpu", None, GPU_BF16, CPU_FLOAT32),
        ("cpu", True, OLD_CPU, Precision("cpu", bf16=True)),
        ("auto", None, GPU_BF16, Precision("cuda", bf16=True)),
        ("cuda", None, GPU_BF16, Precision("cuda", bf16=True)),
        ("auto", None, OLD_GPU, Precision("cuda", bf16=False)),
    ],
)
def test_precision_follows_the_setting_and_the_machine(device, bf16, machine, expected) -> None:
    assert training_precision(device, bf16, machine) == expected


def test_cuda_without_a_gpu_raises() -> None:
    with pytest.raises(DeviceUnavailableError):
        training_precision("cuda", None, BF16_CPU)


def test_trainer_arguments_carry_the_precision(tmp_path: Path) -> None:
    on_gpu = trainer_arguments(SFTSettings(), tmp_path, Precision("cuda", bf16=True))
    assert (on_gpu["use_cpu"], on_gpu["bf16"]) == (False, True)
    on_cpu = trainer_arguments(SFTSettings(), tmp_path, CPU_FLOAT32)
    assert (on_cpu["use_cpu"], on_cpu["bf16"]) == (True, False)


# -- the global batch and the launch ----------------------------------------------------------
def test_each_process_takes_its_share_of_the_batch(tmp_path: Path, monkeypatch) -> None:
    assert per_process_batch(8, 2) == 4
    with pytest.raises(BatchSplitError):
        per_process_batch(3, 2)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as accelerate launch sets it
    args = trainer_arguments(SFTSettings(batch_size=4, micro_batch_size=4), tmp_path, CPU_FLOAT32)
    assert (args["per_device_train_batch_size"], args["gradient_accumulation_steps"]) == (2, 1)
    # micro-batches of 1 (the default): each process accumulates its 2 examples
    args = trainer_arguments(SFTSettings(batch_size=4, grad_accum=3), tmp_path, CPU_FLOAT32)
    assert (args["per_device_train_batch_size"], args["gradient_accumulation_steps"]) == (1, 6)
    with pytest.raises(BatchSplitError, match="micro_batch_size 3"):
        micro_batches(SFTSettings(batch_size=8, micro_batch_size=3), 2)


def test_config_validation_refuses_what_the_processes_cannot_run() -> None:
    compute = {"distributed": {"num_processes": 4}}
    with pytest.raises(ValueError, match="does not split over 4 processes"):
        RunConfig(env="twx/twc", compute=compute, mixture={"batch_size": 2})
    RunConfig(env="twx/twc", compute=compute, sft={"batch_size": 8}, mixture={"batch_size": 4})
    fsdp = {"distributed": {"strategy": "fsdp"}}
    with pytest.raises(ValueError, match="LoRA merges into whole weights"):
        RunConfig(env="twx/twc", compute=fsdp, mixture={"lora": {"enabled": True}})


def test_launch_command_names_the_strategy(tmp_path: Path) -> None:
    job = tmp_path / JOB_FILE
    fsdp = ComputeSettings(distributed={"num_processes": 8, "strategy": "fsdp"}).distributed
    command = launch_command(fsdp, Precision("cuda", bf16=True), job)
    assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert command[-3:] == ["-m", "ipr_core.training.launch", str(job)]
    flags = " ".join(command)
    assert "--num_processes 8" in flags and "--use_fsdp" in flags
    assert "--mixed_precision bf16" in flags
    zero2 = ComputeSettings(distributed={"strategy": "deepspeed-zero2"}).distributed
    assert "--zero_stage 2" in " ".join(launch_command(zero2, Precision("cuda", True), job))
    with pytest.raises(LayoutError, match="needs CUDA devices"):
        launched(print, ComputeSettings(distributed={"strategy": "fsdp"}), CPU_FLOAT32)


# -- 2 CPU processes train what 1 process trains ----------------------------------------------
# Both runs use the same settings: batch_size is the global batch, so 1 process takes 4
# examples per step and each of the 2 launched processes takes 2 of them. The batch is
# the whole dataset, so every step sees the same 4 examples in both runs whatever order
# the samplers draw them in; DDP averages the 2 processes' gradients, which (with
# TRL's token counts gathered across processes) is the gradient of the 4-example batch.
# Whole batches per forward pass (micro_batch_size = batch_size), as the mixture's SFT term
# is a token mean per forward pass. Several steps per run check that the processes' updates
# stay in step.
LOSS_TOLERANCE = 1e-5
"""Measured: SFT 3e-7, mixture 1e-6 (float32 sums in another order); weights within 4e-6."""


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")


def _same_training(one, two) -> None:
    assert two.checkpoint_id == one.checkpoint_id
    assert two.metrics.keys() == one.metrics.keys()
    assert two.metrics["steps"] == one.metrics["steps"] > 1
    for key in ("first_step_loss", "last_step_loss", "train_loss"):
        assert two.metrics[key] == pytest.approx(one.metrics[key], abs=LOSS_TOLERANCE), key
    assert sorted(p.name for p in two.path.parent.iterdir()) == sorted(
        p.name for p in one.path.parent.iterdir()
    )
    a, b = _weights(one.path), _weights(two.path)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def test_sft_on_two_processes_trains_what_one_process_trains(
    tiny_model_path: Path, tmp_path: Path
) -> None:
    experts = [_expert(i) for i in range(4)]
    settings = SFTSettings(epochs=3, lr=1e-3, batch_size=4, micro_batch_size=4, max_length=1024)
    one = train_sft(tiny_model_path, experts, PROMPT, settings, tmp_path / "one", ONE_PROCESS)
    two = train_sft(tiny_model_path, experts, PROMPT, settings, tmp_path / "two", TWO_PROCESSES)
    _same_training(one, two)


def test_mixture_on_two_processes_trains_what_one_process_trains(
    tiny_model_path: Path, tmp_path: Path
) -> None:
    pairs = _pairs(2)  # 2 trajectory and 2 step pairs
    settings = MixtureSettings(epochs=3, lr=1e-3, batch_size=4, micro_batch_size=4, max_length=1024)
    one = train_mixture(tiny_model_path, pairs, settings, tmp_path / "one", compute=ONE_PROCESS)
    two = train_mixture(tiny_model_path, pairs, settings, tmp_path / "two", compute=TWO_PROCESSES)
    _same_training(one, two)


def test_ipr_train_sft_on_two_processes_writes_the_same_store_row(
    tmp_path: Path, tiny_model_path: Path
) -> None:
    """The CLI honours `compute`; the checkpoint row differs from one process's only in path."""
    rows = []
    fp32 = {"device": "cpu", "bf16": False}
    for name, compute in (("one", fp32), ("two", {**fp32, "distributed": {}})):
        folder = tmp_path / name
        folder.mkdir()
        config = write_config(folder, tiny_model_path, compute=compute)
        store = Store(folder / "s.duckdb")
        assert main(["ingest", "--env", ENV, "--limit", "2", "--store", str(store.path)]) == 0
        assert main(["train", "sft", "--config", str(config)]) == 0
        rows.append(store.query("SELECT * FROM checkpoints WHERE kind = 'sft'").iloc[0])
    one, two = rows
    for column in ("checkpoint_id", "parent_id", "config", "run_id", "iteration"):
        assert two[column] == one[column], column
    metrics_one, metrics_two = json.loads(one["metrics"]), json.loads(two["metrics"])
    assert metrics_two.keys() == metrics_one.keys()
    assert metrics_two["train_loss"] == pytest.approx(metrics_one["train_loss"], abs=LOSS_TOLERANCE)
