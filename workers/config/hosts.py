"""Where each program of a deployment runs: its hosts, and the addresses to bind and to reach.

Without a `hosts:` section a deployment has one host, LOCAL: every program runs on this machine,
the controller, API and web UI bind to their own `host:` value (127.0.0.1 by default) and the
workers to 127.0.0.1, exactly as before hosts existed.

With a `hosts:` section (name -> address, cores, memory_gib), `controller.host`, `api.host`,
`web.host` and `models[].host` name the host each runs on (default: the first host). A program
binds to its host's address (`bind:` may override it for the controller, API and web UI, e.g.
0.0.0.0), and is reached at that address by the others: a worker registers with the controller
as http://<its host's address>:<port>, never as localhost.
"""
from __future__ import annotations

import os
import socket
from typing import Union

from workers.config.schema import Deployment, Endpoint, ModelSpec

LOCAL = "local"  # the one host of a deployment without a hosts: section
SERVICES = ("controller", "api", "web")

Component = Union[str, ModelSpec]  # "controller", "api", "web", or a model


class HostError(ValueError):
    """Which host this machine is cannot be told, or a named host does not exist."""


def has_hosts(dep: Deployment) -> bool:
    return bool(dep.hosts)


def several(dep: Deployment) -> bool:
    """More than one host: programs talk over the network, and a worker secret is required."""
    return len(dep.hosts) > 1


def names(dep: Deployment) -> list[str]:
    return list(dep.hosts) or [LOCAL]


def _endpoint(dep: Deployment, component: Component) -> Endpoint | None:
    return getattr(dep, component) if isinstance(component, str) else None


def host_of(dep: Deployment, component: Component) -> str:
    if not dep.hosts:
        return LOCAL
    ep = _endpoint(dep, component)
    return ep.host if ep is not None else component.host


def _address(dep: Deployment, host: str) -> str:
    return dep.hosts[host].address


def bind_address(dep: Deployment, component: Component) -> str:
    """The address the program listens on."""
    ep = _endpoint(dep, component)
    if not dep.hosts:
        return ep.host if ep is not None else "127.0.0.1"
    if ep is not None and ep.bind:
        return ep.bind
    return _address(dep, host_of(dep, component))


def reach_address(dep: Deployment, component: Component) -> str:
    """The address the other programs (and the CLI) use to reach it."""
    if not dep.hosts:
        ep = _endpoint(dep, component)
        host = ep.host if ep is not None else "127.0.0.1"
        return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return _address(dep, host_of(dep, component))


def port_of(component: Component, dep: Deployment) -> int:
    ep = _endpoint(dep, component)
    return ep.port if ep is not None else component.port


def url(dep: Deployment, component: Component) -> str:
    address = reach_address(dep, component)
    if ":" in address and not address.startswith("["):
        address = f"[{address}]"  # IPv6 literal
    return f"http://{address}:{port_of(component, dep)}"


def controller_url(dep: Deployment) -> str:
    return url(dep, "controller")


def worker_url(dep: Deployment, spec: ModelSpec) -> str:
    """The URL a worker registers under: the controller, API and web UI all call it."""
    return url(dep, spec)


def models_on(dep: Deployment, host: str) -> list[ModelSpec]:
    return [m for m in dep.models if host_of(dep, m) == host]


def services_on(dep: Deployment, host: str) -> list[str]:
    return [s for s in SERVICES if host_of(dep, s) == host]


def label(dep: Deployment, host: str) -> str:
    """'w1 (10.0.0.2)' for messages."""
    return f"{host} ({dep.hosts[host].address})" if host in dep.hosts else host


def model_host_label(dep: Deployment, spec: ModelSpec) -> str:
    """Where a model's worker is, for error messages: "host 'w1' (10.0.0.2:21002)"."""
    where = f"{reach_address(dep, spec)}:{spec.port}"
    return f"host {host_of(dep, spec)!r} ({where})" if dep.hosts else where


def model_for_url(dep: Deployment, worker_url_: str) -> ModelSpec | None:
    """The model whose worker is registered under `worker_url_` (scheme://address:port[/...])."""
    from urllib.parse import urlsplit

    netloc = urlsplit(worker_url_).netloc
    for m in dep.models:
        if urlsplit(worker_url(dep, m)).netloc == netloc:
            return m
    return None


def cores(dep: Deployment, host: str, cpu_count: int) -> int:
    """The cores the rules count on `host`: its declared cores, or this machine's without hosts:."""
    return dep.hosts[host].cores if host in dep.hosts else cpu_count


def local_addresses() -> set[str]:
    """Every address assigned to an interface of this machine (of this network namespace)."""
    import psutil

    found = set()
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family in (socket.AF_INET, socket.AF_INET6):
                found.add(a.address.split("%")[0])
    return found


def _resolves_here(address: str, here: set[str]) -> bool:
    if address in here:
        return True
    try:
        infos = socket.getaddrinfo(address, None)
    except (socket.gaierror, UnicodeError):
        return False
    return any(info[4][0] in here for info in infos)


def this_host(dep: Deployment, wanted: str | None = None) -> str:
    """The host this machine is: `wanted` (--host), else $BUNDLE_HOST, else the host whose
    address is on one of this machine's interfaces, else the only host."""
    wanted = wanted or os.environ.get("BUNDLE_HOST") or None
    if not dep.hosts:
        if wanted not in (None, LOCAL):
            raise HostError(f"--host {wanted}: this deployment has no hosts: section (everything runs here)")
        return LOCAL
    if wanted is not None:
        if wanted not in dep.hosts:
            raise HostError(f"--host {wanted}: no such host; hosts are {', '.join(label(dep, h) for h in dep.hosts)}")
        return wanted
    if len(dep.hosts) == 1:
        return next(iter(dep.hosts))
    here = local_addresses()
    matching = [h for h, spec in dep.hosts.items() if _resolves_here(spec.address, here)]
    if len(matching) == 1:
        return matching[0]
    hosts = ", ".join(label(dep, h) for h in dep.hosts)
    if not matching:
        raise HostError(f"none of the hosts' addresses is on this machine (hosts: {hosts}; "
                        f"addresses here: {', '.join(sorted(here))}); say which one with --host NAME")
    raise HostError(f"several hosts have an address on this machine ({', '.join(matching)}); "
                    f"say which one with --host NAME")


def this_host_or_none(dep: Deployment) -> str | None:
    try:
        return this_host(dep)
    except HostError:
        return None


def reference_problems(dep: Deployment) -> list[str]:
    """Every referenced host is defined; hosts-only keys are not used without hosts:."""
    problems = []
    sections: list[tuple[str, Component]] = [(s, s) for s in SERVICES]
    sections += [(f"models[{i}]", m) for i, m in enumerate(dep.models)]
    defined = ", ".join(dep.hosts)
    for where, component in sections:
        ep = _endpoint(dep, component)
        if dep.hosts:
            host = host_of(dep, component)
            if host not in dep.hosts:
                problems.append(f"{where}.host: {host!r} is not a host of the hosts: section (hosts: {defined}); "
                                f"with hosts:, host names one of them (use bind: for an address to listen on)")
        elif ep is not None and ep.bind is not None:
            problems.append(f"{where}.bind: only with a hosts: section (without one, {where}.host is the address to bind)")
        elif ep is None and component.host is not None:
            problems.append(f"{where}.host: {component.host!r} names a host, but there is no hosts: section")
    return problems
