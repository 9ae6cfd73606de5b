"""Import and export of the IPR/ETO JSON formats, with validation that names the bad record.

SFT format: a JSON list (or JSON lines) of `{id, conversations: [{from, value}]}`, the
first turn from "human" holding the instruction, then "gpt" and "human" turns
alternating (assistant actions and observations). Pair format:
`{id, prompt, chosen, rejected}`, each side a string or a list of `{from, value}` turns.
A file is validated whole before anything is returned, so a bad file writes nothing. Every
field the formats define is type-checked (an `id` is a string or an integer, a `reward` a
number in [0, 1] and not a boolean, a turn's `value` a string); fields they do not define
(ETO's `loss`, say) are ignored. A pair must also mean something: its `env_id` is a known
env with valid parameters (stored in its canonical spelling), its chosen and rejected
sides differ, and the chosen side is not worse than the rejected one by the rewards the
record gives (`chosen_reward`, `chosen_outcome` against the rejected side's) unless the
record says `"chosen_may_be_worse": true`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ipr_core.agent.prompts import (
    OBSERVATION_PREFIX,
    PromptFormat,
    build_conversation,
    step_messages,
)
from ipr_core.agent.react import parse_react
from ipr_core.envs import canonical_env_id
from ipr_core.envs.base import EnvTask
from ipr_core.errors import InputError, UnknownEnvError, kind_of, read_text
from ipr_core.store.store import Row, pair_row
from ipr_core.types import Message, Pair, Step, Trajectory

_ROLE_OF = {"human": "user", "gpt": "assistant", "system": "system"}
_FROM_OF = {role: name for name, role in _ROLE_OF.items()}

MAX_FILE_BYTES = 1 << 30
"""A file is parsed whole in memory; ETO's and IPR's largest files are tens of megabytes."""
MAX_TURN_CHARS = 100_000
"""About 25k tokens, over ten times the training context (`max_length` 2048): no model here
could train on the turn. Real turns, instruction and in-context example included, are a few
thousand characters."""
MAX_TURNS = 5_000
"""2,500 steps: twice the longest step bound of any env (ScienceWorld's 1,135)."""
MAX_ID_CHARS = 256
"""An id is a key that messages and tables show; ETO's are like `webshop_42`."""


def read_records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """Records of a JSON list or JSON-lines file, each labelled by its id for error messages.

    A record whose id is missing or unusable is named by its position instead: `#3` in a
    JSON list, `line 4` in JSON lines."""
    source = str(path)
    text = read_text(path, MAX_FILE_BYTES)
    if text.lstrip().startswith("["):
        records = _parse_json(source, text)
        positions = [f"#{index}" for index in range(len(records))]
    else:
        numbered = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        records = [_parse_json(source, line, n) for n, line in numbered]
        positions = [f"line {n}" for n, _ in numbered]
    labelled = []
    for position, record in zip(positions, records, strict=True):
        if not isinstance(record, dict):
            raise InputError(source, f"expected an object, got {kind_of(record)}", record=position)
        if "id" not in record:
            raise InputError(source, "missing", record=position, field="id")
        record_id = record["id"]
        if isinstance(record_id, bool) or not isinstance(record_id, str | int):
            message = f"expected a string or an integer, got {kind_of(record_id)}"
            raise InputError(source, message, record=position, field="id")
        if record_id == "" or len(str(record_id)) > MAX_ID_CHARS:
            message = f"expected 1 to {MAX_ID_CHARS} characters, got {len(str(record_id))}"
            raise InputError(source, message, record=position, field="id")
        if isinstance(record_id, str):
            _check_text(source, position, "id", record_id)
        labelled.append((str(record_id), record))
    if not labelled:
        raise InputError(source, "the file holds no records")
    return labelled


def _parse_json(source: str, text: str, line: int | None = None) -> Any:
    """`text` parsed: the whole file, or (JSON lines) its line number `line`."""
    at = f" (line {line})" if line is not None else ""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        at = f" (line {exc.lineno if line is None else line})"
        raise InputError(source, f"not valid JSON{at}: {exc.msg}") from exc
    except RecursionError as exc:  # nesting far deeper than any record of these formats
        raise InputError(source, f"not valid IPR/ETO JSON{at}: nested too deeply") from exc
    except ValueError as exc:  # an integer of thousands of digits
        raise InputError(source, f"not valid JSON{at}: a number too long") from exc


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
    seen: set[str] = set()
    for label, record in read_records(path):
        if label in seen:
            raise InputError(str(path), "duplicate id", record=label, field="id")
        seen.add(label)
        pair: dict[str, Any] = {"id": label}
        for field in ("prompt", "chosen", "rejected"):
            value = record.get(field)
            if isinstance(value, str):
                _check_text(str(path), label, field, value)
                role = "user" if field == "prompt" else "assistant"
                pair[field] = [{"role": role, "content": value}]
            else:
                pair[field] = _turns(str(path), label, record, field)
        pair.update(_pair_fields(str(path), label, record, pair))
        pairs.append(pair)
    return pairs


PAIR_LEVELS = ("trajectory", "step")
PAIR_ACTORS = ("expert", "agent")
PAIR_MODES = ("suffix", "action", "trajectory")
PAIR_REWARDS = ("chosen_reward", "rejected_reward", "chosen_outcome", "rejected_outcome")
PAIR_WAIVER = "chosen_may_be_worse"
"""A record's boolean that lets its chosen side have a lower reward or outcome than its
rejected side (a deliberate counter-example); without it such a pair is refused."""
PAIR_DEFAULTS = {
    "chosen_reward": 1.0,
    "rejected_reward": 0.0,
    "chosen_outcome": 1.0,
    "rejected_outcome": 0.0,
    "chosen_actor": "expert",
}
"""What a pair file without rewards is taken to say: chosen is the better side."""


def _pair_fields(
    source: str, label: str, record: dict[str, Any], pair: dict[str, Any]
) -> dict[str, Any]:
    """The store's fields of a pair: given in the record (`ipr export pairs` writes them
    all) or derived from its sides: `level` is 'trajectory' when the prompt holds no
    assistant turn, else 'step'; `prefix_len` counts the prompt's assistant turns;
    `task_id` is the id."""
    if pair["prompt"][-1]["role"] != "user":
        raise InputError(
            source, "the prompt must end with a 'human' turn", record=label, field="prompt"
        )
    for side in ("chosen", "rejected"):
        if pair[side][0]["role"] != "assistant":
            raise InputError(
                source, "expected the side to start with a 'gpt' turn", record=label, field=side
            )
    assistant_turns = sum(message["role"] == "assistant" for message in pair["prompt"])
    fields: dict[str, Any] = {
        "level": "step" if assistant_turns else "trajectory",
        "task_id": label,
        "prefix_len": assistant_turns,
        "env_id": None,
        "mode": None,
        **PAIR_DEFAULTS,
    }
    choices = {"level": PAIR_LEVELS, "chosen_actor": PAIR_ACTORS, "mode": PAIR_MODES}
    for name, allowed in choices.items():
        if name in record:
            value = record[name]
            if value not in allowed:
                raise InputError(
                    source,
                    f"expected one of {list(allowed)}, got {_shown(value)}",
                    record=label,
                    field=name,
                )
            fields[name] = value
    for name in ("task_id", "env_id"):
        if name in record:
            value = record[name]
            if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_CHARS:
                raise InputError(
                    source,
                    f"expected a string of 1 to {MAX_ID_CHARS} characters, got {kind_of(value)}",
                    record=label,
                    field=name,
                )
            _check_text(source, label, name, value)
            fields[name] = value
    if fields["env_id"] is not None:
        try:
            fields["env_id"] = canonical_env_id(fields["env_id"])
        except UnknownEnvError as exc:
            raise InputError(source, str(exc), record=label, field="env_id") from exc
    if "prefix_len" in record:
        value = record["prefix_len"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InputError(
                source,
                f"expected an integer >= 0, got {_shown(value)}",
                record=label,
                field="prefix_len",
            )
        fields["prefix_len"] = value
    for name in PAIR_REWARDS:
        if name in record:
            value = record[name]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InputError(
                    source, f"expected a number, got {kind_of(value)}", record=label, field=name
                )
            if not 0.0 <= value <= 1.0:  # NaN and the infinities too
                raise InputError(
                    source,
                    f"expected a number in [0, 1], got {_shown(value)}",
                    record=label,
                    field=name,
                )
            fields[name] = float(value)
    _check_pair_order(source, label, record, pair, fields)
    if fields["mode"] is None:
        fields["mode"] = "trajectory" if fields["level"] == "trajectory" else "suffix"
    return fields


def _check_pair_order(
    source: str, label: str, record: dict[str, Any], pair: dict[str, Any], fields: dict[str, Any]
) -> None:
    """A pair trains its model towards `chosen`: identical sides teach nothing (and hide a
    broken export), a chosen side worse than the rejected one teaches the wrong way."""
    if pair["chosen"] == pair["rejected"]:
        raise InputError(
            source, "the same turns as 'chosen' (a pair's sides must differ)", label, "rejected"
        )
    waiver = record.get(PAIR_WAIVER, False)
    if not isinstance(waiver, bool):
        raise InputError(source, f"expected a boolean, got {kind_of(waiver)}", label, PAIR_WAIVER)
    for measure in ("reward", "outcome"):
        chosen, rejected = fields[f"chosen_{measure}"], fields[f"rejected_{measure}"]
        if chosen < rejected and not waiver:
            raise InputError(
                source,
                f"{chosen} is below rejected_{measure} {rejected}: the chosen side is the "
                f'worse one (set "{PAIR_WAIVER}": true if that is meant)',
                record=label,
                field=f"chosen_{measure}",
            )


def export_sft(trajectories: Sequence[Trajectory], action_hint: str) -> list[dict[str, Any]]:
    records = []
    for trajectory in trajectories:
        messages = build_conversation(trajectory.task, (), PromptFormat(action_hint))
        messages += step_messages(trajectory.steps, final_observation=False)
        records.append({"id": trajectory.task.task_id, "conversations": to_turns(messages)})
    return records


def pair_record(
    pair_id: str, sides: Sequence[Sequence[Message]], fields: dict[str, Any]
) -> dict[str, Any]:
    """One pair in the IPR/ETO pair format: `sides` are prompt, chosen and rejected, with
    a system message kept as a "system" turn (so `ipr import-pairs` gets the same prompt
    back); `fields` are the store's columns the format leaves out (level, rewards, ...)."""
    prompt, chosen, rejected = (to_turns(side, fold_system=False) for side in sides)
    return {"id": pair_id, "prompt": prompt, "chosen": chosen, "rejected": rejected, **fields}


def to_turns(messages: Sequence[Message], fold_system: bool = True) -> list[dict[str, str]]:
    """Chat messages as IPR turns; a system message is folded into the first human turn
    unless `fold_system` is False."""
    turns: list[dict[str, str]] = []
    system = ""
    for message in messages:
        if message["role"] == "system" and fold_system:
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
        got = "an empty list" if turns == [] else kind_of(turns)
        message = f"expected a non-empty list of turns, got {got}"
        raise InputError(source, message, record=label, field=field)
    if len(turns) > MAX_TURNS:
        message = (
            f"{len(turns)} turns, over the cap of {MAX_TURNS} (longer than any env's episodes)"
        )
        raise InputError(source, message, record=label, field=field)
    messages = []
    for i, turn in enumerate(turns):
        where = f"{field}[{i}]"
        if not isinstance(turn, dict):
            message = f"expected an object, got {kind_of(turn)}"
            raise InputError(source, message, record=label, field=where)
        speaker, value = turn.get("from"), turn.get("value")
        if not isinstance(speaker, str) or speaker not in _ROLE_OF:
            raise InputError(
                source,
                f"expected one of {sorted(_ROLE_OF)}, got {_shown(speaker)}",
                record=label,
                field=f"{where}.from",
            )
        if not isinstance(value, str):
            message = f"expected a string, got {kind_of(value)}"
            raise InputError(source, message, record=label, field=f"{where}.value")
        _check_text(source, label, f"{where}.value", value)
        messages.append({"role": _ROLE_OF[speaker], "content": value})
    return messages


def _check_text(source: str, label: str, field: str, value: str) -> None:
    """A string the store and a tokenizer can take: bounded, and encodable as UTF-8."""
    if len(value) > MAX_TURN_CHARS:
        message = f"{len(value)} characters, over the cap of {MAX_TURN_CHARS}"
        raise InputError(source, f"{message} (no training context holds it)", label, field)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        message = f"not Unicode text: a lone surrogate at character {exc.start}"
        raise InputError(source, message, record=label, field=field) from exc


def _shown(value: object, limit: int = 40) -> str:
    """A value as a message shows it: its repr, cut short (one line, a bounded length)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
    if isinstance(reward, bool) or not isinstance(reward, int | float):
        got = kind_of(reward)
        raise InputError(source, f"expected a number in [0, 1], got {got}", label, "reward")
    if not 0.0 <= reward <= 1.0:  # NaN and the infinities too
        got = _shown(reward)
        raise InputError(source, f"expected a number in [0, 1], got {got}", label, "reward")
    task = EnvTask(env_id, label, split, messages[0]["content"], initial_observation="")
    return Trajectory(task=task, steps=tuple(steps), outcome_reward=float(reward))


def pair_rows_of_file(path: Path, run_id: str, iteration: int, env_id: str | None) -> list[Row]:
    """The `pairs` rows of a pair file, stored under (`run_id`, `iteration`); `env_id`
    stands in for records without one. Validated whole: a bad record raises, naming it."""
    rows = []
    seen: dict[tuple[str, str, int], str] = {}
    for pair in load_pair_file(path):
        label = pair["id"]
        key = (pair["level"], pair["task_id"], pair["prefix_len"])
        if key in seen:
            raise InputError(
                str(path),
                f"the same level, task_id and prefix_len as record {seen[key]!r}",
                record=label,
                field="task_id",
            )
        seen[key] = label
        env = pair["env_id"] or env_id
        if env is None:
            raise InputError(str(path), "missing (or pass --env)", record=label, field="env_id")
        sides = {side: tuple(pair[side]) for side in ("prompt", "chosen", "rejected")}
        fields = {name: pair[name] for name in ("level", "task_id", "prefix_len", "chosen_actor")}
        stored = Pair(**fields, **sides, **{name: pair[name] for name in PAIR_REWARDS})
        rows.append(pair_row(stored, run_id, iteration, env, pair["mode"]))
    return rows
