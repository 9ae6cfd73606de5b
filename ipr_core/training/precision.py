"""Where a trainer runs and whether it computes in bfloat16.

Weights always load in float32, on CUDA too: they are the optimizer's master copy, and
a bfloat16 weight (8 mantissa bits) would round away the mixture's lr-3e-6 updates. On
CUDA the forward and backward passes run under bf16 autocast where the GPU supports it,
as the paper's FSDP runs did; CPU stays float32, where bf16 autocast is slow. The choice
is one pure function of the setting and what the machine offers, tested without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ipr_core.errors import IprError
from ipr_core.training.config import Device


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


def training_precision(device: Device, cuda_available: bool, bf16_supported: bool) -> Precision:
    """`auto` takes CUDA when present; CUDA without bf16 support (pre-Ampere) stays in
    float32 rather than fp16, which would need loss scaling."""
    if device == "cpu" or (device == "auto" and not cuda_available):
        return CPU_FLOAT32
    if not cuda_available:
        raise DeviceUnavailableError("training device 'cuda' asked for, but torch sees no GPU")
    return Precision("cuda", bf16=bf16_supported)


def detect_precision(device: Device) -> Precision:
    """`training_precision` on this machine."""
    cuda = torch.cuda.is_available()
    return training_precision(device, cuda, cuda and torch.cuda.is_bf16_supported())
