"""The Prefect layer: the `ipr` flow on ephemeral Prefect, caching, resume after a kill,
and `ipr serve` + `prefect deployment run ipr/iterate`."""

import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Prefect reads its settings at import: a private home for this module, set first.
PREFECT_HOME = Path(tempfile.mkdtemp(prefix="ipr-prefect-"))
os.environ["PREFECT_HOME"] = str(PREFECT_HOME)
os.environ.pop("PREFECT_API_URL", None)

import duckdb  # noqa: E402
import httpx  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterStartTime  # noqa: E402

from flows import ipr_flow  # noqa: E402
from ipr_core.config import load_config  # noqa: E402
from ipr_core.store.store import Store  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IPR = str(Path(sys.executable).parent / "ipr")
TABLES = ["expert_trajectories", "rollouts", "step_rewards", "pairs", "evaluations", "checkpoints"]
PAIR_COLUMNS = (
    "iteration, level, task_id, prefix_len, mode, prompt, chosen, rejected, chosen_actor, "
    "chosen_reward, rejected_reward, chosen_outcome, rejected_outcome"
)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, tiny_model_path) -> Path:
    cache = tmp_path_factory.mktemp("ipr-cache")
    (cache / "models").mkdir()
    (cache / "models" / "tiny-llama").symlink_to(tiny_model_path)
    return cache


def smoke_config(store: Path, cache_dir: Path):
    overrides = {"store": str(store), "cache_dir": str(cache_dir)}
    return load_config(ROOT / "configs" / "smoke.yaml", overrides)


def counts(store: Store) -> dict[str, int]:
    return {table: store.count(table) for table in TABLES}


def task_runs_since(started: float) -> list:
    """Every task run of the flow runs (the `ipr` flow and its subflows) started after."""
    from datetime import UTC, datetime

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterStartTime,
    )

    after = datetime.fromtimestamp(started, UTC)
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(after_=after))
        )
        ids = [run.id for run in runs]
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))


@pytest.fixture(scope="module")
def smoke_flow(tmp_path_factory, cache_dir):
    """One uninterrupted `ipr` flow run of the smoke config (ephemeral Prefect)."""
    config = smoke_config(tmp_path_factory.mktemp("flow") / "run.duckdb", cache_dir)
    state = ipr_flow.ipr(config, return_state=True)
    assert state.is_completed(), state
    return config, Store(config.store), state.result()


def test_flow_fills_every_table(smoke_flow):
    config, store, rows = smoke_flow
    assert [row["iteration"] for row in rows] == [-1, 0, 1]
    assert store.count("rollouts", "kind = 'explore'") > 0
    assert store.count("rollouts", "kind = 'mc'") > 0
    assert store.count("step_rewards", "actor = 'expert'") > 0
    assert store.count("step_rewards", "actor = 'agent'") > 0
    assert store.count("pairs", "level = 'trajectory'") >= 1
    assert store.count("pairs", "level = 'step'") >= 1
    assert store.count("evaluations") == 3


