"""Stage 1: supervised fine-tuning on expert trajectories with TRL's SFTTrainer.

The loss is the NLL of assistant turns only. The dataset reaches SFTTrainer already
tokenised with an `assistant_masks` column built by `training.data` (TRL turns it into
labels): TRL's own `assistant_only_loss` needs `{% generation %}` markers in the chat
template, which the ChatML templates of the tiny Llama and SmolLM2 lack.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path

from datasets import Dataset
from trl import SFTConfig as TrlSFTConfig
from trl import SFTTrainer

from ipr_core.agent.prompts import PromptFormat
from ipr_core.errors import IprError
from ipr_core.training.checkpoints import TrainResult, checkpoint_id, model_id, train_once
from ipr_core.training.config import IN_PROCESS, ComputeConfig, SFTConfig
from ipr_core.training.data import build_sft_examples, sft_data_hash
from ipr_core.training.distributed import launched
from ipr_core.training.precision import Precision, detect_precision
from ipr_core.training.runtime import (
    load_tokenizer,
    load_training_model,
    lora_config,
    run_training,
    save_trained,
    trainer_arguments,
    training_metrics,
)
from ipr_core.training.trl_adapter import project_only_scored_positions
from ipr_core.types import Trajectory


def train_sft(
    model_path: Path,
    trajectories: Sequence[Trajectory],
    prompt: PromptFormat,
    settings: SFTConfig,
    checkpoints_root: Path,
    compute: ComputeConfig = IN_PROCESS,
) -> TrainResult:
    """Fine-tune `model_path` on `trajectories`; the result lives in `checkpoints_root/<id>`.

    Skips training when that checkpoint is already complete.
    """
    parent_id = model_id(model_path)
    ckpt_id = checkpoint_id(parent_id, sft_data_hash(trajectories, prompt), settings)

    precision = detect_precision(compute)
    fit = partial(fit_sft, model_path, trajectories, prompt, settings, precision)
    return train_once(
        checkpoints_root, ckpt_id, parent_id, "sft", settings, launched(fit, compute, precision)
    )


def fit_sft(
    model_path: Path,
    trajectories: Sequence[Trajectory],
    prompt: PromptFormat,
    settings: SFTConfig,
    precision: Precision,
    work: Path,
) -> dict[str, float]:
    """Train and save into `work`; every process of a launched run runs this."""
    tokenizer = load_tokenizer(model_path)
    rows, stats = build_sft_examples(trajectories, prompt, tokenizer, settings.max_length)
    if not rows:
        raise IprError(f"SFT: none of {stats.n_input} trajectories fits {settings.max_length}")
    args = TrlSFTConfig(
        **trainer_arguments(settings, work, precision),
        max_length=settings.max_length,
        gradient_checkpointing=settings.gradient_checkpointing,
    )
    project_only_scored_positions()
    trainer = SFTTrainer(
        model=load_training_model(model_path),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora_config(settings.lora),
    )
    output, figures = run_training(trainer, work)
    save_trained(trainer, tokenizer, work)
    return {
        **training_metrics(trainer, output, figures),
        "n_examples": len(rows),
        "n_truncated": stats.n_truncated,
        "n_dropped": stats.n_dropped,
    }
