"""The InterCode-SQL adapter on the project's private MariaDB server (started by these tests
through `ipr_core.envs.sql_server`, on first use and reused)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.commands import main
from ipr_core.envs import EnvCrashed, known_env_ids, make_env
from ipr_core.envs.intercode_sql import (
    DUMPS_VAR,
    ERROR_PREFIX,
    OBSERVATION_CHARS,
    SPLIT_FILE_VARS,
    InterCodeSqlEnv,
    intercode_reward,
    kendall_tau_b,
    normalise_action,
)
from ipr_core.envs.sql_server import MariaDbServer, shared_server
from ipr_core.errors import InputError, UnknownEnvError
from ipr_core.store.store import Store

ENV = "intercode-sql"


@pytest.fixture(scope="module")
def env() -> Iterator[InterCodeSqlEnv]:
    made = make_env(ENV)
    assert isinstance(made, InterCodeSqlEnv)
    yield made
    made.close()


def database_state() -> dict[str, object]:
    """Every loaded database's tables with their checksums and row counts (as the admin)."""
    with contextlib.closing(shared_server().connect_admin()) as conn, conn.cursor() as cur:
        cur.execute("SHOW DATABASES")
        state: dict[str, object] = {"databases": sorted(r[0] for r in cur.fetchall())}
        cur.execute(
            "SELECT table_schema, table_name FROM information_schema.tables WHERE table_schema "
            "NOT IN ('mysql', 'sys', 'information_schema', 'performance_schema') ORDER BY 1, 2"
        )
        for schema, table in cur.fetchall():
            cur.execute(f"CHECKSUM TABLE `{schema}`.`{table}`")
            checksum = cur.fetchone()[1]
            cur.execute(f"SELECT count(*) FROM `{schema}`.`{table}`")
            state[f"{schema}.{table}"] = (checksum, cur.fetchone()[0])
    return state


# -- the reward ---------------------------------------------------------------------------
def test_reward_is_iou_scaled_by_order_agreement() -> None:
    gold = [("a",), ("b",), ("c",)]
    assert intercode_reward(list(gold), gold) == 1.0
    assert intercode_reward([], []) == 1.0  # both empty
    assert intercode_reward(None, gold) == 0.0  # no result set (or an error) last
    assert intercode_reward([("x",)], gold) == 0.0
    assert intercode_reward([("a",), ("b",)], gold) == 0.67  # IoU 2/3, same order
    assert intercode_reward([("a",), ("c",), ("b",)], gold) == 0.33  # tau 1/3
    assert intercode_reward([("c",), ("b",), ("a",)], gold) == 0.0  # tau -1, clamped
    # Rows are a multiset: a duplicate counts in the union, so IoU 3/4; tau is over the
    # shared rows only ((a, b, c) in both orders: 1.0).
    assert intercode_reward([("a",), ("a",), ("b",), ("c",)], gold) == 0.75
    # A single shared row has no order: tau is undefined and the IoU stays unrounded.
    assert intercode_reward([("a",), ("z",), ("y",)], [("a",)]) == pytest.approx(1 / 3)


def test_kendall_tau_b_handles_ties_like_scipy() -> None:
    # tau-b = (C - D) / sqrt((n0 - ties_x)(n0 - ties_y)); values checked against scipy.
    assert kendall_tau_b(["1", "2", "3"], ["1", "3", "2"]) == pytest.approx(1 / 3)
    assert kendall_tau_b(["1", "1", "2"], ["1", "2", "3"]) == pytest.approx(0.8164965809)
    assert math.isnan(kendall_tau_b(["1", "1"], ["1", "2"]))  # x constant: undefined


def test_actions_in_code_fences_are_unwrapped() -> None:
    assert normalise_action("```sql\nSELECT 1;\n```") == "SELECT 1;"
    assert normalise_action("sql SELECT 1;") == "SELECT 1;"  # what ReAct parsing leaves of it
    assert normalise_action("  SHOW TABLES;  ") == "SHOW TABLES;"


# -- registry and tasks -------------------------------------------------------------------
def test_registry_has_a_family_without_variant() -> None:
    assert ENV in known_env_ids()
    for bad in ["intercode-sql/", "intercode-sql/spider"]:
        with pytest.raises(UnknownEnvError, match="known env ids"):
            make_env(bad)


