"""Training: the mixture loss, the TRL trainers on a tiny model, overflow and checkpoints."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.trainer.utils import add_fused_lm_head

from flows import commands
from ipr_core.agent.prompts import PromptFormat, build_conversation, step_messages
from ipr_core.envs.base import EnvTask
from ipr_core.errors import InputError
from ipr_core.run.portable import export_checkpoints, import_checkpoints
from ipr_core.store.store import Store
from ipr_core.training.checkpoints import base_checkpoint, checkpoint_id, checkpoint_row, model_id
from ipr_core.training.config import (
    ComputeConfig,
    MixtureConfig,
    MixtureWeights,
    SFTConfig,
)
from ipr_core.training.data import (
    TokenizationMismatch,
    build_pair_examples,
    build_sft_examples,
    sft_data_hash,
)
from ipr_core.training.methods import mixture_preset
from ipr_core.training.mixture import (
    MixtureTrainer,
    PairCollator,
    PairLogps,
    mixture_config,
    mixture_loss,
    shared_prompt_logps,
    train_mixture,
    two_row_logps,
)
from ipr_core.training.precision import CPU_FLOAT32
from ipr_core.training.runtime import (
    load_model,
    load_training_model,
)
from ipr_core.training.sft import train_sft
from ipr_core.training.trl_adapter import project_only_scored_positions
from ipr_core.types import Pair, Step, Trajectory

PROMPT = PromptFormat("Actions: go <direction>, take <item>, stop.")


def _task(i: int) -> EnvTask:
    return EnvTask("toy", f"t{i}", "train", f"Fetch the key from room {i}.", "You are in a hall.")


def _expert(i: int) -> Trajectory:
    steps = (
        Step("Thought: the room is north.\nAction: go north", "go north", f"You are in room {i}."),
        Step("Thought: I see the key.\nAction: take key", "take key", "You hold the key."),
        Step("Thought: done.\nAction: stop", "stop", "Task complete."),
    )
    return Trajectory(task=_task(i), steps=steps, outcome_reward=1.0)


BAD = (Step("Thought: maybe south.\nAction: go south", "go south", "A wall."),)


def _pairs(n: int = 3) -> list[Pair]:
    pairs = []
    for i in range(n):
        expert = _expert(i)
        task = expert.task
        pairs.append(
            Pair("trajectory", task.task_id, 0, tuple(build_conversation(task, (), PROMPT)),
                 tuple(step_messages(expert.steps, final_observation=False)),
                 tuple(step_messages(BAD, final_observation=False)), "expert", 1.0, 0.0, 1.0, 0.0)
        )  # fmt: skip
        pairs.append(
            Pair("step", task.task_id, 1, tuple(build_conversation(task, expert.steps[:1], PROMPT)),
                 tuple(step_messages(expert.steps[1:], final_observation=False)),
                 tuple(step_messages(BAD, final_observation=False)), "expert", 1.0, 0.0, 1.0, 0.0)
        )  # fmt: skip
    return pairs


def _sequence_logps(model, prompt_ids, side_ids, side_mask) -> torch.Tensor:
    """Sum of log-probs of the masked tokens of `side_ids` after `prompt_ids` (plain forward)."""
    ids = torch.tensor([prompt_ids + side_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float()
    token_logps = torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None])[:, 0]
    mask = torch.tensor([0] * len(prompt_ids) + side_mask, dtype=torch.bool)[1:]
    return token_logps[mask].sum()


def _side_logps(model_path: Path, rows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen logps, rejected logps, chosen assistant token counts) per pair."""
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    chosen = torch.stack([
        _sequence_logps(model, r["prompt_ids"], r["chosen_ids"], r["chosen_mask"]) for r in rows
    ])  # fmt: skip
    rejected = torch.stack([
        _sequence_logps(model, r["prompt_ids"], r["rejected_ids"], r["rejected_mask"]) for r in rows
    ])  # fmt: skip
    counts = torch.tensor([sum(r["chosen_mask"]) for r in rows], dtype=torch.float32)
    return chosen, rejected, counts