def test_the_run_publishes_tables_a_plot_and_progress(smoke_flow):
    """The iteration artifact carries the summary row and inline PNGs of its training steps
    and of the dev curve; every rollout stage filled a progress artifact."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterType

    with get_client(sync_client=True) as client:
        latest = client.read_latest_artifacts()
        progress = client.read_artifacts(
            artifact_filter=ArtifactFilter(type=ArtifactFilterType(any_=["progress"]))
        )
    by_key = {a.key: a for a in latest}
    markdown = by_key["smoke-iteration-1"].data
    assert "| iteration | trajectory_pairs | step_pairs |" in markdown
    figures = re.findall(r"!\[([^\]]+)\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", markdown)
    assert [alt for alt, _ in figures] == ["mixture training steps", "dev reward and average steps"]
    assert all(base64.b64decode(png).startswith(b"\x89PNG") for _, png in figures)
    assert "| iteration | wall_s | cpu_s |" in markdown and "| total |" in markdown
    config, store, _ = smoke_flow
    [example] = store.example_pairs(config.run_id, 1, 1)
    assert f"pair {example['id']}: run {config.run_id}, iteration 1" in markdown
    assert by_key["smoke-summary"].type == "table"
    labels = {a.description.split(":")[0] for a in progress}
    assert {"expert step rewards", "explore[1]", "agent step rewards[1]"} <= labels
    assert {"evaluate[-1]", "evaluate[0]", "evaluate[1]"} <= labels
    assert all(a.data == 100.0 for a in progress)


def test_a_rerun_finds_every_stage_recorded_and_changes_no_row(smoke_flow):
    """Prefect's cache is off: each stage task runs and its completion record, unchanged,
    says it is done."""
    config, store, rows = smoke_flow
    before = counts(store)
    records = "SELECT run_id, iteration, stage, created_at FROM stage_runs ORDER BY ALL"
    recorded = rows_of(store, records)
    started = time.time()
    state = ipr_flow.ipr(config, return_state=True)
    assert state.is_completed()
    assert state.result() == rows
    assert counts(store) == before and rows_of(store, records) == recorded
    names = {run.name: run.state.name for run in task_runs_since(started - 1)}
    assert "explore[1]" in names and "train-mixture[1]" in names
    assert {s for n, s in names.items() if not n.startswith("iteration")} == {"Completed"}


def test_a_stage_whose_rows_are_gone_is_recomputed(smoke_flow):
    config, store, _ = smoke_flow
    before = counts(store)
    with store.transaction() as con:  # as if the pairs were dropped by hand
        con.execute("DELETE FROM pairs WHERE run_id = ?", [config.run_id])
    ipr_flow.ipr(config)
    assert counts(store) == before


def pairs_of(store: Store) -> list[tuple]:
    return rows_of(store, f"SELECT {PAIR_COLUMNS} FROM pairs ORDER BY ALL")


def rows_of(store: Store, sql: str) -> list[tuple]:
    return list(store.query(sql).itertuples(index=False, name=None))


RESULTS = {
    "pairs": f"SELECT {PAIR_COLUMNS} FROM pairs ORDER BY ALL",
    "step_rewards": "SELECT * EXCLUDE (created_at) FROM step_rewards ORDER BY ALL",
    "evaluations": "SELECT * EXCLUDE (created_at) FROM evaluations ORDER BY ALL",
}
"""What a run produces; the same config gives the same rows through every entry point."""


def test_the_flow_and_the_plain_run_produce_the_same_rows(smoke_flow, smoke_run):
    """`ipr run` (this flow) and `ipr run --no-prefect` execute the same stages."""
    _, flow_store, _ = smoke_flow
    _, plain_store, _ = smoke_run
    for table, sql in RESULTS.items():
        rows = rows_of(flow_store, sql)
        assert rows and rows == rows_of(plain_store, sql), table


class KilledMidWrite(Exception):
    """Stands for a kill while the stage's transaction is open."""


def test_a_stage_interrupted_mid_write_is_redone_from_its_completion_record(
    tmp_path, cache_dir, smoke_flow, monkeypatch
):
    """The flow dies while `mine-pairs` writes (its pair rows are in the open transaction);
    `ipr run --no-prefect` resumes the run: the stages with a completion record are not
    redone, `mine-pairs` is, and the rows equal an uninterrupted run's."""
    from ipr_core.run.direct import run_pipeline
    from ipr_core.store import store as store_module

    _, reference, _ = smoke_flow
    config = smoke_config(tmp_path / "interrupted.duckdb", cache_dir)
    upsert = store_module.upsert

    def dies_after_writing_pairs(con, table, rows):
        written = upsert(con, table, rows)
        if table == "pairs":
            raise KilledMidWrite(f"{written} pair rows written, not committed")
        return written

    monkeypatch.setattr(store_module, "upsert", dies_after_writing_pairs)
    state = ipr_flow.ipr(config, return_state=True)
    assert state.is_failed() and "KilledMidWrite" in str(state.message) + repr(state)
    monkeypatch.undo()
    store = Store(config.store)
    assert store.count("pairs") == 0
    recorded = dict(rows_of(store, "SELECT stage, created_at FROM stage_runs"))
    assert "explore" in recorded and "mine-pairs" not in recorded

    log: list[str] = []
    run_pipeline(config, log=log.append)
    assert any(line.startswith("explore[1]: done before") for line in log)
    assert not any(line.startswith("mine-pairs[1]: done before") for line in log)
    after = dict(rows_of(store, "SELECT stage, created_at FROM stage_runs"))
    assert after["explore"] == recorded["explore"] and "mine-pairs" in after
    for table, sql in RESULTS.items():
        assert rows_of(store, sql) == rows_of(reference, sql), table


