"""What SFT and the mixture share: model loading, LoRA, saving, timing and memory."""

from __future__ import annotations

import json
import resource
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, Trainer
from transformers.integrations import TensorBoardCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import TrainOutput

from ipr_core.training.checkpoints import ADAPTER_DIR, MODEL_DIR, STEPS_FILE, TENSORBOARD_DIR
from ipr_core.training.config import LoraConfig, micro_batches
from ipr_core.training.distributed import world_size
from ipr_core.training.precision import Precision

TRAINER_DIR = "trainer"
"""The Trainer's scratch output folder inside the work folder; removed after saving."""


def load_model(path: Path) -> PreTrainedModel:
    """float32 weights on every device: on CUDA bf16 autocast computes (see training.precision)."""
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def load_training_model(path: Path) -> PreTrainedModel:
    """The model a trainer trains: `load_model`, its decoder attending causally without a
    mask when a batch is right-padded (`attend_causally_when_right_padded`)."""
    model = load_model(path)
    decoder = model.get_decoder()
    decoder.register_forward_pre_hook(attend_causally_when_right_padded, with_kwargs=True)
    return model


def attend_causally_when_right_padded(
    decoder: torch.nn.Module, args: tuple, kwargs: dict[str, Any]
) -> tuple[tuple, dict[str, Any]]:
    """Drop the attention mask of a right-padded batch: in a causal model a real token sees
    only earlier positions, all real, and the pads after it are never scored, so the mask
    changes no scored log-prob. Without it attention runs its causal kernel instead of a
    masked one: a forward + backward of 4 rows of ~870 tokens with 6% padding ran at 477
    tokens/s against 391 with the mask on 2 CPU cores (docs/benchmarks.md). The trainers pad
    on the right; a left-padded mask is kept."""
    mask = kwargs.get("attention_mask")
    per_token = isinstance(mask, torch.Tensor) and mask.dim() == 2
    if per_token and bool((mask[:, 1:] <= mask[:, :-1]).all()):  # ones, then only zeros
        kwargs["attention_mask"] = None
    return args, kwargs


def load_tokenizer(path: Path):
    return AutoTokenizer.from_pretrained(path)


def trainer_arguments(settings: Any, work: Path, precision: Precision) -> dict[str, Any]:
    """TrainingArguments shared by every trainer here: cosine schedule, the device and
    autocast of `precision`, `batch_size` split over the launched processes and then into
    micro-batches, no intermediate saves or trackers, a log line per step (`run_training`
    adds the bar)."""
    micro, accumulation = micro_batches(settings, world_size())
    return {
        "output_dir": str(work / TRAINER_DIR),
        "num_train_epochs": settings.epochs,
        "learning_rate": settings.lr,
        "lr_scheduler_type": "cosine",
        "per_device_train_batch_size": micro,
        "gradient_accumulation_steps": accumulation,
        "use_cpu": precision.use_cpu,
        "bf16": precision.bf16,
        "seed": settings.seed,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "disable_tqdm": True,
    }


def lora_config(settings: LoraConfig, task_type: str = "CAUSAL_LM") -> PeftLoraConfig | None:
    """PEFT's LoRA config; task type SEQ_CLS makes PEFT train (and save) a new head in full."""
    if not settings.enabled:
        return None
    return PeftLoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        task_type=task_type,
    )


def save_trained(trainer: Trainer, tokenizer, work: Path) -> None:
    """Save the adapter (LoRA) and always a full merged model, so later stages load one folder.

    Of launched processes only the main one writes; under FSDP and DeepSpeed every
    process first joins in gathering the whole weights (which LoRA's merge would need
    on the unwrapped model: config validation refuses LoRA with FSDP and ZeRO-3)."""
    sharded = trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled
    state = trainer.accelerator.get_state_dict(trainer.model) if sharded else None
    if not trainer.accelerator.is_main_process:
        return
    model = trainer.accelerator.unwrap_model(trainer.model)
    if isinstance(model, PeftModel):
        model.save_pretrained(work / ADAPTER_DIR)
        model = model.merge_and_unload()
    model.save_pretrained(work / MODEL_DIR, state_dict=state)
    tokenizer.save_pretrained(work / MODEL_DIR)
    shutil.rmtree(work / TRAINER_DIR, ignore_errors=True)


