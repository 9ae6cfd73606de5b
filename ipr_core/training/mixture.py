"""Stage 3 training: the IPR mixture of outcome DPO, step DPO and SFT, on TRL's DPOTrainer.

Loss of a batch of B pairs (i = 1..B), each with a level (trajectory or step):

    Δ_i = [log πθ(y_w,i|x_i) - log πθ(y_l,i|x_i)] - [log πref(y_w,i|x_i) - log πref(y_l,i|x_i)]
    L   = (1/B) Σ_i w_level(i) · (-log σ(β Δ_i))  +  w_sft · NLL_chosen
    NLL_chosen = -Σ_i Σ_{t ∈ A(y_w,i)} log πθ(t | ·)  /  Σ_i |A(y_w,i)|

A sequence log-prob sums over assistant tokens only (observations inside a suffix side
are context); NLL_chosen is the mean over all chosen assistant tokens of the batch. A
batch may mix levels; over the data, the DPO part equals w_o·(N_o/N)·L_o-DPO +
w_s·(N_s/N)·L_s-DPO. Pairs of a level with weight 0 are left out of the data,
together with their SFT term when w_sft is 0 too, so an `eto` run trains on trajectory
pairs alone; with w_sft > 0 (ipr-no-odpo) they stay for the SFT term, and B counts them.

Reference = the SFT model. Its log-probs are precomputed once before training
(`precompute_ref_log_probs`): the reference is fixed, so one no-grad pass over the pairs
replaces one per epoch, and full fine-tuning holds no second model copy. With LoRA the
precompute runs the loaded SFT model with the adapter disabled, i.e. the same reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers.data.data_collator import DataCollatorMixin
from trl import DPOConfig, DPOTrainer
from trl.trainer.utils import pad

from ipr_core.errors import IprError
from ipr_core.training.checkpoints import TrainResult, checkpoint_id, model_id, train_once
from ipr_core.training.config import IN_PROCESS, ComputeConfig, MixtureConfig, MixtureWeights
from ipr_core.training.data import build_pair_examples, pairs_data_hash
from ipr_core.training.distributed import launched, shared_dataset
from ipr_core.training.precision import Precision, detect_precision
from ipr_core.training.runtime import (
    load_tokenizer,
    load_training_model,
    lora_config,
    project_only_scored_positions,
    run_training,
    save_trained,
    trainer_arguments,
    training_metrics,
)
from ipr_core.types import Pair


@dataclass(frozen=True)
class PairLogps:
    """Sequence log-probs of a batch of pairs, one entry per pair, under policy and reference."""

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor


def mixture_loss(
    logps: PairLogps,
    is_step_level: torch.Tensor,
    chosen_nll: torch.Tensor,
    beta: float,
    weights: MixtureWeights,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The batch loss of the module docstring; a zero weight removes its term entirely.

    `is_step_level` is boolean per pair; `chosen_nll` is the scalar token-mean NLL of the
    chosen sides.
    """
    delta = (logps.policy_chosen - logps.ref_chosen) - (logps.policy_rejected - logps.ref_rejected)
    per_pair = -F.logsigmoid(beta * delta)
    w = torch.where(is_step_level, weights.step_dpo, weights.trajectory_dpo).to(per_pair.dtype)
    weighted = torch.where(w > 0, w * per_pair, torch.zeros_like(per_pair))
    loss = weighted.mean()
    if weights.sft > 0:
        loss = loss + weights.sft * chosen_nll

    metrics = {
        "loss/sft": chosen_nll.item(),
        "rewards/margins": (beta * delta).mean().item(),
        "rewards/accuracies": (delta > 0).float().mean().item(),
    }
    for name, mask in (("o_dpo", ~is_step_level), ("s_dpo", is_step_level)):
        if mask.any():
            metrics[f"loss/{name}"] = per_pair[mask].mean().item()
    return loss, metrics


@dataclass
class PairCollator(DataCollatorMixin):
    """Pads pairs into one batch: chosen sequences first, then rejected (TRL's layout).

    `completion_mask` is the assistant mask of each side, not all completion tokens, so
    observations inside suffix sides are not scored.
    """

    pad_token_id: int
    return_tensors: str = "pt"

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        sequences, masks = [], []
        for side in ("chosen", "rejected"):
            for ex in examples:
                sequences.append(torch.tensor(ex["prompt_ids"] + ex[f"{side}_ids"]))
                masks.append(torch.tensor([0] * len(ex["prompt_ids"]) + ex[f"{side}_mask"]))
        batch = {
            "input_ids": pad(sequences, padding_value=self.pad_token_id, padding_side="right"),
            "attention_mask": pad(
                [torch.ones_like(s) for s in sequences], padding_value=0, padding_side="right"
            ),
            "completion_mask": pad(masks, padding_value=0, padding_side="right"),
            "is_step_level": torch.tensor([bool(ex["is_step_level"]) for ex in examples]),
        }
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in examples[0]:
                batch[key] = torch.tensor([ex[key] for ex in examples])
        return batch


