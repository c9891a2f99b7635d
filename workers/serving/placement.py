"""What the API server says when a model's host is away (deployments with a hosts: section).

A worker host that disappears is dropped by the controller after the heartbeat expiry. Before the
drop, calls to its worker fail ("the model worker or controller at http://10.0.0.11:21002 stopped
answering"); after it, the model has no registered worker. Both are 503 (workers/serving/errors.py).
With hosts, the API knows from the deployment where every model lives, and both messages name
the model and its host:

    model 'qwen-7b-chat' is not available: its worker on host 'second' (10.0.0.11:21002) is not
    registered with the controller (that host is down, unreachable or restarting; ...)
    model 'qwen-7b-chat' on host 'second' (10.0.0.11:21002) is not answering: the model worker ...

One hook, called by the API server once its handlers are installed: `placement.install_api(dep)`.
It wraps the two error constructors of workers/serving/errors.py in this process (they are looked
up as `errors.<name>` at call time). Without hosts: it does nothing.
"""
from __future__ import annotations

from workers.config import hosts


def not_registered_message(dep, spec, name: str) -> str:
    return (f"model {name!r} is not available: its worker on {hosts.model_host_label(dep, spec)} is not "
            f"registered with the controller (that host is down, unreachable or restarting; it registers again "
            f"on its own when it is back) - retry later")


def unreachable_message(dep, spec, detail: str) -> str:
    return f"model {spec.names[0]!r} on {hosts.model_host_label(dep, spec)} is not answering: {detail}"


def model_named(dep, name: str):
    return next((m for m in dep.models if name in m.names), None)


def install_api(dep) -> None:
    if not hosts.has_hosts(dep):
        return
    from workers.serving import errors

    not_registered = getattr(errors.not_registered, "_bundle_original", errors.not_registered)
    unavailable = getattr(errors.unavailable, "_bundle_original", errors.unavailable)

    def not_registered_on_host(model: str):
        err = not_registered(model)
        spec = model_named(dep, model)
        if spec is not None:
            err.message = not_registered_message(dep, spec, model)
            err.args = (err.message,)
        return err

    def unavailable_on_host(url: str, exc: BaseException):
        err = unavailable(url, exc)
        spec = hosts.model_for_url(dep, url)
        if spec is not None:
            err.message = unreachable_message(dep, spec, err.message)
            err.args = (err.message,)
        return err

    not_registered_on_host._bundle_original = not_registered
    unavailable_on_host._bundle_original = unavailable
    errors.not_registered, errors.unavailable = not_registered_on_host, unavailable_on_host
