"""`ipr serve`: a local Prefect server, the `ipr-local` process pool, deployments
`ipr/iterate` and `experiment/reproduce` (from prefect.yaml) and a worker, as child
processes of one command.

Readiness is polled (`/api/health`) against a deadline, never slept for. Ctrl-C or
SIGTERM stops the worker first (it needs the server to finish cleanly), then the server.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tasks.settings import REPO_ROOT, configure_prefect_env

DEPLOYMENT = "ipr/iterate"
EXPERIMENT_DEPLOYMENT = "experiment/reproduce"


class ServeError(RuntimeError):
    pass


def prefect_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "prefect", *args]


def wait_healthy(url: str, process: subprocess.Popen, deadline_s: float) -> float:
    """Poll `<url>/health` until it answers 200; returns the seconds it took."""
    started = time.monotonic()
    delay = 0.1
    while True:
        if process.poll() is not None:
            raise ServeError(f"prefect server exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return time.monotonic() - started
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() - started > deadline_s:
            raise ServeError(f"prefect server not healthy at {url} after {deadline_s:.0f} s")
        time.sleep(delay)
        delay = min(delay * 1.5, 1.0)


def run_checked(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise ServeError(f"{shlex.join(cmd[2:])} failed:\n{done.stdout}{done.stderr}")
    return done


def ensure_pool(pool: str, env: dict[str, str]) -> bool:
    """Create the process work pool unless it exists; True if it was created."""
    found = subprocess.run(
        prefect_cmd("work-pool", "inspect", pool), env=env, capture_output=True, text=True
    )
    if found.returncode == 0:
        return False
    run_checked(prefect_cmd("work-pool", "create", pool, "--type", "process"), env)
    return True


def stop(process: subprocess.Popen | None, name: str, timeout_s: float = 30.0) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)  # both prefect commands shut down cleanly on SIGINT
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        print(f"{name} did not stop in {timeout_s:.0f} s; killing it", flush=True)
        process.kill()
        process.wait()


def run_command(config_path: Path) -> str:
    from ipr_core.config import load_config

    config = load_config(config_path)
    params = json.dumps({"config": config.model_dump(mode="json")}, separators=(",", ":"))
    return f"prefect deployment run {DEPLOYMENT} --watch --params {shlex.quote(params)}"


def serve(port: int, pool: str, config_path: Path, ready_timeout_s: float) -> int:
    """`ipr serve` (its options, in `flows.cli`, hold the defaults)."""
    configure_prefect_env()
    api = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ, PREFECT_API_URL=api, IPR_WORK_POOL=pool, IPR_REPO=str(REPO_ROOT))
    server = worker = None
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_signal)
    started = time.monotonic()
    try:
        server = subprocess.Popen(
            prefect_cmd("server", "start", "--host", "127.0.0.1", "--port", str(port)),
            env=env,
            cwd=REPO_ROOT,
            start_new_session=True,
        )
        took = wait_healthy(api, server, ready_timeout_s)
        print(f"prefect server healthy at {api} after {took:.1f} s", flush=True)
        if ensure_pool(pool, env):
            print(f"created process work pool {pool!r}", flush=True)
        run_checked(prefect_cmd("--no-prompt", "deploy", "--all"), env)
        deployed = f"{DEPLOYMENT} and {EXPERIMENT_DEPLOYMENT}"
        print(f"deployed {deployed} (prefect.yaml) on pool {pool!r}", flush=True)
        worker = subprocess.Popen(
            prefect_cmd("worker", "start", "--pool", pool, "--type", "process"),
            env=env,
            cwd=REPO_ROOT,
            start_new_session=True,
        )
        print(
            f"ready in {time.monotonic() - started:.1f} s. UI: http://127.0.0.1:{port}\n"
            f"Run it from another shell:\n  export PREFECT_API_URL={api}\n"
            f"  {run_command(config_path)}\n"
            "Ctrl-C stops the worker, then the server.",
            flush=True,
        )
        while True:
            for process, name in ((server, "server"), (worker, "worker")):
                if process.poll() is not None:
                    raise ServeError(f"prefect {name} exited with code {process.returncode}")
            time.sleep(1.0)
    except KeyboardInterrupt:
        print("stopping worker, then server", flush=True)
        return 0
    except ServeError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop(worker, "worker")
        stop(server, "server")
        del stopping
