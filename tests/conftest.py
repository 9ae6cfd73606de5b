"""Shared fixtures. Tests never reach a model hub: every model is built or loaded locally."""

import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from ipr_core.envs.sql_server import DEFAULT_ROOT, ROOT_ENV_VAR  # noqa: E402

# A MariaDB server per pytest-xdist worker: some tests kill the server on purpose, which must
# not break the queries of a module that another worker runs at that moment.
if worker := os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ[ROOT_ENV_VAR] = f"{os.environ.get(ROOT_ENV_VAR) or DEFAULT_ROOT}-{worker}"

from ipr_core.engine.models import build_tiny_llama  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    """A tiny random Llama with a ChatML tokenizer, built once per test session."""
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, tiny_model_path):
    """One `ipr run --no-prefect` of the smoke config (tests/test_flows.py compares the
    Prefect flow's rows with it); the tiny model is linked into the run's model cache."""
    from ipr_core.config import load_config
    from ipr_core.run.direct import run_pipeline
    from ipr_core.store.store import Store

    cache = tmp_path_factory.mktemp("ipr")
    (cache / "models").mkdir()
    (cache / "models" / "tiny-llama").symlink_to(tiny_model_path)
    overrides = {"store": str(cache / "run.duckdb"), "cache_dir": str(cache)}
    config = load_config(Path(__file__).parents[1] / "configs" / "smoke.yaml", overrides)
    summary = run_pipeline(config, log=lambda _: None)
    return config, Store(config.store), summary


@pytest.fixture(scope="session")
def two_task_mc_config():
    """Builds the config of Monte Carlo over the first 2 tasks of `twx/arithmetic` (5 gold
    steps each: 10 expert steps) with the tiny model, N = 2: what the scale-out and chunk
    tests score."""
    from ipr_core.config import GenerationConfig, MonteCarloConfig, RunConfig

    def make(run_id: str, store: Path, max_live: int) -> RunConfig:
        return RunConfig(
            run_id=run_id,
            env="twx/arithmetic",
            model="tiny-llama",
            store=store,
            cache_dir=store.parent,
            train_limit=2,
            max_steps=6,
            seed=3,
            generation=GenerationConfig(
                max_new_tokens=16, max_batch_size=32, max_live_episodes=max_live
            ),
            monte_carlo=MonteCarloConfig(n_samples=2, temperature=1.0),
        )

    return make


@pytest.fixture(scope="session", autouse=True)
def stop_prefect_server():
    """Stop Prefect's ephemeral API server (if a test started one) while the session's
    streams are open: left to Prefect's atexit hook, its "Stopping temporary server" log
    line goes to a stream pytest has closed ("Logging error ... I/O operation on closed
    file")."""
    yield
    if "prefect.server.api.server" in sys.modules:  # never import Prefect just for this
        from prefect.server.api.server import SubprocessASGIServer

        SubprocessASGIServer().stop()
