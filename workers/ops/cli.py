"""Operate the bundle under supervisord: start, stop, status, restart a worker.

    bundle start [--profile default] [--host NAME]
    bundle stop | status | restart MODEL [--profile P]
    bundle download [--profile seed]

With a hosts: section, `start` starts the programs placed on one host (--host, default: the host
whose address is on this machine, or the only one) under that host's own supervisord; stop,
status and restart act on the host this machine started. `status` lists the models of every host.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import requests
from supervisor.states import ProcessStates

from workers.config import deployment, hosts, rules, secrets
from workers.models import sources as model_sources
from workers.ops import download, supervisor_client, supervisor_conf
from workers.ops import environments as worker_environments
from workers.serving import auth
from workers.config.deployment import DeploymentError
from workers.config.schema import Deployment
from workers.config.paths import ROOT, logs_dir

STARTUP_STATES_OK = {"STARTING", "RUNNING"}


def _say(msg: str) -> None:
    print(msg, flush=True)


def _controller(dep: Deployment) -> str:
    return hosts.controller_url(dep)


def _http(dep: Deployment) -> auth.RequestsShim:
    """requests-like client whose calls to the bundle's programs carry the worker secret."""
    return auth.client(dep)


def _scripts(name: str) -> str:
    return os.path.relpath(ROOT / "scripts" / name, Path.cwd())


def log_tail(program: str, lines: int = 25, offset: int = 0) -> str:
    """The last `lines` lines of a program's log written after byte `offset` (this start's own lines)."""
    path = logs_dir() / f"{program}.log"
    if not path.is_file():
        return f"(no log at {path})"
    with path.open("rb") as f:
        f.seek(offset if offset <= path.stat().st_size else 0)  # a log rotated since: all of it
        text = [line for line in f.read().decode(errors="replace").splitlines() if line.strip()]
    return "\n".join(text[-lines:]) or "(nothing logged yet)"


def registered_models(dep: Deployment) -> set[str]:
    r = _http(dep).post(f"{_controller(dep)}/list_models", timeout=5)
    r.raise_for_status()
    return set(r.json()["models"])


def _api_answers(dep: Deployment) -> bool:
    r = requests.get(f"{hosts.url(dep, 'api')}/v1/models", timeout=(auth.CONNECT_TIMEOUT_S, 5))
    return r.status_code in (200, 401)  # 401: up, and keys are required


def _web_answers(dep: Deployment) -> bool:
    return requests.get(f"{hosts.url(dep, 'web')}/", timeout=(auth.CONNECT_TIMEOUT_S, 5)).status_code == 200


def _controller_answers(dep: Deployment) -> bool:
    registered_models(dep)
    return True


def running(args) -> tuple[str, Deployment]:
    """(profile, deployment) of the bundle that runs; --profile, when given, must name it."""
    profile, dep = deployment.read_snapshot()
    wanted = getattr(args, "profile", None)
    if wanted is not None and wanted != profile:
        raise DeploymentError(f"the running bundle was started with profile {profile!r}, not {wanted!r}")
    return profile, dep


def running_host(dep: Deployment) -> str:
    """The host of the deployment this machine's supervisord runs."""
    return deployment.snapshot_host() or hosts.this_host(dep)


