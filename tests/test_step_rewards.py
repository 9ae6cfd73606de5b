"""The Monte Carlo average and its failure rule (pure part; the engine part is in the
TextWorldExpress integration test)."""

from ipr_core.agent.react import format_turn
from ipr_core.engine.rollout import RolloutResult, RolloutSpec
from ipr_core.envs.base import EnvTask
from ipr_core.method.step_rewards import StepQuery, summarize
from ipr_core.types import Trajectory

TASK = EnvTask("twx/test", "train-1", "train", "Do it.", "")
QUERY = StepQuery("train-1", "expert", (), format_turn("go", "move north"))


def result(outcome, status="ok"):
    return RolloutResult(RolloutSpec("train-1"), Trajectory(TASK, (), outcome, status))


def test_mean_over_samples():
    reward = summarize(QUERY, [result(1.0), result(0.0), result(0.5), result(0.5)], False)
    assert reward.mean_reward == 0.5
    assert (reward.n_samples, reward.n_ok, reward.n_failed) == (4, 4, 0)
    assert reward.action == "move north"


def test_failed_rollouts_are_left_out_not_counted_as_zero():
    samples = [result(1.0), result(None, "env_error"), result(None, "truncated"), result(0.5)]
    reward = summarize(QUERY, samples, False)
    assert reward.mean_reward == 0.75
    assert (reward.n_ok, reward.n_failed) == (2, 2)


def test_all_failed_gives_no_reward():
    reward = summarize(QUERY, [result(None, "generation_error")] * 3, False)
    assert reward.mean_reward is None
    assert reward.n_failed == 3


def test_max_steps_outcome_counts():
    reward = summarize(QUERY, [result(0.2, "max_steps"), result(0.4)], False)
    assert abs(reward.mean_reward - 0.3) < 1e-12
