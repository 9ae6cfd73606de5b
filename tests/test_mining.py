"""Pair-mining rules on hand-built explorations (pure functions, no model)."""

import pytest

from ipr_core.agent.prompts import PromptFormat
from ipr_core.agent.react import format_turn
from ipr_core.config import MiningConfig
from ipr_core.engine.rollout import RolloutResult, RolloutSpec
from ipr_core.envs.base import EnvTask
from ipr_core.method.explore import Exploration
from ipr_core.method.mining import mine_pairs
from ipr_core.types import Step, Trajectory

TASK = EnvTask("twx/test", "train-1", "train", "Make a meal.", "You are in the kitchen.")
EXPERT = Trajectory(
    TASK,
    tuple(
        Step(format_turn(f"t{i}", a), a, f"obs {a}")
        for i, a in enumerate(["open fridge", "take apple", "eat apple"])
    ),
    outcome_reward=1.0,
)


def exploration(j: int, agent_actions: list[str], outcome: float | None, status="ok"):
    agent = tuple(Step(format_turn("a", a), a, f"obs {a}") for a in agent_actions)
    trajectory = Trajectory(TASK, EXPERT.steps[:j] + agent, outcome, status)
    prefix = tuple(s.text for s in EXPERT.steps[:j])
    return Exploration(EXPERT, j, RolloutResult(RolloutSpec(TASK.task_id, prefix), trajectory))


def mine(explorations, expert_r, agent_r, **config):
    key = lambda j: (TASK.task_id, j)  # noqa: E731
    return mine_pairs(
        explorations,
        {key(j): r for j, r in expert_r.items()},
        {key(j): r for j, r in agent_r.items()},
        MiningConfig(**config),
        PromptFormat(""),
    )


def test_step_pair_when_expert_beats_agent_by_margin_and_outcome():
    pairs = mine([exploration(1, ["look", "look"], 0.0)], {1: 0.8}, {1: 0.2}, step_margin=0.5)
    assert len(pairs) == 1
    pair = pairs[0]
    assert (pair.level, pair.prefix_len, pair.chosen_actor) == ("step", 1, "expert")
    assert (pair.chosen_reward, pair.rejected_reward) == (0.8, 0.2)
    # prompt = e_{t-1}: system, task, then the first expert turn and its observation
    assert [m["role"] for m in pair.prompt] == ["system", "user", "assistant", "user"]
    # suffix mode: the whole expert suffix vs the whole agent suffix, no final observation
    assert [m["content"] for m in pair.chosen if m["role"] == "assistant"] == [
        s.text for s in EXPERT.steps[1:]
    ]
    assert len([m for m in pair.rejected if m["role"] == "assistant"]) == 2
    assert pair.chosen[-1]["role"] == pair.rejected[-1]["role"] == "assistant"


def test_no_step_pair_within_margin():
    assert mine([exploration(1, ["look"], 0.0)], {1: 0.6}, {1: 0.2}, step_margin=0.5) == []


def test_no_step_pair_when_agent_outcome_is_not_lower():
    assert mine([exploration(1, ["look"], 1.0)], {1: 0.9}, {1: 0.1}, step_margin=0.5) == []


def test_no_step_pair_when_agent_repeats_the_expert_action():
    same = exploration(1, ["Take  Apple", "look"], 0.0)
    assert mine([same], {1: 0.9}, {1: 0.1}, step_margin=0.1) == []


def test_no_step_pair_without_step_rewards():
    assert mine([exploration(1, ["look"], 0.0)], {1: 0.9}, {1: None}) == []
    assert mine([exploration(1, ["look"], 0.0)], {}, {1: 0.1}) == []


def test_no_pair_from_failed_rollouts():
    failed = exploration(1, ["look"], None, status="env_error")
    assert mine([failed], {1: 0.9}, {1: 0.1}, step_margin=0.1) == []


