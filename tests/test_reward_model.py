"""Step reward model: examples from the store, training on a tiny model, scoring, reuse."""

from __future__ import annotations

from pathlib import Path

import pytest

from ipr_core.agent.prompts import PromptFormat, build_conversation
from ipr_core.envs.base import EnvTask
from ipr_core.errors import IprError
from ipr_core.store.store import Store, expert_to_row
from ipr_core.training.reward_model import (
    RewardModelScorer,
    RewardModelSettings,
    split_by_task,
    step_reward_examples,
    train_reward_model,
)
from ipr_core.types import Step, Trajectory

PROMPT = PromptFormat("Actions: go <direction>, take <item>, look around.")
RUN, SCORER = "run-rm", "scorer-0"
GOOD = "Thought: there is a coin here.\nAction: take coin"
BAD = "Thought: let me check the room.\nAction: look around"
N_TASKS = 10
PREFIXES = (0, 1, 2)


def _expert(i: int) -> Trajectory:
    task = EnvTask("toy", f"t{i:02d}", "train", f"Collect the coins in room {i}.", "A hall.")
    steps = tuple(
        Step(f"Thought: go on.\nAction: go {d}", f"go {d}", f"You are in room {i}{d[0]}.")
        for d in ("north", "east", "south")
    )
    return Trajectory(task=task, steps=steps, outcome_reward=1.0)


def _reward_row(i: int, prefix_len: int, actor: str, iteration: int, reward: float | None) -> dict:
    text = GOOD if actor == "expert" else BAD
    return {
        "run_id": RUN,
        "scorer_id": SCORER,
        "iteration": iteration,
        "env_id": "toy",
        "task_id": f"t{i:02d}",
        "prefix_len": prefix_len,
        "actor": actor,
        "action": text.split("Action: ")[1],
        "step_text": text,
        "mean_reward": reward,
        "n_samples": 4,
        "n_ok": 0 if reward is None else 4,
        "n_failed": 4 if reward is None else 0,
        "terminal": False,
    }


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    """Per task and prefix: "take coin" scored 1.0, "look around" 0.0 (two iterations each)."""
    store = Store(tmp_path_factory.mktemp("store") / "ipr.duckdb")
    rows = []
    for i in range(N_TASKS):
        for j in PREFIXES:
            rows.append(_reward_row(i, j, "expert", 0, 1.0))
            rows += [_reward_row(i, j, "agent", it, 0.0) for it in (1, 2)]
    rows.append(_reward_row(0, 3, "agent", 1, None))  # every MC rollout failed
    rows.append(_reward_row(1, 3, "agent", 2, float("nan")))  # NULL as pandas writes it
    rows.append({**_reward_row(99, 0, "agent", 1, 0.5), "task_id": "no-expert"})
    rows.append({**_reward_row(2, 0, "agent", 1, 0.5), "run_id": "other-run"})
    experts = [expert_to_row(_expert(i), source="test") for i in range(N_TASKS)]
    store.write({"expert_trajectories": experts, "step_rewards": rows})
    return store


def test_examples_rebuilt_from_store(store):
    examples = step_reward_examples(store.scored_steps(RUN, SCORER), PROMPT)
    assert len(examples) == N_TASKS * len(PREFIXES) * 3
    assert examples.n_rows == len(examples) + 3
    assert examples.n_failed == 2
    assert examples.n_no_expert == 1
    assert all(e.target in (0.0, 1.0) for e in examples)  # NULLs never become 0
    expert = _expert(4)
    (example,) = [e for e in examples if (e.task_id, e.prefix_len, e.actor) == ("t04", 2, "expert")]
    history = build_conversation(expert.task, expert.steps[:2], PROMPT)
    assert list(example.messages) == [*history, {"role": "assistant", "content": GOOD}]
    assert example.target == 1.0 and example.action == "take coin"
    assert step_reward_examples(store.scored_steps(RUN, "other-scorer"), PROMPT) == []


def test_split_keeps_tasks_apart(store):
    examples = step_reward_examples(store.scored_steps(RUN, SCORER), PROMPT)
    train, heldout = split_by_task(examples, 0.2, seed=0)
    train_tasks, heldout_tasks = {e.task_id for e in train}, {e.task_id for e in heldout}
    assert not train_tasks & heldout_tasks
    assert len(heldout_tasks) == 2 and len(train) + len(heldout) == len(examples)
    assert split_by_task(examples, 0.2, seed=0) == (train, heldout)  # deterministic
    assert {e.task_id for e in split_by_task(examples, 0.2, seed=1)[1]} != heldout_tasks
    assert split_by_task(examples, 0.0, seed=0) == (list(examples), [])


def test_train_and_score(store, tiny_model_path, tmp_path):
    examples = step_reward_examples(store.scored_steps(RUN, SCORER), PROMPT)
    settings = RewardModelSettings(epochs=6, lr=1e-3, batch_size=8, max_length=512)
    root = tmp_path / "checkpoints"
    result = train_reward_model(tiny_model_path, examples, settings, root)
    metrics = result.metrics
    assert not result.skipped and result.kind == "reward_model"
    assert metrics["n_heldout_tasks"] == 2 and metrics["n_heldout"] == 2 * len(PREFIXES) * 3
    assert metrics["last_step_loss"] < metrics["first_step_loss"]
    assert metrics["heldout_mse"] < metrics["heldout_baseline_mse"]

    _, heldout = split_by_task(examples, settings.heldout_fraction, settings.seed)
    scorer = RewardModelScorer(result.path, batch_size=4)
    scores = scorer.score([list(e.messages) for e in heldout])
    assert all(0.0 <= s <= 1.0 for s in scores)
    by_key = {}
    for example, score in zip(heldout, scores, strict=True):
        by_key.setdefault((example.task_id, example.prefix_len), {})[example.actor] = score
    assert by_key and all(s["expert"] > s["agent"] for s in by_key.values())
    # batching and order do not change a score
    single = scorer.score([list(heldout[-1].messages)])
    assert single[0] == pytest.approx(scores[-1], abs=1e-4)
    with pytest.raises(IprError):
        scorer.score([list(heldout[0].messages[:-1])])

    again = train_reward_model(tiny_model_path, examples, settings, root)
    assert again.skipped and again.checkpoint_id == result.checkpoint_id
    assert again.metrics == metrics and Path(again.path) == result.path
