"""Policy backends: the interface, and `make_backend` to pick an implementation by name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ipr_core.backends.base import (
    Completion,
    FinishReason,
    Message,
    PolicyBackend,
    SamplingParams,
)
from ipr_core.errors import InputError

BACKEND_KINDS = ("transformers",)

__all__ = [
    "BACKEND_KINDS",
    "Completion",
    "FinishReason",
    "Message",
    "PolicyBackend",
    "SamplingParams",
    "make_backend",
]


def make_backend(model_path: Path, kind: str = "transformers", **kwargs: Any) -> PolicyBackend:
    """Build a backend; imported lazily so the interface never pulls in torch."""
    if kind == "transformers":
        from ipr_core.backends.transformers_backend import TransformersBackend

        return TransformersBackend(model_path, **kwargs)
    raise InputError(
        "backend", f"unknown backend kind {kind!r}; expected one of {', '.join(BACKEND_KINDS)}"
    )
