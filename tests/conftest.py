"""Shared fixtures. Tests never reach a model hub: every model is built or loaded locally."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from ipr_core.models import build_tiny_llama  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    """A tiny random Llama with a ChatML tokenizer, built once per test session."""
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")
