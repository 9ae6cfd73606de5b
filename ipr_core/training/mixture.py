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
(`precompute_ref_log_probs`) and kept with each pair: the reference is fixed, so one
no-grad pass over the pairs replaces one per epoch, and full fine-tuning holds no second
model copy. With LoRA the precompute runs the loaded SFT model with the adapter disabled,
i.e. the same reference. With `compute.share_prompts`, policy and reference run a pair's
prompt once for both sides (`shared_prompt_logps`): the sides share its keys and values.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import DynamicCache
from transformers.data.data_collator import DataCollatorMixin
from trl import DPOConfig
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
    run_training,
    save_trained,
    trainer_arguments,
    training_metrics,
)
from ipr_core.training.trl_adapter import PretokenizedDPOTrainer, project_only_scored_positions
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
) -> torch.Tensor:
    """The batch loss of the module docstring; a zero weight removes its term entirely.

    `is_step_level` is boolean per pair; `chosen_nll` is the scalar token-mean NLL of the
    chosen sides.
    """
    per_pair = -F.logsigmoid(beta * implicit_margin(logps))
    w = torch.where(is_step_level, weights.step_dpo, weights.trajectory_dpo).to(per_pair.dtype)
    weighted = torch.where(w > 0, w * per_pair, torch.zeros_like(per_pair))
    loss = weighted.mean()
    if weights.sft > 0:
        loss = loss + weights.sft * chosen_nll
    return loss


def implicit_margin(logps: PairLogps) -> torch.Tensor:
    """Δ per pair: the chosen side's log-ratio to the reference minus the rejected side's."""
    return (logps.policy_chosen - logps.ref_chosen) - (logps.policy_rejected - logps.ref_rejected)


LEVELS = {"o_dpo": False, "s_dpo": True}
"""The DPO levels by their diagnostics prefix, and whether their pairs are step-level."""
LEVEL_SUMS = ("pairs", "loss", "margin", "chosen_logratio", "rejected_logratio", "accuracy")
"""What `level_sums` adds up per level; `MixtureTrainer.log` divides all but `pairs` by it."""


def level_sums(logps: PairLogps, is_step_level: torch.Tensor, beta: float) -> torch.Tensor:
    """Per DPO level (rows in `LEVELS` order, columns in `LEVEL_SUMS` order) the pair count
    and the sums over its pairs of the unweighted DPO loss -log σ(βΔ), the implicit reward
    margin βΔ, the chosen and rejected log-ratios log πθ - log πref, and Δ > 0 (accuracy).
    Sums, so micro-batches and processes add up to the step's means over its pairs."""
    with torch.no_grad():
        chosen = logps.policy_chosen - logps.ref_chosen
        rejected = logps.policy_rejected - logps.ref_rejected
        delta = chosen - rejected
        per_pair = torch.stack(
            [
                torch.ones_like(delta),
                -F.logsigmoid(beta * delta),
                beta * delta,
                chosen,
                rejected,
                (delta > 0).to(delta.dtype),
            ],
            dim=1,
        )
        return torch.stack(
            [per_pair[is_step_level == step].sum(dim=0) for step in LEVELS.values()]
        ).float()


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
            "prompt_lengths": torch.tensor([len(ex["prompt_ids"]) for ex in examples]),
        }
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in examples[0]:
                batch[key] = torch.tensor([ex[key] for ex in examples])
        return batch


