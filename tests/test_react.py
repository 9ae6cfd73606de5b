import pytest

from ipr_core.agent.react import format_turn, parse_react


def test_parses_thought_and_action():
    turn = parse_react("Thought: the apple is here.\nAction: take apple")
    assert turn.ok
    assert (turn.thought, turn.action) == ("the apple is here.", "take apple")


def test_tolerates_missing_thought_extra_text_and_decoration():
    turn = parse_react("Sure! Let me think.\n**Action:** `open fridge`.\nObservation: the fridge")
    assert turn.ok
    assert turn.action == "open fridge"
    assert turn.thought == "Sure! Let me think."


def test_first_action_line_wins_and_case_is_ignored():
    assert parse_react("thought: x\nACTION: move north\nAction: move south").action == "move north"


def test_missing_action_is_a_reported_failure_not_an_exception():
    turn = parse_react("I think I should take the apple")
    assert not turn.ok
    assert turn.action == ""
    assert "Action" in (turn.error or "")


def test_empty_action_is_a_failure():
    assert not parse_react("Thought: hmm\nAction:   ").ok


def test_format_round_trips():
    turn = parse_react(format_turn("I need it.", "take red apple"))
    assert (turn.thought, turn.action) == ("I need it.", "take red apple")


@pytest.mark.parametrize(
    ("raw", "action"),
    [
        ("SELECT name FROM pets WHERE kind = 'cat'", "SELECT name FROM pets WHERE kind = 'cat'"),
        ('`SELECT "a"`', 'SELECT "a"'),
        ("**take apple**.", "take apple"),
        ("'open fridge'", "open fridge"),
    ],
)
def test_only_matching_wrappers_are_removed(raw: str, action: str) -> None:
    assert parse_react(f"Thought: t\nAction: {raw}").action == action