# -- (a) the loss as a pure function -------------------------------------------------------
def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_mixture_loss_matches_hand_computation() -> None:
    pc, pr = torch.tensor([-10.0, -5.0]), torch.tensor([-12.0, -4.0])
    rc, rr = torch.tensor([-11.0, -5.5]), torch.tensor([-11.0, -4.2])
    is_step = torch.tensor([False, True])
    nll = torch.tensor(2.5)
    beta, weights = 0.5, MixtureWeights(trajectory_dpo=0.7, step_dpo=1.3, sft=0.4)
    # Δ_traj = (−10+11) − (−12+11) = 2; Δ_step = (−5+5.5) − (−4+4.2) = 0.3; −log σ(x) = softplus(−x)
    o_dpo, s_dpo = _softplus(-beta * 2.0), _softplus(-beta * 0.3)
    expected = (0.7 * o_dpo + 1.3 * s_dpo) / 2 + 0.4 * 2.5
    loss = mixture_loss(PairLogps(pc, pr, rc, rr), is_step, nll, beta, weights)
    assert loss.item() == pytest.approx(expected, abs=1e-5)

    # A zero weight removes its term, even when that term is not finite.
    nan_step = torch.tensor([-11.0, float("nan")])
    no_step = MixtureWeights(trajectory_dpo=0.7, step_dpo=0.0, sft=0.4)
    loss = mixture_loss(PairLogps(pc, pr, nan_step, rr), is_step, nll, beta, no_step)
    assert loss.item() == pytest.approx(0.7 * o_dpo / 2 + 0.4 * 2.5, abs=1e-5)
    no_sft = MixtureWeights(trajectory_dpo=0.7, step_dpo=1.3, sft=0.0)
    nan_nll = torch.tensor(float("nan"))
    loss = mixture_loss(PairLogps(pc, pr, rc, rr), is_step, nan_nll, beta, no_sft)
    assert loss.item() == pytest.approx((0.7 * o_dpo + 1.3 * s_dpo) / 2, abs=1e-5)


# -- (b) the trainer's loss on a real batch --------------------------------------------------
def test_trainer_loss_equals_mixture_loss_of_plain_forward(
    tiny_model_path: Path, tmp_path: Path
) -> None:
    project_only_scored_positions()  # as the trainers set their LM head up
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    rows, _ = build_pair_examples(_pairs(1), tokenizer, max_length=1024)
    assert [r["is_step_level"] for r in rows] == [False, True]
    settings = MixtureConfig(beta=0.3, weights=MixtureWeights(trajectory_dpo=0.5, sft=2.0))
    trainer = MixtureTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32),
        args=mixture_config(settings, tmp_path, CPU_FLOAT32),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        data_collator=PairCollator(pad_token_id=tokenizer.pad_token_id),
        weights=settings.weights,
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    with torch.no_grad():
        trainer_loss = trainer.compute_loss(trainer.model, batch).item()

    chosen, rejected, counts = _side_logps(tiny_model_path, rows)
    # Before any step the policy is the reference; the precomputed reference must agree too.
    torch.testing.assert_close(batch["ref_chosen_logps"], chosen, atol=0, rtol=1e-6)
    torch.testing.assert_close(batch["ref_rejected_logps"], rejected, atol=0, rtol=1e-6)
    nll = -chosen.sum() / counts.sum()
    logps = PairLogps(chosen, rejected, chosen, rejected)
    expected = mixture_loss(logps, torch.tensor([False, True]), nll, 0.3, settings.weights)
    assert trainer_loss == pytest.approx(expected.item(), abs=1e-5)


