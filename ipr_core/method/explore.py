"""Exploration along expert trajectories (docs/method.md, stage 3).

For each expert trajectory of K steps and every j = 0..K-1, replay the first j expert
turns and let the agent act greedily to the end. j = 0 is the agent's own trajectory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ipr_core.engine.rollout import RolloutEngine, RolloutResult, RolloutSpec
from ipr_core.method.step_rewards import StepQuery
from ipr_core.types import Trajectory, same_action


@dataclass(frozen=True)
class Exploration:
    expert: Trajectory
    prefix_len: int
    rollout: RolloutResult

    def agent_step_query(self) -> StepQuery | None:
        """The agent's first own action, for MC scoring; None when there is nothing to
        compare (no action taken, or the same action as the expert's)."""
        own = self.rollout.policy_steps
        if not own:
            return None
        expert_step = self.expert.steps[self.prefix_len]
        if same_action(own[0].action, expert_step.action):
            return None
        history = tuple(step.text for step in self.expert.steps[: self.prefix_len])
        return StepQuery(self.expert.task.task_id, "agent", history, own[0].text)


def explore(
    engine: RolloutEngine,
    experts: Sequence[Trajectory],
    from_start_only: bool = False,
    cut: bool = False,
) -> list[Exploration]:
    """The policy's greedy episodes (the method's exploration; the policy alone decides
    them, so they take no seed) after every prefix of each expert trajectory (prefix 0 is
    its own whole episode); `from_start_only`: prefix 0 alone, all trajectory pairs use.
    `cut`: an episode after a prefix ends at its first action when that is the expert's
    (status `cut`): no pair compares it, as a step pair needs another action and trajectory
    pairs come from prefix 0."""
    specs: list[RolloutSpec] = []
    owners: list[tuple[Trajectory, int]] = []
    for expert in experts:
        texts = tuple(step.text for step in expert.steps)
        for j in range(1 if from_start_only else len(texts)):
            expert_action = expert.steps[j].action if cut and j > 0 else None
            specs.append(RolloutSpec(expert.task.task_id, texts[:j], cut_if_action=expert_action))
            owners.append((expert, j))
    results = engine.run(specs, temperature=0.0)
    return [
        Exploration(expert, j, result) for (expert, j), result in zip(owners, results, strict=True)
    ]
