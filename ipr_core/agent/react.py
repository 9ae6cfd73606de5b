"""ReAct turn parsing that tolerates what small models emit.

A turn should read "Thought: ...\\nAction: ...". We accept a missing thought, extra
text around the pair, markdown emphasis and trailing punctuation; a turn without an
"Action:" line is a parse failure, reported, never an exception.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_ACTION = re.compile(r"^[\s*>#-]*action\s*[:：]\s*(.*)$", re.IGNORECASE | re.MULTILINE)
_THOUGHT = re.compile(r"^[\s*>#-]*thought\s*[:：]\s*", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True)
class ParsedTurn:
    thought: str
    action: str
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def parse_react(text: str) -> ParsedTurn:
    """Split an assistant turn into thought and action (the first "Action:" line wins)."""
    match = _ACTION.search(text)
    if match is None:
        return ParsedTurn(thought=text.strip(), action="", error="no 'Action:' line")
    action = _clean_action(match.group(1))
    before = text[: match.start()]
    thought_match = _THOUGHT.search(before)
    thought = before[thought_match.end() :] if thought_match else before
    if not action:
        return ParsedTurn(thought=thought.strip(), action="", error="empty action")
    return ParsedTurn(thought=thought.strip(), action=action)


def format_turn(thought: str, action: str) -> str:
    return f"Thought: {thought}\nAction: {action}"


_WRAPPERS = ("**", "`", '"', "'", "*")


def _clean_action(raw: str) -> str:
    """Drop the markdown or quotes a model wraps an action in, and a trailing full stop;
    only matching pairs, so an action that ends in a quote (SQL) keeps it."""
    action = raw.strip()
    if not action.rstrip(".!").endswith(
        "*"
    ):  # "**Action:** take apple" leaves the closing "**" in front
        action = action.lstrip("*").strip()
    unwrapped = True
    while unwrapped:
        unwrapped = False
        for mark in _WRAPPERS:
            if len(action) > 2 * len(mark) and action.startswith(mark) and action.endswith(mark):
                action, unwrapped = action[len(mark) : -len(mark)].strip(), True
        if action.endswith((".", "!")) and not action.endswith(("..", "'.", '".')):
            action, unwrapped = action.rstrip(".!").strip(), True
    return action