def print_urls(dep: Deployment, host: str = hosts.LOCAL) -> None:
    names = ", ".join(n for m in dep.models for n in m.names)
    lines = [""]
    if hosts.has_hosts(dep):
        lines.append(f"  This is host {hosts.label(dep, host)} of {len(dep.hosts)}: "
                     f"{', '.join(hosts.services_on(dep, host) + [m.program for m in hosts.models_on(dep, host)])}")
    lines.append(f"  Web chat (single and side by side):  {hosts.url(dep, 'web')}/")
    lines.append(f"  OpenAI-style API:                    {hosts.url(dep, 'api')}/v1   (models: {names})")
    if hosts.has_hosts(dep) and hosts.host_of(dep, "controller") != host:
        lines.append(f"  Controller:                          {_controller(dep)} (host {hosts.host_of(dep, 'controller')})")
    local = hosts.models_on(dep, host)
    lines.append(f"  Status:             {_scripts('status.sh')}")
    if local:
        lines.append(f"  Restart one worker: {_scripts('restart_worker.sh')} {local[0].names[0]}")
    stop = "Stop this host:     " if hosts.several(dep) else "Stop everything:    "
    lines.append(f"  {stop}{_scripts('stop_all.sh')}")
    lines.append(f"  Logs:               {logs_dir()}")
    _say("\n".join(lines))


def _log_sizes(programs) -> dict[str, int]:
    sizes = {}
    for program in programs:
        path = logs_dir() / f"{program}.log"
        sizes[program] = path.stat().st_size if path.is_file() else 0
    return sizes


def _refused_registration(program: str, offset: int) -> bool:
    """Whether the worker logged, since `offset`, that the controller refused its secret."""
    path = logs_dir() / f"{program}.log"
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return b"refused registration" in f.read()
    except OSError:
        return False


def wait_ready(dep: Deployment, timeout: float, host: str = hosts.LOCAL,
               log_offsets: dict[str, int] | None = None) -> str | None:
    """Wait for `host`'s workers to register and its API, web UI and controller to answer.

    Returns None when ready, or the name of the program that failed.
    """
    wanted = {m.program: set(m.names) for m in hosts.models_on(dep, host)}
    log_offsets = log_offsets or {}
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
                _say(f"  worker {program}: registered with the controller at {_controller(dep)}")
            elif program not in ready and _refused_registration(program, log_offsets.get(program, 0)):
                return program
        available = {"api": _api_answers, "web": _web_answers, "controller": _controller_answers}
        checks = {name: available[name] for name in hosts.services_on(dep, host)}
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
                _say(f"  worker {program}: loading ... {log_tail(program, 1, log_offsets.get(program, 0))[-140:]}")
        time.sleep(1)
    return "timeout"


def runtime_kv_bytes(m) -> int:
    """KV memory model `m`'s runtime allocates at load (Runtime.memory_extra: e.g. KV cache slots a batching worker
    holds), else 0."""
    from workers.engine.runtimes import registry
    from workers.engine.runtimes.base import RuntimeUnavailable, UnsupportedBackend

    folder = model_sources.model_dir(m.source)
    try:
        runtime = registry.runtime_for(m.backend, m.int8, folder, m.shared)
        return runtime.memory_extra(folder, m.limit_concurrency if m.batching else 1)
    except (RuntimeUnavailable, UnsupportedBackend, OSError, ValueError):  # reported when its worker starts
        return 0


def memory_problem(dep: Deployment, host: str = hosts.LOCAL) -> str | None:
    """Whether `host`'s workers fit in this machine's free RAM (and in the host's memory_gib)."""
    from workers.config.files import GIB
    from workers.models import memory_budget

    needs = []
    for m in hosts.models_on(dep, host):
        try:
            shape = memory_budget.shape_of_folder(model_sources.model_dir(m.source))
        except (memory_budget.UnknownShape, OSError, ValueError) as exc:
            _say(f"  {m.program}: cannot estimate its memory ({exc}); not counted")
            continue
        needs.append(memory_budget.Need(m.program, m.backend, shape, m.limit_concurrency, m.int8.group_size,
                                        m.prefix_cache_tokens, runtime_kv_bytes(m), m.int8.bits))
    available = psutil.virtual_memory().available
    budget = dep.hosts[host].memory_gib if host in dep.hosts else None
    problem = memory_budget.check(needs, min(available, int(budget * GIB)) if budget else available)
    if problem and budget:
        problem = (f"host {host!r} (memory_gib {budget:g}, {available / GIB:.1f} GiB free on this machine): "
                   f"{problem}")
    return problem