def test_a_shared_prompt_gives_the_two_row_log_probs(tiny_model_path: Path) -> None:
    """Each pair's prompt run once for both sides: the sides' log-probs and the chosen
    token count are those of a row per side, for a micro-batch of pairs whose prompts and
    sides differ in length (so its rows are padded)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    rows, _ = build_pair_examples(_pairs(1), tokenizer, max_length=1024)
    assert len({len(r["prompt_ids"]) for r in rows}) == 2
    batch = PairCollator(pad_token_id=tokenizer.pad_token_id)(rows)
    model = load_training_model(tiny_model_path)
    add_fused_lm_head(model)
    project_only_scored_positions()
    results, gradients = [], []
    for logps in (shared_prompt_logps, two_row_logps):
        model.zero_grad()
        chosen, rejected, tokens = logps(model, batch)
        (rejected.sum() - chosen.sum()).backward()  # through the prompt's keys and values too
        results.append((chosen, rejected, tokens))
        gradients.append([p.grad.clone() for p in model.parameters()])
    for got, expected in zip(*results, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)
    for got, expected in zip(*gradients, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


# -- (c) SFT ---------------------------------------------------------------------------------
def _expert_nll(model_path: Path, trajectories: list[Trajectory]) -> float:
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    rows, _ = build_sft_examples(trajectories, PROMPT, tokenizer, max_length=1024)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    total = sum(
        -_sequence_logps(model, [], r["input_ids"], r["assistant_masks"]).item() for r in rows
    )
    return total / sum(sum(r["assistant_masks"]) for r in rows)


def test_micro_batches_train_the_batch_without_padding(
    tiny_model_path: Path, tmp_path: Path
) -> None:
    """Accumulating micro-batches of 1 is the same optimizer step as one padded batch of 4
    (TRL normalises the NLL by the batch's token count), minus the padding."""
    # of different lengths (1, 2, 3 and 3 steps): a batch of 4 pads
    experts = [
        replace(e, steps=e.steps[-k:])
        for k, e in zip((1, 2, 3, 3), map(_expert, range(4)), strict=True)
    ]
    fp32 = ComputeConfig(device="cpu", bf16=False)
    results = {
        micro: train_sft(
            tiny_model_path,
            experts,
            PROMPT,
            SFTConfig(epochs=2, lr=1e-3, batch_size=4, micro_batch_size=micro, max_length=1024),
            tmp_path / str(micro),
            fp32,
        ).metrics
        for micro in (1, 4)
    }
    one, four = results[1], results[4]
    assert one["steps"] == four["steps"] == 2
    assert one["padding_tokens"] == 0 < four["padding_tokens"]
    assert one["tokens"] == four["tokens"] and one["scored_tokens"] == four["scored_tokens"]
    assert one["first_step_loss"] == pytest.approx(four["first_step_loss"], abs=1e-5)
    assert one["last_step_loss"] == pytest.approx(four["last_step_loss"], abs=1e-4)


@pytest.mark.parametrize("lora", [False, True])
def test_sft_lowers_expert_action_nll(tiny_model_path: Path, tmp_path: Path, lora: bool) -> None:
    experts = [_expert(i) for i in range(4)]
    settings = SFTConfig(
        epochs=4, lr=3e-3 if lora else 1e-3, batch_size=2, max_length=1024, lora={"enabled": lora}
    )
    result = train_sft(tiny_model_path, experts, PROMPT, settings, tmp_path)
    assert result.metrics["steps"] == 8 and result.metrics["n_truncated"] == 0
    assert result.metrics["peak_rss_mb"] > 0
    assert (result.path.parent / "adapter").exists() == lora
    assert _expert_nll(result.path, experts) < _expert_nll(tiny_model_path, experts) - 0.05


# -- (d) the mixture -------------------------------------------------------------------------
def test_mixture_raises_the_chosen_rejected_margin(tiny_model_path: Path, tmp_path: Path) -> None:
    pairs = _pairs(3)
    settings = MixtureConfig(epochs=3, lr=1e-3, batch_size=2, max_length=1024)
    result = train_mixture(tiny_model_path, pairs, settings, tmp_path)
    assert result.metrics["n_pairs"] == 6 and result.metrics["n_step_pairs"] == 3

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    rows, _ = build_pair_examples(pairs, tokenizer, max_length=1024)
    before_c, before_r, _ = _side_logps(tiny_model_path, rows)
    after_c, after_r, _ = _side_logps(result.path, rows)
    gain = (after_c - after_r) - (before_c - before_r)
    assert gain.mean().item() > 0.5
    assert (gain > 0).all()

    # Iteration 2 starts from iteration 1's model; the reference stays the SFT model.
    quick = MixtureConfig(epochs=1, batch_size=2, max_length=1024)
    second = train_mixture(tiny_model_path, pairs, quick, tmp_path, parent_path=result.path)
    assert second.parent_id == result.checkpoint_id != second.checkpoint_id


MAIN_LOSSES = {"steps": 4, "first": 21.835464477539062, "last": 15.430133819580078,
               "mean": 18.026995182037354}  # fmt: skip
"""The run below as main's trainer (before `trl_adapter`) trained it, float32 on CPU."""


@pytest.mark.parametrize("share_prompts", [False, True])
def test_mixture_trains_as_before_and_logs_each_step_per_term_and_level(
    tiny_model_path: Path, tmp_path: Path, share_prompts: bool
) -> None:
    weights = MixtureWeights(trajectory_dpo=0.5, step_dpo=1.3, sft=2.0)
    settings = MixtureConfig(
        epochs=2, lr=1e-3, beta=0.3, batch_size=2, max_length=1024, weights=weights
    )
    fp32 = ComputeConfig(device="cpu", bf16=False, share_prompts=share_prompts)
    result = train_mixture(tiny_model_path, _pairs(2), settings, tmp_path, compute=fp32)
    metrics = result.metrics
    assert metrics["steps"] == MAIN_LOSSES["steps"]
    assert metrics["first_step_loss"] == pytest.approx(MAIN_LOSSES["first"], rel=1e-5)
    assert metrics["last_step_loss"] == pytest.approx(MAIN_LOSSES["last"], rel=1e-5)
    assert metrics["train_loss"] == pytest.approx(MAIN_LOSSES["mean"], rel=1e-5)

    steps = result.training_steps()
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    assert all(s["loss"] > 0 and s["sft/loss"] > 0 for s in steps)
    first = steps[0]  # before any update the policy is the reference: Δ = 0 on both levels
    for level in ("o_dpo", "s_dpo"):
        assert first[f"{level}/pairs"] == 1
        assert first[f"{level}/loss"] == pytest.approx(math.log(2), abs=1e-6)
        for name in ("margin", "chosen_logratio", "rejected_logratio", "accuracy"):
            assert first[f"{level}/{name}"] == 0
    # the first step's loss is its terms, weighted: (0.5 ln 2 + 1.3 ln 2) / 2 + 2 NLL
    assert first["loss"] == pytest.approx(0.9 * math.log(2) + 2 * first["sft/loss"], rel=1e-5)
    later = [s for s in steps[1:] if "s_dpo/margin" in s]
    assert later and all(s["s_dpo/margin"] > 0 and s["s_dpo/accuracy"] == 1 for s in later)
    for s in later:  # the margin is β times chosen minus rejected log-ratio
        gap = s["s_dpo/chosen_logratio"] - s["s_dpo/rejected_logratio"]
        assert s["s_dpo/margin"] == pytest.approx(0.3 * gap, rel=1e-4)

    [events] = (result.path.parent / "tensorboard").glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events)).Reload()
    logged = accumulator.Scalars("train/s_dpo/margin")
    assert [e.step for e in logged] == [s["step"] for s in steps if "s_dpo/margin" in s]
    assert [e.value for e in accumulator.Scalars("train/sft/loss")] == pytest.approx(
        [s["sft/loss"] for s in steps], rel=1e-6
    )


