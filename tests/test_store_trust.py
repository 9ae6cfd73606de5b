"""`ipr sql` reaches nothing but the store, and a store that is not one (a text file, an
older schema) is refused in one line before anything is written."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import duckdb
import pytest

from flows.cli import main
from ipr_core.config import RunConfig
from ipr_core.run import loop
from ipr_core.run.context import RunContext
from ipr_core.store.store import ENV_ID_COLUMNS, SCHEMA, Store

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path) -> Path:
    path = tmp_path / "store.duckdb"
    Store(path).write({"runs": [{"run_id": "r1", "config": "{}"}]})
    return path


def sql(store: Path, query: str, capsys) -> tuple[int, str, str]:
    code = main(["sql", query, "--store", str(store)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_refused(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    assert err.startswith("error: query failed: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def test_a_query_answers(store, capsys):
    code, out, _ = sql(store, "SELECT run_id FROM runs", capsys)
    assert code == 0 and "r1" in out


def test_copy_to_a_file_is_refused_and_creates_nothing(store, tmp_path, capsys):
    target = tmp_path / "leak.csv"
    code, _, err = sql(store, f"COPY runs TO '{target}'", capsys)
    assert_refused(code, err, "Permission Error")
    assert not target.exists()


@pytest.mark.parametrize("reader", ["read_text", "read_csv", "read_json", "read_parquet"])
def test_reading_a_file_outside_the_store_is_refused(reader, store, tmp_path, capsys):
    outside = tmp_path / "secret.txt"
    outside.write_text("a,b\n1,2\n")
    code, out, err = sql(store, f"SELECT * FROM {reader}('{outside}')", capsys)
    assert_refused(code, err, "Permission Error")
    assert "1" not in out


def test_attach_is_refused(store, tmp_path, capsys):
    other = tmp_path / "other.duckdb"
    duckdb.connect(str(other)).close()
    code, _, err = sql(store, f"ATTACH '{other}' AS other", capsys)
    assert_refused(code, err, "Permission Error")


@pytest.mark.parametrize("statement", ["INSTALL httpfs", "LOAD httpfs", "LOAD '/tmp/x.ext'"])
def test_extensions_are_neither_installed_nor_loaded(statement, store, capsys):
    code, _, err = sql(store, statement, capsys)
    assert_refused(code, err, "Permission Error")


@pytest.mark.parametrize(
    "statement",
    [
        "SET enable_external_access = true",
        "RESET enable_external_access",
        "SET lock_configuration = false",
        "SET autoload_known_extensions = true",
        "SET allow_unsigned_extensions = true",
    ],
)
def test_settings_cannot_be_turned_back_on(statement, store, capsys):
    code, _, err = sql(store, statement, capsys)
    assert_refused(code, err, "locked")


def test_writes_to_the_store_are_refused(store, capsys):
    code, _, err = sql(store, "DELETE FROM runs", capsys)
    assert_refused(code, err, "read-only")
    assert Store(store).count("runs") == 1


def test_a_bad_query_is_one_line_with_duckdbs_message(store, capsys):
    code, _, err = sql(store, "SELEC run_id FROM runs", capsys)
    assert_refused(code, err, 'syntax error at or near "SELEC"')
    code, _, err = sql(store, "SELECT nope FROM runs", capsys)
    assert_refused(code, err, "nope")


def test_a_query_waits_for_a_writer_holding_the_lock(store, capsys):
    """A writer holds the file (as a stage's transaction does); the query retries on the
    lock and answers once the writer lets go."""
    holder = textwrap.dedent(
        f"""
        import sys, time, duckdb
        con = duckdb.connect({str(store)!r})
        con.execute("INSERT INTO runs (run_id, config) VALUES ('r2', '{{}}')")
        print("locked", flush=True)
        time.sleep(3)
        con.close()
        """
    )
    writer = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "locked"
        with pytest.raises(duckdb.IOException, match="lock"):
            duckdb.connect(str(store), read_only=True)  # the file is held right now
        code, out, err = sql(store, "SELECT count(*) AS n FROM runs", capsys)
    finally:
        writer.wait()
    assert code == 0, err
    assert out.split() == ["n", "2"]


def test_a_store_that_is_not_duckdb_is_refused_and_left_as_it_is(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a database\n")
    for argv in (
        ["sql", "SELECT 1", "--store", str(notes)],
        ["ingest", "--env", "twx/twc", "--limit", "1", "--store", str(notes)],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(notes) in err, err
        assert "not a DuckDB store" in err and "field '--store'" in err
    assert notes.read_text() == "not a database\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def _old_store(path: Path, rollouts: str) -> None:
    """A store as an older version wrote it: no `action_hint`, no `stage_runs`."""
    with duckdb.connect(str(path)) as con:
        experts = SCHEMA["expert_trajectories"].replace("action_hint VARCHAR,", "")
        con.execute(f"CREATE TABLE expert_trajectories ({experts})")
        con.execute(f"CREATE TABLE rollouts ({rollouts})")


def test_an_older_store_gains_the_new_tables_and_known_columns(tmp_path):
    path = tmp_path / "old.duckdb"
    _old_store(path, SCHEMA["rollouts"])
    store = Store(path)
    store.write({"runs": [{"run_id": "r1", "config": "{}"}]})
    assert store.table_exists("stage_runs")
    columns = store.query("DESCRIBE expert_trajectories")["column_name"].tolist()
    assert "action_hint" in columns


def test_a_store_lacking_a_column_it_cannot_migrate_is_refused_unchanged(tmp_path, capsys):
    path = tmp_path / "old.duckdb"
    _old_store(path, SCHEMA["rollouts"].replace("parse_failures INTEGER NOT NULL,", ""))
    assert main(["ingest", "--env", "twx/twc", "--limit", "1", "--store", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err, err
    assert "older schema" in err and "rollouts lacks parse_failures" in err
    with duckdb.connect(str(path), read_only=True) as con:
        tables = {t for (t,) in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
        hint = con.execute(
            "SELECT count(*) FROM duckdb_columns() WHERE column_name = 'action_hint'"
        ).fetchone()[0]
    assert tables == {"expert_trajectories", "rollouts"} and hint == 0


SHORT_ID = "twx/twc?locations=1"
FULL_ID = "twx/twc?locations=1&items=2&doors=0&inventory_limit=0"


def _store_of_short_ids(path: Path) -> RunConfig:
    """A store as ipr wrote it while ids left parameters at their default out: rows,
    configs and the ingest stage's completion record, fingerprinted with the short id."""
    config = RunConfig(run_id="r", env=SHORT_ID)
    expert = {
        "env_id": FULL_ID,
        "task_id": "train-0",
        "split": config.train_split,
        "source": "gold",
        "instruction": "Put the apple away.",
        "initial_observation": "",
        "steps": "[]",
        "n_steps": 2,
        "outcome_reward": 1.0,
    }
    settings = {"env": SHORT_ID, "train_split": config.train_split, "train_limit": 8}
    Store(path).write(
        {
            "runs": [{"run_id": "r", "config": config.model_dump_json()}],
            "experiments": [
                {"experiment_id": "e", "config": json.dumps({"run": {"env": SHORT_ID}})},
                {"experiment_id": "sql", "config": '{"run": {"env": "intercode-sql"}}'},
            ],
            "expert_trajectories": [expert],
            "stage_runs": [
                {
                    "run_id": "r",
                    "iteration": 0,
                    "stage": "ingest",
                    "fingerprint": loop.digest("ingest", settings),
                    "result": '{"experts": 1, "steps": 2}',
                    "row_counts": "[1]",
                }
            ],
        }
    )
    with duckdb.connect(str(path)) as con:
        con.execute("UPDATE expert_trajectories SET env_id = ?", [SHORT_ID])
        con.execute("UPDATE runs SET config = replace(config, ?, ?)", [FULL_ID, SHORT_ID])
        con.execute("DROP TABLE env_id_renames")
        con.execute("DROP TABLE store_migrations")
    return config


def test_a_store_of_short_env_ids_is_migrated_once_and_its_finished_stages_stay_done(tmp_path):
    path = tmp_path / "old.duckdb"
    config = _store_of_short_ids(path)
    store = Store(path)
    assert store.query("SELECT DISTINCT env_id FROM expert_trajectories")["env_id"].tolist() == [
        FULL_ID
    ]
    [run_config] = store.query("SELECT config FROM runs")["config"]
    assert RunConfig.model_validate_json(run_config).env == FULL_ID
    experiments = store.query("SELECT experiment_id, config FROM experiments ORDER BY 1")
    [short, bare] = experiments["config"]
    assert json.loads(short)["run"]["env"] == FULL_ID
    assert bare == '{"run": {"env": "intercode-sql"}}'  # an id already full is left alone
    renames = store.query("SELECT old_id, env_id FROM env_id_renames")
    assert renames.to_dict("records") == [{"old_id": SHORT_ID, "env_id": FULL_ID}]
    # The ingest stage finished before the migration is still done on resume.
    here = Path("unused")
    assert config.env == FULL_ID
    assert loop.is_done(loop.INGEST, RunContext(config, store), loop.Iteration(0, here, here))
    # Once: an id written in the short spelling after the migration stays as written.
    with duckdb.connect(str(path)) as con:
        con.execute("UPDATE expert_trajectories SET env_id = ?", [SHORT_ID])
    assert Store(path).count("expert_trajectories", "env_id = ?", [SHORT_ID]) == 1
    assert Store(path).count("store_migrations") == 1
    assert set(ENV_ID_COLUMNS) <= set(SCHEMA)
