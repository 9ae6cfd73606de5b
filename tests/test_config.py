import importlib
import pkgutil
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
import pytest
from pydantic import BaseModel
from pydantic.fields import FieldInfo

import flows
import ipr_core
from flows.commands import main
from ipr_core.config import RunConfig, load_config, parse_overrides
from ipr_core.errors import InputError
from ipr_core.run.experiment import load_experiment_config
from ipr_core.training.methods import REGISTRY

ROOT_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_loads_preset_with_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("env: twx/coin\nmonte_carlo: {n_samples: 3}\nmining: {step_margin: 0.2}\n")
    config = load_config(path)
    assert config.monte_carlo.n_samples == 3
    assert config.mining.step_margin == 0.2
    assert config.mixture_settings.weights.step_dpo == 1.0  # the `ipr` preset


def test_method_sets_the_mixture_weights(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("env: twx/coin\nmethod: eto\nmixture: {beta: 0.3}\n")
    settings = load_config(path).mixture_settings
    assert (settings.weights.step_dpo, settings.weights.sft, settings.beta) == (0.0, 0.0, 0.3)
    path.write_text("env: twx/coin\nmethod: sft\n")
    assert load_config(path).mixture_settings is None
    path.write_text("env: twx/coin\nmethod: custom\nmixture: {weights: {sft: 0.0}}\n")
    assert load_config(path).mixture_settings.weights.sft == 0.0
    path.write_text("env: twx/coin\nmethod: eto\nmixture: {weights: {step_dpo: 0, sft: 0}}\n")
    assert load_config(path).mixture_settings.weights.trajectory_dpo == 1.0  # = the preset


@pytest.mark.parametrize(
    "text, field",
    [
        ("model: x\n", "env"),
        ("env: twx/coin\nmonte_carlo: {n_samples: 0}\n", "monte_carlo.n_samples"),
        ("env: twx/coin\nmining: {step_mode: sideways}\n", "mining.step_mode"),
        ("env: twx/coin\nitterations: 2\n", "itterations"),
        ("env: twx/coin\nmixture: {weights: {sft: 0.0}}\n", "mixture"),
        ("env: twx/coin\nmining: {step_margin: -5}\n", "mining.step_margin"),
        ("env: twx/coin\nmining: {trajectory_margin: 1.0}\n", "mining.trajectory_margin"),
        ("env: twx/coin\nmonte_carlo: {temperature: -0.5}\n", "monte_carlo.temperature"),
        ("env: twx/coin\nmixture: {beta: 0}\n", "mixture.beta"),
        ("env: twx/coin\nseed: -1\n", "seed"),
    ],
)
def test_bad_config_names_file_and_field(tmp_path, text, field):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(InputError) as info:
        load_config(path)
    assert "bad.yaml" in str(info.value) and repr(field) in str(info.value)


@pytest.mark.parametrize(
    "text, field",
    [
        ("backend: sglang\n", "backend"),
        ("backend: openai\n", "openai"),
        ("backend: openai\nopenai: {base_url: localhost:8000}\n", "openai.base_url"),
        ("backend: vllm\nvllm: {max_lora_rank: 48}\n", "vllm.max_lora_rank"),
        ("backend: vllm\nvllm: {gpu_memory_utilization: 1.5}\n", "vllm.gpu_memory_utilization"),
        ("backend: vllm\nvllm: {max_lora_rank: 8}\nsft: {lora: {enabled: true, r: 16}}\n", "vllm"),
    ],
)
def test_bad_backend_settings_name_the_field(tmp_path, text, field):
    path = tmp_path / "bad.yaml"
    path.write_text("env: twx/coin\n" + text)
    with pytest.raises(InputError) as info:
        load_config(path)
    assert repr(field) in str(info.value)


def test_backend_settings(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "env: twx/coin\nbackend: openai\nopenai: {base_url: 'http://127.0.0.1:8000/v1'}\n"
    )
    config = load_config(path)
    assert config.openai.base_url == "http://127.0.0.1:8000/v1" and config.openai.model is None
    path.write_text(
        "env: twx/coin\nbackend: vllm\nvllm: {tensor_parallel_size: 2}\n"
        "mixture: {lora: {enabled: true, r: 32}}\n"
    )
    config = load_config(path)
    assert config.vllm.tensor_parallel_size == 2 and config.lora_rank == 32
    # The LoRA rank is checked only where vLLM serves the adapters.
    path.write_text("env: twx/coin\nvllm: {max_lora_rank: 8}\nsft: {lora: {enabled: true}}\n")
    assert load_config(path).lora_rank == 16


EXPERIMENT = Path(__file__).resolve().parents[1] / "configs" / "experiment-smoke.yaml"


def test_set_items_override_nested_settings_of_run_and_experiment_configs(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("env: twx/coin\nmixture: {beta: 0.3}\n")
    overrides = parse_overrides(["mixture.lr=5.0e-5", "iterations=3", "mining.step_mode=action"])
    config = load_config(path, overrides)
    assert (config.mixture.lr, config.mixture.beta) == (5e-5, 0.3)  # the file's beta stays
    assert (config.iterations, config.mining.step_mode) == (3, "action")
    items = ["experiment_id=tune-e", "seeds=[3, 4]", "run.mixture.lr=1.0e-4"]
    experiment = load_experiment_config(EXPERIMENT, items, store=tmp_path / "x.duckdb")
    assert (experiment.experiment_id, experiment.seeds) == ("tune-e", [3, 4])
    assert experiment.run.mixture.lr == 1e-4 and experiment.run.store == tmp_path / "x.duckdb"


@pytest.mark.parametrize(
    "item, message",
    [
        ("mixture.lr", r"--set: expected KEY=VALUE"),
        ("mixture..lr=1", r"--set: expected KEY=VALUE"),
        ("mixture.lrr=1", r"c.yaml, field 'mixture.lrr': Extra inputs"),
        ("mixture.lr=fast", r"c.yaml, field 'mixture.lr': Input should be a valid number"),
        ("env.game=coin", r"c.yaml, field 'env.game': env is not a section"),
        ("iterations=[1", r"--set, field 'iterations': '\[1' is not a YAML value"),
    ],
)
def test_a_bad_set_item_is_a_named_error(tmp_path, item, message):
    path = tmp_path / "c.yaml"
    path.write_text("env: twx/coin\n")
    with pytest.raises(InputError, match=message):
        load_config(path, parse_overrides([item]))


def test_the_command_line_reports_a_bad_set_item_in_one_line_with_exit_code_2(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("env: twx/coin\n")
    assert main(["estimate", "--config", str(path), "--set", "mixture.lrr=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "field 'mixture.lrr'" in err


BOUNDS = (annotated_types.Gt, annotated_types.Ge, annotated_types.Lt, annotated_types.Le)


def _unbounded(annotation: Any, metadata: list[Any], where: str) -> list[str]:
    """The numbers in `annotation` (a field's type, its items' types) that no bound limits."""
    if get_origin(annotation) is Annotated:
        base, *inner = get_args(annotation)
        inner = [c for m in inner for c in (m.metadata if isinstance(m, FieldInfo) else [m])]
        return _unbounded(base, [*metadata, *inner], where)
    if annotation in (int, float):
        return [] if any(isinstance(m, BOUNDS) for m in metadata) else [where]
    if get_origin(annotation) is Literal:
        return []
    found = []
    for arg in get_args(annotation):  # Optional's members, a list's or a dict's items
        kept = metadata if get_origin(annotation) in (Union, types.UnionType) else []
        found += _unbounded(arg, kept, where)
    return found


def _config_models() -> list[type[BaseModel]]:
    """Every pydantic model the project defines (all its modules imported)."""
    for package in (ipr_core, flows):
        for module in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            importlib.import_module(module.name)
    found, queue = [], [BaseModel]
    while queue:
        for model in queue.pop().__subclasses__():
            queue.append(model)
            if model.__module__.split(".")[0] in ("ipr_core", "flows"):
                found.append(model)
    return found


def test_every_numeric_setting_has_a_range_or_a_stated_reason():
    """A number a config accepts has the range its meaning allows (a negative margin, a
    zero learning rate fail at load), or says in `json_schema_extra` why it has none."""
    models = _config_models()
    assert {"RunConfig", "MiningConfig", "ExperimentConfig", "RewardModelConfig"} <= {
        model.__name__ for model in models
    }
    unbounded = []
    for model in models:
        for name, field in model.model_fields.items():
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
            if not extra.get("unbounded"):
                where = f"{model.__module__}.{model.__name__}.{name}"
                unbounded += _unbounded(field.annotation, list(field.metadata), where)
    assert unbounded == []


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_a_recorded_run_config_reads_back_for_every_method(method):
    """`runs.config` is a full dump, mixture weights included, which only `custom` may set:
    reading it back (`ipr estimate` takes training units from it) must not refuse it."""
    overrides = {"method": method}
    if method == "custom":
        overrides["mixture"] = {"weights": {"trajectory_dpo": 1.0, "step_dpo": 0.5, "sft": 0.0}}
    config = load_config(ROOT_CONFIGS / "demo.yaml", overrides)
    assert RunConfig.from_record(config.model_dump_json()) == config
