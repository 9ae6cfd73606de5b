"""Import and export of the IPR/ETO JSON formats, with validation that names the bad record.

SFT format: a JSON list (or JSON lines) of `{id, conversations: [{from, value}]}`, the
first turn from "human" holding the instruction, then "gpt" and "human" turns
alternating (assistant actions and observations). Pair format:
`{id, prompt, chosen, rejected}`, each side a string or a list of `{from, value}` turns.
A file is validated whole before anything is returned, so a bad file writes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ipr_core.backends.base import Message
from ipr_core.envs.base import EnvTask
from ipr_core.errors import InputError
from ipr_core.prompts import OBSERVATION_PREFIX, PromptFormat, build_conversation, step_messages
from ipr_core.react import parse_react
from ipr_core.types import Step, Trajectory

_ROLE_OF = {"human": "user", "gpt": "assistant", "system": "system"}
_FROM_OF = {role: name for name, role in _ROLE_OF.items()}


def read_records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """Records of a JSON list or JSON-lines file, each with a label for error messages."""
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(source, f"cannot read file: {exc.strerror}") from exc
    try:
        if text.lstrip().startswith("["):
            records = json.loads(text)
        else:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise InputError(source, f"not valid JSON (line {exc.lineno}): {exc.msg}") from exc
    labelled = []
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise InputError(source, "expected an object", record=f"#{index}")
        label = str(record.get("id", f"#{index}"))
        if "id" not in record:
            raise InputError(source, "missing", record=label, field="id")
        labelled.append((label, record))
    if not labelled:
        raise InputError(source, "the file holds no records")
    return labelled


def load_sft_file(path: Path, env_id: str, split: str) -> list[Trajectory]:
    """Expert trajectories from an IPR/ETO SFT file (assumed successful unless `reward` says)."""
    trajectories = []
    seen: set[str] = set()
    for label, record in read_records(path):
        if label in seen:
            raise InputError(str(path), "duplicate id", record=label, field="id")
        seen.add(label)
        turns = _turns(str(path), label, record, "conversations")
        trajectories.append(_trajectory(str(path), label, record, turns, env_id, split))
    return trajectories


def load_pair_file(path: Path) -> list[dict[str, Any]]:
    """Pairs as `{id, prompt, chosen, rejected}` with every side as a list of messages."""
    pairs = []
    for label, record in read_records(path):
        pair: dict[str, Any] = {"id": label}
        for field in ("prompt", "chosen", "rejected"):
            value = record.get(field)
            if isinstance(value, str):
                role = "user" if field == "prompt" else "assistant"
                pair[field] = [{"role": role, "content": value}]
            else:
                pair[field] = _turns(str(path), label, record, field)
        pairs.append(pair)
    return pairs


def export_sft(trajectories: Sequence[Trajectory], action_hint: str) -> list[dict[str, Any]]:
    records = []
    for trajectory in trajectories:
        messages = build_conversation(trajectory.task, (), PromptFormat(action_hint))
        messages += step_messages(trajectory.steps, final_observation=False)
        records.append({"id": trajectory.task.task_id, "conversations": to_turns(messages)})
    return records


def pair_record(
    pair_id: str, prompt: Sequence[Message], chosen: Sequence[Message], rejected: Sequence[Message]
) -> dict[str, Any]:
    """One pair in the IPR/ETO pair format."""
    return {
        "id": pair_id,
        "prompt": to_turns(prompt),
        "chosen": to_turns(chosen),
        "rejected": to_turns(rejected),
    }


def to_turns(messages: Sequence[Message]) -> list[dict[str, str]]:
    """Chat messages as IPR turns; a system message is folded into the first human turn."""
    turns: list[dict[str, str]] = []
    system = ""
    for message in messages:
        if message["role"] == "system":
            system = message["content"] + "\n\n"
            continue
        value = message["content"]
        if system and message["role"] == "user":
            value, system = system + value, ""
        turns.append({"from": _FROM_OF[message["role"]], "value": value})
    return turns


def _turns(source: str, label: str, record: dict[str, Any], field: str) -> list[Message]:
    turns = record.get(field)
    if not isinstance(turns, list) or not turns:
        raise InputError(source, "expected a non-empty list of turns", record=label, field=field)
    messages = []
    for i, turn in enumerate(turns):
        where = f"{field}[{i}]"
        if not isinstance(turn, dict):
            raise InputError(source, "expected an object", record=label, field=where)
        speaker, value = turn.get("from"), turn.get("value")
        if speaker not in _ROLE_OF:
            raise InputError(
                source,
                f"expected one of {sorted(_ROLE_OF)}, got {speaker!r}",
                record=label,
                field=f"{where}.from",
            )
        if not isinstance(value, str):
            raise InputError(source, "expected a string", record=label, field=f"{where}.value")
        messages.append({"role": _ROLE_OF[speaker], "content": value})
    return messages


def _trajectory(
    source: str,
    label: str,
    record: dict[str, Any],
    messages: list[Message],
    env_id: str,
    split: str,
) -> Trajectory:
    if messages[0]["role"] != "user":
        raise InputError(
            source,
            "the first turn must be from 'human'",
            record=label,
            field="conversations[0].from",
        )
    steps: list[Step] = []
    for i in range(1, len(messages), 2):
        field = f"conversations[{i}]"
        if messages[i]["role"] != "assistant":
            raise InputError(source, "expected a 'gpt' turn", record=label, field=f"{field}.from")
        parsed = parse_react(messages[i]["content"])
        if not parsed.ok:
            raise InputError(source, parsed.error or "", record=label, field=f"{field}.value")
        observation = ""
        if i + 1 < len(messages):
            if messages[i + 1]["role"] != "user":
                raise InputError(
                    source,
                    "expected a 'human' turn",
                    record=label,
                    field=f"conversations[{i + 1}].from",
                )
            observation = messages[i + 1]["content"].removeprefix(OBSERVATION_PREFIX)
        steps.append(
            Step(text=messages[i]["content"], action=parsed.action, observation=observation)
        )
    if not steps:
        raise InputError(source, "no 'gpt' turn", record=label, field="conversations")
    reward = record.get("reward", 1.0)
    if not isinstance(reward, int | float) or not 0.0 <= reward <= 1.0:
        raise InputError(source, "expected a number in [0, 1]", record=label, field="reward")
    task = EnvTask(env_id, label, split, messages[0]["content"], initial_observation="")
    return Trajectory(task=task, steps=tuple(steps), outcome_reward=float(reward))
