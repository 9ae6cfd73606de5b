"""Expert trajectories from an environment's gold actions.

Each gold action gets a templated, task-grounded thought, so the expert turns have the
same "Thought:/Action:" shape the agent is trained to write. Every trajectory is
built by executing its actions in the environment, and only those that reach full
reward are kept.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from ipr_core.agent.react import format_turn, parse_react
from ipr_core.envs import Env
from ipr_core.types import Step, Trajectory

_THOUGHTS: dict[str, str] = {
    "take": "I need the {obj} for my task, so I will pick it up.",
    "open": "The {obj} may hold something I need or block my way; I will open it.",
    "move": "What I still need is not here, so I will go {obj}.",
    "go": "What I still need is not here, so I will go {obj}.",
    "cook": "The recipe needs the {obj} cooked, so I will cook it.",
    "slice": "The recipe needs the {obj} sliced, so I will slice it.",
    "chop": "The recipe needs the {obj} chopped, so I will chop it.",
    "dice": "The recipe needs the {obj} diced, so I will dice it.",
    "prepare": "I have everything the recipe asks for, so I will prepare the meal.",
    "eat": "The meal is ready; eating it completes the task.",
    "put": "My task is to put the {obj}, so I will do that now.",
    "read": "The {obj} should tell me what I need.",
    "look": "I should look around to see what is here.",
    "inventory": "Let me check what I am carrying.",
    "drop": "I do not need the {obj} any more, so I will drop it.",
    "select": "I will query the database for the rows that answer the question.",
    "submit": "The last result answers the question, so I will submit it.",
}


def expert_thought(instruction: str, action: str, step_index: int) -> str:
    verb, _, obj = action.partition(" ")
    template = _THOUGHTS.get(verb.lower(), "To make progress on the task, I will {action}.")
    item, to, target = obj.partition(" to ")
    if verb.lower() == "move" and to:  # ALFWorld's "move X to Y" puts X down; TWX's walks
        template = _THOUGHTS["put"]
        obj = f"{item} in/on the {target}"
    thought = template.format(obj=obj or "it", action=action)
    if step_index == 0:
        goal = instruction.strip().split("\n")[0].rstrip(".")
        thought = f"My task: {goal}. {thought}"
    return thought


@dataclass(frozen=True)
class Rejected:
    task_id: str
    reason: str


def build_expert_trajectory(env: Env, task_id: str) -> Trajectory | Rejected:
    """Execute the gold actions of `task_id`; reject unless they reach full reward."""
    task = env.reset(task_id)
    gold = env.gold_actions()
    if not gold:
        return Rejected(task_id, "the environment has no gold actions for this task")
    steps: list[Step] = []
    reward, done = 0.0, False
    for i, action in enumerate(gold):
        text = format_turn(expert_thought(task.instruction, action, i), action)
        if parse_react(text).action != action:  # the agent must be able to write this turn
            return Rejected(task_id, f"gold action {action!r} does not survive ReAct parsing")
        result = env.step(action)
        steps.append(Step(text=text, action=action, observation=result.observation))
        reward, done = result.reward, result.done
        if done:
            break
    if not done or reward < 1.0:
        return Rejected(task_id, f"gold actions end with reward {reward:.3f}, done={done}")
    return Trajectory(task=task, steps=tuple(steps), outcome_reward=reward)


def gold_trajectories(env: Env, split: str) -> Iterator[Trajectory | Rejected]:
    """Expert trajectories of a split, in task order (consume as many as needed)."""
    for task_id in env.task_ids(split):
        yield build_expert_trajectory(env, task_id)
