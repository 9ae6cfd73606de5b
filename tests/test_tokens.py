"""`ipr tokens`: the parts of a conversation add up to what SFT trains on, with and without
a history window, and the turn summary counts the prompts a rollout sends."""

from pathlib import Path

import pytest
import yaml
from transformers import AutoTokenizer

from flows.commands import main
from ipr_core.agent.prompts import PromptFormat, build_conversation, step_messages
from ipr_core.envs.base import EnvTask
from ipr_core.training.data import render, sft_conversations
from ipr_core.training.tokens import conversation_parts, token_table, turn_prompts, turn_table
from ipr_core.types import Step, Trajectory

ROOT = Path(__file__).resolve().parents[1]
HINT = "Actions: go <direction>, take <item>."
EXPERT = Trajectory(
    EnvTask("toy", "t1", "train", "Fetch the key.", "You are in a hall."),
    (
        Step("Thought: north.\nAction: go north", "go north", "A room with a key."),
        Step("Thought: a box.\nAction: open box", "open box", "The box is empty."),
        Step("Thought: there it is.\nAction: take key", "take key", "Done."),
    ),
    outcome_reward=1.0,
)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path: Path):
    return AutoTokenizer.from_pretrained(tiny_model_path)


def test_parts_add_up_to_the_rendered_conversation(tokenizer) -> None:
    parts = conversation_parts(EXPERT, PromptFormat(HINT), tokenizer)
    messages = build_conversation(EXPERT.task, (), PromptFormat(HINT))
    messages += step_messages(EXPERT.steps, final_observation=False)
    assert sum(tokens for _, tokens in parts) == len(render(tokenizer, messages))
    assert [name for name, _ in parts].count("assistant turn") == 3
    assert all(tokens > 0 for _, tokens in parts)

    table = token_table([EXPERT, EXPERT], PromptFormat(HINT), tokenizer).set_index("part")
    assert table.loc["total", "tokens_per_conversation"] == len(render(tokenizer, messages))
    assert table.loc["later observation", "items_per_conversation"] == 2


def test_with_a_window_the_parts_add_up_to_the_sft_examples(tokenizer) -> None:
    windowed = PromptFormat(HINT, history_window=1)
    examples = sft_conversations(EXPERT, windowed)
    trained = sum(len(render(tokenizer, messages)) for messages in examples)
    table = token_table([EXPERT], windowed, tokenizer).set_index("part")
    assert table.loc["total", "tokens_per_conversation"] == trained
    assert table.loc["system prompt", "items_per_conversation"] == 3  # one example a turn
    assert table.loc["assistant turn", "items_per_conversation"] == 1 + 2 + 2
    whole = token_table([EXPERT], PromptFormat(HINT), tokenizer).set_index("part")
    assert trained > whole.loc["total", "tokens_per_conversation"]  # the head, once a turn


def test_turn_prompts_are_the_rollout_prompts_and_the_window_costs_cache_hits(
    tokenizer,
) -> None:
    whole, windowed = PromptFormat(HINT), PromptFormat(HINT, history_window=1)
    sent = [
        len(render(tokenizer, build_conversation(EXPERT.task, EXPERT.steps[:t], p), True))
        for p in (whole, windowed)
        for t in range(3)
    ]
    plain, short = turn_prompts(EXPERT, whole, tokenizer), turn_prompts(EXPERT, windowed, tokenizer)
    assert [tokens for tokens, _ in plain + short] == sent
    assert plain[0][1] == plain[0][0] and all(p < tokens for tokens, p in plain[1:])
    assert short[2][0] < plain[2][0]  # the window drops the first turn ...
    assert short[2][1] > plain[2][1]  # ... so the cached episode matches only the head

    table = turn_table([EXPERT], windowed, tokenizer).set_index("measure")["tokens"]
    assert table["prompt per turn (longest)"] == max(sent[3:])
    assert table["prompt tokens per episode"] == sum(sent[3:])
    assert table["prefilled per episode, prefix cache"] == sum(p for _, p in short)


def test_tokens_command_reads_an_experiment_config_and_the_window(
    tmp_path: Path, tiny_model_path: Path, capsys
) -> None:
    run = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    run.pop("run_id")
    run.pop("method")
    run.pop("seed")
    run.update(model=str(tiny_model_path), cache_dir=str(tmp_path / "cache"))
    config = tmp_path / "experiment.yaml"
    config.write_text(yaml.safe_dump({"experiment_id": "e", "run": run}))
    store = tmp_path / "tokens.duckdb"
    command = ["tokens", "--config", str(config), "--store", str(store)]

    assert main([*command, "--history-window", "0"]) == 2
    assert "field 'prompt.history_window'" in capsys.readouterr().err
    assert not store.exists()  # refused before anything was opened

    assert main([*command, "--history-window", "2"]) == 0
    out = capsys.readouterr().out
    assert "history window: 2; 2 expert conversations" in out
    assert "prefilled per episode, prefix cache" in out
