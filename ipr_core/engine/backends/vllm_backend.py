"""A policy backend on vLLM's offline engine (GPU; `pip install -e '.[gpu]'`).

vLLM is imported only when an engine starts, so the package works without it. What the
backend asks of vLLM is first built as plain data (`serving_plan`, `engine_args`,
`plan_requests`), which the tests check without vLLM; `VLLMBackend` only wraps that data
in vLLM's classes and reads the outputs back.

Engines are shared per process: one per base model folder, so the frozen scorer and a
policy trained from it as a LoRA adapter run on one engine, the policy as a LoRARequest
(never merged). Automatic prefix caching is always on: the N Monte Carlo samples of a
prefix (`n`) and the turns of one episode share their prefill.
"""

from __future__ import annotations

import gc
import json
from collections import OrderedDict
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from ipr_core.config import VLLMSettings
from ipr_core.engine.backends.base import Completion, SamplingParams
from ipr_core.engine.backends.chat import (
    context_overflow,
    conversation_seeds,
    count_prompt_once,
    encode_prompt,
    finish_reason,
    fits_context,
    repeat_to_n,
    vllm_sampling,
)
from ipr_core.engine.models import is_complete_model
from ipr_core.errors import InputError
from ipr_core.training.checkpoints import ADAPTER_DIR, MODEL_DIR
from ipr_core.types import Message

ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class ServingPlan:
    """Which folder an engine loads for a model, and the LoRA adapter served on it."""

    base_model: Path
    adapter: Path | None = None


@dataclass(frozen=True)
class VLLMRequest:
    """One prompt as the backend hands it to vLLM."""

    conversation: int
    """Index of the conversation in the generate call."""
    prompt_token_ids: list[int]
    sampling: dict[str, Any]
    """Keyword arguments of `vllm.SamplingParams`."""


@dataclass(frozen=True)
class LoraTarget:
    """Keyword arguments of `vllm.lora.request.LoRARequest` for one policy."""

    lora_name: str
    lora_int_id: int
    lora_path: str