def test_a_failed_task_gives_the_flow_runs_its_one_line_cause(tmp_path, smoke_flow, monkeypatch):
    """`explore` fails inside the iteration subflow: its task run, the subflow run and the
    `ipr` flow run end with the same one-line cause (file, record and field named)."""
    from prefect.client.orchestration import get_client

    from ipr_core.errors import InputError
    from ipr_core.run import loop

    config, store, _ = smoke_flow
    copy = Path(shutil.copy(store.path, tmp_path / "copy.duckdb"))
    with duckdb.connect(str(copy)) as con:  # explore not done, and no run to copy it from
        con.execute("DELETE FROM stage_runs WHERE stage = 'explore'")

    def explodes(*args, **kwargs):
        raise InputError("policy.json", "expected a number\nmore detail", "r1", "temperature")

    monkeypatch.setattr(loop, "explore", explodes)
    started = time.time()
    state = ipr_flow.ipr(config.model_copy(update={"store": copy}), return_state=True)
    assert state.is_failed()
    cause = (
        "stage 'explore' failed (run 'smoke', iteration 1): InputError: policy.json, "
        "record 'r1', field 'temperature': expected a number"
    )
    after = FlowRunFilter(start_time=FlowRunFilterStartTime(after_=_utc(started - 1)))
    with get_client(sync_client=True) as client:
        flows = {
            run.name: run.state.message for run in client.read_flow_runs(flow_run_filter=after)
        }
    tasks = {run.name: run.state.message for run in task_runs_since(started - 1)}
    messages = [state.message, flows["ipr-smoke"], flows["iteration-1"], tasks["explore[1]"]]
    for message in messages:
        assert message.endswith(cause) and "\n" not in message, message


def _utc(timestamp: float):
    from datetime import UTC, datetime

    return datetime.fromtimestamp(timestamp, UTC)


@pytest.fixture(scope="module")
def experiment_runs(tmp_path_factory, cache_dir):
    """The smoke experiment (sft and ipr, seed 0) as the `experiment` flow and with
    `--no-prefect`, each in its own store (the second finds the models the first trained)."""
    from flows import experiment
    from ipr_core.run.experiment import load_experiment_config, run_experiment

    folder = tmp_path_factory.mktemp("experiment")
    config = load_experiment_config(ROOT / "configs" / "experiment-smoke.yaml")
    run = config.run.model_copy(update={"cache_dir": cache_dir, "store": folder / "flow.duckdb"})
    config = config.model_copy(update={"methods": ["sft", "ipr"], "seeds": [0], "run": run})
    started = time.time()
    state = experiment.experiment(config, return_state=True)
    assert state.is_completed(), state
    plain = run.model_copy(update={"store": folder / "plain.duckdb"})
    run_experiment(config.model_copy(update={"run": plain}), log=lambda _: None)
    return started, Store(run.store), Store(plain.store)


def test_the_experiment_flow_runs_each_run_and_iteration_as_a_subflow(experiment_runs):
    from prefect.client.orchestration import get_client

    started, _, _ = experiment_runs
    after = FlowRunFilter(start_time=FlowRunFilterStartTime(after_=_utc(started - 1)))
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=after)
        flow_names = {run.flow_id: client.read_flow(run.flow_id).name for run in runs}
        by_name = {run.name: run for run in runs}

        def parent(name: str) -> str:
            task_run = client.read_task_run(by_name[name].parent_task_run_id)
            return next(run.name for run in runs if run.id == task_run.flow_run_id)

        assert {run.name: flow_names[run.flow_id] for run in runs} == {
            "experiment-smoke": "experiment",
            "sft-s0": "method-run",
            "ipr-s0": "method-run",
            "iteration-1": "iteration",
        }
        assert parent("sft-s0") == parent("ipr-s0") == "experiment-smoke"
        assert parent("iteration-1") == "ipr-s0"
        assert all(run.state.is_completed() for run in runs)