class MixtureTrainer(DPOTrainer):
    """DPOTrainer with the IPR mixture loss and per-level weights.

    Takes datasets from `training.data.build_pair_examples` (already tokenised with
    assistant masks); TRL's own preparation would score every completion token.
    """

    def __init__(self, *args: Any, weights: MixtureWeights, **kwargs: Any):
        self.mixture_weights = weights
        super().__init__(*args, **kwargs)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = [
                "prompt_ids",
                "chosen_ids",
                "rejected_ids",
                "chosen_mask",
                "rejected_mask",
                "is_step_level",
                "ref_chosen_logps",
                "ref_rejected_logps",
            ]

    def compute_ref_log_probs(self, model, inputs):
        inputs = {k: v for k, v in inputs.items() if k != "is_step_level"}
        return super().compute_ref_log_probs(model, inputs)

    def sequence_logps(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Policy log-probs of chosen and rejected sides, and the chosen token-mean NLL."""
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        outputs = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            labels=labels,
            fused_lm_head=True,
            use_cache=False,
        )
        mask = completion_mask[:, 1:]
        per_token = outputs.log_probs[:, -mask.size(1) :] * mask
        chosen_logps, rejected_logps = per_token.sum(dim=1).chunk(2)
        # Launched processes average their gradients: over the whole global batch's token
        # count (per process), the NLL stays the token mean of the global batch.
        tokens = self.accelerator.gather(mask.chunk(2)[0].sum()[None]).sum().clamp(min=1)
        chosen_nll = -chosen_logps.sum() / (tokens / self.accelerator.num_processes)
        return chosen_logps, rejected_logps, chosen_nll

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        chosen_logps, rejected_logps, chosen_nll = self.sequence_logps(model, inputs)
        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_chosen, ref_rejected = self.compute_ref_log_probs(
                self.ref_model or self.model, inputs
            )
        logps = PairLogps(chosen_logps, rejected_logps, ref_chosen, ref_rejected)
        loss, metrics = mixture_loss(
            logps, inputs["is_step_level"], chosen_nll, self.beta, self.mixture_weights
        )
        for key, value in metrics.items():
            self._metrics[mode][key].append(value)
        if return_outputs:
            raise NotImplementedError("MixtureTrainer computes no logits to return")
        return loss


def train_mixture(
    sft_model_path: Path,
    pairs: Sequence[Pair],
    settings: MixtureConfig,
    checkpoints_root: Path,
    parent_path: Path | None = None,
    compute: ComputeConfig = IN_PROCESS,
) -> TrainResult:
    """Train the policy at `parent_path` (default: the SFT model) on `pairs`, reference = SFT.

    Iteration 1 starts from the SFT model; later iterations pass the previous iteration's
    model as `parent_path` while the reference stays `sft_model_path`.
    """
    pairs = trainable_pairs(pairs, settings.weights)
    start = parent_path or sft_model_path
    parent_id = model_id(start)
    data_hash = pairs_data_hash(pairs) + model_id(sft_model_path)
    ckpt_id = checkpoint_id(parent_id, data_hash, settings)

    precision = detect_precision(compute)
    job = MixtureJob(start, sft_model_path, parent_path is not None, pairs, settings, precision)
    fit = partial(fit_mixture, job)
    return train_once(
        checkpoints_root, ckpt_id, parent_id, "mixture", settings, launched(fit, compute, precision)
    )


@dataclass(frozen=True)
class MixtureJob:
    """What a mixture training process needs (pickled for launched processes)."""

    start: Path
    """The model trained: the SFT model, or the previous iteration's."""
    sft_model_path: Path
    """The DPO reference."""
    separate_reference: bool
    """Whether `start` is not the reference itself."""
    pairs: Sequence[Pair]
    settings: MixtureConfig
    precision: Precision


def fit_mixture(job: MixtureJob, work: Path) -> dict[str, float]:
    """Train `job.start` and save into `work`; every process of a launched run runs this."""
    start, pairs, settings = job.start, job.pairs, job.settings
    if not pairs:
        raise IprError("mixture training: no pairs with a non-zero weighted term")
    tokenizer = load_tokenizer(start)
    rows, stats = build_pair_examples(pairs, tokenizer, settings.max_length)
    if not rows:
        raise IprError(f"mixture: none of {stats.n_input} pairs fits {settings.max_length}")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    args = mixture_config(settings, work, job.precision)  # first: it sets up the processes
    project_only_scored_positions()
    trainer = MixtureTrainer(
        model=load_training_model(start),
        ref_model=load_training_model(job.sft_model_path) if job.separate_reference else None,
        args=args,
        train_dataset=shared_dataset(rows, work),
        processing_class=tokenizer,
        data_collator=PairCollator(pad_token_id=tokenizer.pad_token_id),
        peft_config=lora_config(settings.lora),
        weights=settings.weights,
    )
    trainer.ref_model = None  # its log-probs are precomputed: free the copy
    output, figures = run_training(trainer)
    save_trained(trainer, tokenizer, work)
    return {
        **training_metrics(trainer, output, figures),
        "n_pairs": len(rows),
        "n_step_pairs": sum(bool(r["is_step_level"]) for r in rows),
        "n_truncated": stats.n_truncated,
        "n_dropped": stats.n_dropped,
    }


def mixture_config(settings: MixtureConfig, work: Path, precision: Precision) -> DPOConfig:
    return DPOConfig(
        **trainer_arguments(settings, work, precision),
        max_length=settings.max_length,
        beta=settings.beta,
        precompute_ref_log_probs=True,
        gradient_checkpointing=settings.gradient_checkpointing,
    )


def trainable_pairs(pairs: Sequence[Pair], weights: MixtureWeights) -> list[Pair]:
    """The pairs some term of the loss uses: a level with weight 0 drops out unless the
    SFT term still scores its chosen side."""
    return [p for p in pairs if _level_weight(p, weights) > 0 or weights.sft > 0]


def _level_weight(pair: Pair, weights: MixtureWeights) -> float:
    return weights.step_dpo if pair.level == "step" else weights.trajectory_dpo
