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
from typing import TYPE_CHECKING

from ipr_core.agent.prompts import PromptFormat, build_conversation, step_messages
from ipr_core.config import MiningConfig
from ipr_core.types import Pair, Step, is_failed, same_action

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
    expert_better = expert_reward - agent_reward > config.step_margin
    expert_better = expert_better and agent_outcome < expert_outcome
    agent_better = agent_reward - expert_reward > config.step_margin
    agent_better = config.both_directions and agent_better and agent_outcome > expert_outcome
    if not (expert_better or agent_better):
        return None
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


def _side(steps: Sequence[Step], config: MiningConfig) -> list[dict[str, str]]:
    if config.step_mode == "action":
        return step_messages(steps[:1], final_observation=False)
    return step_messages(steps, final_observation=False)
