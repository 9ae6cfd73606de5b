"""Record real `vllm serve` exchanges for tests/test_backend_openai.py (tests/data/vllm_http).

Start a server on the tiny test model with a LoRA adapter loaded as `sft-lora`, then run
this with the project's venv (commands in README, "Policy backends"):

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

from ipr_core.backends import SamplingParams
from ipr_core.backends.chat import encode_prompt, render_prompt
from ipr_core.backends.openai_backend import completion_request

MODEL = Path(".ipr/models/tiny-llama")
CONVERSATION = [
    {"role": "system", "content": "You are an agent."},
    {"role": "user", "content": "Task: find the apple in the kitchen."},
]
CASES = {
    "greedy": ("tiny", SamplingParams(max_new_tokens=12), 0),
    "sampled_stop": (
        "tiny",
        SamplingParams(1.0, 16, n=3, stop=(" 2", "\nObservation:"), seed=7),
        2,
    ),
    "lora_sampled": ("sft-lora", SamplingParams(1.0, 8, n=2, seed=1), 0),
}


def main(url: str, out: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    prompt = render_prompt(tokenizer, CONVERSATION)
    client = httpx.Client(base_url=url.rstrip("/") + "/", timeout=120)
    for name, (model, params, index) in CASES.items():
        body = completion_request(model, prompt, params, index)
        response = client.post("completions", json=body)
        record = {
            "conversation": CONVERSATION,
            "prompt_tokens": len(encode_prompt(tokenizer, CONVERSATION)),
            "params": {
                "temperature": params.temperature,
                "n": params.n,
                "max_new_tokens": params.max_new_tokens,
                "stop": list(params.stop),
                "seed": params.seed,
            },
            "index": index,
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