def test_eto_preset_trains_on_trajectory_pairs_only(tiny_model_path: Path, tmp_path: Path) -> None:
    settings = mixture_preset("eto", epochs=1, batch_size=2, max_length=1024)
    assert settings is not None
    result = train_mixture(tiny_model_path, _pairs(2), settings, tmp_path)
    assert result.metrics["n_pairs"] == 2 and result.metrics["n_step_pairs"] == 0


# -- (e) context overflow and tokenisation checks -------------------------------------------
def test_overflow_drops_oldest_turns_and_keeps_the_final_action(tiny_model_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    steps = tuple(
        Step(f"Thought: step {k}.\nAction: go north", "go north", f"Room number {k}. " * 20)
        for k in range(5)
    ) + (Step("Thought: finished.\nAction: stop", "stop", "Done."),)
    long = Trajectory(_task(0), steps, 1.0)
    full_rows, _ = build_sft_examples([long], PROMPT, tokenizer, max_length=100_000)
    full_length = len(full_rows[0]["input_ids"])

    rows, stats = build_sft_examples([long, _expert(1)], PROMPT, tokenizer, full_length - 50)
    assert (stats.n_truncated, stats.n_dropped, len(rows)) == (1, 0, 2)
    text = tokenizer.decode(rows[0]["input_ids"])
    scored = tokenizer.decode([t for t, m in zip(*rows[0].values(), strict=True) if m])
    assert "Room number 0." not in text and "Room number 4." in text
    assert "step 0." not in scored and scored.rstrip().endswith("Action: stop<|im_end|>")
    assert text.startswith(tokenizer.decode(full_rows[0]["input_ids"][:60]))  # system + task kept
    assert len(rows[0]["input_ids"]) <= full_length - 50

    _, stats = build_sft_examples([long], PROMPT, tokenizer, max_length=60)
    assert (stats.n_dropped, stats.dropped) == (1, ["sft:t0@0"])


def test_template_that_rewrites_turns_raises_naming_the_example(tiny_model_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    tokenizer.chat_template = (
        "{{ messages | length }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(TokenizationMismatch, match="sft:t3@0"):
        build_sft_examples([_expert(3)], PROMPT, tokenizer, max_length=100_000)


# -- (f) checkpoints --------------------------------------------------------------------------
def test_existing_checkpoint_is_not_retrained(tiny_model_path: Path, tmp_path: Path) -> None:
    experts = [_expert(i) for i in range(2)]
    settings = SFTConfig(epochs=1, batch_size=2, max_length=1024)
    first = train_sft(tiny_model_path, experts, PROMPT, settings, tmp_path)
    again = train_sft(tiny_model_path, experts, PROMPT, settings, tmp_path)
    assert not first.skipped and again.skipped
    assert again.checkpoint_id == first.checkpoint_id and again.metrics == first.metrics
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.checkpoint_id]
    assert model_id(first.path) == first.checkpoint_id

    parent = model_id(tiny_model_path)
    assert checkpoint_id(parent, sft_data_hash(experts, PROMPT), settings) == first.checkpoint_id
    other_data = checkpoint_id(parent, sft_data_hash(experts[:1], PROMPT), settings)
    other_settings = checkpoint_id(parent, sft_data_hash(experts, PROMPT), SFTConfig(lr=1e-4))
    assert len({first.checkpoint_id, other_data, other_settings}) == 3

    store = Store(tmp_path / "store.duckdb")
    store.record_checkpoint(first, run_id="r", iteration=0)
    row = store.query("SELECT * FROM checkpoints").to_dict("records")[0]
    assert (row["checkpoint_id"], row["kind"], row["path"]) == (
        first.checkpoint_id,
        "sft",
        str(first.path),
    )


def test_the_training_summary_says_what_did_not_fit(tmp_path: Path):
    from ipr_core.training.checkpoints import TrainResult

    metrics = {"steps": 9, "first_step_loss": 1.3, "last_step_loss": 0.26,
               "seconds_per_step": 16.0, "n_examples": 3, "n_truncated": 2,
               "n_dropped": 0}  # fmt: skip
    result = TrainResult("c5f6", "ee5e", "sft", tmp_path, {}, metrics)
    assert result.summary() == (
        "trained: 9 steps, loss 1.300 -> 0.260, 16.0 s/step; "
        "of 3 examples 2 lost their oldest turns and 0 were dropped to fit max_length"
    )
    fitting = TrainResult("c5f6", "ee5e", "sft", tmp_path, {}, metrics | {"n_truncated": 0})
    assert fitting.summary().endswith("16.0 s/step")
    assert TrainResult("c5f6", "ee5e", "sft", tmp_path, {}, {}, skipped=True).summary() == "reused"


def test_a_right_padded_batch_is_attended_causally_with_the_same_scored_log_probs(
    tiny_model_path: Path,
) -> None:
    plain = load_model(tiny_model_path).eval()
    trained = load_training_model(tiny_model_path).eval()
    masks_seen: list[torch.Tensor | None] = []
    trained.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: masks_seen.append(kwargs.get("attention_mask")),
        with_kwargs=True,
    )
    ids = torch.randint(0, plain.config.vocab_size, (2, 10))
    right = torch.ones(2, 10, dtype=torch.long)
    right[1, 6:] = 0
    with torch.no_grad():
        expected = plain(input_ids=ids, attention_mask=right).logits
        got = trained(input_ids=ids, attention_mask=right).logits
    assert masks_seen == [None]
    real = right.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)

    left = right.flip(1)  # left padding: the mask is what keeps real tokens off the pads
    with torch.no_grad():
        trained(input_ids=ids, attention_mask=left)
    assert masks_seen[-1] is not None and torch.equal(masks_seen[-1], left)


