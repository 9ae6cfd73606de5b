"""A policy backend on an OpenAI-compatible server, e.g. a running `vllm serve`.

The prompt is rendered here with the model's own tokenizer and chat template (the same
rendering as every other backend) and sent to /v1/completions as text, with
`add_special_tokens: false` so the server adds no second BOS. One request per
conversation, with `n` samples and its own seed, all in flight together: the server
batches them, and its prefix cache serves the shared prefix of the n samples.

`completion_request` and `parse_completion` are the whole translation, plain functions
over dicts; `OpenAIBackend` adds the HTTP calls.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from transformers import AutoTokenizer

from ipr_core.config import OpenAISettings
from ipr_core.engine.backends.base import Completion, SamplingParams
from ipr_core.engine.backends.chat import (
    BackendError,
    context_overflow,
    conversation_seeds,
    count_prompt_once,
    encode_rendered,
    finish_reason,
    fits_context,
    render_prompt,
    repeat_to_n,
    samples_to_generate,
    vllm_sampling,
)
from ipr_core.errors import InputError
from ipr_core.training.checkpoints import ADAPTER_DIR
from ipr_core.types import Message

FIELD = "openai.model"
"""The config field a missing served model is reported against."""


def completion_request(
    model: str, prompt: str, params: SamplingParams, seed: int
) -> dict[str, Any]:
    """The /v1/completions body for a conversation seeded `seed`."""
    return {
        "model": model,
        "prompt": prompt,
        **vllm_sampling(params, seed),
        # vLLM extensions: our template already holds any BOS, and per-sample token ids
        # give each sample's generated-token count (usage only has the sum over n).
        "add_special_tokens": False,
        "return_token_ids": True,
    }


def parse_completion(
    body: Any, params: SamplingParams, prompt_tokens: int, source: str
) -> list[Completion]:
    """The n completions of one response; a malformed or inconsistent one raises BackendError.

    The server's prompt count must equal ours: a different count means it tokenised the
    prompt differently (another model or tokenizer behind that name). The prompt is
    counted once, less the tokens the server's prefix cache served when it reports them
    (`vllm serve --enable-prompt-tokens-details`).
    """
    try:
        usage, choices = body["usage"], sorted(body["choices"], key=lambda c: c["index"])
        served_prompt_tokens = int(usage["prompt_tokens"])
        cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        total_generated = int(usage["completion_tokens"])
        texts = [str(choice["text"]) for choice in choices]
        reasons = [choice.get("finish_reason") for choice in choices]
        token_ids = [choice.get("token_ids") for choice in choices]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BackendError(f"{source}: malformed completion response ({exc!r})") from exc
    expected = params.n if params.temperature > 0 else 1
    if len(choices) != expected:
        raise BackendError(f"{source}: expected {expected} choices, got {len(choices)}")
    if served_prompt_tokens != prompt_tokens:
        raise BackendError(
            f"{source}: usage.prompt_tokens is {served_prompt_tokens} but the model's "
            f"tokenizer gives {prompt_tokens}: is the server running this model?"
        )
    if all(isinstance(ids, list) for ids in token_ids):
        generated = [len(ids) for ids in token_ids]
        if sum(generated) != total_generated:
            raise BackendError(
                f"{source}: choices hold {sum(generated)} token ids, "
                f"usage.completion_tokens says {total_generated}"
            )
    elif len(choices) == 1:
        generated = [total_generated]
    else:
        raise BackendError(f"{source}: no per-choice token_ids to count {len(choices)} samples")
    completions = [
        Completion(text, 0, count, finish_reason(reason, source))
        for text, count, reason in zip(texts, generated, reasons, strict=True)
    ]
    return count_prompt_once(repeat_to_n(completions, params), prompt_tokens - cached)


def check_status(call: str, status: int, text: str) -> None:
    """An error status becomes a BackendError carrying the server's own message."""
    if status < 400:
        return
    try:
        message = json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = text[:500]
    raise BackendError(f"{call}: HTTP {status}: {message}")


