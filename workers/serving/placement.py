"""What the API server says when a model's host is away (deployments with a hosts: section).

A worker host that disappears is dropped by the controller after the heartbeat expiry. Before the
drop, calls to its worker fail ("the model worker or controller at http://10.0.0.11:21002 stopped
answering"); after it, the model has no registered worker. Both are 503 (workers/serving/errors.py).
With hosts, the API knows from the deployment where every model lives, and both messages name
the model and its host:

    model 'qwen-7b-chat' is not available: its worker on host 'second' (10.0.0.11:21002) is not
    registered with the controller (that host is down, unreachable or restarting; ...)
    model 'qwen-7b-chat' on host 'second' (10.0.0.11:21002) is not answering: the model worker ...

`outage_errors(dep)` gives the API server its two constructors of these errors (passed to its handlers
and its Upstream client): errors.not_registered and errors.unavailable, which with hosts name the
model and its host.
"""
from __future__ import annotations

from typing import Callable

from workers.config import hosts
from workers.serving import errors
from workers.serving.errors import ApiError


def not_registered_message(dep, spec, name: str) -> str:
    return (f"model {name!r} is not available: its worker on {hosts.model_host_label(dep, spec)} is not "
            f"registered with the controller (that host is down, unreachable or restarting; it registers again "
            f"on its own when it is back) - retry later")


def unreachable_message(dep, spec, detail: str) -> str:
    return f"model {spec.names[0]!r} on {hosts.model_host_label(dep, spec)} is not answering: {detail}"


def model_named(dep, name: str):
    return next((m for m in dep.models if name in m.names), None)


def outage_errors(dep) -> tuple[Callable[[str], ApiError], Callable[[str, BaseException], ApiError]]:
    """(not_registered(model), unavailable(url, exc)) for this deployment."""
    if dep is None or not hosts.has_hosts(dep):
        return errors.not_registered, errors.unavailable

    def not_registered_on_host(model: str) -> ApiError:
        err = errors.not_registered(model)
        spec = model_named(dep, model)
        return err if spec is None else _reworded(err, not_registered_message(dep, spec, model))

    def unavailable_on_host(url: str, exc: BaseException) -> ApiError:
        err = errors.unavailable(url, exc)
        spec = hosts.model_for_url(dep, url)
        return err if spec is None else _reworded(err, unreachable_message(dep, spec, err.message))

    return not_registered_on_host, unavailable_on_host


def _reworded(err: ApiError, message: str) -> ApiError:
    return ApiError(err.kind, message, err.param, headers=err.headers, type_=err.type, code=err.code)
