"""Typed run configuration, loaded from YAML presets in `configs/`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ipr_core.errors import InputError
from ipr_core.mining import MiningConfig
from ipr_core.training.config import PRESETS, MixtureSettings, SFTSettings

Method = Literal["ipr", "eto", "ipr-no-odpo", "ipr-no-sdpo", "ipr-no-sft", "sft", "custom"]


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


class ScaleOutConfig(_Strict):
    """Monte Carlo step rewards computed in shards on a Dask cluster (the Prefect flow only)."""

    shards: int = Field(2, gt=0)
    """Slices of the step queries; each is one task that writes Parquet files."""
    task_runner: Literal["dask"] = "dask"
    workers: int = Field(2, gt=0)
    """Worker processes of the local cluster started for each sharded stage."""
    threads_per_worker: int = Field(1, gt=0)
    address: str | None = None
    """A running Dask scheduler (`tcp://host:8786`) to use instead of a local cluster."""
    shard_dir: Path | None = None
    """Where shards are written (default `<cache_dir>/shards`); storage shared with the
    workers when they run on other machines, like the checkpoints folder."""


class RunConfig(_Strict):
    run_id: str = "default"
    env: str
    model: str = "smollm2-135m-instruct"
    """The base model: a model spec (see ipr_core.models.resolve_model)."""
    method: Method = "ipr"
    """A row of the paper's table (its loss weights); `custom` uses `mixture.weights`."""
    sft: SFTSettings | None = SFTSettings()
    """Stage 1; null uses the base model as the SFT model (scorer, reference, explorer 1)."""
    mixture: MixtureSettings = MixtureSettings()
    backend: Literal["transformers"] = "transformers"
    store: Path = Path(".ipr/ipr.duckdb")
    cache_dir: Path = Path(".ipr")
    train_split: str = "train"
    train_limit: int = Field(8, gt=0)
    dev_split: str = "dev"
    dev_limit: int = Field(8, gt=0)
    evaluate_base: bool = True
    max_steps: int | None = Field(None, gt=0)
    """Episode step bound; the env's own bound when unset or lower."""
    step_timeout_s: float = Field(60.0, gt=0)
    """An env step running longer fails its rollout (env_error) instead of hanging the run."""
    iterations: int = Field(1, gt=0)
    seed: int = 0
    generation: GenerationConfig = GenerationConfig()
    monte_carlo: MonteCarloConfig = MonteCarloConfig()
    step_reward_model: Path | None = None
    """A step reward model folder (`ipr train reward-model`) whose predictions replace the
    Monte Carlo step rewards (paper 5.5); unset: MC with the SFT model as scorer."""
    mining: MiningConfig = MiningConfig()
    scale_out: ScaleOutConfig | None = None
    """None: each step reward stage runs in the flow's process."""

    @property
    def mixture_settings(self) -> MixtureSettings | None:
        """The mixture of `method` (None for `sft`: no training after stage 1)."""
        if self.method == "custom":
            return self.mixture
        weights = PRESETS[self.method]
        return None if weights is None else self.mixture.model_copy(update={"weights": weights})

    @property
    def checkpoints_dir(self) -> Path:
        return self.cache_dir / "checkpoints"


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
