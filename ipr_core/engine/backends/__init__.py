"""Policy backends: the interface, and `make_backend` to pick an implementation by name."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from ipr_core.engine.backends.base import (
    Completion,
    FinishReason,
    PolicyBackend,
    SamplingParams,
)
from ipr_core.errors import InputError

BACKEND_KINDS = ("transformers", "vllm", "openai")

__all__ = [
    "BACKEND_KINDS",
    "Completion",
    "FinishReason",
    "PolicyBackend",
    "SamplingParams",
    "make_backend",
    "release_engines",
]


def make_backend(model_path: Path, kind: str = "transformers", **kwargs: Any) -> PolicyBackend:
    """Build a backend; imported lazily so the interface never pulls in torch (or vLLM,
    which only the `gpu` extra installs)."""
    if kind == "transformers":
        from ipr_core.engine.backends.transformers_backend import TransformersBackend

        return TransformersBackend(model_path, **kwargs)
    if kind == "vllm":
        from ipr_core.engine.backends.vllm_backend import VLLMBackend

        return VLLMBackend(model_path, **kwargs)
    if kind == "openai":
        from ipr_core.engine.backends.openai_backend import OpenAIBackend

        return OpenAIBackend(model_path, **kwargs)
    raise InputError(
        "backend", f"unknown backend kind {kind!r}; expected one of {', '.join(BACKEND_KINDS)}"
    )


def release_engines() -> None:
    """Shut down the inference engines this process holds (vLLM keeps most of the GPU's
    memory), so that training in the same process has it; backends restart them on use."""
    vllm_backend = sys.modules.get("ipr_core.engine.backends.vllm_backend")
    if vllm_backend is not None:
        vllm_backend.ENGINES.close_all()
