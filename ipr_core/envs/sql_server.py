"""A private MariaDB server that the SQL environments run their queries on.

The project starts its own server rather than using a system one: its data directory lives
under `.ipr/mariadb/` (or `$IPR_MARIADB_DIR`), it listens on a unix socket in that folder
and on no network port, and it runs as the current user (`--user` is passed because
mariadbd refuses to run as root otherwise). Nothing outside the folder is read or written:
`--no-defaults` keeps the machine's `/etc/mysql` configuration out.

Lifecycle: the first process that needs the server starts it (under a file lock, so two
processes never start two servers on one data directory), polls until it answers and stops
it cleanly (`SHUTDOWN`) when it exits. Another process that finds it running uses it; a
server whose starting process died (a hard kill) is adopted by the next process that uses
it, which then stops it at its exit. A server that stopped answering (killed, crashed) is
started again by the next `ensure_running`; InnoDB recovers its data.

Accounts: the administrative account is the current OS user over the socket (unix_socket
authentication, created by `mariadb-install-db`); it loads data. Agents connect as
`ipr_agent`, which may only read (SELECT, SHOW VIEW) the databases loaded from dumps, so no
model output can change a database. Its password is no secret: the server accepts only
local connections through a socket inside the project folder.

Dumps are loaded once: the sha256 of each loaded dump is recorded in `ipr_meta.loaded_dumps`,
so loading again is a lookup. Statements that manage accounts (CREATE USER, GRANT, ...) are
left out of a dump: only this module creates accounts on the server.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pymysql

from ipr_core.envs.base import EnvCrashed

ROOT_ENV_VAR = "IPR_MARIADB_DIR"
DEFAULT_ROOT = Path(__file__).resolve().parents[2] / ".ipr" / "mariadb"
AGENT_USER = "ipr_agent"
AGENT_PASSWORD = "ipr_agent"
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 60.0
POLL_INTERVAL_S = 0.05

# Small memory and disk footprint: the Spider databases are a few MB. Table names are
# case-insensitive as on InterCode's server (its gold SQL spells table names differently
# from its dump), which must be fixed when the data directory is created.
_COMMON_OPTIONS = (
    "--lower-case-table-names=1",
    "--innodb-buffer-pool-size=32M",
    "--innodb-log-file-size=8M",
)
_SERVER_OPTIONS = (
    *_COMMON_OPTIONS,
    "--skip-networking",
    "--skip-name-resolve",
    "--performance-schema=OFF",
    "--max-connections=256",
    "--character-set-server=utf8mb4",
    "--collation-server=utf8mb4_general_ci",
)
_ACCOUNT_STATEMENT = re.compile(
    r"^\s*(CREATE\s+USER|ALTER\s+USER|DROP\s+USER|RENAME\s+USER|GRANT|REVOKE|SET\s+PASSWORD"
    r"|FLUSH\s+PRIVILEGES)\b",
    re.IGNORECASE,
)
_CREATE_DATABASE = re.compile(
    r"^\s*CREATE\s+(?:DATABASE|SCHEMA)\s+(?:IF\s+NOT\s+EXISTS\s+)?`?([A-Za-z0-9_$]+)`?",
    re.IGNORECASE | re.MULTILINE,
)
_INSTALL_HINT = "install MariaDB with scripts/setup_system.sh (apt: mariadb-server mariadb-client)"


def _find_program(*names: str) -> str:
    for name in names:
        found = shutil.which(name) or next(
            (str(p) for d in ("/usr/sbin", "/usr/bin") if (p := Path(d) / name).is_file()), None
        )
        if found:
            return found
    raise EnvCrashed(f"MariaDB program {names[0]!r} not found: {_INSTALL_HINT}")


def _os_user() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _tail(path: Path, lines: int = 8) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no error log)"


class MariaDbServer:
    """One private server on the data directory under `root`."""

    def __init__(self, root: Path):
        self.root = root
        self.datadir = root / "data"
        self.pid_file = root / "mysqld.pid"
        self.error_log = root / "error.log"
        self.owner_file = root / "owner.pid"
        self.lock_file = root / "lock"
        socket = root / "mysqld.sock"
        if len(str(socket)) > 100:  # unix socket paths are limited to ~108 bytes
            digest = hashlib.sha1(str(root).encode()).hexdigest()[:12]
            socket = Path(tempfile.gettempdir()) / f"ipr-mariadb-{digest}.sock"
        self.socket = socket
        self._lock = threading.RLock()
        self._process: subprocess.Popen[bytes] | None = None
        self._owner = False
        self._stop_registered = False
        self._loaded: dict[str, tuple[str, ...]] = {}

    # -- connections ---------------------------------------------------------------------
    def connect_admin(self, timeout: float = 10.0) -> pymysql.Connection:
        return pymysql.connect(
            unix_socket=str(self.socket),
            user=_os_user(),
            autocommit=True,
            charset="utf8mb4",
            connect_timeout=timeout,
            read_timeout=timeout,
            ssl_disabled=True,  # a local socket: TLS would only cost a CA load (~0.1 s) per connect
        )

    def connect_agent(self, database: str, read_timeout: float) -> pymysql.Connection:
        """A read-only session in `database`; `read_timeout` bounds every wait on the server."""
        return pymysql.connect(
            unix_socket=str(self.socket),
            user=AGENT_USER,
            password=AGENT_PASSWORD,
            database=database,
            autocommit=True,
            charset="utf8mb4",
            connect_timeout=10,
            read_timeout=read_timeout,
            write_timeout=read_timeout,
            ssl_disabled=True,
        )

    def answers(self, timeout: float = 5.0) -> bool:
        """Whether the server accepts an administrative connection now."""
        if not self.socket.exists():
            return False
        try:
            with contextlib.closing(self.connect_admin(timeout)) as conn:
                conn.ping(reconnect=False)
        except (pymysql.err.MySQLError, OSError):
            return False
        return True

    def kill_connection(self, thread_id: int) -> None:
        """End a session (and its statement) if it is still there."""
        with (
            contextlib.suppress(pymysql.err.MySQLError, OSError),
            contextlib.closing(self.connect_admin()) as conn,
            conn.cursor() as cur,
        ):
            cur.execute("KILL %s", (thread_id,))

    def pid(self) -> int | None:
        """The server process id, from its pid file."""
        return _read_pid(self.pid_file)

    # -- lifecycle -----------------------------------------------------------------------
    def ensure_running(self) -> None:
        """Start the server, or use (and, if orphaned, adopt) the one already running."""
        with self._lock, self._file_lock():
            if self.answers():
                self._adopt_if_orphaned()
                return
            self._kill_stale_server()
            self._initialise_datadir()
            self._start()
            self._ensure_agent_account()

    def stop(self) -> None:
        """Shut the server down cleanly if this process owns it."""
        with self._lock:
            if not self._owner:
                return
            pid = self.pid()
            with (
                contextlib.suppress(pymysql.err.MySQLError, OSError),
                contextlib.closing(self.connect_admin(30.0)) as conn,
                conn.cursor() as cur,
            ):
                cur.execute("SHUTDOWN")
            if not self._wait_for_exit(pid, STOP_TIMEOUT_S) and pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                self._wait_for_exit(pid, 10.0)
            self._owner = False
            self._process = None
            with contextlib.suppress(OSError):
                self.owner_file.unlink()

    def _start(self) -> None:
        mariadbd = _find_program("mariadbd", "mysqld")
        with contextlib.suppress(OSError):
            self.socket.unlink()  # stale: nothing answered on it
        command = [
            mariadbd,
            "--no-defaults",
            f"--datadir={self.datadir}",
            f"--socket={self.socket}",
            f"--pid-file={self.pid_file}",
            f"--log-error={self.error_log}",
            f"--user={_os_user()}",
            *_SERVER_OPTIONS,
        ]
        # Own session: a Ctrl-C meant for this process does not kill the server mid-write;
        # it is stopped cleanly at exit instead.
        self._process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.answers(timeout=2.0):
            code = self._process.poll()
            if code is not None:
                raise EnvCrashed(
                    f"MariaDB exited with code {code} while starting; {self.error_log}:\n"
                    + _tail(self.error_log)
                )
            if time.monotonic() > deadline:
                self._process.kill()
                raise EnvCrashed(
                    f"MariaDB did not answer within {START_TIMEOUT_S:.0f} s; "
                    f"{self.error_log}:\n" + _tail(self.error_log)
                )
            time.sleep(POLL_INTERVAL_S)
        self._claim()

    def _claim(self) -> None:
        self.owner_file.write_text(str(os.getpid()))
        self._owner = True
        if not self._stop_registered:
            atexit.register(self.stop)
            self._stop_registered = True

    def _adopt_if_orphaned(self) -> None:
        owner = _read_pid(self.owner_file)
        if owner is None or owner == os.getpid() or not _process_alive(owner):
            self._claim()

    def _kill_stale_server(self) -> None:
        """A server of this data directory that runs but does not answer is hung: end it."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        pid = self.pid()
        if pid is None or not _process_alive(pid):
            return
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return
        if f"--datadir={self.datadir}".encode() in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            self._wait_for_exit(pid, 30.0)

    def _wait_for_exit(self, pid: int | None, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process is not None and self._process.pid == pid:
                if self._process.poll() is not None:
                    return True
            elif pid is None or not _process_alive(pid):
                return True
            time.sleep(POLL_INTERVAL_S)
        return False

    def _initialise_datadir(self) -> None:
        if (self.datadir / "mysql").is_dir():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / "data.partial"
        shutil.rmtree(staging, ignore_errors=True)
        command = [
            _find_program("mariadb-install-db", "mysql_install_db"),
            "--no-defaults",
            f"--datadir={staging}",
            f"--user={_os_user()}",
            "--auth-root-authentication-method=socket",
            "--skip-test-db",
            *_COMMON_OPTIONS,
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise EnvCrashed(
                f"mariadb-install-db failed ({done.returncode}): {done.stderr.strip()[-2000:]}"
            )
        staging.rename(self.datadir)  # a half-made data directory is never used

    def _ensure_agent_account(self) -> None:
        with contextlib.closing(self.connect_admin()) as conn, conn.cursor() as cur:
            cur.execute(
                "CREATE USER IF NOT EXISTS %s@'localhost' IDENTIFIED BY %s",
                (AGENT_USER, AGENT_PASSWORD),
            )

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        """Serialise starting and loading across processes sharing this data directory."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.lock_file, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # -- data ----------------------------------------------------------------------------
    def ensure_dump_loaded(self, dump: Path) -> tuple[str, ...]:
        """Load a MySQL dump once; returns its databases, readable by the agent account."""
        data = dump.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest in self._loaded:
            return self._loaded[digest]
        with self._lock, self._file_lock():
            databases = self._recorded_databases(digest)
            if databases is None:
                databases = self._load(dump, data.decode("utf-8"), digest)
            self._loaded[digest] = databases
            return databases

    def _recorded_databases(self, digest: str) -> tuple[str, ...] | None:
        with contextlib.closing(self.connect_admin()) as conn, conn.cursor() as cur:
            cur.execute("CREATE DATABASE IF NOT EXISTS ipr_meta")
            cur.execute(
                "CREATE TABLE IF NOT EXISTS ipr_meta.loaded_dumps (sha256 CHAR(64) PRIMARY KEY, "
                "source TEXT NOT NULL, databases_json TEXT NOT NULL, "
                "loaded_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP)"
            )
            cur.execute(
                "SELECT databases_json FROM ipr_meta.loaded_dumps WHERE sha256 = %s", (digest,)
            )
            row = cur.fetchone()
        return None if row is None else tuple(json.loads(row[0]))

    def _load(self, dump: Path, text: str, digest: str) -> tuple[str, ...]:
        kept = [line for line in text.splitlines() if not _ACCOUNT_STATEMENT.match(line)]
        databases = tuple(dict.fromkeys(m.lower() for m in _CREATE_DATABASE.findall(text)))
        if not databases:
            raise EnvCrashed(f"{dump}: the dump creates no database (no CREATE DATABASE)")
        client = _find_program("mariadb", "mysql")
        done = subprocess.run(
            [client, "--no-defaults", f"--socket={self.socket}", f"--user={_os_user()}", "--batch"],
            input="\n".join(kept) + "\n",
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise EnvCrashed(f"{dump}: loading into MariaDB failed: {done.stderr.strip()[-2000:]}")
        with contextlib.closing(self.connect_admin()) as conn, conn.cursor() as cur:
            for name in databases:
                cur.execute(
                    f"GRANT SELECT, SHOW VIEW ON `{name}`.* TO %s@'localhost'", (AGENT_USER,)
                )
            cur.execute(
                "INSERT INTO ipr_meta.loaded_dumps (sha256, source, databases_json) "
                "VALUES (%s, %s, %s)",
                (digest, str(dump), json.dumps(databases)),
            )
        return databases


_SHARED: MariaDbServer | None = None
_SHARED_LOCK = threading.Lock()


def shared_server() -> MariaDbServer:
    """The process's server object for `$IPR_MARIADB_DIR` (default `.ipr/mariadb`)."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None:
            _SHARED = MariaDbServer(Path(os.environ.get(ROOT_ENV_VAR) or DEFAULT_ROOT))
        return _SHARED
