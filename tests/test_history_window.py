"""The history window: SFT examples, rollout prompts and pair prompts of a step agree."""

from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from ipr_core.agent.prompts import PromptFormat
from ipr_core.config import MiningConfig, RunConfig, validate_config
from ipr_core.engine.backends.base import Completion, SamplingParams
from ipr_core.engine.rollout import EpisodeConfig, RolloutEngine, RolloutSpec
from ipr_core.envs import make_env
from ipr_core.errors import InputError
from ipr_core.method.expert import build_expert_trajectory
from ipr_core.method.explore import Exploration
from ipr_core.method.mining import mine_pairs
from ipr_core.run import loop
from ipr_core.run.context import Engines, RunContext
from ipr_core.run.pipeline import ensure_experts
from ipr_core.store.store import Store
from ipr_core.training.checkpoints import model_id
from ipr_core.training.data import build_sft_examples, render, sft_conversations
from ipr_core.types import Message, Trajectory

ENV = "twx/twc"
WINDOW = 1
STEP = 2
"""The step compared: two expert turns before it, so the window drops one."""


@dataclass
class RecordingBackend:
    """Answers every prompt with one fixed turn and keeps the prompts it was asked."""

    policy_id: str = "recording"
    prompts: list[list[Message]] = field(default_factory=list)

    def generate(self, conversations, params: SamplingParams, seeds=None):
        self.prompts += [list(c) for c in conversations]
        turn = "Thought: let me look.\nAction: look around"
        return [[Completion(turn, 0, 0, "stop")] for _ in conversations]


@pytest.fixture(scope="module")
def expert() -> Trajectory:
    env = make_env(ENV)
    try:
        expert = build_expert_trajectory(env, env.task_ids("train")[0])
    finally:
        env.close()
    assert isinstance(expert, Trajectory) and len(expert.steps) > STEP
    return expert


def test_sft_rollout_and_pair_prompts_of_a_step_are_the_same_messages(
    expert: Trajectory, tiny_model_path: Path
) -> None:
    backend = RecordingBackend()
    prefix = tuple(step.text for step in expert.steps[:STEP])
    settings = EpisodeConfig(max_steps=STEP + 1, history_window=WINDOW)
    with RolloutEngine(ENV, backend, settings) as engine:  # one turn after the replayed prefix
        [rollout] = engine.run([RolloutSpec(expert.task.task_id, prefix)], temperature=0.0)
        prompt = engine.prompt
    [rollout_prompt] = backend.prompts
    assert [m["role"] for m in rollout_prompt] == ["system", "user", "assistant", "user"]
    assert rollout_prompt[2]["content"] == expert.steps[STEP - 1].text  # the last turn only

    sft_example = sft_conversations(expert, prompt)[STEP]
    assert sft_example[:-1] == rollout_prompt
    assert sft_example[-1] == {"role": "assistant", "content": expert.steps[STEP].text}

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    rows, _ = build_sft_examples([expert], prompt, tokenizer, max_length=100_000)
    row = rows[STEP]
    first_scored = row["assistant_masks"].index(1)
    assert row["input_ids"][:first_scored] == render(tokenizer, rollout_prompt, True)
    assert sum(row["assistant_masks"]) > 0 and len(rows) == len(expert.steps)

    exploration = Exploration(expert, STEP, rollout)
    key = (expert.task.task_id, STEP)
    [pair] = mine_pairs([exploration], {key: 1.0}, {key: 0.0}, MiningConfig(), prompt)
    assert list(pair.prompt) == rollout_prompt


def test_without_a_window_the_whole_history_is_shown(expert: Trajectory) -> None:
    [whole] = sft_conversations(expert, PromptFormat("hint"))
    assert len(whole) == 2 + 2 * len(expert.steps) - 1


def test_the_window_is_validated_and_reaches_the_keys_and_the_scorer_id(
    tiny_model_path: Path,
) -> None:
    with pytest.raises(InputError, match="history_window"):
        validate_config(RunConfig, {"env": ENV, "prompt": {"history_window": 0}}, Path("x.yaml"))
    plain = RunConfig(env=ENV)
    windowed = RunConfig(env=ENV, prompt={"history_window": 2})
    store = Store(tiny_model_path / "never-opened.duckdb")
    contexts = [RunContext(config, store) for config in (plain, windowed)]
    fields = [loop.config_fields(ctx, *loop.ROLLOUT_FIELDS) for ctx in contexts]
    assert fields[0] != fields[1]
    assert Engines(plain).windowed("m") != Engines(windowed).windowed("m")
    sharded = Engines(windowed).scorer_id(tiny_model_path, 1)  # what scale-out workers check
    assert sharded == Engines(windowed).windowed(model_id(tiny_model_path))


def test_a_windowed_run_gives_its_engines_the_prompt_sft_and_mining_build(tmp_path: Path) -> None:
    config = RunConfig(
        env=ENV, store=tmp_path / "s.duckdb", train_limit=1, prompt={"history_window": WINDOW}
    )
    ctx = RunContext(config, Store(config.store), log=lambda message: None)
    ensure_experts(ctx)
    with ExitStack() as stack:  # what exploration, Monte Carlo and evaluation run with
        engine = ctx.engines.open(stack, RecordingBackend())
        assert engine.prompt == ctx.prompt  # what SFT and mining are given
    assert ctx.prompt.history_window == WINDOW and ctx.prompt.action_hint
