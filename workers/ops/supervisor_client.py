"""Talk to the bundle's supervisord over its owner-only unix socket (supervisor's own XML-RPC client)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import xmlrpc.client
from pathlib import Path

from supervisor.xmlrpc import SupervisorTransport

from workers.ops import supervisor_conf
from workers.config.paths import run_dir


def proxy(run: Path | None = None):
    """XML-RPC proxy of the bundle whose run folder is `run` (default: this checkout's var/run)."""
    user, password = supervisor_conf.credentials(run)
    transport = SupervisorTransport(user, password, serverurl=f"unix://{supervisor_conf.socket_path(run)}")
    return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)


def pid() -> int | None:
    """supervisord's pid when it is running and answering, else None."""
    pidfile = run_dir() / "supervisord.pid"
    try:
        value = int(pidfile.read_text().strip())
        os.kill(value, 0)
    except (OSError, ValueError):
        return None
    try:
        proxy().supervisor.getState()
    except (OSError, xmlrpc.client.Error):
        return None
    return value


def start_daemon(conf: Path) -> None:
    supervisord = Path(sys.executable).with_name("supervisord")
    subprocess.run([str(supervisord), "-c", str(conf)], check=True)
    deadline = time.monotonic() + 30
    while pid() is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"supervisord did not come up; see {run_dir().parent / 'logs' / 'supervisord.log'}")
        time.sleep(0.2)


def processes() -> dict[str, dict]:
    """'group:name' -> supervisor process info."""
    return {f"{p['group']}:{p['name']}": p for p in proxy().supervisor.getAllProcessInfo()}


def shutdown(timeout: float = 60) -> None:
    daemon = pid()
    if daemon is None:
        return
    # supervisord's own shutdown stops one program group per tick of its loop (about a second each: the workers,
    # then web, api, controller); stopAllProcesses signals every program at once and returns when all are stopped.
    try:
        proxy().supervisor.stopAllProcesses(True)
    except xmlrpc.client.Fault:
        pass  # e.g. one was already stopping: shutdown below stops what is left
    proxy().supervisor.shutdown()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(daemon, 0)
        except OSError:
            return
        time.sleep(0.2)
    raise RuntimeError(f"supervisord (pid {daemon}) did not stop within {timeout:.0f} s")
