"""Step reward model (docs/method.md, step reward model): regress the Monte Carlo step reward.

An LLM backbone with a scalar head (`AutoModelForSequenceClassification`, one label,
`problem_type="regression"`, i.e. MSE loss) learns r_s(e_{t-1}, a_t) from the
(history, action, MC step reward) triples of the `step_rewards` table. Each example is
the conversation the agent saw, rebuilt with the one prompt builder from the expert's
first `prefix_len` steps, followed by the scored assistant turn; the head reads the
last token. Once trained, `RewardModelScorer` scores a step with one forward pass
instead of N Monte Carlo rollouts.

Rows whose every MC rollout failed have no reward (NULL): they are skipped and counted,
never trained on as 0. The held-out split is by task, so no task is on both sides.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from pydantic import Field
from transformers import (
    AutoModelForSequenceClassification,
    DataCollatorWithPadding,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
    set_seed,
)

from ipr_core.agent.prompts import PromptFormat, build_conversation
from ipr_core.digest import digest
from ipr_core.errors import IprError
from ipr_core.training.checkpoints import (
    RESULT_FILE,
    CheckpointKind,
    TrainResult,
    checkpoint_id,
    model_id,
    train_once,
)
from ipr_core.training.config import IN_PROCESS, LoraConfig, Seed, StrictConfig
from ipr_core.training.data import HEAD_MESSAGES, render
from ipr_core.training.precision import detect_precision
from ipr_core.training.runtime import (
    load_tokenizer,
    lora_config,
    run_training,
    save_trained,
    trainer_arguments,
    training_metrics,
)
from ipr_core.types import Message, StoredStepReward

REWARD_MODEL_KIND: CheckpointKind = "reward_model"


class RewardModelConfig(StrictConfig):
    epochs: float = Field(3.0, gt=0)
    lr: float = Field(2e-5, gt=0)
    batch_size: int = Field(8, gt=0)
    micro_batch_size: int = Field(1, gt=0)
    """Examples per forward pass; `batch_size` is reached by accumulation (no padding)."""
    grad_accum: int = Field(1, gt=0)
    max_length: int = Field(2048, gt=0)
    """Tokens per example; longer ones lose their oldest (assistant, observation) turns."""
    lora: LoraConfig = LoraConfig()
    heldout_fraction: float = Field(0.2, ge=0, lt=1)
    """Share of tasks (not rows) kept out of training to measure the error."""
    seed: Seed = 0


@dataclass(frozen=True)
class RewardExample:
    """One (history, action, MC step reward) triple as the conversation the scorer reads."""

    task_id: str
    prefix_len: int
    actor: str
    iteration: int
    action: str
    messages: tuple[Message, ...]
    """System, task, the expert's first `prefix_len` turns and observations, the scored turn."""
    target: float


class RewardExamples(list[RewardExample]):
    """The examples, with counts of the rows that were not turned into one."""

    n_rows: int = 0
    n_failed: int = 0
    """Rows with a NULL mean reward (every MC rollout failed): skipped, not trained as 0."""
    n_no_expert: int = 0
    """Rows whose task has no expert trajectory (or a shorter one than `prefix_len`)."""


def step_reward_examples(steps: Sequence[StoredStepReward], prompt: PromptFormat) -> RewardExamples:
    """An example per scored step (`Store.scored_steps`), in the steps' order."""
    examples = RewardExamples()
    for step in steps:
        examples.n_rows += 1
        if step.mean_reward is None:
            examples.n_failed += 1
            continue
        expert = step.expert
        if expert is None or step.prefix_len > len(expert.steps):
            examples.n_no_expert += 1
            continue
        history = build_conversation(expert.task, expert.steps[: step.prefix_len], prompt)
        examples.append(
            RewardExample(
                task_id=step.task_id,
                prefix_len=step.prefix_len,
                actor=step.actor,
                iteration=step.iteration,
                action=step.action,
                messages=(*history, {"role": "assistant", "content": step.step_text}),
                target=step.mean_reward,
            )
        )
    return examples


