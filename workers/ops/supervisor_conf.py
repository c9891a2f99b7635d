"""Render the supervisord configuration from a Deployment.

Programs: controller, one program per model in group `workers`, api, web. Commands run Python
directly (no shell in between), so supervisord's signals reach the server process, and
stopasgroup/killasgroup also stop the quantization child a worker may have started.
"""
from __future__ import annotations

import configparser
import io
import os
import secrets
import shlex
import sys
from pathlib import Path

from workers.config import hosts
from workers.config.files import write_atomic
from workers.config.schema import Deployment
from workers.config.paths import logs_dir, run_dir, var_dir
from workers.serving.launch import GRACEFUL_SHUTDOWN_S

SOCKET_NAME = "supervisor.sock"
SECRET_NAME = "supervisor.secret"


def socket_path(run: Path | None = None) -> Path:
    return (run or run_dir()) / SOCKET_NAME


def conf_path() -> Path:
    return run_dir() / "supervisord.conf"


def credentials(run: Path | None = None) -> tuple[str, str]:
    """supervisorctl user and password, generated once, readable by the owner only."""
    run = run or run_dir()
    run.mkdir(parents=True, exist_ok=True)
    run.chmod(0o700)
    secret = run / SECRET_NAME
    if not secret.exists():
        write_atomic(secret, f"bundle:{secrets.token_urlsafe(24)}\n")
    user, password = secret.read_text().strip().split(":", 1)
    return user, password


def _env(dep: Deployment) -> str:
    env = {
        "PYTHONUNBUFFERED": "1",
        "BUNDLE_VAR_DIR": str(var_dir()),
        "LOGDIR": str(logs_dir()),  # FastChat's own log files
        "FASTCHAT_WORKER_HEART_BEAT_INTERVAL": str(dep.heartbeat.worker_interval_s),
        "FASTCHAT_CONTROLLER_HEART_BEAT_EXPIRATION": str(dep.heartbeat.expiration_s),
        "HF_HUB_OFFLINE": "1",  # serving never downloads: models are prepared before start
        "TRANSFORMERS_OFFLINE": "1",
    }
    if os.environ.get("PYTHONPATH"):  # a checkout run through another environment's console script
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return ",".join(f'{k}="{v}"' for k, v in env.items())


def program_commands(dep: Deployment, snapshot: Path, host: str = hosts.LOCAL) -> dict[str, list[str]]:
    """'group:program' -> arguments after the Python executable, for the programs placed on `host`.
    Every program reads its settings from the deployment snapshot; nothing is re-declared as a flag here."""
    snap = ["--deployment", str(snapshot)]
    modules = {"controller": "workers.serving.controller", "api": "workers.serving.api_server",
               "web": "workers.serving.web_ui"}
    commands = {s: ["-m", modules[s], *snap] for s in hosts.services_on(dep, host)}
    for m in hosts.models_on(dep, host):
        commands[f"workers:{m.program}"] = ["-m", "workers.serving.worker", *snap, "--model", m.program]
    return commands


def command_line(args: list[str]) -> str:
    # supervisord splits commands shlex-style and expands %(name)s: quote, and double every '%'.
    return shlex.join(args).replace("%", "%%")


def render(dep: Deployment, snapshot: Path, python: str | None = None, host: str = hosts.LOCAL,
           worker_pythons: dict[str, str] | None = None) -> str:
    """`worker_pythons`: program -> the Python of the environment its model needs (environments.py);
    every other program runs in `python` (this process's own by default)."""
    python = python or sys.executable
    worker_pythons = worker_pythons or {}
    user, password = credentials()
    logs, run = logs_dir(), run_dir()
    cp = configparser.ConfigParser(interpolation=None)
    cp.optionxform = str
    cp["unix_http_server"] = {"file": str(socket_path()), "chmod": "0700", "username": user, "password": password}
    cp["supervisord"] = {
        "logfile": str(logs / "supervisord.log"), "logfile_maxbytes": "10MB", "logfile_backups": "3",
        "pidfile": str(run / "supervisord.pid"), "childlogdir": str(logs), "directory": str(run),
        "nodaemon": "false", "silent": "true", "umask": "077",
    }
    cp["rpcinterface:supervisor"] = {"supervisor.rpcinterface_factory": "supervisor.rpcinterface:make_main_rpcinterface"}
    cp["supervisorctl"] = {"serverurl": f"unix://{socket_path()}", "username": user, "password": password}
    env = _env(dep)
    for name, args in program_commands(dep, snapshot, host).items():
        program = name.split(":")[-1]
        cp[f"program:{program}"] = {
            "command": command_line([worker_pythons.get(program, python), *args]),
            "directory": str(run),
            "environment": env,
            "autostart": "true",
            "autorestart": "true",
            "startsecs": "3",
            "startretries": "3",
            "stopsignal": "TERM",
            # A program still running this long after its own shutdown is killed; the margin is for a machine whose
            # cores are busy with the other workers' answers.
            "stopwaitsecs": str(GRACEFUL_SHUTDOWN_S + 25),
            "stopasgroup": "true",
            "killasgroup": "true",
            "redirect_stderr": "true",
            "stdout_logfile": str(logs / f"{program}.log"),
            "stdout_logfile_maxbytes": "20MB",
            "stdout_logfile_backups": "3",
        }
    if hosts.models_on(dep, host):
        cp["group:workers"] = {"programs": ",".join(m.program for m in hosts.models_on(dep, host))}
    out = io.StringIO()
    out.write("; Generated by workers/ops/supervisor_conf.py from conf/. Do not edit: edit conf/ and restart.\n")
    cp.write(out)
    return out.getvalue()


def write(dep: Deployment, snapshot: Path, host: str = hosts.LOCAL, worker_pythons: dict[str, str] | None = None) -> Path:
    logs_dir().mkdir(parents=True, exist_ok=True)
    return write_atomic(conf_path(), render(dep, snapshot, host=host, worker_pythons=worker_pythons))