@pytest.mark.parametrize("both, expected", [(False, 0), (True, 1)])
def test_reverse_pairs_only_when_both_directions(both, expected):
    # the expert's outcome is 1.0, so the agent can only win against a weaker expert
    weak_expert = Trajectory(TASK, EXPERT.steps, outcome_reward=0.5)
    agent = tuple(Step(format_turn("a", "look"), "look", "o") for _ in range(1))
    trajectory = Trajectory(TASK, weak_expert.steps[:1] + agent, 1.0)
    prefix = (weak_expert.steps[0].text,)
    ex = Exploration(weak_expert, 1, RolloutResult(RolloutSpec(TASK.task_id, prefix), trajectory))
    pairs = mine([ex], {1: 0.1}, {1: 0.9}, step_margin=0.5, both_directions=both)
    assert len(pairs) == expected
    if pairs:
        assert pairs[0].chosen_actor == "agent"
        assert pairs[0].chosen[0]["content"] == agent[0].text


def test_action_mode_keeps_single_turns_and_includes_first_step():
    pairs = mine(
        [exploration(0, ["look", "look"], 0.0)],
        {0: 0.9},
        {0: 0.1},
        step_margin=0.5,
        step_mode="action",
    )
    levels = sorted(p.level for p in pairs)
    assert levels == ["step", "trajectory"]
    step = next(p for p in pairs if p.level == "step")
    assert step.chosen == ({"role": "assistant", "content": EXPERT.steps[0].text},)
    assert len(step.rejected) == 1


def test_trajectory_pair_ordered_by_outcome_with_margin():
    pairs = mine([exploration(0, ["look"], 0.3)], {}, {}, trajectory_margin=0.5)
    assert [p.level for p in pairs] == ["trajectory"]
    assert pairs[0].chosen_actor == "expert"
    assert (pairs[0].chosen_outcome, pairs[0].rejected_outcome) == (1.0, 0.3)
    assert mine([exploration(0, ["look"], 0.6)], {}, {}, trajectory_margin=0.5) == []


def test_suffix_mode_leaves_prefix_zero_to_the_trajectory_level():
    pairs = mine([exploration(0, ["look"], 0.0)], {0: 0.9}, {0: 0.0}, step_margin=0.1)
    assert [p.level for p in pairs] == ["trajectory"]


def test_early_stopping_is_exact_against_every_completion_of_the_samples():
    """pair_decided says 'settled' only when every way the remaining samples could go (each
    failing or any outcome in [0, 1], checked on a grid) gives the full run's decision."""
    import itertools

    from ipr_core.method.mining import PairContext, pair_decided, step_winner

    config = MiningConfig(step_margin=0.1, both_directions=True)
    grid = [None, 0.0, 0.25, 0.5, 1.0]  # None: a failed sample
    contexts = [
        PairContext(expert_reward=e, expert_outcome=eo, agent_outcome=ao)
        for e in (0.0, 0.5, 1.0)
        for eo, ao in ((1.0, 0.0), (0.0, 1.0), (0.5, 0.5))
    ] + [PairContext(1.0, 1.0, 0.0, makes_step_pair=False)]
    settled_count = 0
    for context, n in itertools.product(contexts, (3, 4)):
        for drawn in itertools.product(grid, repeat=2):
            outcomes = [o for o in drawn if o is not None]
            if not pair_decided(context, config, outcomes, n - 2):
                continue
            settled_count += 1
            finals = set()
            for rest in itertools.product(grid, repeat=n - 2):
                ok = outcomes + [o for o in rest if o is not None]
                mean = sum(ok) / len(ok) if ok else None
                finals.add(
                    step_winner(
                        context.expert_reward, mean, context.expert_outcome,
                        context.agent_outcome, config,
                    )
                    if context.makes_step_pair
                    else None
                )  # fmt: skip
            assert len(finals) == 1, (context, drawn)
    assert settled_count > 0
    # certain only when it is: one low sample against a high expert reward settles, a tie
    # does not; a sample outside [0, 1] turns the bound off
    high = PairContext(expert_reward=1.0, expert_outcome=1.0, agent_outcome=0.0)
    assert pair_decided(high, config, [0.0], 3)
    assert not pair_decided(PairContext(0.5, 1.0, 0.0), config, [0.5], 3)
    assert not pair_decided(high, config, [2.0], 3)
