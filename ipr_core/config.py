"""Typed run configuration, loaded from YAML presets in `configs/`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ipr_core.errors import InputError
from ipr_core.mining import MiningConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GenerationConfig(_Strict):
    max_new_tokens: int = Field(96, gt=0)
    max_batch_size: int = Field(16, gt=0)
    """Sequences per forward pass of the transformers backend."""
    max_live_episodes: int = Field(32, gt=0)
    """Episodes in lock-step at once (one env instance each)."""


class MonteCarloConfig(_Strict):
    n_samples: int = Field(5, gt=0)
    temperature: float = Field(1.0, ge=0)


class RunConfig(_Strict):
    run_id: str = "default"
    env: str
    model: str = "smollm2-135m-instruct"
    """The explorer of iteration 1: a model spec (see ipr_core.models.resolve_model)."""
    scorer: str | None = None
    """The frozen MC scorer (the SFT model in the paper); defaults to `model`."""
    backend: Literal["transformers"] = "transformers"
    store: Path = Path(".ipr/ipr.duckdb")
    cache_dir: Path = Path(".ipr")
    train_split: str = "train"
    train_limit: int = Field(8, gt=0)
    max_steps: int | None = Field(None, gt=0)
    """Episode step bound; the env's own bound when unset or lower."""
    iterations: int = Field(1, gt=0)
    seed: int = 0
    generation: GenerationConfig = GenerationConfig()
    monte_carlo: MonteCarloConfig = MonteCarloConfig()
    mining: MiningConfig = MiningConfig()

    @property
    def scorer_spec(self) -> str:
        return self.scorer or self.model


def load_config(path: Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML preset; errors name the file and the offending field."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise InputError(str(path), f"cannot read config: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise InputError(str(path), f"not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise InputError(str(path), "expected a mapping of settings")
    data.update(overrides or {})
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        raise InputError(str(path), first["msg"], field=field) from exc
