"""The Prefect side of a flow command: a temporary server that dies with it, and no run left RUNNING.

Without `PREFECT_API_URL`, Prefect starts a temporary server in a child process and stops it
when the interpreter exits. A flow command killed with SIGKILL (or by the OOM killer) never
gets there: the server lives on, and the run it was recording stays RUNNING forever. So our
flow commands start that temporary server themselves (the same app, on loopback), with the
kernel asked to SIGTERM it when the command dies. Each flow run they start carries a
`process:<host>:<pid>` tag, and on start they mark as Crashed every run still RUNNING or
PENDING whose process on this host is gone.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Iterator

import httpx
from prefect import get_client, tags
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterState, FlowRunFilterStateType
from prefect.client.schemas.objects import StateType
from prefect.events.worker import EventsWorker
from prefect.logging.handlers import APILogWorker
from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW,
    get_current_settings,
    temporary_settings,
)
from prefect.states import Crashed

from starfish.errors import StarfishError
from starfish.io import free_port, process_alive

log = logging.getLogger("starfish.flows")
PROCESS_TAG = "process:"
_PR_SET_PDEATHSIG = 1
SERVER_START_TIMEOUT_S = 120.0  # Prefect's default 20 s was missed on a loaded machine
_UNFINISHED = [StateType.RUNNING, StateType.PENDING]


def process_tag(pid: int | None = None) -> str:
    """The tag naming the flow command process that started a run."""
    return f"{PROCESS_TAG}{socket.gethostname()}:{pid or os.getpid()}"


def mark_orphans_crashed() -> list[str]:
    """Mark Crashed every unfinished run, and its unfinished task runs, whose flow command on this
    host has died; return their ids."""
    host_prefix = f"{PROCESS_TAG}{socket.gethostname()}:"
    crashed = []
    with get_client(sync_client=True) as client:
        unfinished = FlowRunFilterState(type=FlowRunFilterStateType(any_=_UNFINISHED))
        for run in client.read_flow_runs(flow_run_filter=FlowRunFilter(state=unfinished)):
            pids = [int(tag[len(host_prefix):]) for tag in run.tags if tag.startswith(host_prefix)]
            if not pids or process_alive(pids[0]):
                continue
            message = f"its flow command (pid {pids[0]}) died without finishing it"
            for task_run in client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))):
                if task_run.state_type in _UNFINISHED:
                    client.set_task_run_state(task_run.id, Crashed(message=message), force=True)
            client.set_flow_run_state(run.id, Crashed(message=message), force=True)
            log.warning("flow run %s (%s) marked Crashed: %s", run.name, run.id, message)
            crashed.append(str(run.id))
    return crashed


def _die_with_parent(parent: int) -> None:
    """In the server's process, before it runs: SIGTERM when the parent dies (Linux)."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the request was in place
        os._exit(1)


@contextmanager
def temporary_server() -> Iterator[None]:
    """Prefect's temporary API server as a child that cannot outlive this process; nothing
    when a server is configured (`PREFECT_API_URL`)."""
    settings = get_current_settings()
    if settings.api.url:
        yield
        return
    port, parent = free_port(), os.getpid()
    env = {**os.environ, **settings.to_environment_variables(exclude_unset=True), "PREFECT_UI_ENABLED": "0",
           "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}  # as Prefect's own temporary server
    command = [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
               "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"]
    url = f"http://127.0.0.1:{port}/api"
    timeout = max(settings.server.ephemeral.startup_timeout_seconds, SERVER_START_TIMEOUT_S)
    # One server starts at a time per PREFECT_HOME: a starting server migrates the database, and
    # two migrating one database at once fail ("duplicate column name").
    settings.home.mkdir(parents=True, exist_ok=True)
    with (settings.home / ".starfish-server-start.lock").open("a") as start_lock:
        fcntl.flock(start_lock, fcntl.LOCK_EX)
        # Its own session: a Ctrl-C at the terminal reaches the flow command, which marks its run
        # Crashed through this server before stopping it.
        server = subprocess.Popen(command, env=env, preexec_fn=lambda: _die_with_parent(parent),
                                  start_new_session=True)
        try:
            _wait_until_healthy(server, url, timeout)
        except BaseException:
            _stop(server)
            raise
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            log.info("temporary Prefect server on %s (pid %d), stopped with this command", url, server.pid)
            yield
    finally:
        _stop(server)


def _wait_until_healthy(server: subprocess.Popen, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not _healthy(url):
        status = server.poll()
        if status is not None:
            raise StarfishError(f"the temporary Prefect server exited with status {status} before it answered; "
                                "its log is above. Start a server with `prefect server start` and set PREFECT_API_URL")
        if time.monotonic() > deadline:
            raise StarfishError(
                f"the temporary Prefect server did not start within {timeout:.0f} s (the machine may be loaded); "
                "raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or start a server with `prefect server "
                "start` and set PREFECT_API_URL")
        time.sleep(0.1)


def _stop(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def flow_session() -> Iterator[None]:
    """What a flow command runs its flow in: the server, orphans of dead commands marked
    Crashed, and this process's tag on every run it starts. Our log lines outside a flow run
    stay on the console instead of warning that the API cannot take them. What the runs still
    have to send is sent before it ends."""
    with temporary_settings(updates={PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW: "ignore"}), temporary_server():
        mark_orphans_crashed()
        try:
            with tags(process_tag()):
                yield
        finally:
            _drain()


def _drain() -> None:
    """Send the logs and events still queued (a watch's event, say) before the command exits."""
    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=10)
