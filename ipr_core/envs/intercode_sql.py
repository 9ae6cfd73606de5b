"""InterCode-SQL adapter: the `intercode-sql` environment.

InterCode-SQL (Yang et al., NeurIPS 2023 Datasets and Benchmarks) asks natural-language
questions about Spider databases; the agent answers by running SQL on a MySQL server and
ends with `submit`. The databases and questions are those the `intercode-bench` package
ships (installed without its dependencies and never imported: only its data files are
read), the server is the project's private MariaDB (`sql_server.py`).

Semantics, as in InterCode and IPR's use of it:
- An action is one SQL statement, or `submit`. The agent's session starts in the task's
  database (InterCode runs `use <db>` before the episode).
- A result set is shown as the Python list of row tuples, cut at 350 characters plus
  "..." (IPR's InterCode-SQL wrapper; InterCode's own agents cut at 500-1000 characters);
  a failed statement as "Error executing query: <server message>"; a statement without
  a result set as "[Executed Successfully with No Output]".
- The outcome reward compares the rows of the last executed statement with the gold
  query's rows (`intercode_reward`). It is final on `submit` and when the episode reaches
  `max_steps` (10 turns, the paper's bound); before that, every step reports the reward
  the episode would get if it ended there.

Safety: the agent's SQL runs as a read-only account (SELECT only) with MariaDB's
`max_statement_time` set before every statement, `sql_select_limit` bounding result
size, and a client read timeout as a last resort, so no model output can change a
database or hang an episode. A server that stops (or restarts) under an episode raises
`EnvCrashed` (the rollout is an env_error) and is started again, so the next reset works.

Tasks: the 23 question/gold-SQL pairs of `intercode-bench` (`sql_queries.csv`), split by
database so no database is shared between splits (as Spider splits its own data):
train = pets_1, course_teach, cre_Doc_Template_Mgt, wta_1 (13 questions); dev =
battle_death, student_transcripts_tracking (5); test = network_1, dog_kennels (5).
Task ids are `<split>-<row of the csv>`. Users' own InterCode files (`ic_spider_*.json`,
a JSON list of {query, gold, db, ...}) replace a split unchanged when
`IPR_INTERCODE_SQL_TRAIN` / `_DEV` / `_TEST` name them (task ids `<split>-<index>`);
their databases must be loaded: the shipped Spider dev dump always is, and
`IPR_INTERCODE_SQL_DUMPS` adds further MySQL dumps (paths separated by ':').
"""

from __future__ import annotations

import contextlib
import csv
import functools
import importlib.util
import json
import math
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pymysql

from ipr_core.envs.base import EnvCrashed, EnvTask, StepResult
from ipr_core.envs.sql_server import shared_server
from ipr_core.errors import InputError

ENV_ID = "intercode-sql"
SPLITS = ("train", "dev", "test")
MAX_STEPS = 10
STATEMENT_TIMEOUT_S = 5.0
MAX_RESULT_ROWS = 10_000
"""A bigger result is an error: no Spider dev question needs more (the largest table has 4079)."""
OBSERVATION_CHARS = 350
NO_OUTPUT = "[Executed Successfully with No Output]"
ERROR_PREFIX = "Error executing query: "
SPLIT_FILE_VARS = {split: f"IPR_INTERCODE_SQL_{split.upper()}" for split in SPLITS}
DUMPS_VAR = "IPR_INTERCODE_SQL_DUMPS"
SHIPPED_SPLIT_OF_DB = {
    "pets_1": "train",
    "course_teach": "train",
    "cre_Doc_Template_Mgt": "train",
    "wta_1": "train",
    "battle_death": "dev",
    "student_transcripts_tracking": "dev",
    "network_1": "test",
    "dog_kennels": "test",
}
ACTION_HINT = (
    "You are connected to a read-only MySQL database. Each action is ONE MySQL statement "
    "on a single line, ending with ';', e.g. 'SHOW TABLES;', 'DESCRIBE student;' or "
    "'SELECT name FROM student WHERE age > 20;'. The result of your last statement is your "
    "answer: once it answers the question, reply with the action 'submit'."
)

Rows = list[tuple[Any, ...]]


@dataclass(frozen=True)
class SqlTask:
    """One question, with the record it came from (for error messages)."""

    source: str
    index: int
    question: str
    gold: str
    db: str


