"""`ipr tokens`: the parts of a conversation add up to its rendering."""

from pathlib import Path

from transformers import AutoTokenizer

from ipr_core.envs.base import EnvTask
from ipr_core.prompts import PromptFormat, build_conversation, step_messages
from ipr_core.tokens import conversation_parts, token_table
from ipr_core.training.data import render
from ipr_core.types import Step, Trajectory

HINT = "Actions: go <direction>, take <item>."
EXPERT = Trajectory(
    EnvTask("toy", "t1", "train", "Fetch the key.", "You are in a hall."),
    (
        Step("Thought: north.\nAction: go north", "go north", "A room with a key."),
        Step("Thought: there it is.\nAction: take key", "take key", "Done."),
    ),
    outcome_reward=1.0,
)


def test_parts_add_up_to_the_rendered_conversation(tiny_model_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    parts = conversation_parts(EXPERT, HINT, tokenizer)
    messages = build_conversation(EXPERT.task, (), PromptFormat(HINT))
    messages += step_messages(EXPERT.steps, final_observation=False)
    assert sum(tokens for _, tokens in parts) == len(render(tokenizer, messages))
    assert [name for name, _ in parts].count("assistant turn") == 2
    assert all(tokens > 0 for _, tokens in parts)

    table = token_table([EXPERT, EXPERT], HINT, tokenizer).set_index("part")
    assert table.loc["total", "tokens_per_conversation"] == len(render(tokenizer, messages))
    assert table.loc["later observation", "items_per_conversation"] == 1