def split_by_task(
    examples: Sequence[RewardExample], heldout_fraction: float, seed: int
) -> tuple[list[RewardExample], list[RewardExample]]:
    """(train, held-out): a seeded hash order of the task ids puts whole tasks on one side.

    Holds out round(fraction * n_tasks) tasks, at least one when the fraction is positive
    and at least one task is left to train on.
    """
    tasks = sorted({e.task_id for e in examples})
    n_heldout = 0
    if heldout_fraction > 0 and len(tasks) > 1:
        n_heldout = min(max(1, round(heldout_fraction * len(tasks))), len(tasks) - 1)
    ranked = sorted(tasks, key=lambda t: hashlib.sha256(f"{seed}\0{t}".encode()).hexdigest())
    heldout = set(ranked[:n_heldout])
    train = [e for e in examples if e.task_id not in heldout]
    return train, [e for e in examples if e.task_id in heldout]


def reward_data_hash(examples: Sequence[RewardExample]) -> str:
    payload = [[e.task_id, list(e.messages), e.target] for e in examples]
    return digest(payload)


# -- tokenisation ------------------------------------------------------------------------
def fit_conversation(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], max_length: int
) -> tuple[list[int], bool]:
    """Token ids of `messages`, dropping the oldest (assistant, observation) turns to fit.

    The system and task messages and the scored (last) turn are kept. Returns the ids and
    whether turns were dropped; the ids may still exceed `max_length`.
    """
    messages = list(messages)
    ids = render(tokenizer, messages)
    truncated = False
    while len(ids) > max_length and len(messages) - HEAD_MESSAGES - 1 >= 2:
        messages = messages[:HEAD_MESSAGES] + messages[HEAD_MESSAGES + 2 :]
        ids, truncated = render(tokenizer, messages), True
    return ids, truncated


def _check_scored_turn(messages: Sequence[Message]) -> None:
    if not messages or messages[-1]["role"] != "assistant":
        raise IprError("a conversation to score must end with the assistant step")


