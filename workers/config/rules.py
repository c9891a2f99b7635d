"""Rules checked before anything starts that need the whole deployment or the machine."""
from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

from workers.config import hosts
from workers.config.int8 import unsupported_reason
from workers.config.paths import ROOT
from workers.config.schema import Deployment


def semantic_problems(dep: Deployment, cpu_count: int | None = None, base_dir: Path = ROOT,
                      cpu_flags: frozenset[str] | None = None, host: str | None = None) -> list[str]:
    """Rules that need the whole deployment or the machine (not just one field).

    Ports, threads and pinned cores are checked per host, against that host's `cores` (this
    machine's cores without hosts:). What depends on this machine (its core count, CPU features,
    local model folders) is checked for the models of `host` (default: the host this machine is;
    every model without hosts:), since other hosts' CPUs and disks are not visible from here.
    """
    cpu_count = cpu_count or os.cpu_count() or 1
    problems = hosts.reference_problems(dep)
    if problems:
        return problems
    here = host if host is not None else hosts.this_host_or_none(dep)
    seen_names: dict[str, str] = {}
    for i, m in enumerate(dep.models):
        for n in m.names:
            if n in seen_names:
                problems.append(f"models[{i}].names: {n!r} is already used by {seen_names[n]}")
            seen_names.setdefault(n, f"models[{i}]")
    for name in hosts.names(dep):
        problems += _host_problems(dep, name, cpu_count)
    if here in dep.hosts and dep.hosts[here].cores > cpu_count:
        problems.append(f"hosts.{here}.cores: {dep.hosts[here].cores} cores but this machine (host {here!r}) "
                        f"has {cpu_count}")
    for i, m in enumerate(dep.models):
        if here is not None and hosts.host_of(dep, m) != here:
            continue
        where = f"models[{i}]"
        if m.backend == "itrex-int8":
            problem = unsupported_reason(m.int8, cpu_flags)
            if problem:
                problems.append(f"{where}.int8: {problem}")
        if m.source.path is not None and not resolve_path(m.source.path, base_dir).is_dir():
            problems.append(f"{where}.source.path: {resolve_path(m.source.path, base_dir)} does not exist")
    return problems


def _host_problems(dep: Deployment, host: str, cpu_count: int) -> list[str]:
    """Ports unique, threads within the cores, cores pinned once: on one host."""
    problems = []
    cores = hosts.cores(dep, host, cpu_count)
    on = f" on host {host!r}" if dep.hosts else ""
    machine = f"host {host!r}" if dep.hosts else "this machine"
    seen_ports: dict[int, str] = {}
    for field in hosts.services_on(dep, host):
        port = getattr(dep, field).port
        if port in seen_ports:
            problems.append(f"{field}.port: port {port}{on} is already used by {seen_ports[port]}")
        seen_ports.setdefault(port, f"{field}.port")
    used_cores: dict[int, str] = {}
    total = 0
    for i, m in enumerate(dep.models):
        if hosts.host_of(dep, m) != host:
            continue
        where = f"models[{i}]"
        if m.port in seen_ports:
            problems.append(f"{where}.port: port {m.port}{on} is already used by {seen_ports[m.port]}")
        seen_ports.setdefault(m.port, f"{where}.port")
        if not m.shared and m.threads > cores:
            problems.append(f"{where}.threads: {m.threads} threads but {machine} has {cores} cores")
        for c in m.cpu_cores or []:
            if c >= cores:
                problems.append(f"{where}.cpu_cores: core {c} does not exist (cores{on} are 0..{cores - 1})")
            elif c in used_cores:
                problems.append(f"{where}.cpu_cores: core {c} is already pinned by {used_cores[c]}")
            used_cores.setdefault(c, where)
    total = fixed_threads(dep, host)
    if total > cores:
        problems.append(
            f"models: {total} threads in all{on} on {cores} cores oversubscribes the CPU "
            f"(measured 10-20x slower requests); lower models[*].threads"
        )
    elif any(m.shared for m in hosts.models_on(dep, host)) and total >= cores:
        problems.append(f"models: the fixed-thread workers{on} take all {cores} cores, none is left for "
                        f"the workers with threads: shared")
    return problems


def fixed_threads(dep: Deployment, host: str | None = None) -> int:
    """Threads of the fixed-thread workers (of `host` only, when given)."""
    models = dep.models if host is None else hosts.models_on(dep, host)
    return sum(m.threads for m in models if not m.shared)


def shared_cores(dep: Deployment, cpu_count: int | None = None, host: str | None = None) -> int:
    """Cores that the `threads: shared` workers (of one host) split between them by demand.

    With hosts:, those of `host` (default: the host this machine is), out of its declared cores."""
    cpu_count = cpu_count or os.cpu_count() or 1
    if dep.hosts:
        host = host or hosts.this_host_or_none(dep)
        if host in dep.hosts:
            return max(1, dep.hosts[host].cores - fixed_threads(dep, host))
    return max(1, cpu_count - fixed_threads(dep))


def resolve_path(path: Path, base_dir: Path = ROOT) -> Path:
    path = path.expanduser()
    return path if path.is_absolute() else (base_dir / path)


def ports_in_use(dep: Deployment, host: str = hosts.LOCAL) -> list[str]:
    """Ports of `host`'s programs that something else is already listening on (checked on this machine)."""
    busy = []
    endpoints = [(f"{s}.port", s) for s in hosts.services_on(dep, host)]
    endpoints += [(f"models[{i}].port", m) for i, m in enumerate(dep.models) if hosts.host_of(dep, m) == host]
    for field, component in endpoints:
        address, port = hosts.bind_address(dep, component), hosts.port_of(component, dep)
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with socket.socket(family) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((address, port))
            except OSError as exc:
                if exc.errno == errno.EADDRNOTAVAIL:
                    busy.append(f"{field}: address {address} is not on this machine (is this host {host!r}?)")
                    continue
                busy.append(f"{field}: port {port} on {address} is already in use ({exc.strerror})")
    return busy
