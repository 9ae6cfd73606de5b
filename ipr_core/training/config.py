"""Typed training settings (each method's weights are in `ipr_core.training.methods`).

The defaults follow the released IPR scripts (SFT lr 2e-5 for 3 epochs; mixture lr 3e-6,
beta 0.1, equal weights). Batch sizes default small because this project trains on CPU;
the paper's batch of 48 is reached with `grad_accum`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from ipr_core.errors import IprError

Seed = Annotated[int, Field(ge=0, lt=2**32)]
"""A random seed: what every generator it seeds accepts (NumPy's is 32 bits, unsigned)."""


class StrictConfig(BaseModel):
    """The base of every typed config: an unknown key is an error, and values never change
    after validation (a changed setting is a new config: `model_copy(update=...)`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class LoraConfig(StrictConfig):
    enabled: bool = False
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )


class SFTConfig(StrictConfig):
    epochs: float = Field(3.0, gt=0)
    lr: float = Field(2e-5, gt=0)
    batch_size: int = Field(4, gt=0)
    micro_batch_size: int = Field(1, gt=0)
    """Examples per forward pass; `batch_size` is reached by accumulating micro-batches.
    1 pads nothing; full fine-tuning on CPUs with AMX trains ~10-20% more tokens/s with 4
    (`ipr bench training`, docs/benchmarks.md)."""
    grad_accum: int = Field(1, gt=0)
    max_length: int = Field(2048, gt=0)
    """Tokens per conversation; longer ones lose their oldest turns (see training.data)."""
    lora: LoraConfig = LoraConfig()
    gradient_checkpointing: bool = False
    """Trade compute for activation memory (worth it for long conversations on big models)."""
    seed: Seed = 0


class MixtureWeights(StrictConfig):
    """w_o, w_s, w_sft of L = w_o L_o-DPO + w_s L_s-DPO + w_sft L_SFT."""

    trajectory_dpo: float = Field(1.0, ge=0)
    step_dpo: float = Field(1.0, ge=0)
    sft: float = Field(1.0, ge=0)

    @property
    def uses_step_pairs(self) -> bool:
        """Whether a term reads step pairs (s-DPO, or the SFT term on their chosen sides).
        Without one (ETO) an iteration needs no step rewards: its trajectory pairs compare
        outcomes of episodes explored from the start."""
        return self.step_dpo > 0 or self.sft > 0


class MixtureConfig(StrictConfig):
    epochs: float = Field(3.0, gt=0)
    lr: float = Field(3e-6, gt=0)
    beta: float = Field(0.1, gt=0)
    weights: MixtureWeights = MixtureWeights()
    batch_size: int = Field(2, gt=0)
    """Pairs per step (each is two sequences: chosen and rejected)."""
    micro_batch_size: int = Field(1, gt=0)
    """Pairs per forward pass; `batch_size` is reached by accumulating micro-batches.
    1 pads least; full fine-tuning on CPUs with AMX trains ~10-20% more tokens/s with 4, at
    twice the memory (`ipr bench training`, docs/benchmarks.md)."""
    grad_accum: int = Field(1, gt=0)
    max_length: int = Field(2048, gt=0)
    lora: LoraConfig = LoraConfig()
    gradient_checkpointing: bool = False
    """Trade compute for activation memory (worth it for long conversations on big models)."""
    seed: Seed = 0


Device = Literal["auto", "cpu", "cuda"]
Strategy = Literal["ddp", "fsdp", "deepspeed-zero2", "deepspeed-zero3"]


class DistributedConfig(StrictConfig):
    """Training under `accelerate launch`, one process per device (per core group on CPU).

    `batch_size` stays the global batch: each process takes `batch_size / num_processes`
    examples per step, so the same settings train the same model on any layout.
    """

    num_processes: int = Field(2, ge=2)
    strategy: Strategy = "ddp"
    """ddp replicates the model; fsdp and deepspeed-zero3 shard weights, gradients and
    optimizer state; deepspeed-zero2 shards gradients and optimizer state."""
    main_process_port: int | None = Field(None, gt=0, lt=65536)
    """The rendezvous port (accelerate's default 29500 when unset)."""


class ComputeConfig(StrictConfig):
    """Where SFT and the mixture train; checkpoint ids leave it out (it changes no result
    beyond float rounding and bf16 autocast)."""

    device: Device = "auto"
    """auto: CUDA when torch sees a GPU, else CPU."""
    bf16: bool | None = None
    """bf16 autocast over float32 weights; None: where the device computes bf16 natively
    (Ampere+ GPUs, CPUs with AVX512-BF16 or AMX), which is 1.7-1.9x faster on this
    project's CPU (`ipr bench training`)."""
    distributed: DistributedConfig | None = None
    """None: train in the calling process."""
    share_prompts: bool = False
    """Run a mixture pair's prompt once for both sides (its KV cache continues into chosen
    and rejected) instead of once per side: (P + C + R) tokens per pair instead of
    (2P + C + R), the same log-probs up to float rounding. Off by default: its speed on
    this CPU is not settled (docs/benchmarks.md). Ignored under gradient checkpointing
    and in launched processes."""


IN_PROCESS = ComputeConfig()
"""The trainers' default: the calling process, on the detected device."""


class LayoutError(IprError, ValueError):
    """Training settings the launched processes cannot run (a ValueError, so config
    validation reports it on its field)."""


class BatchSplitError(LayoutError):
    """A batch that does not split evenly over the launched processes."""


SHARDED_WEIGHTS: frozenset[Strategy] = frozenset({"fsdp", "deepspeed-zero3"})
"""Strategies that split the weights themselves, so no process holds a whole model."""


def check_layout(stage: SFTConfig | MixtureConfig, compute: ComputeConfig) -> None:
    """Raise LayoutError where `stage` cannot train on `compute`'s processes."""
    if compute.distributed is None:
        return
    micro_batches(stage, compute.distributed.num_processes)
    strategy = compute.distributed.strategy
    if stage.lora.enabled and strategy in SHARDED_WEIGHTS:
        raise LayoutError(f"LoRA merges into whole weights, which {strategy} splits: use ddp")


def per_process_batch(batch_size: int, num_processes: int) -> int:
    """Each process's share of the global `batch_size`."""
    if batch_size % num_processes:
        raise BatchSplitError(
            f"batch_size {batch_size} does not split over {num_processes} processes: "
            f"use a multiple of {num_processes}"
        )
    return batch_size // num_processes


def micro_batches(stage: SFTConfig | MixtureConfig, num_processes: int) -> tuple[int, int]:
    """(examples per forward pass, forward passes per optimizer step) of one process, so
    that a step still trains `batch_size * grad_accum` examples over all processes."""
    share = per_process_batch(stage.batch_size, num_processes)
    micro = min(stage.micro_batch_size, share)
    if share % micro:
        raise BatchSplitError(
            f"micro_batch_size {micro} does not divide the {share} examples per process "
            f"of batch_size {stage.batch_size}"
        )
    return micro, stage.grad_accum * share // micro