# -- portable checkpoints ----------------------------------------------------------------------
def test_exported_lora_checkpoints_rebuild_bit_for_bit_on_a_fresh_machine(
    tiny_model_path: Path, tmp_path: Path
) -> None:
    """A LoRA SFT model and a mixture trained from it, exported as adapters and records and
    imported into an empty cache: every file of both model folders is rebuilt byte for byte,
    the SFT model before the mixture merged into it."""
    lora = {"enabled": True, "r": 4, "alpha": 8}
    root = tmp_path / "ipr" / "checkpoints"
    sft_settings = SFTConfig(epochs=1, lr=3e-3, batch_size=2, max_length=1024, lora=lora)
    sft = train_sft(tiny_model_path, [_expert(i) for i in range(2)], PROMPT, sft_settings, root)
    mixture_settings = MixtureConfig(epochs=1, batch_size=2, max_length=1024, lora=lora)
    mixture = train_mixture(sft.path, _pairs(2), mixture_settings, root)
    assert mixture.parent_id == sft.checkpoint_id
    store = Store(tmp_path / "run.duckdb")
    rows = [checkpoint_row(base_checkpoint(tiny_model_path)), checkpoint_row(sft, "r", 0)]
    store.write({"checkpoints": [*rows, checkpoint_row(mixture, "r", 1)]})

    exported, skipped = export_checkpoints(store, tmp_path / "portable")
    assert exported == [sft.checkpoint_id, mixture.checkpoint_id] and skipped == []
    weights = sorted(p.name for p in (tmp_path / "portable").rglob("*.safetensors"))
    assert weights == ["adapter_model.safetensors"] * 2  # no merged model: that is rebuilt

    fresh = tmp_path / "fresh"
    rebuilt = import_checkpoints(store, tmp_path / "portable", fresh)
    assert rebuilt == [sft.checkpoint_id, mixture.checkpoint_id]
    for trained in (sft, mixture):
        files = sorted(p.name for p in trained.path.iterdir())
        again = fresh / "checkpoints" / trained.checkpoint_id / "model"
        assert sorted(p.name for p in again.iterdir()) == files
        for name in files:
            assert (again / name).read_bytes() == (trained.path / name).read_bytes(), name
    assert import_checkpoints(store, tmp_path / "portable", fresh) == []  # nothing missing