def test_the_experiment_flow_and_the_plain_experiment_record_the_same_stages(experiment_runs):
    _, flow_store, plain_store = experiment_runs
    stages = "SELECT run_id, iteration, stage, fingerprint FROM stage_runs ORDER BY ALL"
    assert rows_of(flow_store, stages) == rows_of(plain_store, stages)
    for table, sql in RESULTS.items():
        rows = rows_of(flow_store, sql)
        assert rows and rows == rows_of(plain_store, sql), table
    # the SFT model is a stage of each run: its completion record and its cost row
    for store in (flow_store, plain_store):
        sft = "stage = 'sft' AND run_id IN ('smoke-sft-s0', 'smoke-ipr-s0')"
        assert store.count("stage_runs", sft) == store.count("stage_costs", sft) == 2


def test_killed_run_resumes_to_the_same_pairs(tmp_path, cache_dir, smoke_flow):
    """SIGKILL mid-iteration (once iteration 1 is explored), restart with the same run id:
    the resumed run reuses finished stages and its pairs equal an uninterrupted run's."""
    _, reference, _ = smoke_flow
    store_path = tmp_path / "killed.duckdb"
    data = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    data.update(store=str(store_path), cache_dir=str(cache_dir))
    config_file = tmp_path / "smoke.yaml"
    config_file.write_text(yaml.safe_dump(data))
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect"))
    cmd = [IPR, "run", "--config", str(config_file), "--run-id", "smoke"]
    log = (tmp_path / "killed.log").open("w")
    first = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)  # fmt: skip
    store = Store(store_path, lock_timeout_s=30)
    deadline = time.monotonic() + 600
    try:
        while store.count("rollouts", "kind = 'explore' AND iteration = 1") == 0:
            assert first.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no exploration rollouts in time"
            time.sleep(0.5)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the CLI and its ephemeral Prefect server
        first.wait()
    assert store.count("pairs") == 0  # killed before mining

    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    output = resumed.stdout + resumed.stderr
    for stage in ("ingest", "sft", "expert-step-rewards"):
        assert f"{stage}[" in output
    assert "sft: done before" in output  # finished stages were not redone

    assert pairs_of(store) == pairs_of(reference)
    for table in ("rollouts", "step_rewards", "evaluations"):
        assert store.count(table) == reference.count(table), table


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_line(process: subprocess.Popen, text: str, timeout_s: float) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            if process.poll() is not None:
                break
            continue
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"no {text!r} from ipr serve:\n{''.join(lines)[-3000:]}")


def test_serve_deployment_run_completes(tmp_path, smoke_flow):
    """`ipr serve` + `prefect deployment run ipr/iterate --watch`: Completed, with the
    iteration subflow and artifacts in the API. The results of `smoke_flow` are shared, so
    the run is cached (the uncached path is what the tests above cover)."""
    config, _, _ = smoke_flow
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = dict(
        os.environ,
        PREFECT_HOME=str(tmp_path / "prefect"),
        PREFECT_RESULTS_LOCAL_STORAGE_PATH=str(PREFECT_HOME / "storage"),
    )
    serve = subprocess.Popen(
        [IPR, "serve", "--port", str(port), "--pool", "ipr-test"],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        wait_for_line(serve, "Ctrl-C stops", timeout_s=240)
        params = json.dumps({"config": config.model_dump(mode="json")})
        run = subprocess.run(
            [sys.executable, "-m", "prefect", "deployment", "run", "ipr/iterate", "--watch",
             "--params", params],
            env=dict(env, PREFECT_API_URL=api), cwd=ROOT, capture_output=True, text=True,
            timeout=300,
        )  # fmt: skip
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert "Completed" in run.stdout
        flow_runs = httpx.post(f"{api}/flow_runs/filter", json={}).json()
        names = {fr["name"]: fr["state_type"] for fr in flow_runs}
        assert names.get("iteration-1") == "COMPLETED" and names.get("ipr-smoke") == "COMPLETED"
        artifacts = {a["key"] for a in httpx.post(f"{api}/artifacts/filter", json={}).json()}
        assert {"smoke-iteration-1", "smoke-summary"} <= artifacts
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            rest, _ = serve.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
            raise
    assert serve.returncode == 0, rest[-2000:]
    assert "stopping worker, then server" in rest
