"""Operate the bundle under supervisord: start, stop, status, restart a worker.

    bundle start [--profile default]
    bundle stop | status | restart MODEL [--profile P]
    bundle download [--profile seed]
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import psutil
import requests
from supervisor.states import ProcessStates

from workers.config import deployment, rules
from workers.models import sources as model_sources
from workers.ops import download, supervisor_client, supervisor_conf
from workers.config.deployment import DeploymentError
from workers.config.schema import Deployment
from workers.config.paths import ROOT, logs_dir

STARTUP_STATES_OK = {"STARTING", "RUNNING"}


def _say(msg: str) -> None:
    print(msg, flush=True)


def _controller(dep: Deployment) -> str:
    return f"http://{dep.controller.host}:{dep.controller.port}"


def _scripts(name: str) -> str:
    return os.path.relpath(ROOT / "scripts" / name, Path.cwd())


def log_tail(program: str, lines: int = 25) -> str:
    path = logs_dir() / f"{program}.log"
    if not path.is_file():
        return f"(no log at {path})"
    text = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return "\n".join(text[-lines:])


def registered_models(dep: Deployment) -> set[str]:
    r = requests.post(f"{_controller(dep)}/list_models", timeout=5)
    r.raise_for_status()
    return set(r.json()["models"])


def _api_answers(dep: Deployment) -> bool:
    r = requests.get(f"http://{dep.api.host}:{dep.api.port}/v1/models", timeout=5)
    return r.status_code in (200, 401)  # 401: up, and keys are required


def _web_answers(dep: Deployment) -> bool:
    return requests.get(f"http://{dep.web.host}:{dep.web.port}/", timeout=5).status_code == 200


def running(args) -> tuple[str, Deployment]:
    """(profile, deployment) of the bundle that runs; --profile, when given, must name it."""
    profile, dep = deployment.read_snapshot()
    wanted = getattr(args, "profile", None)
    if wanted is not None and wanted != profile:
        raise DeploymentError(f"the running bundle was started with profile {profile!r}, not {wanted!r}")
    return profile, dep


def print_urls(dep: Deployment) -> None:
    names = ", ".join(n for m in dep.models for n in m.names)
    _say(f"""
  Web chat (single and side by side):  http://{dep.web.host}:{dep.web.port}/
  OpenAI-style API:                    http://{dep.api.host}:{dep.api.port}/v1   (models: {names})
  Status:             {_scripts('status.sh')}
  Restart one worker: {_scripts('restart_worker.sh')} {dep.models[0].names[0]}
  Stop everything:    {_scripts('stop_all.sh')}
  Logs:               {logs_dir()}""")


def wait_ready(dep: Deployment, timeout: float) -> str | None:
    """Wait for every worker to register and the API and web UI to answer.

    Returns None when ready, or the name of the program that failed.
    """
    wanted = {m.program: set(m.names) for m in dep.models}
    first_pids: dict[str, int] = {}
    ready: set[str] = set()
    deadline = time.monotonic() + timeout
    last_progress = 0.0
    while time.monotonic() < deadline:
        for name, info in supervisor_client.processes().items():
            program = name.split(":")[-1]
            if info["state"] == ProcessStates.RUNNING:
                first_pids.setdefault(program, info["pid"])
            restarted = program in first_pids and info["pid"] not in (0, first_pids[program])
            if info["statename"] not in STARTUP_STATES_OK or restarted:
                return program
        try:
            registered = registered_models(dep)
        except requests.RequestException:
            registered = set()
        for program, names in wanted.items():
            if program not in ready and names <= registered:
                ready.add(program)
                _say(f"  worker {program}: registered")
        checks = {"api": _api_answers, "web": _web_answers}
        for name, check in checks.items():
            if name not in ready:
                try:
                    if check(dep):
                        ready.add(name)
                        _say(f"  {name}: answering")
                except requests.RequestException:
                    pass
        if ready >= set(wanted) | set(checks):
            return None
        if time.monotonic() - last_progress > 15:  # show what the slow ones are doing (e.g. loading a large model)
            last_progress = time.monotonic()
            for program in sorted(set(wanted) - ready):
                _say(f"  worker {program}: loading ... {log_tail(program, 1)[-140:]}")
        time.sleep(1)
    return "timeout"


def memory_problem(dep: Deployment) -> str | None:
    from workers.models import memory_budget

    needs = []
    for m in dep.models:
        try:
            shape = memory_budget.shape_of_folder(model_sources.model_dir(m.source))
        except (memory_budget.UnknownShape, OSError, ValueError) as exc:
            _say(f"  {m.program}: cannot estimate its memory ({exc}); not counted")
            continue
        needs.append(memory_budget.Need(m.program, m.backend, shape, m.limit_concurrency, m.int8.group_size,
                                        m.prefix_cache_tokens))
    return memory_budget.check(needs, psutil.virtual_memory().available)


def prepare_int8_weights(dep: Deployment, folders: dict[str, Path]) -> str | None:
    """Build missing INT8 cache entries now, one model at a time, before any worker runs.

    Quantizing is the memory peak of a first start; done here, no serving worker shares RAM with
    it, and its progress shows in this terminal. The workers then load the cache.
    """
    from workers.engine import int8_cache
    from workers.config.paths import int8_cache_dir

    int8_models = [m for m in dep.models if m.backend == "itrex-int8"]
    _say(f"[2/4] INT8 weights for {len(int8_models)} model(s) (quantized once, then loaded from {int8_cache_dir()})")
    for m in int8_models:
        try:
            entry = int8_cache.ensure(folders[m.program], m.int8, int8_cache_dir(), m.trust_remote_code)
        except int8_cache.CacheBuildError as exc:
            return f"models[{m.program}]: {exc}"
        _say(f"  {m.program}: {entry.name}")
    return None


def cmd_start(args) -> int:
    dep = deployment.load(args.profile)
    running = supervisor_client.pid()
    if running:
        profile, current = deployment.read_snapshot()
        _say(f"The bundle is already running (supervisord pid {running}, profile '{profile}'); nothing changed.")
        print_urls(current)
        return 0
    busy = rules.ports_in_use(dep)
    if busy:
        _say("Cannot start: " + "; ".join(busy))
        return 2
    _say(f"[1/4] preparing {len(dep.models)} model(s)")
    folders = {}
    for m in dep.models:
        try:
            folders[m.program] = model_sources.prepare(m.source)
        except model_sources.SourceNotReady as exc:
            _say(f"Cannot start: models[{m.program}]: {exc}")
            return 2
        _say(f"  {m.program}: {folders[m.program]} ({m.backend}, {m.threads} thread(s))")
    if not args.skip_memory_check:
        problem = memory_problem(dep)
        if problem:
            _say(f"Cannot start: {problem}\n(--skip-memory-check starts anyway.)")
            return 2
    problem = prepare_int8_weights(dep, folders)
    if problem:
        _say(f"Cannot start: {problem}")
        return 2
    snapshot = deployment.write_snapshot(dep, args.profile)
    conf = supervisor_conf.write(dep, snapshot)
    _say(f"[3/4] starting supervisord ({conf})")
    supervisor_client.start_daemon(conf)
    _say("[4/4] waiting for workers to register and the API and web UI to answer")
    failed = wait_ready(dep, args.timeout)
    if failed:
        if failed == "timeout":
            _say(f"Not ready after {args.timeout:.0f} s. Last lines of each worker log:")
            for m in dep.models:
                _say(f"--- {m.program}\n{log_tail(m.program)}")
        else:
            _say(f"Program '{failed}' failed to start. Last lines of {logs_dir() / (failed + '.log')}:\n"
                 f"{log_tail(failed)}")
        _say("Stopping the bundle so nothing is left half-started.")
        supervisor_client.shutdown()
        return 1
    _say("The bundle is up.")
    print_urls(dep)
    return 0


def cmd_stop(args) -> int:
    if supervisor_client.pid() is None:
        _say("The bundle is not running.")
        return 0
    running(args)
    pids = [p["pid"] for p in supervisor_client.processes().values() if p["pid"]]
    supervisor_client.shutdown()
    leftovers = [p for p in pids if psutil.pid_exists(p)]
    for p in leftovers:  # should not happen (stopasgroup), but never leave a server behind
        psutil.Process(p).kill()
    _say("The bundle is stopped.")
    return 0


def _rss_mib(pid: int) -> str:
    try:
        proc = psutil.Process(pid)
        rss = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
        return f"{rss / 2**20:.0f}"
    except psutil.Error:
        return "-"


def cmd_status(args) -> int:
    if supervisor_client.pid() is None:
        _say("The bundle is not running. Start it with scripts/start_all.sh")
        return 3
    _, dep = running(args)
    procs = supervisor_client.processes()
    _say(f"{'PROGRAM':<28} {'STATE':<10} {'PID':>7} {'RSS MiB':>8}  UPTIME")
    for name, p in sorted(procs.items()):
        uptime = p["description"].split("uptime ")[-1] if "uptime" in p["description"] else p["description"]
        _say(f"{name:<28} {p['statename']:<10} {p['pid'] or '-':>7} {_rss_mib(p['pid']) if p['pid'] else '-':>8}  {uptime}")
    _say("")
    _say(f"{'MODEL':<28} {'WORKER':<26} {'QUEUE':>5}  REGISTERED")
    try:
        registered = registered_models(dep)
    except requests.RequestException as exc:
        _say(f"(controller not answering: {type(exc).__name__})")
        return 1
    for m in dep.models:
        for n in m.names:
            address, queue = "-", "-"
            if n in registered:
                address = requests.post(f"{_controller(dep)}/get_worker_address", json={"model": n}, timeout=5).json()["address"]
                try:
                    queue = requests.post(f"{address}/worker_get_status", timeout=5).json()["queue_length"]
                except requests.RequestException:
                    queue = "?"
            _say(f"{n:<28} {address:<26} {queue:>5}  {'yes' if n in registered else 'NO'}")
    return 0


def cmd_restart(args) -> int:
    if supervisor_client.pid() is None:
        _say("The bundle is not running.")
        return 3
    _, dep = running(args)
    m = deployment.model_by_name(dep, args.model)
    rpc = supervisor_client.proxy()
    _say(f"restarting workers:{m.program} ...")
    rpc.supervisor.stopProcess(f"workers:{m.program}")
    rpc.supervisor.startProcess(f"workers:{m.program}")
    worker = f"http://127.0.0.1:{m.port}"
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        try:
            status = requests.post(f"{worker}/worker_get_status", timeout=5).json()
            if set(m.names) <= registered_models(dep) and status["model_names"] == m.names:
                _say(f"{m.program} is registered again and serving.")
                return 0
        except requests.RequestException:
            pass
        info = rpc.supervisor.getProcessInfo(f"workers:{m.program}")
        if info["statename"] not in STARTUP_STATES_OK:
            _say(f"{m.program} failed to start ({info['statename']}). Last lines of its log:\n{log_tail(m.program)}")
            return 1
        time.sleep(1)
    _say(f"{m.program} did not register within {args.timeout:.0f} s. Last lines of its log:\n{log_tail(m.program)}")
    return 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("start", help="start everything and wait until it serves")
    s.add_argument("--profile", default=os.environ.get("BUNDLE_PROFILE", "default"),
                   help="conf/<profile>.yaml or a path to a deployment file")
    s.add_argument("--timeout", type=float, default=float(os.environ.get("BUNDLE_START_TIMEOUT", 1800)))
    s.add_argument("--skip-memory-check", action="store_true", help="start even if the estimate exceeds free RAM")
    stop = sub.add_parser("stop", help="stop every bundle process")
    status = sub.add_parser("status", help="programs, registered models, queues and memory")
    r = sub.add_parser("restart", help="restart one model's worker and wait until it is registered again")
    r.add_argument("model")
    for running_cmd in (stop, status, r):
        running_cmd.add_argument("--profile", default=None,
                                 help="refuse unless the running bundle was started with this profile")
    r.add_argument("--timeout", type=float, default=1800)
    d = sub.add_parser("download", help="download a profile's ModelScope models and check them")
    download.add_arguments(d)
    args = p.parse_args(argv)
    # INFO from the bundle's own steps (INT8 cache, downloads) goes to the terminal with _say's lines.
    logging.basicConfig(level=logging.INFO, format="  %(message)s", stream=sys.stdout)
    handlers = {"start": cmd_start, "stop": cmd_stop, "status": cmd_status, "restart": cmd_restart,
                "download": download.run}
    try:
        return handlers[args.command](args)
    except DeploymentError as exc:
        print(f"Invalid deployment:\n{exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
