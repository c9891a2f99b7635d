"""Several hosts in one deployment file: placement, per-host rules, which host this machine is,
the worker secret, and the secret check on both sides of a call."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml

from workers.config import deployment, hosts, rules, secrets
from workers.config.deployment import DeploymentError
from workers.config.schema import Deployment
from workers.ops import supervisor_conf

SECRET = "unit-test-worker-secret-123456"


def model(name, host=None, port=21002, **extra):
    m = {"names": [name], "source": {"embedded": "smollm2-135m-instruct"}, "port": port, "threads": 1, **extra}
    return {**m, "host": host} if host else m


def two_hosts(**extra) -> dict:
    data = {
        "hosts": {"main": {"address": "10.9.0.1", "cores": 2, "memory_gib": 24},
                  "second": {"address": "10.9.0.2", "cores": 4}},
        "controller": {"port": 21001}, "api": {"port": 8000}, "web": {"port": 7860, "bind": "0.0.0.0"},
        "models": [model("glm", "main"), model("qwen", "second", threads=4)],
    }
    data.update(extra)
    return data


def load(tmp_path: Path, data: dict, host: str | None = None) -> Deployment:
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(data))
    return deployment.load(str(path), cpu_count=2, host=host)


def load_error(tmp_path, data, host=None) -> str:
    with pytest.raises(DeploymentError) as info:
        load(tmp_path, data, host)
    return str(info.value)


def test_placement_and_addresses(tmp_path):
    dep = load(tmp_path, two_hosts())
    # what names no host runs on the first one
    assert [hosts.host_of(dep, s) for s in ("controller", "api", "web")] == ["main"] * 3
    glm, qwen = dep.models
    assert hosts.host_of(dep, qwen) == "second"
    assert hosts.controller_url(dep) == "http://10.9.0.1:21001"
    assert hosts.worker_url(dep, qwen) == "http://10.9.0.2:21002"   # what it registers under
    assert hosts.bind_address(dep, qwen) == "10.9.0.2"                # never all interfaces
    assert hosts.bind_address(dep, "web") == "0.0.0.0" and hosts.url(dep, "web") == "http://10.9.0.1:7860"
    assert [m.program for m in hosts.models_on(dep, "second")] == ["qwen"]
    assert hosts.services_on(dep, "second") == [] and hosts.services_on(dep, "main") == ["controller", "api", "web"]
    assert hosts.model_for_url(dep, "http://10.9.0.2:21002/worker_generate") is qwen
    assert hosts.model_host_label(dep, qwen) == "host 'second' (10.9.0.2:21002)"
    # the snapshot round trip keeps the placement
    snap = deployment.write_snapshot(dep, "x", tmp_path / "snap.json", host="second")
    assert deployment.read_snapshot(snap)[1] == dep and deployment.snapshot_host(snap) == "second"


def test_single_host_deployments_are_unchanged():
    dep = deployment.load("default", cpu_count=2)
    assert not hosts.has_hosts(dep) and hosts.names(dep) == [hosts.LOCAL]
    assert hosts.controller_url(dep) == "http://127.0.0.1:21001"
    assert hosts.bind_address(dep, dep.models[0]) == "127.0.0.1"
    assert hosts.worker_url(dep, dep.models[0]) == "http://127.0.0.1:21002"
    assert hosts.this_host(dep) == hosts.LOCAL
    assert deployment.load("seed", cpu_count=2).hosts == {}


def test_every_referenced_host_must_be_defined(tmp_path):
    err = load_error(tmp_path, two_hosts(models=[model("glm", "main"), model("qwen", "third")]))
    assert "models[1].host: 'third' is not a host of the hosts: section (hosts: main, second)" in err
    err = load_error(tmp_path, two_hosts(controller={"host": "127.0.0.1", "port": 21001}))
    assert "controller.host: '127.0.0.1' is not a host of the hosts: section" in err


def test_host_keys_need_a_hosts_section(tmp_path):
    assert "models[0].host: 'main' names a host, but there is no hosts: section" in load_error(
        tmp_path, {"models": [model("a", "main")]})
    assert "web.bind: only with a hosts: section" in load_error(
        tmp_path, {"web": {"port": 7860, "bind": "0.0.0.0"}, "models": [model("a")]})


def test_ports_are_unique_per_host(tmp_path):
    load(tmp_path, two_hosts())  # the same worker port on two hosts is fine
    err = load_error(tmp_path, two_hosts(models=[model("glm", "main", port=8000), model("qwen", "second")]))
    assert "models[0].port: port 8000 on host 'main' is already used by api.port" in err


def test_threads_and_pinned_cores_per_host(tmp_path):
    err = load_error(tmp_path, two_hosts(models=[model("glm", "main", threads=3), model("qwen", "second", threads=4)]))
    assert "models[0].threads: 3 threads but host 'main' has 2 cores" in err
    err = load_error(tmp_path, two_hosts(models=[model("a", "second", threads=3), model("b", "second", port=21003,
                                                                                      threads=2)]))
    assert "models: 5 threads in all on host 'second' on 4 cores oversubscribes the CPU" in err
    err = load_error(tmp_path, two_hosts(models=[model("a", "main", cpu_cores=[3])]))
    assert "models[0].cpu_cores: core 3 does not exist (cores on host 'main' are 0..1)" in err
    # two hosts may pin the same core number: they are different machines
    load(tmp_path, two_hosts(models=[model("a", "main", cpu_cores=[1]), model("b", "second", cpu_cores=[1])]))


def test_a_host_cannot_claim_more_cores_than_the_machine_it_starts_on(tmp_path):
    assert "hosts.second.cores: 4 cores but this machine (host 'second') has 2" in load_error(
        tmp_path, two_hosts(), host="second")


def test_bad_hosts_are_refused(tmp_path):
    err = load_error(tmp_path, two_hosts(hosts={"main": {"address": "0.0.0.0", "cores": 2}}))
    assert "hosts.main.address" in err and "not an address other hosts can reach" in err
    assert "a host name uses lowercase letters" in load_error(
        tmp_path, two_hosts(hosts={"Main Box": {"address": "10.0.0.1", "cores": 2}}))
    assert "hosts.main.cores: Field required" in load_error(tmp_path, two_hosts(hosts={"main": {"address": "10.0.0.1"}}))


def test_which_host_this_machine_is(tmp_path, monkeypatch):
    dep = load(tmp_path, two_hosts())
    monkeypatch.delenv("BUNDLE_HOST", raising=False)
    monkeypatch.setattr(hosts, "local_addresses", lambda: {"127.0.0.1", "10.9.0.2"})
    assert hosts.this_host(dep) == "second"
    assert hosts.this_host(dep, "main") == "main"
    monkeypatch.setenv("BUNDLE_HOST", "main")
    assert hosts.this_host(dep) == "main"
    monkeypatch.delenv("BUNDLE_HOST")
    with pytest.raises(hosts.HostError, match="--host nope: no such host; hosts are main .10.9.0.1., second"):
        hosts.this_host(dep, "nope")
    monkeypatch.setattr(hosts, "local_addresses", lambda: {"127.0.0.1"})
    with pytest.raises(hosts.HostError, match="none of the hosts' addresses is on this machine.*--host NAME"):
        hosts.this_host(dep)


def test_worker_secret_required_with_several_hosts_optional_on_one(tmp_path, monkeypatch):
    monkeypatch.delenv("BUNDLE_WORKER_SECRET", raising=False)
    dep = load(tmp_path, two_hosts())
    with pytest.raises(secrets.SecretError, match=r"several hosts needs a worker secret: set \$BUNDLE_WORKER_SECRET"):
        secrets.worker_secret(dep)
    assert secrets.worker_secret(deployment.load("default", cpu_count=2)) is None  # one host: no check
    monkeypatch.setenv("BUNDLE_WORKER_SECRET", "short")
    with pytest.raises(secrets.SecretError, match="5 characters; use at least 16"):
        secrets.worker_secret(dep)
    monkeypatch.setenv("BUNDLE_WORKER_SECRET", SECRET)
    assert secrets.worker_secret(dep) == SECRET
    monkeypatch.delenv("BUNDLE_WORKER_SECRET")
    file = tmp_path / "secret"
    file.write_text(f"# the bundle's worker secret\n{SECRET}\n")
    assert secrets.worker_secret(load(tmp_path, two_hosts(worker_secret={"file": str(file)}))) == SECRET


def test_supervisord_runs_only_the_hosts_programs_and_the_secret_is_written_nowhere(tmp_path, monkeypatch):
    monkeypatch.setenv("BUNDLE_VAR_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("BUNDLE_WORKER_SECRET", SECRET)
    monkeypatch.setenv("PYTHONPATH", "/some/checkout")
    dep = load(tmp_path, two_hosts())
    snapshot = deployment.write_snapshot(dep, "two", host="second")
    second = supervisor_conf.render(dep, snapshot, host="second")
    assert "[program:qwen]" in second and "[program:glm]" not in second and "[program:controller]" not in second
    assert 'PYTHONPATH="/some/checkout"' in second
    main = supervisor_conf.render(dep, snapshot, host="main")
    assert {"[program:controller]", "[program:api]", "[program:web]", "[program:glm]"} <= set(main.splitlines())
    assert "[program:qwen]" not in main
    assert SECRET not in second + main + snapshot.read_text()


def test_ports_in_use_checks_the_hosts_own_addresses(tmp_path):
    dep = load(tmp_path, two_hosts())
    problems = rules.ports_in_use(dep, "second")  # 10.9.0.2 is not an address of this machine
    assert problems == ["models[1].port: address 10.9.0.2 is not on this machine (is this host 'second'?)"]


# -- both sides of a call ---------------------------------------------------------------------

def _app_with_secret(secret):
    from fastapi import FastAPI

    from workers.serving import auth

    app = FastAPI()

    @app.post("/worker_get_status")
    async def status():
        return {"ok": True}

    auth.install_server(app, secret)
    return app


def test_server_answers_401_without_the_secret():
    from fastapi.testclient import TestClient

    from workers.serving.auth import HEADER

    client = TestClient(_app_with_secret(SECRET))
    assert client.post("/worker_get_status").status_code == 401
    assert client.post("/worker_get_status", headers={HEADER: "wrong-secret-wrong-secret"}).status_code == 401
    assert "missing or wrong worker secret" in client.post("/worker_get_status").text
    assert client.post("/worker_get_status", headers={HEADER: SECRET}).json() == {"ok": True}
    assert TestClient(_app_with_secret(None)).post("/worker_get_status").status_code == 200  # no secret: no check


def test_client_shim_sends_the_secret_with_a_connect_timeout_and_names_a_refusal(monkeypatch):
    import requests

    from workers.serving import auth

    calls = []

    class Response:
        def __init__(self, status):
            self.status_code = status

        def close(self):
            pass

    status = {"code": 200}

    def fake_request(method, url, **kw):
        calls.append((method, url, kw))
        return Response(status["code"])

    monkeypatch.setattr(requests, "request", fake_request)
    shim = auth.RequestsShim(SECRET, who="worker")
    shim.post("http://10.9.0.1:21001/receive_heart_beat", json={}, timeout=5)
    shim.post("http://10.9.0.1:21001/register_worker", json={})
    assert calls[0][2]["headers"] == {auth.HEADER: SECRET} and calls[0][2]["timeout"] == (auth.CONNECT_TIMEOUT_S, 5)
    assert calls[1][2]["timeout"] == (auth.CONNECT_TIMEOUT_S, auth.DEFAULT_READ_TIMEOUT_S)  # FastChat sets none
    assert shim.exceptions is requests.exceptions  # FastChat catches requests.exceptions.RequestException
    status["code"] = 401
    with pytest.raises(auth.RegistrationRefused,
                       match="controller at http://10.9.0.1:21001 refused registration: wrong or missing worker secret"):
        shim.post("http://10.9.0.1:21001/register_worker", json={})
    with pytest.raises(requests.exceptions.RequestException, match="refused the worker's call to /receive_heart_beat"):
        shim.post("http://10.9.0.1:21001/receive_heart_beat", json={})
    status["code"] = 200
    auth.RequestsShim(None).post("http://10.9.0.1:21001/list_models")  # no secret configured: no header
    assert auth.HEADER not in calls[-1][2]["headers"]


def test_api_names_model_and_host_when_a_host_is_away(tmp_path, monkeypatch):
    import httpx

    from workers.serving import errors, placement

    dep = load(tmp_path, two_hosts())
    not_registered, unavailable = placement.outage_errors(dep)
    err = not_registered("qwen")
    assert err.status == 503 and err.message.startswith(
        "model 'qwen' is not available: its worker on host 'second' (10.9.0.2:21002) is not registered with the "
        "controller")
    err = unavailable("http://10.9.0.2:21002/count_token", httpx.ConnectTimeout("timed out"))
    assert err.status == 503 and err.message.startswith(
        "model 'qwen' on host 'second' (10.9.0.2:21002) is not answering: the model worker or controller at "
        "http://10.9.0.2:21002 stopped answering (ConnectTimeout)")
    # the controller, or a model the deployment does not know: unchanged
    assert unavailable("http://10.9.0.1:21001/list_models", OSError()).message.startswith(
        "the model worker or controller at http://10.9.0.1:21001")
    assert "its worker stopped answering" in not_registered("other").message
    assert placement.outage_errors(load(tmp_path, {"models": [model("one", None)]})) == (errors.not_registered,
                                                                                       errors.unavailable)


def test_shipped_two_host_example_is_valid():
    dep = deployment.load("seed-two-hosts", cpu_count=2)
    assert list(dep.hosts) == ["main", "second"]
    assert [hosts.host_of(dep, m) for m in dep.models] == ["main", "second"]
    assert hosts.worker_url(dep, dep.models[1]) == "http://192.168.10.12:21002"


def test_api_servers_aiohttp_calls_carry_the_secret_and_a_refusal_is_named():
    import aiohttp
    from aiohttp import web

    from workers.serving import auth, errors

    seen = []

    async def handler(request):
        seen.append(request.headers.get(auth.HEADER))
        return web.json_response({"models": []}, status=200 if seen[-1] == SECRET else 401)

    async def main():
        app = web.Application()
        app.router.add_post("/list_models", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            results = []
            for secret in (SECRET, "wrong-secret-wrong-secret"):
                try:
                    async with auth.AiohttpShim(secret).ClientSession() as session:
                        async with session.post(f"http://127.0.0.1:{port}/list_models") as r:
                            results.append(r.status)
                except errors.ApiError as exc:
                    results.append((exc.status, exc.message))
            return results
        finally:
            await runner.cleanup()

    ok, (status, refused) = asyncio.run(main())
    assert ok == 200 and seen == [SECRET, "wrong-secret-wrong-secret"]
    assert status == 503  # not 401: the client's API key is not what was refused
    assert "refused the API server's call to /list_models: wrong or missing worker secret" in refused
    assert auth.AiohttpShim(None).ClientTimeout is aiohttp.ClientTimeout  # the rest is aiohttp's own


def test_api_servers_httpx_client_carries_the_secret():
    import httpx

    from workers.serving import auth, errors, worker_client

    seen = []

    def handler(request):
        seen.append(request.headers.get(auth.HEADER))
        assert request.extensions["timeout"]["connect"] == auth.CONNECT_TIMEOUT_S  # bounded, whatever the call says
        assert request.headers["Connection"] == "close"  # several hosts: no pooled connection to a vanished host
        return httpx.Response(401 if request.url.path == "/count_token" else 200, json={"models": ["qwen"]})

    async def main():
        upstream = worker_client.Upstream(lambda: "http://10.9.0.1:21001", auth.httpx_options(SECRET, True))
        upstream.http._transport = httpx.MockTransport(handler)
        models = await upstream.list_models()
        try:
            await upstream.count_tokens("http://10.9.0.2:21002", "qwen", "hi")
        except errors.ApiError as exc:
            return models, exc
        finally:
            await upstream.aclose()

    models, refused = asyncio.run(main())
    assert models == ["qwen"] and seen == [SECRET, SECRET]
    assert refused.status == 503 and "http://10.9.0.2:21002 refused the API server's call to /count_token" in refused.message


def test_shared_threads_split_each_hosts_own_cores(tmp_path):
    dep = load(tmp_path, two_hosts(models=[model("glm", "main", threads="shared"), model("qwen", "second", threads=3),
                                           model("q2", "second", port=21003, threads="shared")]))
    assert rules.shared_cores(dep, host="main") == 2 and rules.shared_cores(dep, host="second") == 1
    err = load_error(tmp_path, two_hosts(models=[model("glm", "main", threads="shared"), model("qwen", "second", threads=4),
                                                 model("q2", "second", port=21003, threads="shared")]))
    assert "models: the fixed-thread workers on host 'second' take all 4 cores, none is left" in err