def test_splits_are_by_database_stable_and_disjoint(env: InterCodeSqlEnv) -> None:
    splits = {split: env.task_ids(split) for split in ("train", "dev", "test")}
    assert splits == {
        "train": [f"train-{i}" for i in range(13)],
        "dev": [f"dev-{i}" for i in range(13, 18)],
        "test": [f"test-{i}" for i in range(18, 23)],
    }
    databases = {}
    for split, ids in splits.items():
        databases[split] = {env.reset(tid).initial_observation for tid in ids}
    assert not databases["train"] & databases["dev"]
    assert not databases["train"] & databases["test"]
    assert not databases["dev"] & databases["test"]
    with pytest.raises(ValueError, match="validation"):
        env.task_ids("validation")
    for bad in ["train-13", "dev-0", "train", "test-x"]:
        with pytest.raises(ValueError, match="unknown task id"):
            env.reset(bad)


def test_every_gold_query_replays_to_reward_one(env: InterCodeSqlEnv) -> None:
    for split in ("train", "dev", "test"):
        for task_id in env.task_ids(split):
            task = env.reset(task_id)
            gold = env.gold_actions()
            assert gold is not None and gold[-1] == "submit" and gold[0].endswith(";")
            first = env.step(gold[0])
            assert not first.done and first.reward == 1.0
            assert first.observation.startswith("[") and not first.observation.startswith(
                ERROR_PREFIX
            )
            last = env.step(gold[1])
            assert last.done and last.reward == 1.0, (task.task_id, last)
    again = env.reset("train-1")
    assert again == env.reset("train-1")  # deterministic per task id


def test_wrong_or_missing_answers_score_below_one(env: InterCodeSqlEnv) -> None:
    env.reset("train-3")  # first names of students with a cat or a dog: Linda, Tracy
    partial = env.step("SELECT Fname FROM Student;")  # every student's first name
    assert 0.0 < partial.reward < 1.0 and not partial.done
    assert len(partial.observation) == OBSERVATION_CHARS + 3 and partial.observation.endswith("...")
    assert env.step("submit").reward == partial.reward
    env.reset("train-3")
    assert env.step("submit").reward == 0.0  # nothing queried
    env.reset("train-3")
    cat_owners = env.step(
        "SELECT DISTINCT T1.Fname FROM Student AS T1 JOIN Has_Pet AS T2 ON T1.stuid = T2.stuid "
        "JOIN Pets AS T3 ON T3.petid = T2.petid WHERE T3.pettype = 'cat';"
    )
    assert 0.0 < cat_owners.reward < 1.0  # Linda only: IoU 1/2
    wrong = env.step("USE pets_1;")  # the last statement counts, and it has no result set
    assert wrong.observation == "[Executed Successfully with No Output]"
    assert env.step("submit").reward == 0.0


def test_max_steps_ends_the_episode_with_the_submit_reward(env: InterCodeSqlEnv) -> None:
    env.reset("dev-14")
    gold = env.gold_actions()
    assert gold is not None
    for _ in range(env.max_steps - 1):
        assert not env.step("SHOW TABLES;").done
    last = env.step(gold[0])
    assert last.done and last.reward == 1.0
    assert env.step("SELECT 1;") == last  # nothing runs after the end


# -- safety -------------------------------------------------------------------------------
WRITES = [
    "DROP TABLE pets;",
    "DELETE FROM pets;",
    "UPDATE pets SET pet_age = 0;",
    "INSERT INTO pets VALUES (9999, 'cat', 1, 1);",
    "CREATE TABLE stolen (a INT);",
    "CREATE DATABASE stolen;",
    "DROP DATABASE pets_1;",
    "TRUNCATE TABLE has_pet;",
    "ALTER TABLE pets ADD COLUMN x INT;",
    "GRANT ALL ON *.* TO 'ipr_agent'@'localhost';",
    "SET GLOBAL max_statement_time = 0;",
    "SELECT * FROM pets INTO OUTFILE '/tmp/ipr-stolen.txt';",
]