# -- reward -------------------------------------------------------------------------------
def intercode_reward(agent_rows: Rows | None, gold_rows: Rows) -> float:
    """InterCode-SQL's outcome reward of the agent's last result against the gold result.

    Rows are compared as strings. The reward is the multiset intersection over union of the
    two row lists (1 when both are empty, 0 when the agent's last statement gave no result
    set); when they share rows, it is scaled by Kendall's tau-b between the shared rows in
    the agent's order and in the gold order, and rounded to 2 decimals. Reversed order
    makes tau negative: clamped to 0, the protocol's range.
    """
    if agent_rows is None:
        return 0.0
    agent = [str(row) for row in agent_rows]
    gold = [str(row) for row in gold_rows]
    agent_counts, gold_counts = Counter(agent), Counter(gold)
    union = agent_counts | gold_counts
    if not union:
        return 1.0
    shared = agent_counts & gold_counts
    reward = sum(shared.values()) / sum(union.values())
    if shared:
        tau = kendall_tau_b(_keep_shared(agent, shared), _keep_shared(gold, shared))
        if not math.isnan(tau):
            reward = float(np.round(tau * reward, 2))
    return min(max(reward, 0.0), 1.0)


def _keep_shared(rows: list[str], shared: Counter[str]) -> list[str]:
    """The rows in order, each kept as often as it is shared."""
    left = Counter(shared)
    kept = []
    for row in rows:
        if left[row] > 0:
            left[row] -= 1
            kept.append(row)
    return kept


def kendall_tau_b(x: Sequence[str], y: Sequence[str]) -> float:
    """Kendall's tau-b of the pairs (x[i], y[i]) (values ordered as strings), as
    scipy.stats.kendalltau computes it; NaN when x or y is constant."""
    n = len(x)
    rank = {value: i for i, value in enumerate(sorted(set(x) | set(y)))}
    xr = np.array([rank[v] for v in x], dtype=np.int64)
    yr = np.array([rank[v] for v in y], dtype=np.int64)
    concordance = x_ties = y_ties = 0
    for i in range(n - 1):  # n <= MAX_RESULT_ROWS: one vectorised row of pairs at a time
        dx, dy = np.sign(xr[i + 1 :] - xr[i]), np.sign(yr[i + 1 :] - yr[i])
        concordance += int((dx * dy).sum())
        x_ties += int((dx == 0).sum())
        y_ties += int((dy == 0).sum())
    pairs = n * (n - 1) // 2
    if x_ties == pairs or y_ties == pairs:
        return math.nan
    tau = concordance / math.sqrt(pairs - x_ties) / math.sqrt(pairs - y_ties)
    return min(1.0, max(-1.0, tau))


# -- observations and actions -------------------------------------------------------------
def render_rows(rows: Rows | None) -> str:
    if rows is None:
        return NO_OUTPUT
    text = str(rows)
    return text[:OBSERVATION_CHARS] + "..." if len(text) > OBSERVATION_CHARS else text


_FENCE = re.compile(r"^```[a-zA-Z]*\s*(.*?)\s*```$", re.DOTALL)
_LANGUAGE_TAG = re.compile(r"^(?:my)?sql\s+(?=\S)", re.IGNORECASE)


def normalise_action(action: str) -> str:
    """The statement inside a markdown code fence, without a leading language tag.

    The ReAct parser strips backticks around an action, so "```sql SELECT 1```" reaches
    here as "sql SELECT 1"; no SQL statement starts with the word "sql".
    """
    text = action.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1)
    return _LANGUAGE_TAG.sub("", text).strip()


def is_submit(action: str) -> bool:
    return action.rstrip(";.! ").strip().lower() == "submit"


