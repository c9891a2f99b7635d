"""Process and network helpers for tests that run the real thing."""
from __future__ import annotations

import os
import xmlrpc.client
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import requests
import yaml

ROOT = Path(__file__).resolve().parent.parent
HEARTBEAT_S = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bundle_env(**extra: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def start(args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """Start a Python module in its own process group, output to `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, *args], stdout=out, stderr=subprocess.STDOUT,
            env=env or bundle_env(), cwd=log.parent, start_new_session=True,
        )


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = predicate()
            if result:
                return result
        except (requests.RequestException, OSError, ValueError):
            pass
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log else ""
            raise AssertionError(f"process exited ({proc.returncode}) while waiting for {what}\n{tail}")
        time.sleep(0.5)
    tail = log.read_text()[-3000:] if log else ""
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")


def bundle_cli(env: dict, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workers.bundle", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def write_deployment(var, models: list[dict], **extra) -> tuple[str, dict]:
    ports = {"controller": free_port(), "api": free_port(), "web": free_port()}
    data = {
        "controller": {"port": ports["controller"]},
        "api": {"port": ports["api"]},
        "web": {"port": ports["web"]},
        "heartbeat": {"worker_interval_s": HEARTBEAT_S, "expiration_s": 10},
        "models": models,
    }
    for section, values in extra.items():  # merged into the defaults above, e.g. api={"api_keys_env": ...}
        data[section] = {**data.get(section, {}), **values}
    path = var / "deploy.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path), ports


def rpc(env):
    from supervisor.xmlrpc import SupervisorTransport

    user, password = (open(os.path.join(env["BUNDLE_VAR_DIR"], "run", "supervisor.secret")).read().strip().split(":", 1))
    sock = os.path.join(env["BUNDLE_VAR_DIR"], "run", "supervisor.sock")
    return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=SupervisorTransport(user, password, f"unix://{sock}"))


def bundle_processes(var) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline", "environ"]):
        try:
            if str(var) in " ".join(p.info["cmdline"] or []) or str(var) == (p.info["environ"] or {}).get("BUNDLE_VAR_DIR"):
                found.append(p)
        except psutil.Error:
            pass
    return found


