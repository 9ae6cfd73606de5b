"""Where a trainer runs and whether it computes in bfloat16.

Weights always load in float32, on CUDA too: they are the optimizer's master copy, and
a bfloat16 weight (8 mantissa bits) would round away the mixture's lr-3e-6 updates. On
CUDA the forward and backward passes run under bf16 autocast where the GPU supports it,
as the paper's FSDP runs did. On CPU bf16 autocast pays only where the CPU has native
bf16 instructions (AVX512-BF16, AMX): there a SmolLM2 forward + backward runs 1.7-1.9x
faster than in float32 (`ipr bench training`); elsewhere oneDNN emulates it, slower than
float32. The choice is one pure function of the settings and what the machine offers,
tested without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ipr_core.errors import IprError
from ipr_core.training.config import ComputeConfig, Device


class DeviceUnavailableError(IprError):
    """`device: cuda` was asked for on a machine without a CUDA device."""


@dataclass(frozen=True)
class Precision:
    device: Literal["cpu", "cuda"]
    bf16: bool
    """bf16 autocast (TrainingArguments' `bf16`) over float32 weights."""

    @property
    def use_cpu(self) -> bool:
        return self.device == "cpu"


CPU_FLOAT32 = Precision("cpu", bf16=False)


@dataclass(frozen=True)
class Machine:
    """What the machine offers a trainer."""

    cuda: bool
    cuda_bf16: bool
    cpu_bf16: bool


def training_precision(device: Device, bf16: bool | None, machine: Machine) -> Precision:
    """`auto` takes CUDA when present. `bf16` None means "where native": a device without
    native bf16 (pre-Ampere GPUs, older CPUs) stays in float32 rather than fp16, which
    would need loss scaling."""
    if device == "cuda" and not machine.cuda:
        raise DeviceUnavailableError("training device 'cuda' asked for, but torch sees no GPU")
    on_cuda = device == "cuda" or (device == "auto" and machine.cuda)
    native = machine.cuda_bf16 if on_cuda else machine.cpu_bf16
    return Precision("cuda" if on_cuda else "cpu", bf16=native if bf16 is None else bf16)


def this_machine() -> Machine:
    cuda = torch.cuda.is_available()
    return Machine(
        cuda=cuda,
        cuda_bf16=cuda and torch.cuda.is_bf16_supported(),
        cpu_bf16=torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported(),
    )


def detect_precision(compute: ComputeConfig) -> Precision:
    """`training_precision` of `compute` on this machine."""
    return training_precision(compute.device, compute.bf16, this_machine())
