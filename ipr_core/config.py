"""Typed run configuration, loaded from YAML presets in `configs/`."""

from __future__ import annotations

import json
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from ipr_core.envs import canonical_env_id
from ipr_core.errors import InputError, UnknownEnvError, kind_of, read_text
from ipr_core.training.config import (
    IN_PROCESS,
    ComputeConfig,
    MixtureConfig,
    Seed,
    SFTConfig,
    StrictConfig,
    check_layout,
)
from ipr_core.training.methods import REGISTRY, Needs, method

ConfigT = TypeVar("ConfigT", bound=BaseModel)


def _known_method(value: str) -> str:
    if value not in REGISTRY:
        raise ValueError(f"unknown method {value!r}; known: {', '.join(REGISTRY)}")
    return value


MethodName = Annotated[str, AfterValidator(_known_method)]
"""A name of the method registry (`ipr_core.training.methods`)."""


def _canonical_env_id(value: str) -> str:
    """As a validation error, so the config's error names the file and the field."""
    try:
        return canonical_env_id(value)
    except UnknownEnvError as exc:
        raise ValueError(str(exc)) from exc


EnvId = Annotated[str, AfterValidator(_canonical_env_id)]
"""An env id, e.g. `twx/twc?locations=1&items=2`, kept in its canonical spelling (one key in
the store for every spelling of one setting)."""


DtypeSetting = Literal["auto", "float32", "bfloat16"]
"""A phase's dtype in the transformers backend; `auto` measures both at startup."""
DecodeAttention = Literal["sdpa", "grouped"]
ExpertSteps = Literal["all", "compared"]
"""The transformers backend's decode attention (`GenerationConfig.decode_attention`)."""


class GenerationConfig(StrictConfig):
    max_new_tokens: int = Field(96, gt=0)
    max_batch_size: int = Field(16, gt=0)
    """Sequences per forward pass of the transformers backend."""
    max_live_episodes: int = Field(32, gt=0)
    """Episodes in lock-step at once (one env instance each)."""
    prefill_dtype: DtypeSetting = "float32"
    """The transformers backend's prefill dtype; `auto` measures float32 and bfloat16 on the
    loaded model at startup (bfloat16 prefill is ~2x faster on a CPU with AVX512-BF16)."""
    decode_dtype: DtypeSetting = "float32"
    """The same for decode steps (bfloat16 decode measured slower than float32 on one)."""
    decode_attention: DecodeAttention = "sdpa"
    """The transformers backend's decode attention: `sdpa` (transformers' SDPA), or `grouped`
    (two grouped matmuls: ~1.35x SDPA's decode rate in bfloat16 on a CPU, the same in
    float32; its float rounding depends on how far a row is padded, so a sampled rollout's
    tokens can change with the batch it shares, and sharded or resumed rows can differ from
    an uninterrupted run's: use it where speed matters more than that identity)."""


class MonteCarloConfig(StrictConfig):
    n_samples: int = Field(5, gt=0)
    temperature: float = Field(1.0, ge=0)
    early_stop: bool = False
    """Sample an agent step one sample per wave and stop once the remaining samples cannot
    change its pair decision (`mining.pair_decided`, outcomes in [0, 1]): the same pairs
    from fewer rollouts; its stored step reward is the mean of the samples drawn."""
    expert_steps: ExpertSteps = "all"
    """Which expert steps get Monte Carlo samples: `all` (once per run, before iteration 1's
    exploration), or `compared`: in each iteration, after its exploration, only the steps an
    agent step differs from that no earlier iteration scored. Mining reads an expert step's
    reward only there, and a rollout is seeded by its query and sample, so the pairs are
    `all`'s from fewer rollouts; what is lost is the expert rewards nobody compares with (the
    report's expert-reward quantiles and a step reward model's training rows)."""