def test_an_experiment_export_keeps_what_its_unfinished_work_starts_from(
    tiny_model_path: Path, tmp_path: Path
) -> None:
    """`ipr checkpoints export --experiment`: a running run's checkpoints with their parents,
    each seed's SFT model; a finished run's mixture is not needed (and leaves the folder)."""
    lora = {"enabled": True, "r": 4, "alpha": 8}
    root = tmp_path / "checkpoints"
    settings = SFTConfig(epochs=1, batch_size=2, max_length=1024, lora=lora)
    sft = train_sft(tiny_model_path, [_expert(0)], PROMPT, settings, root)
    mixture_settings = MixtureConfig(epochs=1, batch_size=2, max_length=1024, lora=lora)
    mixture = train_mixture(sft.path, _pairs(2), mixture_settings, root)
    store = Store(tmp_path / "run.duckdb")
    base = checkpoint_row(base_checkpoint(tiny_model_path))
    rows = [base, checkpoint_row(sft, "x-sft-s0", 0), checkpoint_row(mixture, "x-eto-s0", 1)]
    runs = [
        {"experiment_id": "x", "method": "sft", "seed": 0, "run_id": "x-sft-s0",
         "status": "finished", "best_iteration": 0, "test_policy_id": sft.checkpoint_id},
        {"experiment_id": "x", "method": "eto", "seed": 0, "run_id": "x-eto-s0",
         "status": "running", "best_iteration": None, "test_policy_id": None},
    ]  # fmt: skip
    experiment = {"experiment_id": "x", "config": "{}"}
    store.write({"checkpoints": rows, "experiment_runs": runs, "experiments": [experiment]})
    to = tmp_path / "portable"
    args = ["checkpoints", "export", "--store", str(store.path), "--to", str(to)]
    assert commands.main([*args, "--experiment", "x"]) == 0
    both = sorted([sft.checkpoint_id, mixture.checkpoint_id])
    assert sorted(p.name for p in to.iterdir()) == both

    assert commands.main([*args, "--experiment", "nope"]) == 2  # unknown: nothing removed
    assert sorted(p.name for p in to.iterdir()) == both

    with store.transaction() as con:  # the ETO run finished: its mixture is not needed
        con.execute("UPDATE experiment_runs SET status = 'finished' WHERE method = 'eto'")
    assert commands.main([*args, "--experiment", "x"]) == 0
    assert [p.name for p in to.iterdir()] == [sft.checkpoint_id]
    assert commands.main(args) == 0  # without --experiment: every checkpoint
    assert len(list(to.iterdir())) == 2