def prepare_int8_weights(dep: Deployment, folders: dict[str, Path], host: str = hosts.LOCAL,
                         step: str = "[2/4]") -> str | None:
    """Build missing INT8 cache entries now, before any worker runs.

    Quantizing is the memory peak of a first start; done here, no serving worker shares RAM with
    it, and its progress shows in this terminal. The workers then load the cache. Several models
    are built side by side where int8_cache lets them (small ones: engine/quantize_slots.py).
    """
    from workers.config.paths import int8_cache_dir
    from workers.engine import int8_cache
    from workers.engine.runtimes import registry
    from workers.engine.runtimes.base import RuntimeUnavailable

    quantized = []
    for m in hosts.models_on(dep, host):
        try:  # the runtime the worker will pick (registry), so its entry is the one built here
            runtime, settings = registry.select(m.backend, m.int8, folders[m.program], m.shared)
        except RuntimeUnavailable as exc:
            return f"models[{m.program}]: {exc}"
        if runtime.quantizes:
            quantized.append((m, settings))
    _say(f"{step} INT8 weights for {len(quantized)} model(s) (quantized once, then loaded from {int8_cache_dir()})")
    for m, settings in quantized:
        problem = registry.unsupported_reason(settings)
        if problem:  # a CPU check of the runtime chosen (config checked what every runtime needs)
            return f"models[{m.program}].int8: {problem}"
        runtime = registry.by_name(settings.runtime)
        try:
            runtime.prepare(settings, _say)
        except RuntimeUnavailable as exc:
            return f"models[{m.program}]: {exc}"
        problem = runtime.quantizer_environment and worker_environments.build_missing([runtime.quantizer_environment],
                                                                                      _say)
        if problem:
            return f"models[{m.program}]: {problem}"

    failed = threading.Event()

    def build(m, settings) -> str | None:
        if failed.is_set():  # the start stops at the first failure: nothing more is begun
            return None
        try:
            entry = int8_cache.ensure(folders[m.program], settings, int8_cache_dir(), m.trust_remote_code)
        except (int8_cache.CacheBuildError, RuntimeUnavailable) as exc:
            failed.set()
            return f"models[{m.program}]: {exc}"
        _say(f"  {m.program}: {entry.name} ({settings.describe()})")
        return None

    with ThreadPoolExecutor(max_workers=max(1, min(len(quantized), os.cpu_count() or 1))) as pool:
        problems = list(pool.map(lambda job: build(*job), quantized))
    return next((p for p in problems if p), None)  # the first model's problem, in the deployment's order


def prepare_models(dep: Deployment, host: str, models_step: str, int8_step: str, memory_check=None):
    """What a start does before anything runs: each model's folder (converted or downloaded where needed), the
    environments its workers run in (built where missing), then `memory_check(dep, host)` when given, then the INT8
    weights (quantized where missing). Returns (folders, environments), or what stopped it."""
    local = hosts.models_on(dep, host)
    on = f" on host {hosts.label(dep, host)}" if hosts.has_hosts(dep) else ""
    _say(f"{models_step} preparing {len(local)} model(s){on}")
    folders = {}
    for m in local:
        try:
            folders[m.program] = model_sources.prepare(m.source)
        except model_sources.SourceNotReady as exc:
            return f"models[{m.program}]: {exc}"
        _say(f"  {m.program}: {folders[m.program]} ({m.backend}, {m.threads} thread(s))")
    environments = worker_environments.for_models(folders)
    for program, (env, why) in environments.items():
        if env.name != "pinned":
            _say(f"  {program}: runs in the '{env.name}' environment ({why})")
    problem = worker_environments.build_missing([env for env, _ in environments.values()], _say)
    if problem:
        return problem
    problem = memory_check and memory_check(dep, host)
    if problem:
        return f"{problem}\n(--skip-memory-check starts anyway.)"
    problem = prepare_int8_weights(dep, folders, host, int8_step)
    return problem or (folders, environments)


