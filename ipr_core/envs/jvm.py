"""One py4j JVM per process, shared by every adapter instance of an engine that runs on the JVM.

TextWorldExpress and ScienceWorld are Scala simulators reached through py4j. Their pip
packages start one JVM per env instance (75 MB to 2 GB each); the rollout engine keeps a pool
of ~32 instances, so the adapters instead start one JVM per process and give every instance
its own interface object in it. The JVM stops when the last instance releases it, and a JVM
that died is replaced on the next `acquire`.

A Ctrl-C is held back for the length of one py4j command and raised when it returns: py4j's
own clean-up of an interrupted command fails (`AttributeError: ... shutdown_socket`) and
replaces the KeyboardInterrupt, which would end an interrupted run as a failed stage.
"""

from __future__ import annotations

import signal
import subprocess
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import Any

from py4j.java_gateway import GatewayClient, GatewayParameters, JavaGateway, launch_gateway
from py4j.protocol import Py4JError

from ipr_core.envs.base import EnvCrashed


class SharedJvm:
    """A JVM started on first use with `classpath`, stopped when its last user releases it."""

    def __init__(self, name: str, classpath: str, cwd: str, java_opts: Sequence[str] = ()):
        self.name = name
        self._classpath, self._cwd, self._java_opts = classpath, cwd, list(java_opts)
        self._lock = threading.Lock()
        self.gateway: JavaGateway | None = None
        self._users = 0

    def acquire(self) -> JavaGateway:
        with self._lock:
            if self.gateway is not None and self.gateway.java_process.poll() is not None:
                _disconnect(self.gateway)
                self.gateway = None
            if self.gateway is None:
                self.gateway, self._users = self._launch(), 0
            self._users += 1
            return self.gateway

    def release(self, gateway: JavaGateway) -> None:
        with self._lock:
            if gateway is not self.gateway:
                return  # a JVM that died and was replaced: nothing left to stop
            self._users -= 1
            if self._users == 0:
                _stop(self.gateway)
                self.gateway = None

    def _launch(self) -> JavaGateway:
        try:
            # die_on_exit: the JVM exits when this process does, even on a hard kill.
            port, proc = launch_gateway(
                classpath=self._classpath,
                javaopts=self._java_opts,
                die_on_exit=True,
                cwd=self._cwd,
                return_proc=True,
            )
        except (OSError, ValueError, Py4JError) as e:
            raise EnvCrashed(f"could not start the {self.name} JVM: {e}") from e
        return _Gateway(
            gateway_parameters=GatewayParameters(port=port, auto_field=True), java_process=proc
        )


class _Client(GatewayClient):
    def send_command(self, *args: Any, **kwargs: Any) -> Any:
        with _interrupt_held_back():
            return super().send_command(*args, **kwargs)


class _Gateway(JavaGateway):
    def _create_gateway_client(self) -> GatewayClient:
        return _Client(gateway_parameters=self.gateway_parameters)


_holding = threading.local()


@contextmanager
def _interrupt_held_back() -> Iterator[None]:
    """Defer SIGINT to the end of the block (main thread only: signals go there alone)."""
    if threading.current_thread() is not threading.main_thread() or getattr(
        _holding, "active", False
    ):
        yield
        return
    caught: list[int] = []

    def remember(signum: int, _frame: FrameType | None) -> None:
        caught.append(signum)

    previous = signal.signal(signal.SIGINT, remember)
    _holding.active = True
    try:
        yield
    finally:
        _holding.active = False
        signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)
        if caught:
            signal.raise_signal(signal.SIGINT)  # now, to whatever handler was there


def _disconnect(gateway: JavaGateway) -> None:
    """Mark a dead JVM's client closed: py4j's finalizers of the objects that lived in it
    then no longer try to reach it (each try logged an ERROR with a traceback)."""
    client = gateway._gateway_client  # py4j has no public handle on its client
    client.close()
    client.is_connected = False


def _stop(gateway: JavaGateway) -> None:
    proc = gateway.java_process
    if proc.poll() is not None:
        _disconnect(gateway)  # died: a shutdown command would only log a refused connection
        return
    gateway.shutdown()
    if proc.poll() is None:
        # With --die-on-broken-pipe the py4j server exits on a line on its stdin.
        try:
            proc.stdin.write(b"\n")
            proc.stdin.flush()
            proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