def merge_adapter(parent: Path, adapter: Path, out: Path) -> None:
    """Write into model folder `out` the weights of `parent` with the LoRA `adapter` merged
    into it: those `save_trained` wrote, bit for bit (both merge in float32). The files `out`
    holds already (config, tokenizer, as training saved them) are kept."""
    kept = {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()}
    merged = PeftModel.from_pretrained(load_model(parent), adapter).merge_and_unload()
    merged.save_pretrained(out)
    for name, content in kept.items():
        (out / name).write_bytes(content)


class StepBar(ProgressCallback):
    """A terminal bar over optimizer steps, the Trainer's log lines printed above it."""

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if state.is_world_process_zero and logs:
            with tqdm.external_write_mode():
                print({k: round(v, 6) if isinstance(v, float) else v for k, v in logs.items()})


@dataclass
class TokenCount:
    """Wraps a trainer's collator to count what its training batches hold: every trainer
    reports the same figures, and the reference precompute (run before) is not counted."""

    collate: Callable[[list[dict[str, Any]]], dict[str, Any]]
    tokens: int = 0
    """Real (non-padding) tokens of the batches, over all epochs."""
    scored: int = 0
    """Tokens the loss scores (assistant tokens)."""
    padding: int = 0

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collate(examples)
        real = batch["attention_mask"].sum().item()
        self.tokens += real
        self.padding += batch["attention_mask"].numel() - real
        if "completion_mask" in batch:  # pairs: their assistant masks
            self.scored += batch["completion_mask"].sum().item()
        else:  # SFT and the reward model: labels of -100 are not scored
            labels = batch["labels"]
            self.scored += (labels[..., 1:] != -100).sum().item() if labels.dim() > 1 else 0
        return batch


def run_training(trainer: Trainer, work: Path) -> tuple[TrainOutput, dict[str, float]]:
    """Train with a step bar; also returns the wall seconds, the tokens trained and the
    peak resident memory of training (MiB). Each optimizer step's log goes to
    `work/STEPS_FILE` and, as TensorBoard events, to `work/TENSORBOARD_DIR`.

    Linux resets the peak (VmHWM) by writing 5 to /proc/self/clear_refs, so the figure
    is training's peak, not the process's; elsewhere it is the process's peak so far.
    """
    if sys.stderr.isatty():  # a bar in log files is noise: there PrinterCallback stays
        trainer.remove_callback(PrinterCallback)  # StepBar prints its lines instead
        trainer.add_callback(StepBar())
    with suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    trainer.add_callback(tensorboard_callback(work / TENSORBOARD_DIR))
    count = trainer.data_collator = TokenCount(trainer.data_collator)
    start = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - start
    if trainer.accelerator.is_main_process:
        (work / STEPS_FILE).write_text(json.dumps(step_log(trainer), indent=1))
    figures = {
        "seconds": seconds,
        "peak_rss_mb": peak_rss_mb(),
        "tokens": count.tokens,
        "scored_tokens": count.scored,
        "padding_tokens": count.padding,
        "tokens_per_second": count.tokens / seconds,
    }
    return output, figures


def tensorboard_callback(folder: Path) -> TensorBoardCallback:
    """transformers' own TensorBoard logging, into `folder` (offline event files). Only the
    main process of a launched run opens a writer (transformers' rule). `report_to` would
    write under the Trainer's scratch folder, which saving removes."""
    callback = TensorBoardCallback()
    callback.logging_dir = str(folder)
    return callback


def step_log(trainer: Trainer) -> list[dict[str, float]]:
    """The Trainer's log line of each optimizer step (`logging_steps` is 1): the loss, its
    terms and diagnostics as the trainer logged them, with the step number."""
    return [
        {key: value for key, value in entry.items() if isinstance(value, int | float)}
        for entry in trainer.state.log_history
        if "loss" in entry and "step" in entry
    ]


def peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def loss_history(trainer: Trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def training_metrics(trainer: Trainer, output: TrainOutput, figures: dict[str, float]) -> dict:
    """The figures every trainer reports: losses, steps, time and memory."""
    losses = loss_history(trainer)
    steps = output.global_step
    return {
        "train_loss": output.training_loss,
        "first_step_loss": losses[0],
        "last_step_loss": losses[-1],
        "steps": steps,
        "seconds": figures["seconds"],
        "seconds_per_step": figures["seconds"] / max(steps, 1),
        "peak_rss_mb": figures["peak_rss_mb"],
        "tokens": figures["tokens"],
        "scored_tokens": figures["scored_tokens"],
        "padding_tokens": figures["padding_tokens"],
        "tokens_per_second": figures["tokens_per_second"],
    }
