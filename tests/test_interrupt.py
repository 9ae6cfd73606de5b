"""Ctrl-C stops `ipr run` cleanly: a SIGINT mid-iteration ends the command with one line and
exit code 130, and no process it started (the ephemeral Prefect server, the env's JVM,
engines) outlives it."""

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from ipr_core.envs.jvm import _interrupt_held_back
from ipr_core.store.store import Store

ROOT = Path(__file__).resolve().parents[1]


def alive(processes: list[psutil.Process]) -> list[str]:
    """The processes still running (a zombie has exited), as 'pid name'."""
    left = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{process.pid} {process.name()}")
        except psutil.NoSuchProcess:
            continue
    return left


def command_of(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.NoSuchProcess:
        return ""


def descendants_with_a_jvm(run: subprocess.Popen, log: Path) -> list[psutil.Process]:
    """Every descendant of `run`, taken once a JVM is among them (an env is stepping)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert run.poll() is None, log.read_text()[-3000:]
        found = psutil.Process(run.pid).children(recursive=True)
        if any("java" in command_of(p) for p in found):
            return found
        time.sleep(0.1)
    raise AssertionError("no JVM under the run in time")


@pytest.mark.parametrize("orchestrated", [True, False], ids=["prefect", "no-prefect"])
def test_sigint_mid_iteration_leaves_no_process_behind(orchestrated, tmp_path, tiny_model_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny-llama").symlink_to(tiny_model_path)
    data = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    data.update(store=str(tmp_path / "run.duckdb"), cache_dir=str(tmp_path))
    config = tmp_path / "smoke.yaml"
    config.write_text(yaml.safe_dump(data))
    cmd = [sys.executable, "-m", "flows.cli", "run", "--config", str(config)]
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect"))
    env.pop("PREFECT_API_URL", None)
    log = tmp_path / "run.log"
    with log.open("w") as out:
        run = subprocess.Popen(
            cmd if orchestrated else [*cmd, "--no-prefect"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # the test's own process group is not signalled
            # A job started in the background inherits SIGINT ignored, and Python then keeps
            # it ignored: give the command the disposition a terminal's Ctrl-C meets.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    try:
        store = Store(tmp_path / "run.duckdb", lock_timeout_s=30)
        deadline = time.monotonic() + 600
        while store.count("rollouts", "kind = 'explore' AND iteration = 1") == 0:
            assert run.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no exploration of iteration 1 in time"
            time.sleep(0.5)
        children = descendants_with_a_jvm(run, log)
        commands = [command_of(p) for p in children]
        run.send_signal(signal.SIGINT)  # to the command only: it must stop its children
        code = run.wait(timeout=180)
        deadline = time.monotonic() + 30  # a child may take a moment to see its parent gone
        while alive(children) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert alive(children) == [], log.read_text()[-3000:]
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    assert code == 130, log.read_text()[-3000:]
    text = log.read_text()
    assert "error: interrupted; the same command resumes from the finished stages" in text
    assert "Traceback" not in text
    assert any("java" in c for c in commands)
    assert any("uvicorn" in c for c in commands) == orchestrated  # the ephemeral server


def test_a_ctrl_c_during_a_jvm_command_is_raised_when_the_command_returns():
    # Python's own Ctrl-C handler: absent when the suite was started with SIGINT ignored
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    finished = []
    try:
        with pytest.raises(KeyboardInterrupt), _interrupt_held_back():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)  # the handler runs between bytecodes: give it the chance
            finished.append("command")
        assert finished == ["command"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


def test_an_error_of_a_clean_up_after_ctrl_c_ends_the_command_as_interrupted(capsys):
    from flows.commands import main

    def clean_up_fails(_args):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise AttributeError("no attribute 'shutdown_socket'")  # noqa: B904 (py4j's way)

    def plain_bug(_args):
        raise AttributeError("a bug")

    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers()
    commands.add_parser("interrupted").set_defaults(handler=clean_up_fails)
    commands.add_parser("bug").set_defaults(handler=plain_bug)
    assert main(["interrupted"], parser) == 130
    assert capsys.readouterr().err.startswith("error: interrupted;")
    with pytest.raises(AttributeError, match="a bug"):
        main(["bug"], parser)