def serving_plan(model_path: Path, serve_adapters: bool = True) -> ServingPlan:
    """A LoRA-trained checkpoint (`<ckpt>/model` beside `<ckpt>/adapter`) is served as its
    adapter on the model it was trained from, so it shares that model's engine.

    PEFT records the base folder as given at training time (relative to the working
    directory then). A checkpoint whose base folder is gone is served from its merged copy.
    """
    model_path = Path(model_path).resolve()
    adapter = model_path.parent / ADAPTER_DIR
    if (
        not serve_adapters
        or model_path.name != MODEL_DIR
        or not (adapter / ADAPTER_CONFIG).is_file()
    ):
        return ServingPlan(model_path)
    config = json.loads((adapter / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    base = config.get("base_model_name_or_path")
    if not base or not is_complete_model(Path(base)):
        return ServingPlan(model_path)
    return ServingPlan(Path(base).resolve(), adapter)


def engine_args(base_model: Path, settings: VLLMSettings, enable_lora: bool) -> dict[str, Any]:
    """Keyword arguments of `vllm.LLM` for an engine on `base_model`."""
    args: dict[str, Any] = {
        "model": str(base_model),
        "tokenizer": str(base_model),
        "enable_prefix_caching": True,
        "tensor_parallel_size": settings.tensor_parallel_size,
        "gpu_memory_utilization": settings.gpu_memory_utilization / settings.max_engines,
        "max_model_len": settings.max_model_len,
        "max_num_batched_tokens": settings.max_num_batched_tokens,
        "dtype": settings.dtype,
        "enforce_eager": settings.enforce_eager,
        "seed": 0,
    }
    if enable_lora:
        args.update(
            enable_lora=True, max_lora_rank=settings.max_lora_rank, max_loras=settings.max_loras
        )
    return args


def plan_requests(
    prompts: list[list[int]],
    params: SamplingParams,
    max_context: int,
    seeds: Sequence[int] | None = None,
) -> list[VLLMRequest]:
    """One request per prompt that fits the context (the others are answered "context"),
    seeded by its conversation's seed (see `PolicyBackend.generate`)."""
    seeds = conversation_seeds(params, len(prompts), seeds)
    return [
        VLLMRequest(index, ids, vllm_sampling(params, seeds[index]))
        for index, ids in enumerate(prompts)
        if fits_context(len(ids), params.max_new_tokens, max_context)
    ]


@dataclass
class EngineHandle:
    """A loaded engine, its context length, and the LoRA ids handed out on it."""

    llm: Any
    max_context: int
    adapter_ids: dict[Path, int] = field(default_factory=dict)

    def lora_target(self, policy_id: str, adapter: Path) -> LoraTarget:
        """vLLM needs a distinct positive integer per adapter: numbered in order of first use."""
        lora_id = self.adapter_ids.setdefault(adapter, len(self.adapter_ids) + 1)
        return LoraTarget(policy_id, lora_id, str(adapter))


class _EnginePool:
    """The vLLM engines of this process, by their arguments; the least recently used one
    is shut down when a new one would exceed `max_engines`."""

    def __init__(self) -> None:
        self._engines: OrderedDict[str, EngineHandle] = OrderedDict()

    def get(self, args: dict[str, Any], max_engines: int) -> EngineHandle:
        key = json.dumps(args, sort_keys=True)
        if key in self._engines:
            self._engines.move_to_end(key)
            return self._engines[key]
        while len(self._engines) >= max_engines:
            _, old = self._engines.popitem(last=False)
            _shutdown(old.llm)
        llm = _vllm().LLM(**args)
        engine = EngineHandle(llm, llm.llm_engine.model_config.max_model_len)
        self._engines[key] = engine
        return engine

    def discard(self, args: dict[str, Any]) -> None:
        """Shut down the engine for `args` (if loaded), so the next `get` starts a fresh one."""
        engine = self._engines.pop(json.dumps(args, sort_keys=True), None)
        if engine is not None:
            with suppress(Exception):  # a dead engine may fail to stop cleanly
                _shutdown(engine.llm)

    def close_all(self) -> None:
        while self._engines:
            _shutdown(self._engines.popitem()[1].llm)


ENGINES = _EnginePool()


def _vllm() -> Any:
    """vLLM, from the `gpu` extra: imported only when an engine starts."""
    try:
        import vllm
    except ImportError as exc:
        raise InputError(
            "backend", f"backend 'vllm' needs vLLM: pip install -e '.[gpu]' ({exc})"
        ) from exc
    return vllm


def _shutdown(llm: Any) -> None:
    """Stop the engine's core process and free its GPU memory for the next engine."""
    llm.llm_engine.engine_core.shutdown()
    gc.collect()  # drop the engine's tensors now, not at some later collection
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class VLLMBackend:
    """Generation on a shared vLLM engine; a LoRA checkpoint runs as an adapter request."""

    def __init__(
        self,
        model_path: Path,
        policy_id: str | None = None,
        settings: VLLMSettings | None = None,
        enable_lora: bool = False,
    ):
        model_path = Path(model_path)
        self.policy_id = policy_id or model_path.name
        self.settings = settings or VLLMSettings()
        self.plan = serving_plan(model_path, self.settings.serve_lora_adapters and enable_lora)
        self.engine_args = engine_args(self.plan.base_model, self.settings, enable_lora)
        # The policy's own tokenizer renders prompts, exactly as the transformers backend does.
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        self.max_context = self._engine().max_context
        self.stats = {"prefill_tokens": 0, "cached_tokens": 0, "generated_tokens": 0}
        """Running totals of prompt tokens computed and served by vLLM's prefix cache (its
        num_cached_tokens per request; on CPU it caches whole blocks of 128 tokens), and
        of tokens generated."""

    def _engine(self) -> EngineHandle:
        """Looked up per call: the pool may have shut it down for another model meanwhile."""
        return ENGINES.get(self.engine_args, self.settings.max_engines)

    def generate(
        self,
        conversations: list[list[Message]],
        params: SamplingParams,
        seeds: Sequence[int] | None = None,
    ) -> list[list[Completion]]:
        """Return `params.n` completions for each conversation, in order: one vLLM call."""
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest

        engine = self._engine()
        prompts = [encode_prompt(self.tokenizer, conversation) for conversation in conversations]
        requests = plan_requests(prompts, params, engine.max_context, seeds)
        lora = None
        if self.plan.adapter is not None:
            lora = LoRARequest(**asdict(engine.lora_target(self.policy_id, self.plan.adapter)))
        outputs = []
        if requests:
            try:
                outputs = engine.llm.generate(
                    [TokensPrompt(prompt_token_ids=r.prompt_token_ids) for r in requests],
                    [_vllm().SamplingParams(**r.sampling) for r in requests],
                    use_tqdm=False,
                    lora_request=lora,
                )
            except Exception:
                # After a failure the engine may be dead (EngineDeadError); the rollout engine
                # records this call's episodes as failed, and the next call gets a fresh one.
                ENGINES.discard(self.engine_args)
                raise
        results = [context_overflow(params.n) for _ in conversations]
        for request, output in zip(requests, outputs, strict=True):
            cached = output.num_cached_tokens or 0
            computed = len(output.prompt_token_ids) - cached
            completions = [
                Completion(
                    text=sample.text,
                    prompt_tokens=0,
                    generated_tokens=len(sample.token_ids),
                    finish_reason=finish_reason(sample.finish_reason, f"vLLM ({self.policy_id})"),
                )
                for sample in output.outputs
            ]
            results[request.conversation] = count_prompt_once(
                repeat_to_n(completions, params), computed
            )
            self.stats["prefill_tokens"] += computed
            self.stats["cached_tokens"] += cached
            self.stats["generated_tokens"] += sum(c.generated_tokens for c in completions)
        return results