class VLLMConfig(StrictConfig):
    """The vLLM offline engine (`backend: vllm`, GPU): automatic prefix caching, `n` sampling,
    and LoRA checkpoints served as adapters on their base model's engine (never merged)."""

    tensor_parallel_size: int = Field(1, gt=0)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    """The GPU memory share of all engines of this process together (split among max_engines)."""
    max_engines: int = Field(2, gt=0)
    """Engines kept loaded at once (least recently used one is shut down): the scorer and
    a policy whose adapter does not sit on the scorer's model need two."""
    max_model_len: int | None = Field(None, gt=0)
    """Context length; the model's own when unset."""
    max_num_batched_tokens: int | None = Field(None, gt=0)
    """Tokens per engine step (vLLM's default when unset); prompts beyond it are prefilled
    in chunks."""
    dtype: str = "auto"
    enforce_eager: bool = False
    """Skip CUDA graph capture: faster start, slower decoding."""
    serve_lora_adapters: bool = True
    """Serve a LoRA-trained checkpoint as its adapter on the base it was trained from."""
    max_lora_rank: Literal[1, 8, 16, 32, 64, 128, 256, 320, 512] = 64
    """The ranks vLLM accepts; at least the largest LoRA rank the training stages use."""
    max_loras: int = Field(4, gt=0)
    """Adapters resident on the GPU at once."""


class OpenAIConfig(StrictConfig):
    """An OpenAI-compatible server (`backend: openai`), e.g. a running `vllm serve`."""

    base_url: str = Field(pattern=r"^https?://")
    """The API root, e.g. http://127.0.0.1:8000/v1."""
    model: str | None = None
    """The served name of the base model; unset: the served model whose root is the model
    folder (as `vllm serve PATH` reports it in /v1/models)."""
    load_lora_adapters: bool = False
    """Load a LoRA-trained checkpoint's adapter into the server (needs `vllm serve
    --enable-lora` with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and the same file system)."""
    timeout_s: float = Field(600.0, gt=0)
    max_concurrency: int = Field(32, gt=0)
    """Requests in flight at once (one per conversation; the server batches them)."""
    api_key_env: str | None = None
    """Name of the environment variable holding a bearer token, if the server wants one."""


def largest_lora_rank(*stages: SFTConfig | MixtureConfig | None) -> int | None:
    ranks = [stage.lora.r for stage in stages if stage is not None and stage.lora.enabled]
    return max(ranks, default=None)


class ScaleOutConfig(StrictConfig):
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


class PromptConfig(StrictConfig):
    """The prompt every stage builds (SFT examples, rollouts, pairs): one setting for all."""

    history_window: int | None = Field(None, ge=1)
    """Keep the system and task messages and the last k (assistant, observation) turns;
    None: the whole history."""


class MiningConfig(StrictConfig):
    """Contrastive pair mining (`ipr_core.method.mining`)."""

    step_margin: float = Field(0.1, ge=0, lt=1)
    """τ: 0.5 ALFWorld, 0.01 WebShop, 0.1 InterCode-SQL in the paper. Rewards lie in [0, 1]:
    below 0 it would mine steps the agent did better, from 1 it mines none."""
    trajectory_margin: float = Field(0.0, ge=0, lt=1)
    """Outcomes differing by no more than this make no pair (from 1: none would)."""
    both_directions: bool = False
    step_mode: Literal["suffix", "action"] = "suffix"


