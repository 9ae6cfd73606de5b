"""`ipr show`: a stored rollout or pair as a transcript a person reads.

A rollout shows each step's thought and action, the observation that followed and,
beside the step, the Monte Carlo step reward the store holds for it: the expert's reward
at that prefix for a replayed expert step, the rollout's own actor's reward for the step
it starts with (explorations and MC rollouts). A pair shows the prompt's last turns, the
turns chosen and rejected share, where they diverge, both sides from there, their step
rewards and outcomes, and the Monte Carlo samples behind both step rewards.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from ipr_core.agent.react import parse_react
from ipr_core.store.store import steps_from_json
from ipr_core.types import Message, Trajectory

PROMPT_TURNS = 4
"""The prompt's last turns a pair transcript shows (the task and the latest steps)."""


def rollout_transcript(
    row: Mapping[str, Any], expert: Trajectory | None, rewards: pd.DataFrame
) -> str:
    """A `rollouts` row (with its short `id`) as a transcript; `expert` is its task's
    expert trajectory (for the instruction), `rewards` the task's step rewards."""
    j = int(row["prefix_len"])
    outcome = _num(row["outcome_reward"])
    lines = [
        f"rollout {row['id']}: run {row['run_id']}, iteration {row['iteration']}, "
        f"{row['kind']}, task {row['task_id']} ({row['env_id']}), actor {row['actor']}, "
        f"sample {row['sample_idx']}, policy {row['policy_id']}",
        f"status {row['status']}, outcome reward {outcome}, {row['n_steps']} steps "
        f"({j} expert steps replayed), {row['env_steps']} env steps, "
        f"{row['prefill_tokens']} tokens prefilled, {row['generated_tokens']} generated",
    ]
    if isinstance(row.get("error"), str):
        lines.append(f"error: {row['error']}")
    if expert is not None:
        lines += ["", "Task: " + expert.task.instruction]
        if expert.task.initial_observation:
            lines.append("Observation: " + expert.task.initial_observation)
    for i, step in enumerate(steps_from_json(row["steps"])):
        who = "expert (replayed)" if i < j else row["actor"] if i == j else "policy"
        lines += ["", f"[step {i + 1} | {who} | {_step_reward(row, i, rewards)}]"]
        lines += _indent(step.text)
        lines.append(f"  -> action: {step.action or '(did not parse)'}")
        lines += _indent("Observation: " + step.observation)
    return "\n".join(lines)


def _step_reward(row: Mapping[str, Any], i: int, rewards: pd.DataFrame) -> str:
    """The stored step reward of step i of a rollout, named by whose it is."""
    j = int(row["prefix_len"])
    if rewards.empty or row["kind"] == "eval" or i > j:
        return "no step reward"
    actor = "expert" if i < j else row["actor"]
    iteration = 0 if actor == "expert" else int(row["iteration"])  # experts: scored once
    found = rewards[
        (rewards["actor"] == actor)
        & (rewards["iteration"] == iteration)
        & (rewards["prefix_len"] == i)
    ]
    if found.empty and i == j:  # the agent took the expert's action: the expert's reward
        found = rewards[(rewards["actor"] == "expert") & (rewards["prefix_len"] == i)]
        actor = "expert"
    if found.empty:
        return "no step reward"
    first = found.iloc[0]
    return f"step reward {_num(first['mean_reward'])} ({actor}, {first['n_samples']} MC samples)"


def pair_transcript(row: Mapping[str, Any], samples: pd.DataFrame) -> str:
    """A `pairs` row (with its short `id`) as a transcript; `samples` are the Monte Carlo
    samples behind its step rewards (`Store.pair_mc_samples`)."""
    prompt, chosen, rejected = (json.loads(row[side]) for side in ("prompt", "chosen", "rejected"))
    rejected_actor = "agent" if row["chosen_actor"] == "expert" else "expert"
    margin = float(row["chosen_reward"]) - float(row["rejected_reward"])
    lines = [
        f"pair {row['id']}: run {row['run_id']}, iteration {row['iteration']}, {row['level']} "
        f"pair, task {row['task_id']} ({row['env_id']}), prefix {row['prefix_len']} expert "
        f"steps, mode {row['mode']}",
        f"chosen: {row['chosen_actor']}, reward {_num(row['chosen_reward'])}, outcome "
        f"{_num(row['chosen_outcome'])} | rejected: {rejected_actor}, reward "
        f"{_num(row['rejected_reward'])}, outcome {_num(row['rejected_outcome'])} | "
        f"margin {margin:.3f}",
        "",
        f"Prompt ({len(prompt)} turns, the last {min(PROMPT_TURNS, len(prompt))} shown):",
    ]
    for message in prompt[-PROMPT_TURNS:]:
        lines += _message(message)
    shared = _shared_turns(chosen, rejected)
    if shared:
        lines += ["", f"Shared by both sides ({shared} turns):"]
        for message in chosen[:shared]:
            lines += _message(message)
    step = int(row["prefix_len"]) + _assistant_turns(chosen[:shared]) + 1
    lines += ["", f"Chosen and rejected diverge here (step {step}):"]
    for name, side, reward in (
        ("CHOSEN", chosen, row["chosen_reward"]),
        ("REJECTED", rejected, row["rejected_reward"]),
    ):
        lines += ["", f"{name} (reward {_num(reward)}):"]
        for message in side[shared:]:
            lines += _message(message)
    if not samples.empty:
        lines += ["", "Monte Carlo samples behind the step rewards:"]
        lines.append(samples.to_string(index=False, na_rep="NULL"))
    return "\n".join(lines)


def _shared_turns(a: Sequence[Message], b: Sequence[Message]) -> int:
    shared = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        shared += 1
    return shared


def _assistant_turns(messages: Sequence[Message]) -> int:
    return sum(message["role"] == "assistant" for message in messages)


def _message(message: Message) -> list[str]:
    role, content = message["role"], message["content"]
    if role == "system":
        return [f"  [system] ({len(content)} characters)"]
    if role == "user":
        return [f"  [env/user] {line}" for line in content.splitlines() or [""]]
    parsed = parse_react(content)
    return [*_indent(content), f"  -> action: {parsed.action if parsed.ok else '(did not parse)'}"]


def _indent(text: str) -> list[str]:
    return ["  " + line for line in text.splitlines() or [""]]


def _num(value: object) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "NULL"
    return f"{float(value):.3f}"