def served_model_for(
    models: Any, model_path: Path, configured: str | None, source: str
) -> tuple[str, int | None]:
    """The served name for `model_path` and its context length, from /v1/models.

    `configured` (the config's openai.model) must be served; otherwise the model is the one
    whose root is the model folder or the checkpoint's LoRA adapter folder.
    """
    try:
        entries = {str(m["id"]): m for m in models["data"]}
    except (KeyError, TypeError) as exc:
        raise BackendError(f"{source}: malformed /v1/models response ({exc!r})") from exc
    if configured is not None:
        if configured not in entries:
            raise InputError(
                source, f"{configured!r} is not served (it serves {sorted(entries)})", field=FIELD
            )
        name = configured
    else:
        wanted = {str(model_path.resolve()), str((model_path.parent / ADAPTER_DIR).resolve())}
        roots = [n for n, m in entries.items() if _resolved(m.get("root")) in wanted]
        if not roots:
            raise InputError(
                source,
                f"serves no model rooted at {model_path} (it serves {sorted(entries)}); "
                "start `vllm serve` on that folder, set openai.model, or set "
                "openai.load_lora_adapters for a LoRA checkpoint",
                field=FIELD,
            )
        name = roots[0]
    # A LoRA adapter's entry has no max_model_len: it inherits its parent's.
    entry = entries[name]
    length = entry.get("max_model_len") or entries.get(str(entry.get("parent")), {}).get(
        "max_model_len"
    )
    return name, None if length is None else int(length)


def _model_context(model_path: Path) -> int:
    """The model's own context length, for servers that do not report theirs."""
    config = json.loads((model_path / "config.json").read_text(encoding="utf-8"))
    return int(config["max_position_embeddings"])


def _resolved(root: Any) -> str | None:
    return None if not root else str(Path(str(root)).expanduser().resolve())


class OpenAIBackend:
    """Completions from a running OpenAI-compatible server; the chat template stays ours."""

    def __init__(
        self,
        model_path: Path,
        settings: OpenAISettings,
        policy_id: str | None = None,
        served_model: str | None = None,
    ):
        model_path = Path(model_path)
        self.policy_id = policy_id or model_path.name
        self.settings = settings
        self.source = settings.base_url.rstrip("/")
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        headers = {}
        if settings.api_key_env:
            headers["Authorization"] = f"Bearer {os.environ.get(settings.api_key_env, '')}"
        self.client = httpx.Client(
            base_url=self.source + "/",
            headers=headers,
            timeout=settings.timeout_s,
            limits=httpx.Limits(max_connections=settings.max_concurrency),
        )
        try:
            self.model, context = served_model_for(
                self._get("models"), model_path, served_model, self.source
            )
        except InputError:
            adapter = model_path.parent / ADAPTER_DIR
            if served_model is not None or not settings.load_lora_adapters or not adapter.is_dir():
                raise
            lora = {"lora_name": self.policy_id, "lora_path": str(adapter.resolve())}
            self._post("load_lora_adapter", lora)
            self.model, context = served_model_for(
                self._get("models"), model_path, None, self.source
            )
        self.max_context = context or _model_context(model_path)
        self.stats = {"prefill_tokens": 0, "cached_tokens": 0, "generated_tokens": 0}

    def close(self) -> None:
        self.client.close()

    def generate(
        self,
        conversations: list[list[Message]],
        params: SamplingParams,
        seeds: Sequence[int] | None = None,
    ) -> list[list[Completion]]:
        """Return `params.n` completions for each conversation, in order."""
        seeds = conversation_seeds(params, len(conversations), seeds)
        jobs = []
        results = [context_overflow(params.n) for _ in conversations]
        for index, conversation in enumerate(conversations):
            prompt = render_prompt(self.tokenizer, conversation)
            prompt_tokens = len(encode_rendered(self.tokenizer, prompt))
            if fits_context(prompt_tokens, params.max_new_tokens, self.max_context):
                body = completion_request(self.model, prompt, params, seeds[index])
                jobs.append((index, body, prompt_tokens))
        with ThreadPoolExecutor(self.settings.max_concurrency) as pool:
            bodies = list(pool.map(lambda job: self._post("completions", job[1]), jobs))
        for (index, _, prompt_tokens), body in zip(jobs, bodies, strict=True):
            completions = parse_completion(body, params, prompt_tokens, self.source)
            results[index] = completions
            computed = completions[0].prompt_tokens
            self.stats["prefill_tokens"] += computed
            self.stats["cached_tokens"] += prompt_tokens - computed
            self.stats["generated_tokens"] += sum(
                c.generated_tokens for c in completions[: samples_to_generate(params)]
            )
        return results

    def _get(self, path: str) -> Any:
        return self._send("GET", path)

    def _post(self, path: str, body: Mapping[str, Any]) -> Any:
        return self._send("POST", path, body)

    def _send(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        """One HTTP call: the JSON answer (or the text of a non-JSON one, as vLLM's
        load_lora_adapter gives); transport failures and error statuses raise BackendError."""
        url = f"{self.source}/{path}"
        try:
            response = self.client.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise BackendError(f"{method} {url}: {exc!r}") from exc
        check_status(f"{method} {url}", response.status_code, response.text)
        try:
            return response.json()
        except json.JSONDecodeError:
            return response.text