# -- tasks --------------------------------------------------------------------------------
def intercode_assets() -> Path:
    """The data folder of the installed `intercode-bench` package, found without importing
    it (its __init__ needs docker and gymnasium, which this project does not install)."""
    spec = importlib.util.find_spec("intercode")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the intercode-bench package is not installed (`make venv` installs it: "
            "pip install --no-deps intercode-bench==0.1.22)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "assets" / "datasets"


def _checked(source: str, index: int, record: object) -> SqlTask:
    if not isinstance(record, dict):
        raise InputError(source, "expected an object with query, gold and db", record=str(index))
    for field in ("query", "gold", "db"):
        value = record.get(field)
        if not isinstance(value, str) or not value.strip():
            raise InputError(source, "missing or empty text", record=str(index), field=field)
    return SqlTask(source, index, record["query"].strip(), record["gold"].strip(), record["db"])


@functools.lru_cache(maxsize=16)
def _read_task_file(path: str, _mtime_ns: int, _size: int) -> tuple[SqlTask, ...]:
    """An InterCode task file (cached per content version: 32 env instances read it once)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(path, f"cannot read task file: {exc.strerror}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(path, f"not valid JSON: {exc}") from exc
    if not isinstance(data, list):
        raise InputError(path, "expected a JSON list of {query, gold, db} records")
    return tuple(_checked(path, i, record) for i, record in enumerate(data))


def load_task_file(path: Path) -> tuple[SqlTask, ...]:
    try:
        stat = path.stat()
    except OSError as exc:
        raise InputError(str(path), f"cannot read task file: {exc.strerror}") from exc
    return _read_task_file(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=1)
def shipped_tasks() -> dict[str, tuple[SqlTask, ...]]:
    """intercode-bench's question/gold pairs, split by database."""
    path = intercode_assets() / "sql_queries.csv"
    with open(path, encoding="utf-8", newline="") as handle:
        records = list(csv.DictReader(handle))
    splits: dict[str, list[SqlTask]] = {split: [] for split in SPLITS}
    for index, record in enumerate(records):
        task = _checked(str(path), index, record)
        if task.db not in SHIPPED_SPLIT_OF_DB:
            raise InputError(
                str(path), f"database {task.db!r} has no split", record=str(index), field="db"
            )
        splits[SHIPPED_SPLIT_OF_DB[task.db]].append(task)
    return {split: tuple(tasks) for split, tasks in splits.items()}


def configured_dumps() -> list[Path]:
    """The shipped Spider dev dump, then the users' dumps of `IPR_INTERCODE_SQL_DUMPS`."""
    extra = [Path(p) for p in os.environ.get(DUMPS_VAR, "").split(os.pathsep) if p.strip()]
    for path in extra:
        if not path.is_file():
            raise InputError(DUMPS_VAR, f"no such dump file: {path}")
    return [intercode_assets() / "spider_dev.sql", *extra]


# -- the environment ----------------------------------------------------------------------
class InterCodeSqlEnv:
    """InterCode-SQL on the project's private MariaDB server."""

    def __init__(self, statement_timeout_s: float = STATEMENT_TIMEOUT_S):
        self.env_id = ENV_ID
        self.max_steps = MAX_STEPS
        self.action_hint = ACTION_HINT
        self.statement_timeout_s = statement_timeout_s
        shipped = shipped_tasks()
        self._tasks: dict[str, dict[int, SqlTask]] = {}
        for split in SPLITS:
            user_file = os.environ.get(SPLIT_FILE_VARS[split], "").strip()
            tasks = load_task_file(Path(user_file)) if user_file else shipped[split]
            self._tasks[split] = {task.index: task for task in tasks}
        self._dumps = configured_dumps()
        self._server = shared_server()
        self._start_server()
        self._conn: pymysql.Connection | None = None
        self._server_pid: int | None = None
        """The server process the session was opened on: a different one means a restart."""
        self._task: SqlTask | None = None
        self._gold_rows: Rows = []
        self._last_rows: Rows | None = None
        self._last_observation = ""
        self._last: StepResult | None = None
        self._steps = 0

    def task_ids(self, split: str) -> list[str]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
        return [f"{split}-{index}" for index in self._tasks[split]]

    def reset(self, task_id: str) -> EnvTask:
        split, _, index = task_id.partition("-")
        if split not in SPLITS or not index.isdigit() or int(index) not in self._tasks[split]:
            raise ValueError(f"{self.env_id}: unknown task id {task_id!r}")
        task = self._tasks[split][int(index)]
        self._disconnect()
        self._task, self._steps, self._last_rows = task, 0, None
        self._conn = self._connect(task)
        self._gold_rows = self._gold_result(task)
        self._last_observation = f"You are connected to the MySQL database '{task.db}'."
        self._last = StepResult(self._last_observation, done=False, reward=0.0)
        return EnvTask(
            env_id=self.env_id,
            task_id=task_id,
            split=split,
            instruction=task.question,
            initial_observation=self._last_observation,
            action_hint=self.action_hint,
        )

    def step(self, action: str) -> StepResult:
        if self._last is None or self._task is None:
            raise RuntimeError(f"{self.env_id}: step() before reset()")
        if self._last.done:
            return self._last
        statement = normalise_action(action)
        self._steps += 1
        submitted = is_submit(statement)
        if not submitted:
            self._last_observation = self._execute(statement)
        done = submitted or self._steps >= self.max_steps
        reward = intercode_reward(self._last_rows, self._gold_rows)
        self._last = StepResult(self._last_observation, done=done, reward=reward)
        return self._last

    def gold_actions(self) -> list[str] | None:
        """The gold query (ended with ';', which also keeps a final quote through ReAct
        parsing) and `submit`."""
        if self._task is None:
            return None
        return [self._task.gold.rstrip("; \n") + ";", "submit"]

    def close(self) -> None:
        self._disconnect()
        self._task, self._last = None, None

    # -- statements ----------------------------------------------------------------------
    def _execute(self, statement: str) -> str:
        """Run the agent's statement; any failure of the statement is an observation."""
        assert self._conn is not None and self._task is not None
        self._last_rows = None
        try:
            rows = self._query(self._conn, statement)
        except pymysql.err.MySQLError as exc:
            if _connection_lost(exc):
                self._recover_session(exc)
            else:
                self._check_session()
            return ERROR_PREFIX + _message(exc)
        if rows is not None and len(rows) > MAX_RESULT_ROWS:
            return f"{ERROR_PREFIX}the result has more than {MAX_RESULT_ROWS} rows"
        self._last_rows = rows
        return render_rows(rows)

    def _query(self, conn: pymysql.Connection, statement: str) -> Rows | None:
        with conn.cursor() as cur:
            # Set before every statement: the agent may have changed its session variables.
            cur.execute(
                "SET SESSION max_statement_time = %s, sql_select_limit = %s",
                (self.statement_timeout_s, MAX_RESULT_ROWS + 1),
            )
            cur.execute(statement)  # no arguments: a '%' in the SQL stays as written
            return None if cur.description is None else list(cur.fetchall())

    def _gold_result(self, task: SqlTask) -> Rows:
        assert self._conn is not None
        try:
            rows = self._query(self._conn, task.gold)
        except pymysql.err.MySQLError as exc:
            if _connection_lost(exc):
                raise self._crash("lost the server running the gold SQL", exc) from exc
            raise InputError(
                task.source, f"gold SQL fails: {_message(exc)}", str(task.index), "gold"
            ) from exc
        if rows is None or len(rows) > MAX_RESULT_ROWS:
            raise InputError(
                task.source,
                f"gold SQL must return a result set of at most {MAX_RESULT_ROWS} rows",
                str(task.index),
                "gold",
            )
        return rows

    # -- connections ---------------------------------------------------------------------
    def _start_server(self) -> None:
        self._server.ensure_running()
        for dump in self._dumps:
            self._server.ensure_dump_loaded(dump)

    def _connect(self, task: SqlTask) -> pymysql.Connection:
        """A fresh read-only session in the task's database (fresh: no state carries over)."""
        read_timeout = self.statement_timeout_s + 10.0  # the server's own limit acts first
        try:
            conn = self._server.connect_agent(task.db, read_timeout)
        except pymysql.err.OperationalError as exc:
            if exc.args and exc.args[0] in (1044, 1049):  # no such (readable) database
                raise InputError(
                    task.source,
                    f"database {task.db!r} is not loaded (add its dump to {DUMPS_VAR})",
                    str(task.index),
                    "db",
                ) from exc
            raise self._crash("cannot connect to MariaDB", exc) from exc
        self._server_pid = self._server.pid()
        return conn

    def _recover_session(self, exc: pymysql.err.MySQLError) -> None:
        """The connection broke: a crash if the server stopped or was restarted meanwhile,
        else (the agent killed its session, a read timed out) a fresh session."""
        assert self._conn is not None and self._task is not None
        thread_id = self._conn.thread_id()
        self._disconnect()
        if not self._server.answers() or self._server.pid() != self._server_pid:
            raise self._crash("the MariaDB server stopped", exc) from exc
        self._server.kill_connection(thread_id)  # its statement may still be running
        self._conn = self._connect(self._task)

    def _crash(self, what: str, exc: BaseException) -> EnvCrashed:
        """The server failed under this episode: the episode is an env failure, and the
        server is started again so that the next reset works."""
        self._disconnect()
        try:
            self._start_server()
            after = "MariaDB answers again"
        except (EnvCrashed, pymysql.err.MySQLError, OSError) as restart_exc:
            after = f"starting MariaDB again failed too: {restart_exc}"
        return EnvCrashed(f"{self.env_id}: {what} ({exc}); {after}")

    def _check_session(self) -> None:
        """After an error the session may be gone (e.g. the agent ran KILL CONNECTION_ID())."""
        assert self._conn is not None
        try:
            self._conn.ping(reconnect=False)
        except pymysql.err.MySQLError as exc:
            self._recover_session(exc)

    def _disconnect(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):  # the socket may already be dead
                self._conn.close()
            self._conn = None


def _connection_lost(exc: pymysql.err.MySQLError) -> bool:
    """Client-side errors (codes 2000+, or no code) mean the connection, not the SQL, failed."""
    if isinstance(exc, pymysql.err.InterfaceError):
        return True
    code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else 0
    return isinstance(exc, pymysql.err.OperationalError) and code >= 2000


def _message(exc: pymysql.err.MySQLError) -> str:
    return str(exc.args[1]) if len(exc.args) > 1 else str(exc)
