"""`ipr estimate`'s plan of a run: the work it expects each stage to do."""

from pathlib import Path

from ipr_core.config import load_config
from ipr_core.run.costs import planned_work

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def _units(overrides: dict) -> dict[str, float]:
    config = load_config(DEMO, overrides)
    return {work.stage: work.units for work in planned_work(config, steps_per_task=5.0)}


def test_explore_limit_scales_exploration_monte_carlo_and_mixture_not_sft():
    every = _units({"train_limit": 16, "explore_limit": None})
    first_three = _units({"train_limit": 16, "explore_limit": 3})
    assert first_three["sft"] == every["sft"] == 16  # one epoch over every SFT task
    for stage in ("expert-step-rewards", "explore", "agent-step-rewards", "train-mixture"):
        assert first_three[stage] * 16 == every[stage] * 3, stage
    # A limit above the SFT tasks explores them all, never more.
    assert _units({"train_limit": 4, "explore_limit": 10})["explore"] == 4 * 5.0


def test_eto_plans_no_step_rewards_and_explores_each_task_from_its_start_only():
    eto = _units({"train_limit": 16, "explore_limit": 4, "method": "eto"})
    assert "expert-step-rewards" not in eto and "agent-step-rewards" not in eto
    assert eto["explore"] == 4  # one episode per task, not one per expert step
    ipr = _units({"train_limit": 16, "explore_limit": 4, "method": "ipr"})
    assert ipr["explore"] == 4 * 5.0 and ipr["agent-step-rewards"] > 0