def two_row_logps(model, inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probs of the chosen and rejected sides of each pair as TRL computes them: each
    side a row of prompt + side; and the count of chosen tokens scored."""
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
    return chosen_logps, rejected_logps, mask.chunk(2)[0].sum()


def shared_prompt_logps(model, inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`two_row_logps` with each pair's prompt run once: its keys and values, kept with
    their graph, serve both sides, which continue from its last token. The same sums up
    to float rounding, for (2P + C + R) -> (P + C + R) tokens per pair of prompt P and
    sides C, R (P is most of a step pair: the conversation up to the step)."""
    ids, completion_mask = inputs["input_ids"], inputs["completion_mask"]
    lengths = inputs["attention_mask"].sum(dim=1)
    pairs = len(inputs["prompt_lengths"])
    chosen, rejected, tokens = [], [], completion_mask.new_zeros(())
    for i, prompt_length in enumerate(inputs["prompt_lengths"].tolist()):
        rows = [i, pairs + i]
        start = prompt_length - 1  # the prompt's last token starts both continuations
        cache = DynamicCache(config=model.config)
        if start > 0:
            prompt = ids[i : i + 1, :start]
            model(input_ids=prompt, labels=torch.full_like(prompt, -100), fused_lm_head=True,
                  past_key_values=cache)  # fmt: skip
            cache.batch_repeat_interleave(2)
        end = int(lengths[rows].max())
        sides, mask = ids[rows, start:end], completion_mask[rows, start:end]
        outputs = model(input_ids=sides, labels=sides.masked_fill(mask == 0, -100),
                        fused_lm_head=True, past_key_values=cache)  # fmt: skip
        logps = (outputs.log_probs * mask[:, 1:]).sum(dim=1)
        chosen.append(logps[0])
        rejected.append(logps[1])
        tokens = tokens + mask[0, 1:].sum()
    return torch.stack(chosen), torch.stack(rejected), tokens


def step_diagnostics(sums: torch.Tensor, nll: torch.Tensor) -> dict[str, float]:
    """A step's log entries from what its micro-batches added up: `sft/loss` (the mean of
    their SFT terms) and per DPO level with pairs `<level>/pairs` and the means over them
    of the other `LEVEL_SUMS`."""
    logs = {"sft/loss": (nll[0] / nll[1]).item()}
    for level, level_sum in zip(LEVELS, sums, strict=True):
        pairs = level_sum[0].item()
        if pairs:
            logs[f"{level}/pairs"] = pairs
            for name, total in zip(LEVEL_SUMS[1:], level_sum[1:], strict=True):
                logs[f"{level}/{name}"] = (total / pairs).item()
    return logs


PAIR_KEYS = ("is_step_level", "prompt_lengths")
"""What `PairCollator` adds to TRL's batch layout for the loss (not model inputs)."""


class MixtureTrainer(PretokenizedDPOTrainer):
    """DPOTrainer with the IPR mixture loss and per-level weights, through TRL's public
    hooks: `compute_loss` (the Trainer's own extension point), `compute_ref_log_probs`
    and `log`.

    TRL's `loss_type=["sigmoid", "sft"]` with `loss_weights` computes this loss only when
    both DPO levels weigh the same: it has no per-pair weight, and the ablations weigh a
    level 0 while its pairs stay for the SFT term. So the loss is `mixture_loss` here, on
    TRL's fused LM head and its precomputed reference log-probs.

    Takes datasets from `training.data.build_pair_examples` (already tokenised with
    assistant masks; see `trl_adapter`). Logs per optimizer step the SFT term and, per
    DPO level, the diagnostics of `level_sums`.
    """

    def __init__(
        self, *args: Any, weights: MixtureWeights, share_prompts: bool = False, **kwargs: Any
    ):
        self.mixture_weights = weights
        self.share_prompts = share_prompts
        self.step_sums = torch.zeros(len(LEVELS), len(LEVEL_SUMS))
        self.step_nll = torch.zeros(2)  # sum of micro-batch SFT terms, micro-batches
        super().__init__(*args, **kwargs)

    def compute_ref_log_probs(self, model, inputs):
        """The reference's log-probs, computed as the policy's are (`sequence_logps`), so
        that before any update the two agree exactly (Δ = 0, not float noise)."""
        if not self.shares_prompts:
            inputs = {k: v for k, v in inputs.items() if k not in PAIR_KEYS}
            return super().compute_ref_log_probs(model, inputs)
        unwrapped = self.accelerator.unwrap_model(model)
        peft = isinstance(unwrapped, PeftModel)  # the reference: LoRA's base model
        reference = unwrapped.disable_adapter() if peft else nullcontext()
        with torch.no_grad(), reference, self.accelerator.autocast():
            chosen_logps, rejected_logps, _ = shared_prompt_logps(model, inputs)
        return chosen_logps, rejected_logps

    def sequence_logps(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Policy log-probs of chosen and rejected sides, and the chosen token-mean NLL."""
        if self.shares_prompts:
            chosen_logps, rejected_logps, chosen_tokens = shared_prompt_logps(model, inputs)
        else:
            chosen_logps, rejected_logps, chosen_tokens = two_row_logps(model, inputs)
        # Launched processes average their gradients: over the whole global batch's token
        # count (per process), the NLL stays the token mean of the global batch.
        tokens = self.accelerator.gather(chosen_tokens[None]).sum().clamp(min=1)
        chosen_nll = -chosen_logps.sum() / (tokens / self.accelerator.num_processes)
        return chosen_logps, rejected_logps, chosen_nll

    @property
    def shares_prompts(self) -> bool:
        """Whether a pair's prompt runs once for both sides (`shared_prompt_logps`), as
        asked: not under gradient checkpointing, which drops the KV cache the sides read,
        nor in launched processes, whose gradient sync expects one forward per backward."""
        single = self.accelerator.num_processes == 1
        return self.share_prompts and not self.args.gradient_checkpointing and single

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise NotImplementedError("MixtureTrainer computes no logits to return")
        chosen_logps, rejected_logps, chosen_nll = self.sequence_logps(model, inputs)
        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_chosen, ref_rejected = self.compute_ref_log_probs(
                self.ref_model or self.model, inputs
            )
        logps = PairLogps(chosen_logps, rejected_logps, ref_chosen, ref_rejected)
        is_step = inputs["is_step_level"]
        if model.training:
            sums = level_sums(logps, is_step, self.beta).to(self.accelerator.device)
            nll = torch.stack([chosen_nll.detach().float(), torch.ones_like(chosen_nll).float()])
            self.step_sums += self.accelerator.gather(sums[None]).sum(dim=0).cpu()
            self.step_nll += self.accelerator.gather(nll[None]).sum(dim=0).cpu()
        return mixture_loss(logps, is_step, chosen_nll, self.beta, self.mixture_weights)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """An optimizer step's log line gets the means of what its micro-batches added up."""
        if "loss" in logs and self.step_nll[1] > 0:
            logs.update(step_diagnostics(self.step_sums, self.step_nll))
            self.step_sums.zero_()
            self.step_nll.zero_()
        super().log(logs, start_time)


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
    job = MixtureJob(
        start, sft_model_path, parent_path is not None, pairs, settings, precision,
        compute.share_prompts,
    )  # fmt: skip
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
    share_prompts: bool = False


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
        share_prompts=job.share_prompts,
    )
    trainer.ref_model = None  # its log-probs are precomputed: free the copy
    output, figures = run_training(trainer, work)
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
        remove_unused_columns=False,  # the collator reads the masks and levels
    )


def trainable_pairs(pairs: Sequence[Pair], weights: MixtureWeights) -> list[Pair]:
    """The pairs some term of the loss uses: a level with weight 0 drops out unless the
    SFT term still scores its chosen side."""
    return [p for p in pairs if _level_weight(p, weights) > 0 or weights.sft > 0]


def _level_weight(pair: Pair, weights: MixtureWeights) -> float:
    return weights.step_dpo if pair.level == "step" else weights.trajectory_dpo