def _set_pad_token(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> None:
    """Llama's classification head reads the last non-pad token, so it needs a pad id."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id


def load_regression_model(path: Path) -> PreTrainedModel:
    """Backbone + a freshly initialised scalar head (float32: training runs on CPU)."""
    return AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, problem_type="regression", dtype=torch.float32
    )


# -- training ----------------------------------------------------------------------------
def train_reward_model(
    model_path: Path,
    examples: Sequence[RewardExample],
    settings: RewardModelConfig,
    checkpoints_root: Path,
) -> TrainResult:
    """Fit the step reward model on `examples`; the result lives in `checkpoints_root/<id>`.

    Metrics include the held-out MSE and MAE (of predictions clipped to [0, 1], as the
    scorer returns them) and the MSE/MAE of always predicting the training mean.
    Skips training when that checkpoint is already complete.
    """
    if not examples:
        raise IprError("reward model: no examples (every step reward failed or none exist)")
    parent_id = model_id(model_path)
    ckpt_id = checkpoint_id(parent_id, reward_data_hash(examples), settings)

    def train(work: Path) -> dict[str, float]:
        train_set, heldout = split_by_task(examples, settings.heldout_fraction, settings.seed)
        tokenizer = load_tokenizer(model_path)
        train_rows, n_truncated, n_dropped = _tokenize(tokenizer, train_set, settings.max_length)
        heldout_rows, h_truncated, h_dropped = _tokenize(tokenizer, heldout, settings.max_length)
        if not train_rows:
            raise IprError(f"reward model: no training example fits {settings.max_length} tokens")
        set_seed(settings.seed)  # the head's initialisation
        model = load_regression_model(model_path)
        _set_pad_token(tokenizer, model)
        lora = lora_config(settings.lora, task_type="SEQ_CLS")
        if lora is not None:
            from peft import get_peft_model

            model = get_peft_model(model, lora)
        args = TrainingArguments(
            **trainer_arguments(settings, work, detect_precision(IN_PROCESS)),
            per_device_eval_batch_size=settings.batch_size,
            eval_strategy="no",
            dataloader_pin_memory=torch.cuda.is_available(),
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(train_rows),
            data_collator=DataCollatorWithPadding(tokenizer),
            processing_class=tokenizer,
        )
        output, figures = run_training(trainer, work)
        metrics: dict[str, float] = {}
        if heldout_rows:
            predictions = trainer.predict(Dataset.from_list(heldout_rows)).predictions
            metrics.update(_heldout_metrics(predictions, heldout_rows, train_rows))
        save_trained(trainer, tokenizer, work)
        return {
            **metrics,
            **training_metrics(trainer, output, figures),
            "n_train": len(train_rows),
            "n_heldout": len(heldout_rows),
            "n_train_tasks": len({e.task_id for e in train_set}),
            "n_heldout_tasks": len({e.task_id for e in heldout}),
            "train_target_mean": _mean([r["labels"] for r in train_rows]),
            "n_truncated": n_truncated + h_truncated,
            "n_dropped": n_dropped + h_dropped,
        }

    return train_once(checkpoints_root, ckpt_id, parent_id, REWARD_MODEL_KIND, settings, train)


def _tokenize(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[RewardExample], max_length: int
) -> tuple[list[dict[str, Any]], int, int]:
    rows: list[dict[str, Any]] = []
    n_truncated = n_dropped = 0
    for example in examples:
        _check_scored_turn(example.messages)
        ids, truncated = fit_conversation(tokenizer, example.messages, max_length)
        if len(ids) > max_length:
            n_dropped += 1
            continue
        n_truncated += truncated
        rows.append({"input_ids": ids, "labels": float(example.target)})
    return rows, n_truncated, n_dropped


def _heldout_metrics(
    predictions: Any, heldout_rows: Sequence[dict[str, Any]], train_rows: Sequence[dict[str, Any]]
) -> dict[str, float]:
    predicted = [min(max(float(p), 0.0), 1.0) for p in torch.as_tensor(predictions).reshape(-1)]
    targets = [r["labels"] for r in heldout_rows]
    baseline = _mean([r["labels"] for r in train_rows])
    return {
        "heldout_mse": _mean([(p - t) ** 2 for p, t in zip(predicted, targets, strict=True)]),
        "heldout_mae": _mean([abs(p - t) for p, t in zip(predicted, targets, strict=True)]),
        "heldout_baseline_mse": _mean([(baseline - t) ** 2 for t in targets]),
        "heldout_baseline_mae": _mean([abs(baseline - t) for t in targets]),
    }


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


# -- scoring -----------------------------------------------------------------------------
class RewardModelScorer:
    """Scores steps with a trained reward model: one forward pass instead of MC rollouts."""

    def __init__(
        self,
        path: Path,
        batch_size: int = 8,
        max_length: int | None = None,
        device: str | None = None,
    ):
        """`path`: a reward model folder (`TrainResult.path`).

        `max_length` defaults to the one it was trained with (from the checkpoint's result
        file), else the tokenizer's limit.
        """
        self.path = Path(path)
        self.batch_size = batch_size
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = load_tokenizer(self.path)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            self.path, dtype=torch.float32
        )
        _set_pad_token(self.tokenizer, self.model)
        self.model.to(self.device).eval()
        self.max_length = max_length or self._trained_max_length()

    def _trained_max_length(self) -> int:
        result = self.path.parent / RESULT_FILE
        if result.is_file():
            settings = json.loads(result.read_text()).get("settings", {})
            if "max_length" in settings:
                return int(settings["max_length"])
        return int(min(self.tokenizer.model_max_length, 1 << 16))

    @torch.inference_mode()
    def score(self, conversations: Sequence[Sequence[Message]]) -> list[float]:
        """The predicted step reward of each conversation's last (assistant) turn, in [0, 1].

        A conversation too long even without its old turns keeps its last `max_length`
        tokens (its head is lost, the scored turn is not).
        """
        encoded = []
        for messages in conversations:
            _check_scored_turn(messages)
            ids, _ = fit_conversation(self.tokenizer, messages, self.max_length)
            encoded.append(ids[-self.max_length :])
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        scores = [0.0] * len(encoded)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            padded = self.tokenizer.pad(
                {"input_ids": [encoded[i] for i in batch]}, return_tensors="pt"
            ).to(self.device)
            logits = self.model(**padded).logits.reshape(-1).float().clamp(0.0, 1.0)
            for i, value in zip(batch, logits.tolist(), strict=True):
                scores[i] = value
        return scores
