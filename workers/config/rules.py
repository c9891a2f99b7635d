"""Rules checked before anything starts that need the whole deployment or the machine."""
from __future__ import annotations

import os
import socket
from pathlib import Path

from workers.config.int8 import unsupported_reason
from workers.config.paths import ROOT
from workers.config.schema import Deployment


def semantic_problems(dep: Deployment, cpu_count: int | None = None, base_dir: Path = ROOT,
                      cpu_flags: frozenset[str] | None = None) -> list[str]:
    """Rules that need the whole deployment or the machine (not just one field)."""
    cpu_count = cpu_count or os.cpu_count() or 1
    problems = []
    seen_names: dict[str, str] = {}
    seen_ports: dict[int, str] = {}
    for field, port in (("controller.port", dep.controller.port), ("api.port", dep.api.port), ("web.port", dep.web.port)):
        if port in seen_ports:
            problems.append(f"{field}: port {port} is already used by {seen_ports[port]}")
        seen_ports.setdefault(port, field)
    used_cores: dict[int, str] = {}
    for i, m in enumerate(dep.models):
        where = f"models[{i}]"
        for n in m.names:
            if n in seen_names:
                problems.append(f"{where}.names: {n!r} is already used by {seen_names[n]}")
            seen_names.setdefault(n, where)
        if m.port in seen_ports:
            problems.append(f"{where}.port: port {m.port} is already used by {seen_ports[m.port]}")
        seen_ports.setdefault(m.port, f"{where}.port")
        if not m.shared and m.threads > cpu_count:
            problems.append(f"{where}.threads: {m.threads} threads but this machine has {cpu_count} cores")
        for c in m.cpu_cores or []:
            if c >= cpu_count:
                problems.append(f"{where}.cpu_cores: core {c} does not exist (cores are 0..{cpu_count - 1})")
            elif c in used_cores:
                problems.append(f"{where}.cpu_cores: core {c} is already pinned by {used_cores[c]}")
            used_cores.setdefault(c, where)
        if m.backend == "itrex-int8":
            problem = unsupported_reason(m.int8, cpu_flags)
            if problem:
                problems.append(f"{where}.int8: {problem}")
        if m.source.path is not None and not resolve_path(m.source.path, base_dir).is_dir():
            problems.append(f"{where}.source.path: {resolve_path(m.source.path, base_dir)} does not exist")
    total = fixed_threads(dep)
    if total > cpu_count:
        problems.append(
            f"models: {total} threads in all on {cpu_count} cores oversubscribes the CPU "
            f"(measured 10-20x slower requests); lower models[*].threads"
        )
    elif any(m.shared for m in dep.models) and total >= cpu_count:
        problems.append(f"models: the fixed-thread workers take all {cpu_count} cores, none is left for "
                        f"the workers with threads: shared")
    return problems


def fixed_threads(dep: Deployment) -> int:
    return sum(m.threads for m in dep.models if not m.shared)


def shared_cores(dep: Deployment, cpu_count: int | None = None) -> int:
    """Cores that the `threads: shared` workers split between them by demand."""
    return max(1, (cpu_count or os.cpu_count() or 1) - fixed_threads(dep))


def resolve_path(path: Path, base_dir: Path = ROOT) -> Path:
    path = path.expanduser()
    return path if path.is_absolute() else (base_dir / path)


def ports_in_use(dep: Deployment) -> list[str]:
    """Ports of the deployment that something else is already listening on."""
    busy = []
    endpoints = [("controller.port", dep.controller), ("api.port", dep.api), ("web.port", dep.web)]
    endpoints += [(f"models[{i}].port", m) for i, m in enumerate(dep.models)]
    for field, ep in endpoints:
        host = getattr(ep, "host", "127.0.0.1")
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, ep.port))
            except OSError as exc:
                busy.append(f"{field}: port {ep.port} on {host} is already in use ({exc.strerror})")
    return busy