class RunConfig(StrictConfig):
    run_id: str = "default"
    env: EnvId
    model: str = "smollm2-135m-instruct"
    """The base model: a model spec (see ipr_core.engine.models.resolve_model)."""
    method: MethodName = "ipr"
    """A method of the registry (`ipr_core.training.methods`: its loss and what its
    iterations need); `custom` trains the mixture with `mixture.weights`."""
    sft: SFTConfig | None = SFTConfig()
    """Stage 1; null uses the base model as the SFT model (scorer, reference, explorer 1)."""
    mixture: MixtureConfig = MixtureConfig()
    compute: ComputeConfig = IN_PROCESS
    """Where SFT and the mixture train: device, and processes under `accelerate launch`."""
    backend: Literal["transformers", "vllm", "openai"] = "transformers"
    store: Path = Path(".ipr/ipr.duckdb")
    cache_dir: Path = Path(".ipr")
    train_split: str = "train"
    train_limit: int = Field(8, gt=0)
    """Expert trajectories of `train_split` that SFT trains on."""
    explore_limit: int | None = Field(None, gt=0)
    """Explore from (and score the steps of) the first `explore_limit` of those experts; all
    when unset. SFT is cheap next to exploration and Monte Carlo scoring on a CPU."""
    cut_explorations: bool = False
    """End an exploration after an expert prefix at its first action when that action is
    the expert's (status `cut`, no outcome): no pair compares it (a step pair needs another
    action; trajectory pairs come from the prefix-0 episodes, never cut), yet playing such
    episodes to the end of the game was most of an exploration stage's turns. The pairs are
    those of a run without it."""
    dev_split: str = "dev"
    dev_limit: int = Field(8, gt=0)
    evaluate_base: bool = True
    max_steps: int | None = Field(None, gt=0)
    """Episode step bound; the env's own bound when unset or lower."""
    step_timeout_s: float = Field(60.0, gt=0)
    """An env step running longer fails its rollout (env_error) instead of hanging the run."""
    iterations: int = Field(1, gt=0)
    seed: Seed = 0
    generation: GenerationConfig = GenerationConfig()
    prompt: PromptConfig = PromptConfig()
    monte_carlo: MonteCarloConfig = MonteCarloConfig()
    step_reward_model: Path | None = None
    """A step reward model folder (`ipr train reward-model`) whose predictions replace the
    Monte Carlo step rewards (paper 5.5); unset: MC with the SFT model as scorer."""
    step_reward_model_from: int = Field(1, ge=1)
    """The first iteration the step reward model scores; earlier ones use MC. Paper 5.5's
    use: run iteration 1 with MC, `ipr train reward-model` on its rows, then resume with
    `step_reward_model` set and this at 2 (iteration 1's results stay valid)."""
    mining: MiningConfig = MiningConfig()
    vllm: VLLMConfig = Field(VLLMConfig(), validate_default=True)
    openai: OpenAIConfig | None = Field(None, validate_default=True)

    @field_validator("vllm")
    @classmethod
    def _lora_rank_fits_vllm(cls, value: VLLMConfig, info: ValidationInfo) -> VLLMConfig:
        if info.data.get("backend") != "vllm":
            return value
        rank = largest_lora_rank(info.data.get("sft"), info.data.get("mixture"))
        if rank is not None and rank > value.max_lora_rank:
            raise ValueError(f"max_lora_rank {value.max_lora_rank} is below the LoRA rank {rank}")
        return value

    @field_validator("mixture")
    @classmethod
    def _weights_belong_to_custom(cls, value: MixtureConfig, info: ValidationInfo) -> MixtureConfig:
        """A method other than `custom` brings its own weights: silently training with
        them instead of the ones the config spells out would mislabel an ablation."""
        name = info.data.get("method")
        spec = REGISTRY.get(name) if isinstance(name, str) else None
        custom = spec is not None and spec.reads_config_weights
        fixed = None if spec is None else spec.weights
        if not custom and "weights" in value.model_fields_set and value.weights != fixed:
            raise ValueError(
                f"weights are fixed by method {name!r}; set method: custom to train with these"
            )
        return value

    @field_validator("compute")
    @classmethod
    def _stages_fit_the_processes(cls, value: ComputeConfig, info: ValidationInfo) -> ComputeConfig:
        for stage in (info.data.get("sft"), info.data.get("mixture")):
            if stage is not None:
                check_layout(stage, value)
        return value

    @field_validator("openai")
    @classmethod
    def _openai_needs_a_server(
        cls, value: OpenAIConfig | None, info: ValidationInfo
    ) -> OpenAIConfig | None:
        if value is None and info.data.get("backend") == "openai":
            raise ValueError("backend 'openai' needs this section with at least base_url")
        return value

    @property
    def lora_rank(self) -> int | None:
        """The largest LoRA rank any training stage uses (None: every stage trains in full)."""
        return largest_lora_rank(self.sft, self.mixture)

    scale_out: ScaleOutConfig | None = None
    """None: each step reward stage runs in the flow's process."""

    @classmethod
    def from_record(cls, text: str) -> RunConfig:
        """A config as a run recorded it (`runs.config`, a full dump): the dump spells out
        the mixture weights, which only `custom` may set, so a method's own are left to it."""
        data = json.loads(text)
        spec = REGISTRY.get(data.get("method", "ipr"))
        if spec is not None and not spec.reads_config_weights:
            data.get("mixture", {}).pop("weights", None)
        return cls.model_validate(data)

    @property
    def mixture_settings(self) -> MixtureConfig | None:
        """The mixture of `method` (None for a method that trains none: sft, rft)."""
        spec = method(self.method)
        if spec.training != "mixture":
            return None
        if spec.reads_config_weights:
            return self.mixture
        return self.mixture.model_copy(update={"weights": spec.weights})

    @property
    def needs(self) -> Needs:
        """What each iteration of the run's method needs (`ipr_core.training.methods`)."""
        mixture = self.mixture_settings
        return method(self.method).needs(None if mixture is None else mixture.weights)

    @property
    def checkpoints_dir(self) -> Path:
        return checkpoints_dir(self.cache_dir)