def test_writes_are_refused_and_leave_every_database_unchanged(env: InterCodeSqlEnv) -> None:
    before = database_state()
    env.reset("train-1")
    for statement in WRITES:
        result = env.step(statement)
        assert result.observation.startswith(ERROR_PREFIX), statement
        assert "denied" in result.observation, (statement, result.observation)
        env.reset("train-1")
    assert database_state() == before
    assert not Path("/tmp/ipr-stolen.txt").exists()


def test_long_statements_end_within_the_statement_timeout() -> None:
    env = InterCodeSqlEnv(statement_timeout_s=1.0)
    try:
        env.reset("train-1")
        for statement in [
            "SELECT SLEEP(100);",
            "SELECT count(*) FROM student a, student b, student c, student d, student e, "
            "student f;",
        ]:
            result = env.step(statement)
            assert result.observation.startswith(ERROR_PREFIX), statement
            assert "max_statement_time" in result.observation
        # The agent cannot lift its own limit: it is set again before every statement.
        env.step("SET SESSION max_statement_time = 0;")
        assert "max_statement_time" in env.step("SELECT SLEEP(100);").observation
        assert env.step("SELECT count(*) FROM pets;").observation == "[(3,)]"
    finally:
        env.close()


def test_results_beyond_the_row_limit_are_refused(env: InterCodeSqlEnv) -> None:
    env.reset("train-1")
    huge = env.step("SELECT * FROM student a, student b, student c;")  # 34^3 rows
    assert huge.observation == f"{ERROR_PREFIX}the result has more than 10000 rows"
    assert huge.reward == 0.0


def test_malformed_sql_gets_an_error_observation(env: InterCodeSqlEnv) -> None:
    env.reset("train-1")
    for statement in ["SELEC * FROM pets;", "", "SELECT 1; SELECT 2;", "SELECT nope FROM pets;"]:
        result = env.step(statement)
        assert result.observation.startswith(ERROR_PREFIX) and not result.done, statement
        assert result.reward == 0.0
    killed = env.step("KILL CONNECTION_ID();")  # the agent ends its own session
    assert killed.observation.startswith(ERROR_PREFIX)
    assert env.step("SELECT count(*) FROM pets;").observation == "[(3,)]"  # a new session


def test_a_killed_server_is_an_env_crash_and_the_next_reset_restarts_it() -> None:
    server = shared_server()
    env = make_env(ENV)
    try:
        env.reset("test-19")
        pid = server.pid()
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(EnvCrashed, match="MariaDB answers again"):
            env.step("SELECT 1;")
        env.reset("test-19")  # the same instance goes on with the restarted server
        assert server.pid() not in (None, pid)
        gold = env.gold_actions()
        assert gold is not None
        env.step(gold[0])
        assert env.step(gold[1]).reward == 1.0
    finally:
        env.close()


# -- users' task files and dumps ----------------------------------------------------------
def test_users_task_files_replace_a_split(tmp_path, monkeypatch) -> None:
    records = [
        {"query": "How many poker players are there?", "gold": "SELECT count(*) FROM poker_player",
         "db": "poker_player", "hardness": "easy", "db_tables": {}},
        {"query": "List the names of people.", "gold": "SELECT Name FROM people",
         "db": "poker_player"},
    ]  # fmt: skip
    path = tmp_path / "ic_spider_train.json"
    path.write_text(json.dumps(records))
    monkeypatch.setenv(SPLIT_FILE_VARS["train"], str(path))
    env = make_env(ENV)
    try:
        assert env.task_ids("train") == ["train-0", "train-1"]
        assert env.task_ids("dev") == [f"dev-{i}" for i in range(13, 18)]  # still shipped
        task = env.reset("train-0")
        assert task.instruction == records[0]["query"]
        gold = env.gold_actions()
        assert gold == ["SELECT count(*) FROM poker_player;", "submit"]
        env.step(gold[0])
        assert env.step(gold[1]).reward == 1.0
    finally:
        env.close()