def test_a_snapshot_of_a_store_resumes_on_a_fresh_machine(
    tiny_model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`ipr snapshot`: the store's copy and, beside it, the checkpoints its experiment's resume
    needs, read from the copy; a fresh cache rebuilds them from the snapshot alone. A
    misspelt experiment writes nothing, and so does a snapshot that could not resume (a
    needed checkpoint neither here nor exported before)."""
    lora = {"enabled": True, "r": 4, "alpha": 8}
    settings = SFTConfig(epochs=1, batch_size=2, max_length=1024, lora=lora)
    sft = train_sft(tiny_model_path, [_expert(0)], PROMPT, settings, tmp_path / "checkpoints")
    store = Store(tmp_path / "run.duckdb")
    run = {"experiment_id": "x", "method": "eto", "seed": 0, "run_id": "x-eto-s0",
           "status": "running", "best_iteration": None, "test_policy_id": None}  # fmt: skip
    store.write(
        {
            "checkpoints": [
                checkpoint_row(base_checkpoint(tiny_model_path)),
                checkpoint_row(sft, "x-eto-s0", 0),
            ],
            "experiment_runs": [run],
            "experiments": [{"experiment_id": "x", "config": "{}"}],
        }
    )
    target = tmp_path / "docs" / "x.duckdb"
    args = ["snapshot", "--store", str(store.path), "--to", str(target), "--experiment"]
    assert commands.main([*args, "nope"]) == 2
    assert not (tmp_path / "docs").exists()

    assert commands.main([*args, "x"]) == 0
    copy = Store(target, read_only=True)
    assert copy.query("SELECT run_id, status FROM experiment_runs").values.tolist() == [
        ["x-eto-s0", "running"]
    ]
    folder = tmp_path / "docs" / "x-checkpoints"
    assert [p.name for p in folder.iterdir()] == [sft.checkpoint_id]
    assert sorted(p.name for p in (tmp_path / "docs").iterdir()) == ["x-checkpoints", "x.duckdb"]
    fresh = tmp_path / "fresh"
    assert import_checkpoints(copy, folder, fresh) == [sft.checkpoint_id]
    again = fresh / "checkpoints" / sft.checkpoint_id / "model"
    for name in (p.name for p in sft.path.iterdir()):
        assert (again / name).read_bytes() == (sft.path / name).read_bytes(), name

    sft.path.parent.rename(tmp_path / "moved")  # e.g. run from another directory
    capsys.readouterr()
    elsewhere = ["snapshot", "--store", str(store.path), "--to", str(tmp_path / "b" / "x.duckdb")]
    assert commands.main([*elsewhere, "--experiment", "x"]) == 2
    assert "1 checkpoint(s) a resume of experiment 'x' needs are neither on this machine" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "b").exists()
    assert commands.main([*args, "x"]) == 0  # its earlier export holds it: kept
    assert [p.name for p in folder.iterdir()] == [sft.checkpoint_id]


def test_importing_a_checkpoint_whose_parent_is_unknown_names_the_file_and_field(
    tiny_model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lora = {"enabled": True, "r": 4, "alpha": 8}
    settings = SFTConfig(epochs=1, batch_size=2, max_length=1024, lora=lora)
    sft = train_sft(tiny_model_path, [_expert(0)], PROMPT, settings, tmp_path / "checkpoints")
    store = Store(tmp_path / "run.duckdb")
    store.write({"checkpoints": [checkpoint_row(sft, "r", 0)]})  # its base is not recorded
    export_checkpoints(store, tmp_path / "portable")
    with pytest.raises(InputError, match="result.json, field 'parent_id'"):
        import_checkpoints(store, tmp_path / "portable", tmp_path / "fresh")
    assert not (tmp_path / "fresh" / "checkpoints" / sft.checkpoint_id).exists()
    args = ["--store", str(store.path), "--from", str(tmp_path / "portable"), "--cache-dir"]
    args.append(str(tmp_path / "fresh"))
    assert commands.main(["checkpoints", "import", *args]) == 2
    assert f"{sft.checkpoint_id}/result.json, field 'parent_id'" in capsys.readouterr().err