def checkpoints_dir(cache_dir: Path) -> Path:
    """Where a cache keeps its trained checkpoints (`ipr_core.training.checkpoints`)."""
    return cache_dir / "checkpoints"


def load_config(path: Path, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Read a YAML preset with `overrides` set (`with_overrides`); errors name the file and
    the offending field."""
    data = with_overrides(read_yaml_mapping(path), overrides or {}, path)
    return validate_config(RunConfig, data, path)


def with_overrides(
    data: dict[str, Any], overrides: Mapping[str, Any], path: Path
) -> dict[str, Any]:
    """`data` with each setting of `overrides` set, a dotted key reaching into sections
    (`mixture.lr`); validation of the result then names a misspelt key like one in the file."""
    for key, value in overrides.items():
        parts = key.split(".")
        node = data
        for depth, part in enumerate(parts[:-1], start=1):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                section = ".".join(parts[:depth])
                raise InputError(str(path), f"{section} is not a section of settings", field=key)
            node = child
        node[parts[-1]] = value
    return data


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """The command line's `--set KEY=VALUE` items: dotted keys, values read as YAML
    (`5.0e-5`, `[0, 1]`, `null`, `{enabled: false}`)."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not all(key.split(".")):
            raise InputError("--set", f"expected KEY=VALUE with a dotted KEY, got {item!r}")
        try:
            overrides[key] = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise InputError("--set", f"{text!r} is not a YAML value", field=key) from exc
    return overrides


MAX_CONFIG_BYTES = 1 << 20
"""A config is a few kilobytes; a file over a megabyte is not one."""


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """The mapping at the top of a UTF-8 YAML file; every error is one line naming the file."""
    text = read_text(path, MAX_CONFIG_BYTES)
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except _DuplicateKey as exc:
        message = f"duplicate key (line {exc.line}); a YAML mapping names each key once"
        raise InputError(str(path), message, field=exc.key) from exc
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise InputError(str(path), f"not valid YAML{where}: {exc.problem}") from exc
    except yaml.YAMLError as exc:
        raise InputError(str(path), f"not valid YAML: {' '.join(str(exc).split())}") from exc
    except RecursionError as exc:
        raise InputError(str(path), "not valid YAML: nested too deeply") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(str(path), f"expected a mapping of settings, got {kind_of(data)}")
    return data


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: str, line: int):
        super().__init__(key)
        self.key, self.line = key, line


class _UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.safe_load`, except that a key written twice in one mapping is an error: YAML
    would keep the last silently, and a setting the user wrote would be ignored."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue  # the base class names the unhashable key
            if key in seen:
                raise _DuplicateKey(str(key), key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep)


def validate_config(model: type[ConfigT], data: Any, path: Path) -> ConfigT:
    """Validate `data` as `model`; the error names the file and the first bad field."""
    found = _bool_for_number(model, data)
    if found is not None:
        raise InputError(str(path), "expected a number, got a boolean", field=found)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"] if part != "[key]")  # a bad key
        raise InputError(str(path), first["msg"], field=field) from exc


def _bool_for_number(model: type[BaseModel], data: Any, loc: tuple[str, ...] = ()) -> str | None:
    """The first number field that `data` gives a boolean (pydantic would read `yes` as 1)."""
    if not isinstance(data, dict):
        return None
    for name, value in data.items():
        field = model.model_fields.get(name) if isinstance(name, str) else None
        if field is None:
            continue
        types = get_args(field.annotation) or (field.annotation,)
        where = (*loc, name)
        if isinstance(value, bool) and bool not in types and any(t in (int, float) for t in types):
            return ".".join(where)
        for kind in types:
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                found = _bool_for_number(kind, value, where)
                if found is not None:
                    return found
    return None