def cmd_prepare(args) -> int:
    """Everything a start does before it starts a program, so that a later start only loads."""
    dep = deployment.load(args.profile, host=args.host)
    try:
        host = hosts.this_host(dep, args.host)
    except hosts.HostError as exc:
        _say(f"Cannot prepare: {exc}")
        return 2
    prepared = prepare_models(dep, host, "[1/2]", "[2/2]")
    if isinstance(prepared, str):
        _say(f"Cannot prepare: {prepared}")
        return 2
    _say(f"Prepared {len(prepared[0])} model(s); `bundle start --profile {args.profile}` loads them without quantizing.")
    return 0


def cmd_start(args) -> int:
    dep = deployment.load(args.profile, host=args.host)
    running = supervisor_client.pid()
    if running:
        profile, current = deployment.read_snapshot()
        _say(f"The bundle is already running (supervisord pid {running}, profile '{profile}'); nothing changed.")
        print_urls(current, running_host(current))
        return 0
    try:
        host = hosts.this_host(dep, args.host)
        secrets.worker_secret(dep)  # required with several hosts; read again by every program
    except (hosts.HostError, secrets.SecretError) as exc:
        _say(f"Cannot start: {exc}")
        return 2
    local = hosts.models_on(dep, host)
    if not local and not hosts.services_on(dep, host):
        _say(f"Cannot start: nothing of this deployment is placed on host {hosts.label(dep, host)}")
        return 2
    busy = rules.ports_in_use(dep, host)
    if busy:
        _say("Cannot start: " + "; ".join(busy))
        return 2
    prepared = prepare_models(dep, host, "[1/4]", "[2/4]", None if args.skip_memory_check else memory_problem)
    if isinstance(prepared, str):
        _say(f"Cannot start: {prepared}")
        return 2
    environments = prepared[1]
    snapshot = deployment.write_snapshot(dep, args.profile, host=host if hosts.has_hosts(dep) else None)
    conf = supervisor_conf.write(dep, snapshot, host, {p: env.python() for p, (env, _) in environments.items()})
    offsets = _log_sizes(m.program for m in local)
    _say(f"[3/4] starting supervisord ({conf})")
    supervisor_client.start_daemon(conf)
    services = {"controller": "controller", "api": "API", "web": "web UI"}
    what = ["workers to register"] if local else []
    if hosts.services_on(dep, host):
        what.append("the " + " and ".join(services[x] for x in hosts.services_on(dep, host)) + " to answer")
    what = " and ".join(what)
    _say(f"[4/4] waiting for {what}")
    failed = wait_ready(dep, args.timeout, host, offsets)
    if failed:
        if failed == "timeout":
            _say(f"Not ready after {args.timeout:.0f} s. Last lines of each worker log:")
            for m in local:
                _say(f"--- {m.program}\n{log_tail(m.program, 25, offsets.get(m.program, 0))}")
        elif failed in offsets and _refused_registration(failed, offsets[failed]):
            _say(f"Worker '{failed}': the controller at {_controller(dep)} refused its registration: {auth.REFUSED}. "
                 f"Every host needs the same worker secret. Last lines of {logs_dir() / (failed + '.log')}:\n"
                 f"{log_tail(failed, 8, offsets[failed])}")
        else:
            _say(f"Program '{failed}' failed to start. Last lines of {logs_dir() / (failed + '.log')}:\n"
                 f"{log_tail(failed, 25, offsets.get(failed, 0))}")
        _say("Stopping the bundle so nothing is left half-started.")
        supervisor_client.shutdown()
        return 1
    _say(f"The bundle is up{f' on host {hosts.label(dep, host)}' if hosts.has_hosts(dep) else ''}.")
    print_urls(dep, host)
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
    host = running_host(dep)
    procs = supervisor_client.processes()
    if hosts.has_hosts(dep):
        _say(f"Host {hosts.label(dep, host)}: programs of its supervisord")
    _say(f"{'PROGRAM':<28} {'STATE':<10} {'PID':>7} {'RSS MiB':>8}  UPTIME")
    for name, p in sorted(procs.items()):
        uptime = p["description"].split("uptime ")[-1] if "uptime" in p["description"] else p["description"]
        _say(f"{name:<28} {p['statename']:<10} {p['pid'] or '-':>7} {_rss_mib(p['pid']) if p['pid'] else '-':>8}  {uptime}")
    _say("")
    http = _http(dep)
    try:
        registered = registered_models(dep)
    except requests.RequestException as exc:
        _say(f"(controller at {_controller(dep)} not answering: {type(exc).__name__}: {exc})"[:300])
        return 1
    if hosts.has_hosts(dep):
        _say(f"Models of every host, as the controller at {_controller(dep)} sees them:")
        _say(f"{'MODEL':<28} {'HOST':<12} {'WORKER':<28} {'QUEUE':>5}  REGISTERED")
    else:
        _say(f"{'MODEL':<28} {'WORKER':<26} {'QUEUE':>5}  REGISTERED")
    for m in dep.models:
        for n in m.names:
            address, queue = "-", "-"
            if n in registered:
                address = http.post(f"{_controller(dep)}/get_worker_address", json={"model": n}, timeout=5).json()["address"]
                try:
                    queue = http.post(f"{address}/worker_get_status", timeout=5).json()["queue_length"]
                except (requests.RequestException, ValueError, KeyError):
                    queue = "?"
            state = "yes" if n in registered else "NO"
            if hosts.has_hosts(dep):
                address = address if address != "-" else f"({hosts.worker_url(dep, m)})"
                _say(f"{n:<28} {hosts.host_of(dep, m):<12} {address:<28} {queue:>5}  {state}")
            else:
                _say(f"{n:<28} {address:<26} {queue:>5}  {state}")
    return 0


