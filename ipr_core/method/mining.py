"""Contrastive pair mining (docs/method.md, stage 3).

Trajectory level (from j = 0): the expert trajectory against the agent's own, ordered
by outcome, dropped when the outcomes differ by no more than `trajectory_margin`.

Step level (prefix j, step t = j + 1): the expert action a_t against the agent's
action â_t after the same expert history. The paper's rule makes a pair when the
agent's step reward is below the expert's by more than τ AND the agent's outcome is
below the expert's; `both_directions` adds the released code's mirror rule (the agent
beats the expert by both margins). No pair when the two actions are the same. The
chosen/rejected sides are the whole suffixes (`suffix`, the paper) or the single
assistant turn (`action`). In suffix mode j = 0 is left to the trajectory level,
whose pair it would duplicate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ipr_core.agent.prompts import PromptFormat, build_conversation, step_messages
from ipr_core.config import MiningConfig
from ipr_core.types import Actor, Pair, Step, is_failed, same_action

if TYPE_CHECKING:
    from ipr_core.method.explore import Exploration

StepKey = tuple[str, int]
"""(task_id, prefix_len)"""


def mine_pairs(
    explorations: Sequence[Exploration],
    expert_rewards: Mapping[StepKey, float | None],
    agent_rewards: Mapping[StepKey, float | None],
    config: MiningConfig,
    prompt_format: PromptFormat,
) -> list[Pair]:
    pairs: list[Pair] = []
    for exploration in explorations:
        if is_failed(exploration.rollout.status):
            continue  # a failed rollout has no outcome to compare
        if exploration.prefix_len == 0:
            pair = trajectory_pair(exploration, config, prompt_format)
            if pair is not None:
                pairs.append(pair)
            if config.step_mode == "suffix":
                continue
        key = (exploration.expert.task.task_id, exploration.prefix_len)
        pair = step_pair(
            exploration, expert_rewards.get(key), agent_rewards.get(key), config, prompt_format
        )
        if pair is not None:
            pairs.append(pair)
    return pairs


def trajectory_pair(
    exploration: Exploration, config: MiningConfig, prompt_format: PromptFormat
) -> Pair | None:
    expert, agent = exploration.expert, exploration.rollout.trajectory
    expert_outcome, agent_outcome = expert.outcome_reward, agent.outcome_reward
    if expert_outcome is None or agent_outcome is None or not agent.steps:
        return None
    if abs(expert_outcome - agent_outcome) <= config.trajectory_margin:
        return None
    expert_wins = expert_outcome > agent_outcome
    expert_side = step_messages(expert.steps, final_observation=False)
    agent_side = step_messages(agent.steps, final_observation=False)
    return Pair(
        level="trajectory",
        task_id=expert.task.task_id,
        prefix_len=0,
        prompt=tuple(build_conversation(expert.task, (), prompt_format)),
        chosen=tuple(expert_side if expert_wins else agent_side),
        rejected=tuple(agent_side if expert_wins else expert_side),
        chosen_actor="expert" if expert_wins else "agent",
        chosen_reward=max(expert_outcome, agent_outcome),
        rejected_reward=min(expert_outcome, agent_outcome),
        chosen_outcome=max(expert_outcome, agent_outcome),
        rejected_outcome=min(expert_outcome, agent_outcome),
    )


def step_pair(
    exploration: Exploration,
    expert_reward: float | None,
    agent_reward: float | None,
    config: MiningConfig,
    prompt_format: PromptFormat,
) -> Pair | None:
    expert, j = exploration.expert, exploration.prefix_len
    agent_steps = exploration.rollout.policy_steps
    expert_outcome = expert.outcome_reward
    agent_outcome = exploration.rollout.outcome_reward
    if not agent_steps or expert_reward is None or agent_reward is None:
        return None
    if expert_outcome is None or agent_outcome is None:
        return None
    if same_action(agent_steps[0].action, expert.steps[j].action):
        return None
    winner = step_winner(expert_reward, agent_reward, expert_outcome, agent_outcome, config)
    if winner is None:
        return None
    expert_better = winner == "expert"
    expert_side = _side(expert.steps[j:], config)
    agent_side = _side(agent_steps, config)
    return Pair(
        level="step",
        task_id=expert.task.task_id,
        prefix_len=j,
        prompt=tuple(build_conversation(expert.task, expert.steps[:j], prompt_format)),
        chosen=tuple(expert_side if expert_better else agent_side),
        rejected=tuple(agent_side if expert_better else expert_side),
        chosen_actor="expert" if expert_better else "agent",
        chosen_reward=expert_reward if expert_better else agent_reward,
        rejected_reward=agent_reward if expert_better else expert_reward,
        chosen_outcome=expert_outcome if expert_better else agent_outcome,
        rejected_outcome=agent_outcome if expert_better else expert_outcome,
    )


def step_winner(
    expert_reward: float | None,
    agent_reward: float | None,
    expert_outcome: float | None,
    agent_outcome: float | None,
    config: MiningConfig,
) -> Actor | None:
    """The step-level rule: which side a step pair chooses, None when there is no pair."""
    if None in (expert_reward, agent_reward, expert_outcome, agent_outcome):
        return None
    assert expert_reward is not None and agent_reward is not None
    assert expert_outcome is not None and agent_outcome is not None
    if expert_reward - agent_reward > config.step_margin and agent_outcome < expert_outcome:
        return "expert"
    agent_better = agent_reward - expert_reward > config.step_margin
    if config.both_directions and agent_better and agent_outcome > expert_outcome:
        return "agent"
    return None


@dataclass(frozen=True)
class PairContext:
    """What the step pair of one agent step knows before that step's Monte Carlo samples:
    the expert step's reward and both outcomes (the agent step's reward is being sampled)."""

    expert_reward: float | None
    expert_outcome: float | None
    agent_outcome: float | None
    makes_step_pair: bool = True
    """False where no step pair is mined at all (suffix mode, prefix 0)."""


OUTCOME_RANGE = (0.0, 1.0)
"""The outcome rewards early stopping assumes (every shipped env's); a sample outside it
turns early stopping off for its step."""


def pair_decided(
    context: PairContext, config: MiningConfig, outcomes: Sequence[float], remaining: int
) -> bool:
    """Whether the step pair's decision is the same whatever `remaining` more samples give.

    The step reward is the mean of the samples that did not fail. With `outcomes` so far
    and r samples left (each failing, or bringing a value in OUTCOME_RANGE), the final mean
    lies between min and max of the current mean and (sum + r * bound) / (n + r), or is
    None (every sample failed) when there are no outcomes yet. The rule's regions are
    intervals of the agent's reward, so one winner at both ends (and for None) is certain.
    """
    low, high = OUTCOME_RANGE
    if any(not low <= outcome <= high for outcome in outcomes):
        return False

    def winner(agent_reward: float | None) -> Actor | None:
        if not context.makes_step_pair:
            return None
        return step_winner(
            context.expert_reward,
            agent_reward,
            context.expert_outcome,
            context.agent_outcome,
            config,
        )

    if remaining == 0:
        return True
    total, n = sum(outcomes), len(outcomes)
    possible: list[float | None] = [
        (total + remaining * low) / (n + remaining),
        (total + remaining * high) / (n + remaining),
        total / n if n else None,
    ]
    return len({winner(reward) for reward in possible}) == 1


def _side(steps: Sequence[Step], config: MiningConfig) -> list[dict[str, str]]:
    if config.step_mode == "action":
        return step_messages(steps[:1], final_observation=False)
    return step_messages(steps, final_observation=False)
