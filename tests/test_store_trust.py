"""`ipr sql` reaches nothing but the store, and a store that is not one (a text file, an
older schema) is refused in one line before anything is written."""

import subprocess
import sys
import textwrap
from pathlib import Path

import duckdb
import pytest

from flows.cli import main
from ipr_core.store.store import SCHEMA, Store

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
