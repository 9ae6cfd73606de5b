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