def cmd_restart(args) -> int:
    if supervisor_client.pid() is None:
        _say("The bundle is not running.")
        return 3
    _, dep = running(args)
    m = deployment.model_by_name(dep, args.model)
    host = running_host(dep)
    if hosts.host_of(dep, m) != host:
        _say(f"{m.program} runs on host {hosts.label(dep, hosts.host_of(dep, m))}, not on this one ({host}): "
             f"run the restart there.")
        return 2
    http = _http(dep)
    rpc = supervisor_client.proxy()
    _say(f"restarting workers:{m.program} ...")
    rpc.supervisor.stopProcess(f"workers:{m.program}")
    rpc.supervisor.startProcess(f"workers:{m.program}")
    worker = hosts.worker_url(dep, m)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        try:
            status = http.post(f"{worker}/worker_get_status", timeout=5).json()
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
    s.add_argument("--host", default=None,
                   help="with a hosts: section, the host to start (default: $BUNDLE_HOST, else the host whose "
                        "address is on this machine, else the only host)")
    prep = sub.add_parser("prepare", help="prepare a profile's models, environments and INT8 weights; start nothing")
    prep.add_argument("--profile", default=os.environ.get("BUNDLE_PROFILE", "default"),
                      help="conf/<profile>.yaml or a path to a deployment file")
    prep.add_argument("--host", default=None, help="with a hosts: section, the host whose models to prepare")
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
    handlers = {"start": cmd_start, "prepare": cmd_prepare, "stop": cmd_stop, "status": cmd_status, "restart": cmd_restart,
                "download": download.run}
    try:
        return handlers[args.command](args)
    except DeploymentError as exc:
        print(f"Invalid deployment:\n{exc}", file=sys.stderr)
        return 2
    except (hosts.HostError, secrets.SecretError) as exc:
        print(f"Cannot {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
