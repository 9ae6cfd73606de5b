"""The method registry: each method's loss and needs, defined once (`ipr_core.training.methods`)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from ipr_core.agent.prompts import PromptFormat
from ipr_core.config import RunConfig
from ipr_core.engine.rollout import RolloutResult, RolloutSpec
from ipr_core.envs.base import EnvTask
from ipr_core.method.evaluate import Episode, summarize
from ipr_core.method.explore import Exploration
from ipr_core.run.loop import rft_examples
from ipr_core.training.config import MixtureWeights
from ipr_core.training.data import sft_conversations
from ipr_core.training.methods import IPR, IPR_NO_SDPO, REGISTRY, Needs, mixture_preset
from ipr_core.training.mixture import PairLogps, mixture_loss
from ipr_core.types import Step, Trajectory

ROOT = Path(__file__).resolve().parents[1]


def _needs(name: str) -> Needs:
    return RunConfig(env="twx/twc", method=name).needs


def test_each_method_runs_only_the_stages_it_needs() -> None:
    assert _needs("sft") == Needs(False, False, False, False)
    assert _needs("eto") == Needs(exploration=True, monte_carlo=False, pairs=True,
                                  successful_explorations=False)  # fmt: skip
    assert _needs("ipr") == Needs(True, True, True, False)
    assert _needs("ipr-no-sdpo") == Needs(True, True, True, False)  # its SFT term reads steps
    assert _needs("rft") == Needs(True, False, False, True)
    assert RunConfig(env="twx/twc", method="rft").mixture_settings is None


def test_mixture_preset_follows_the_registry() -> None:
    assert mixture_preset("sft") is None and mixture_preset("rft") is None
    eto = mixture_preset("eto")
    assert eto is not None and eto.weights == MixtureWeights(step_dpo=0.0, sft=0.0)
    assert mixture_preset("ipr-no-sft", lr=1e-5).weights.sft == 0.0  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="unknown method 'ppo'"):
        mixture_preset("ppo")


def test_ipr_without_s_dpo_has_ipr_s_sft_term_and_no_step_pair_term() -> None:
    weights = IPR_NO_SDPO.weights
    assert weights is not None and IPR.weights is not None
    assert (weights.step_dpo, weights.sft, weights.trajectory_dpo) == (0.0, IPR.weights.sft, 1.0)
    chosen, rejected = torch.tensor([-10.0, -5.0]), torch.tensor([-12.0, -4.0])
    ref_chosen, ref_rejected = torch.tensor([-11.0, -5.5]), torch.tensor([-11.0, -4.2])
    is_step, nll = torch.tensor([False, True]), torch.tensor(2.5)
    loss = mixture_loss(
        PairLogps(chosen, rejected, ref_chosen, ref_rejected), is_step, nll, 0.1, weights
    )
    # moving the step pair's rejected side changes IPR's loss, not this one's
    moved = torch.tensor([-12.0, -1.0])
    same = mixture_loss(PairLogps(chosen, moved, ref_chosen, ref_rejected), is_step, nll, 0.1,
                        weights)  # fmt: skip
    full = mixture_loss(
        PairLogps(chosen, rejected, ref_chosen, ref_rejected), is_step, nll, 0.1, IPR.weights
    )
    full_moved = mixture_loss(
        PairLogps(chosen, moved, ref_chosen, ref_rejected), is_step, nll, 0.1, IPR.weights
    )
    assert same.item() == pytest.approx(loss.item())
    assert full_moved.item() != pytest.approx(full.item())


def _trajectory(task_id: str, reward: float | None, status: str = "ok") -> Trajectory:
    task = EnvTask("toy", task_id, "train", f"Fetch the key of {task_id}.", "A hall.")
    steps = (Step(f"Thought: {task_id} r{reward}.\nAction: go north", "go north", "A room."),)
    return Trajectory(task, steps, reward, status)  # type: ignore[arg-type]


def _explored(expert: Trajectory, reward: float | None, status: str = "ok", prefix: int = 0):
    trajectory = _trajectory(expert.task.task_id + f"-explored-{reward}-{status}", reward, status)
    spec = RolloutSpec(expert.task.task_id, tuple(s.text for s in expert.steps[:prefix]))
    return Exploration(expert, prefix, RolloutResult(spec, trajectory))


def test_rft_trains_on_the_experts_and_the_successful_explorations_only() -> None:
    experts = [_trajectory("t0", 1.0), _trajectory("t1", 1.0)]
    success = _explored(experts[0], 1.0)
    explored = [
        success,
        _explored(experts[1], 0.5),  # partial credit is not a success
        _explored(experts[1], None, "env_error"),
        _explored(experts[0], 1.0, prefix=1),  # a step-level exploration starts mid-task
    ]
    examples = rft_examples(experts, explored)
    assert examples == [*experts, success.rollout.trajectory]
    texts = [
        message["content"]
        for trajectory in examples
        for conversation in sft_conversations(trajectory, PromptFormat("Actions: go north."))
        for message in conversation
        if message["role"] == "assistant"
    ]
    assert texts == [
        "Thought: t0 r1.0.\nAction: go north",
        "Thought: t1 r1.0.\nAction: go north",
        "Thought: t0-explored-1.0-ok r1.0.\nAction: go north",
    ]


def test_a_success_is_a_completed_game_and_failed_episodes_are_left_out() -> None:
    episodes = [
        Episode("ok", 1.0, 5),
        Episode("max_steps", 0.5, 20),  # partial credit is not a success
        Episode("truncated", 1.0, 3),  # a failed episode has no outcome, whatever it stored
        Episode("ok", 1.0, 7),
    ]
    evaluation = summarize("dev", "policy", episodes)
    assert (evaluation.n_failed, evaluation.success_rate) == (1, 2 / 3)
    assert evaluation.avg_reward == pytest.approx(2.5 / 3)


def test_the_registry_is_the_only_place_method_names_are_spelt() -> None:
    """Every method name outside the registry is read from it; `sft` and `ipr` are left
    out of the search because they also name a stage, a config section and the package."""
    names = set(REGISTRY) - {"sft", "ipr"}
    found = []
    for package in ("ipr_core", "flows", "tasks"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == ROOT / "ipr_core" / "training" / "methods.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Constant) and node.value in names:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}")
    assert found == []


def test_an_rft_run_explores_and_trains_without_monte_carlo_or_pairs(tmp_path, tiny_model_path):
    from ipr_core.config import load_config
    from ipr_core.run.direct import run_pipeline
    from ipr_core.store.store import Store

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny-llama").symlink_to(tiny_model_path)
    overrides = {"store": str(tmp_path / "rft.duckdb"), "cache_dir": str(tmp_path),
                 "method": "rft", "run_id": "rft", "evaluate_base": False}  # fmt: skip
    config = load_config(ROOT / "configs" / "smoke.yaml", overrides)
    run_pipeline(config, log=lambda _: None)
    store = Store(config.store)
    stages = store.query("SELECT iteration, stage FROM stage_runs ORDER BY iteration, stage")
    assert list(stages.itertuples(index=False, name=None)) == [
        (0, "evaluate-dev"),
        (0, "ingest"),
        (0, "sft"),
        (1, "evaluate-dev"),
        (1, "explore"),
        (1, "train-rft"),
    ]
    explored = store.query("SELECT DISTINCT prefix_len FROM rollouts WHERE kind = 'explore'")
    assert explored["prefix_len"].tolist() == [0]  # each task from its start only
    assert store.count("pairs") == 0
