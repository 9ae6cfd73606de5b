"""Every preset in configs/ loads with the project's loader; the GPU presets carry the
paper's settings. Env ids are plain strings to the loader, so this needs no env adapter."""

from pathlib import Path

import pytest
import yaml

from flows.bench import load_bench_config
from flows.bench_training import load_training_bench_config
from ipr_core.config import load_config
from ipr_core.run.experiment import load_experiment_config

CONFIGS = Path(__file__).parent.parent / "configs"
PAPER = {  # env: (tau, max turns, paper's training set size)
    "webshop": (0.01, 10, 1624),
    "alfworld": (0.5, 20, 2851),
    "intercode-sql": (0.1, 10, 1500),
}


def experiment_run(path: Path):
    """An experiment config's shared run settings."""
    return load_experiment_config(path).run


LOADERS = {"bench.yaml": load_bench_config, "bench-training.yaml": load_training_bench_config}
"""Files that are not run configs, with their own loaders; experiment configs (those with
an `experiment_id`) load with the experiment loader; the rest are run configs."""


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_preset_loads(path):
    is_experiment = "experiment_id" in yaml.safe_load(path.read_text())
    load = LOADERS.get(path.name, experiment_run if is_experiment else load_config)
    assert load(path).env  # a broken preset raises InputError naming file and field


@pytest.mark.parametrize("env", sorted(PAPER))
def test_gpu_presets_follow_the_paper(env):
    config = load_config(CONFIGS / f"{env}-gpu.yaml")
    tau, turns, train_size = PAPER[env]
    assert (config.env, config.backend, config.method) == (env, "vllm", "ipr")
    assert (config.mining.step_margin, config.max_steps, config.train_limit) == (
        tau, turns, train_size,
    )  # fmt: skip
    assert (config.monte_carlo.n_samples, config.monte_carlo.temperature) == (5, 1.0)
    assert (config.iterations, config.generation.max_new_tokens) == (4, 512)
    sft = config.sft
    assert sft is not None
    assert (sft.epochs, sft.lr, sft.batch_size * sft.grad_accum) == (3, 2e-5, 48)
    mixture = config.mixture_settings
    assert (mixture.epochs, mixture.lr, mixture.beta) == (3, 3e-6, 0.1)
    weights = mixture.weights
    assert (weights.trajectory_dpo, weights.step_dpo, weights.sft) == (1.0, 1.0, 1.0)
    assert config.lora_rank is None  # full fine-tuning
    assert config.model == "/path/to/Llama-2-7b-chat-hf"  # the placeholder users replace
