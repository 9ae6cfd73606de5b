import pytest

from ipr_core.config import load_config
from ipr_core.errors import InputError


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
