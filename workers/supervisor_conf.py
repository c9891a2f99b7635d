"""Render the supervisord configuration from a Deployment.

Programs: controller, one program per model in group `workers`, api, web. Commands run Python
directly (no shell in between), so supervisord's signals reach the server process, and
stopasgroup/killasgroup also stop the quantization child a worker may have started.
"""
from __future__ import annotations

import configparser
import io
import secrets
import sys
from pathlib import Path

from workers.deployment import Deployment, ModelSpec
from workers.model_sources import model_dir
from workers.paths import ROOT, logs_dir, run_dir, var_dir

SOCKET_NAME = "supervisor.sock"
SECRET_NAME = "supervisor.secret"


def socket_path() -> Path:
    return run_dir() / SOCKET_NAME


def conf_path() -> Path:
    return run_dir() / "supervisord.conf"


def credentials() -> tuple[str, str]:
    """supervisorctl user and password, generated once, readable by the owner only."""
    run = run_dir()
    run.mkdir(parents=True, exist_ok=True)
    run.chmod(0o700)
    secret = run / SECRET_NAME
    if not secret.exists():
        secret.touch(mode=0o600)
        secret.write_text(f"bundle:{secrets.token_urlsafe(24)}\n")
    user, password = secret.read_text().strip().split(":", 1)
    return user, password


def _env(dep: Deployment) -> str:
    env = {
        "PYTHONPATH": str(ROOT),
        "PYTHONUNBUFFERED": "1",
        "BUNDLE_VAR_DIR": str(var_dir()),
        "LOGDIR": str(logs_dir()),  # FastChat's own log files
        "FASTCHAT_WORKER_HEART_BEAT_INTERVAL": str(dep.heartbeat.worker_interval_s),
        "FASTCHAT_CONTROLLER_HEART_BEAT_EXPIRATION": str(dep.heartbeat.expiration_s),
        "HF_HUB_OFFLINE": "1",  # serving never downloads: models are prepared before start
        "TRANSFORMERS_OFFLINE": "1",
    }
    return ",".join(f'{k}="{v}"' for k, v in env.items())


def worker_command(dep: Deployment, m: ModelSpec) -> list[str]:
    cmd = [
        "-m", "workers.model_worker",
        "--model-path", str(model_dir(m.source)),
        "--model-names", ",".join(m.names),
        "--backend", m.backend,
        "--compute-dtype", m.int8.compute_dtype,
        "--group-size", str(m.int8.group_size),
        "--threads", str(m.threads),
        "--host", "127.0.0.1",
        "--port", str(m.port),
        "--controller-address", f"http://{dep.controller.host}:{dep.controller.port}",
        "--limit-worker-concurrency", str(m.limit_concurrency),
    ]
    if m.cpu_cores:
        cmd += ["--cpu-cores", ",".join(map(str, m.cpu_cores))]
    if m.conv_template:
        cmd += ["--conv-template", m.conv_template]
    if m.trust_remote_code:
        cmd.append("--trust-remote-code")
    return cmd


def program_commands(dep: Deployment) -> dict[str, list[str]]:
    controller = f"http://{dep.controller.host}:{dep.controller.port}"
    api = ["-m", "workers.api_server", "--host", dep.api.host, "--port", str(dep.api.port),
           "--controller-address", controller]
    if dep.api.api_keys_env:
        api += ["--api-keys-env", dep.api.api_keys_env]
    if dep.api.api_keys_file:
        api += ["--api-keys-file", str(dep.api.api_keys_file.expanduser())]
    web = ["-m", "workers.web_ui", "--host", dep.web.host, "--port", str(dep.web.port),
           "--controller-url", controller, "--title", dep.web.title]
    if dep.web.auth_file:
        web += ["--auth-file", str(dep.web.auth_file.expanduser())]
    commands = {
        "controller": ["-m", "workers.launch_fastchat", "fastchat.serve.controller",
                       "--host", dep.controller.host, "--port", str(dep.controller.port)],
        "api": api,
        "web": web,
    }
    for m in dep.models:
        commands[f"workers:{m.program}"] = worker_command(dep, m)
    return commands


def _quote(arg: str) -> str:
    # supervisord splits commands shlex-style; quote anything with spaces or quotes.
    if arg and all(c.isalnum() or c in "-_./:,=@+" for c in arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render(dep: Deployment, python: str | None = None) -> str:
    python = python or sys.executable
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
    for name, args in program_commands(dep).items():
        program = name.split(":")[-1]
        cp[f"program:{program}"] = {
            "command": " ".join(_quote(a) for a in [python, *args]),
            "directory": str(run),
            "environment": env,
            "autostart": "true",
            "autorestart": "true",
            "startsecs": "3",
            "startretries": "3",
            "stopsignal": "TERM",
            "stopwaitsecs": "15",
            "stopasgroup": "true",
            "killasgroup": "true",
            "redirect_stderr": "true",
            "stdout_logfile": str(logs / f"{program}.log"),
            "stdout_logfile_maxbytes": "20MB",
            "stdout_logfile_backups": "3",
        }
    cp["group:workers"] = {"programs": ",".join(m.program for m in dep.models)}
    out = io.StringIO()
    out.write("; Generated by workers/supervisor_conf.py from conf/. Do not edit: edit conf/ and restart.\n")
    cp.write(out)
    return out.getvalue()


def write(dep: Deployment) -> Path:
    text = render(dep)
    path = conf_path()
    logs_dir().mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.touch(mode=0o600)
    tmp.write_text(text)
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    import argparse

    from workers import deployment

    p = argparse.ArgumentParser(description="print the supervisord config a profile renders to")
    p.add_argument("--profile", default="default")
    args = p.parse_args(argv)
    try:
        print(render(deployment.load(args.profile)))
    except deployment.DeploymentError as exc:
        print(f"Invalid deployment:\n{exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