def test_bad_task_files_name_the_record_and_field(tmp_path, monkeypatch) -> None:
    path = tmp_path / "ic_spider_dev.json"
    monkeypatch.setenv(SPLIT_FILE_VARS["dev"], str(path))
    path.write_text(json.dumps([{"query": "q", "gold": "SELECT 1", "db": "pets_1"},
                                {"query": "q", "db": "pets_1"}]))  # fmt: skip
    with pytest.raises(InputError, match=r"ic_spider_dev.json, record '1', field 'gold'"):
        make_env(ENV)
    path.write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        make_env(ENV)
    path.write_text(json.dumps([{"query": "q", "gold": "SELECT 1", "db": "no_such_db"}]))
    env = make_env(ENV)
    try:
        with pytest.raises(InputError, match=r"record '0', field 'db'.*no_such_db"):
            env.reset("dev-0")
    finally:
        env.close()


def test_users_dumps_load_once_without_their_accounts(tmp_path, monkeypatch) -> None:
    dump = tmp_path / "extra.sql"
    dump.write_text(
        "CREATE USER 'intruder'@'%' IDENTIFIED BY 'x';\n"
        "GRANT ALL PRIVILEGES ON *.* TO 'intruder'@'%';\n"
        "CREATE DATABASE IF NOT EXISTS `ipr_test_extra`;\n"
        "USE `ipr_test_extra`;\n"
        "DROP TABLE IF EXISTS `city`;\n"
        "CREATE TABLE `city` (`id` int PRIMARY KEY, `name` text);\n"
        "INSERT INTO `city` VALUES (1,'Lyon'),(2,'Turin');\n"
    )
    tasks = tmp_path / "tasks.json"
    tasks.write_text(json.dumps([{"query": "Name the cities.", "gold": "SELECT name FROM city "
                                  "ORDER BY id", "db": "ipr_test_extra"}]))  # fmt: skip
    digest = hashlib.sha256(dump.read_bytes()).hexdigest()  # the marker's key
    monkeypatch.setenv(DUMPS_VAR, str(dump))
    monkeypatch.setenv(SPLIT_FILE_VARS["test"], str(tasks))
    env = make_env(ENV)
    try:
        env.reset("test-0")
        gold = env.gold_actions()
        assert gold is not None
        assert env.step(gold[0]).observation == "[('Lyon',), ('Turin',)]"
        assert env.step(gold[1]).reward == 1.0
    finally:
        env.close()
    with contextlib.closing(shared_server().connect_admin()) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM mysql.user WHERE user = 'intruder'")
        assert cur.fetchone()[0] == 0
        cur.execute("SELECT source, loaded_at FROM ipr_meta.loaded_dumps WHERE sha256 = %s",
                    (digest,))  # fmt: skip
        marker = cur.fetchall()
    assert len(marker) == 1
    # A new process finds the marker and does not load again.
    fresh = MariaDbServer(shared_server().root)
    assert fresh.ensure_dump_loaded(dump) == ("ipr_test_extra",)
    with contextlib.closing(shared_server().connect_admin()) as conn, conn.cursor() as cur:
        cur.execute("SELECT source, loaded_at FROM ipr_meta.loaded_dumps WHERE sha256 = %s",
                    (digest,))  # fmt: skip
        assert cur.fetchall() == marker


# -- the server's lifecycle ---------------------------------------------------------------
def test_a_private_server_starts_answers_and_stops_cleanly(tmp_path) -> None:
    server = MariaDbServer(tmp_path / "mariadb")
    server.ensure_running()
    try:
        pid = server.pid()
        assert pid is not None and server.answers()
        assert server.socket.parent == server.root  # no network port: a socket in its folder
        server.ensure_running()  # running: reused, not started again
        assert server.pid() == pid
    finally:
        server.stop()
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{pid}").exists()
    assert not server.answers()
    assert "Shutdown complete" in server.error_log.read_text()


# -- ingest ------------------------------------------------------------------------------
def test_ingest_writes_expert_trajectories_with_reward_one(tmp_path) -> None:
    store_path = tmp_path / "x.duckdb"
    args = ["ingest", "--env", ENV, "--split", "train", "--limit", "3", "--store", str(store_path)]
    assert main(args) == 0
    experts = Store(store_path).expert_trajectories(ENV, "train")
    assert len(experts) == 3
    assert all(t.outcome_reward == 1.0 and len(t.steps) == 2 for t in experts)
    assert [s.action for s in experts[0].steps][1] == "submit"
