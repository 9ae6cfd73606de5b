"""Record real `vllm serve` exchanges for tests/test_backend_openai.py (tests/data/vllm_http).

Start a server on the tiny test model (served as `tiny`, with --enable-lora and
--enable-prompt-tokens-details) and load a LoRA adapter into it as `sft-lora`, then run
this with the project's venv (commands in docs/backends.md, "Policy backends"). The cases run in
order: "greedy" fills the prefix cache that "sampled_stop" then hits.

    python scripts/record_vllm_http.py http://127.0.0.1:8011/v1 tests/data/vllm_http

The bodies are built by the backend's own `completion_request`, so the recording shows
which bodies a real server accepted and what it answered.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
from transformers import AutoTokenizer

from ipr_core.agent.prompts import PromptFormat, build_conversation
from ipr_core.engine.backends import SamplingParams
from ipr_core.engine.backends.chat import encode_prompt, render_prompt
from ipr_core.engine.backends.openai_backend import completion_request
from ipr_core.envs.base import EnvTask
from ipr_core.types import Step

MODEL = Path(".ipr/models/tiny-llama")
TASK = EnvTask("toy", "t1", "train", "Find the apple in the kitchen.", "You are in a hall.")
STEPS = [Step("Thought: the kitchen is north.\nAction: go north", "go north", "A kitchen.")]
CONVERSATION = build_conversation(
    TASK, STEPS, PromptFormat("Actions: go <direction>, take <item>.")
)
"""Longer than one 128-token block of vLLM's CPU prefix cache, so a repeat shows hits."""
CASES = {  # served model, sampling parameters, the conversation's seed
    "greedy": ("tiny", SamplingParams(max_new_tokens=12), 0),
    "sampled_stop": ("tiny", SamplingParams(1.0, 16, n=3, stop=(" 2", "\nObservation:")), 9),
    "lora_sampled": ("sft-lora", SamplingParams(1.0, 8, n=2), 1),
}


def main(url: str, out: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    prompt = render_prompt(tokenizer, CONVERSATION)
    client = httpx.Client(base_url=url.rstrip("/") + "/", timeout=120)
    for name, (model, params, seed) in CASES.items():
        body = completion_request(model, prompt, params, seed)
        response = client.post("completions", json=body)
        record = {
            "conversation": CONVERSATION,
            "prompt_tokens": len(encode_prompt(tokenizer, CONVERSATION)),
            "params": {
                "temperature": params.temperature,
                "n": params.n,
                "max_new_tokens": params.max_new_tokens,
                "stop": list(params.stop),
            },
            "seed": seed,
            "request": body,
            "status": response.status_code,
            "response": response.json(),
        }
        (out / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    # A request the server refuses: a prompt longer than its context.
    too_long = completion_request("tiny", prompt * 200, SamplingParams(max_new_tokens=8), 0)
    response = client.post("completions", json=too_long)
    error = {"status": response.status_code, "response": response.json()}
    (out / "error_too_long.json").write_text(json.dumps(error, indent=1) + "\n")
    (out / "models.json").write_text(json.dumps(client.get("models").json(), indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
