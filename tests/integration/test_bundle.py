"""The whole bundle under a real supervisord, on free ports, with state in a temporary folder."""
from __future__ import annotations

import os
import re
import shutil
import signal
import threading
import time

import pytest
import requests
from openai import APIError, OpenAI

from tests.helpers import (HEARTBEAT_S, LONG_STORY, NEVER_ENDS, bundle_cli, bundle_env, bundle_processes, free_port,
                           int8_and_fp32, rpc, running_bundle, wait_for, write_deployment)

INT8, FP32 = "smollm2-int8", "smollm2-fp32"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, embedded_model, int8_entry, int8_cache_root):
    """A bundle of its own: these tests restart, kill and stop its programs."""
    with running_bundle(tmp_path_factory.mktemp("bundle-var"), int8_and_fp32(INT8, FP32), embedded_model.parent,
                        int8_cache_root) as b:
        yield {**b, "client": OpenAI(base_url=b["api"], api_key="none", max_retries=0)}


def registered(bundle) -> set[str]:
    r = requests.post(f"http://127.0.0.1:{bundle['ports']['controller']}/list_models", timeout=5)
    return set(r.json()["models"])


def ask(client, model, text="What is the capital of France?", max_tokens=12) -> str:
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                       temperature=0, max_tokens=max_tokens, timeout=120)
    return r.choices[0].message.content


def answers(client, model) -> bool:
    try:
        return "Paris" in ask(client, model)
    except APIError:  # e.g. 503 while the controller still lists the killed worker
        return False


def test_start_prints_urls_and_every_model_answers(bundle):
    out = bundle["start_output"]
    assert f"http://127.0.0.1:{bundle['ports']['web']}/" in out and "The bundle is up." in out
    assert {m.id for m in bundle["client"].models.list().data} == {INT8, FP32}
    for model in (INT8, FP32):
        assert "Paris" in ask(bundle["client"], model)
    assert requests.get(f"http://127.0.0.1:{bundle['ports']['web']}/", timeout=10).status_code == 200


def unloadable_model(tmp_path, embedded_model, backend):
    """A deployment of one model that is complete on disk (passes the folder check) but not loadable."""
    broken = tmp_path / "broken-model"
    shutil.copytree(embedded_model, broken)
    (broken / "config.json").write_text('{"model_type": "no-such-architecture"}')
    conf, _ = write_deployment(tmp_path, [
        {"names": ["broken"], "source": {"path": str(broken)}, "backend": backend, "port": free_port(), "threads": 1},
    ])
    return broken, conf


def test_start_prepares_int8_weights_before_any_worker_runs(bundle):
    out = bundle["start_output"]
    int8_step, supervisord_step = out.index("[2/4] INT8 weights for 1 model(s)"), out.index("[3/4] starting supervisord")
    assert int8_step < out.index(f"  {INT8}: smollm2-135m-instruct-") < supervisord_step
    line = next(line for line in out.splitlines() if line.startswith(f"  {INT8}: smollm2-135m-instruct-"))
    # the runtime the worker then loads (a Llama, fixed threads) and the group size auto gave its 576/1536-wide rows
    assert line.endswith("(INT8 weights, neural-speed, groups of 64)")


def test_int8_model_that_cannot_be_quantized_stops_the_start_before_supervisord(tmp_path, embedded_model):
    broken, conf = unloadable_model(tmp_path, embedded_model, "itrex-int8")
    env = bundle_env(BUNDLE_VAR_DIR=str(tmp_path / "var"), BUNDLE_MODELS_DIR=str(embedded_model.parent),
                     BUNDLE_INT8_CACHE_DIR=str(tmp_path / "cache"))
    result = bundle_cli(env, "start", "--profile", conf)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"Cannot start: models[broken]: quantizing {broken} failed" in result.stdout
    assert "[3/4] starting supervisord" not in result.stdout
    assert bundle_processes(tmp_path / "var") == []
    assert not [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]  # nothing half-written


def test_second_start_changes_nothing(bundle):
    before = {name: p["pid"] for name, p in ((p["name"], p) for p in rpc(bundle["env"]).supervisor.getAllProcessInfo())}
    again = bundle_cli(bundle["env"], "start", "--profile", bundle["conf"])
    assert again.returncode == 0
    assert "already running" in again.stdout and "nothing changed" in again.stdout
    after = {p["name"]: p["pid"] for p in rpc(bundle["env"]).supervisor.getAllProcessInfo()}
    assert after == before


def test_status_lists_programs_and_models(bundle):
    out = bundle_cli(bundle["env"], "status").stdout
    for line in ("workers:smollm2-int8", "workers:smollm2-fp32", "controller:controller", "api:api", "web:web"):
        assert line in out
    assert out.count("RUNNING") == 5 and f"{INT8}" in out and "yes" in out


def test_restart_one_worker_while_the_other_keeps_serving(bundle):
    client, stop, results = bundle["client"], threading.Event(), []

    def keep_asking():
        while not stop.is_set():
            try:
                results.append(("ok", ask(client, FP32, max_tokens=4)))
            except Exception as exc:  # any failure to the other model counts
                results.append(("fail", repr(exc)))

    t = threading.Thread(target=keep_asking)
    t.start()
    try:
        restarted = bundle_cli(bundle["env"], "restart", INT8)
    finally:
        stop.set()
        t.join(timeout=120)
    assert restarted.returncode == 0, restarted.stdout
    assert "registered again" in restarted.stdout
    failures = [r for r in results if r[0] == "fail"]
    assert results and not failures, failures
    assert "Paris" in ask(client, INT8)


def test_kill_9_worker_in_flight_request_gets_clear_error_then_worker_returns(bundle):
    client = bundle["client"]
    info = rpc(bundle["env"]).supervisor.getProcessInfo(f"workers:{INT8}")
    outcome: dict = {}

    def long_stream():
        try:
            stream = client.chat.completions.create(
                model=INT8, messages=LONG_STORY, stream=True, timeout=120, **NEVER_ENDS)
            for chunk in stream:
                outcome.setdefault("first_delta", time.monotonic())
            outcome["result"] = "completed"
        except APIError as exc:
            outcome["result"] = f"error: {exc.message}"
        outcome["ended"] = time.monotonic()

    t = threading.Thread(target=long_stream)
    t.start()
    wait_for(lambda: "first_delta" in outcome, 60, "the stream to start")
    os.kill(info["pid"], signal.SIGKILL)
    killed_at = time.monotonic()
    t.join(timeout=60)
    assert not t.is_alive(), "the in-flight request hung after the worker was killed"
    assert outcome["result"].startswith("error:") and "stopped answering" in outcome["result"], outcome
    assert outcome["ended"] - killed_at < 30
    # supervisord starts a new worker process, which registers again and answers.
    wait_for(lambda: rpc(bundle["env"]).supervisor.getProcessInfo(f"workers:{INT8}")["pid"] not in (0, info["pid"]),
             60, "supervisord to restart the worker")
    wait_for(lambda: answers(client, INT8), 180, "the restarted worker to answer")


def test_a_worker_stopped_mid_answer_cuts_the_answer_and_exits_by_itself(bundle):
    """A stop (a restart, `bundle stop`) while an answer streams: the answer gets GRACEFUL_SHUTDOWN_S to end, then it
    is cut and the worker exits as a Python program ends, not killed by supervisord after its stopwaitsecs."""
    client, proxy = bundle["client"], rpc(bundle["env"]).supervisor
    log = bundle["var"] / "logs" / "supervisord.log"
    before = len(log.read_text())
    outcome: dict = {}

    def long_stream():
        try:
            for _ in client.chat.completions.create(model=FP32, messages=LONG_STORY, stream=True, timeout=120,
                                                    **NEVER_ENDS):
                outcome.setdefault("first_delta", True)
            outcome["result"] = "completed"
        except Exception as exc:  # the connection is cut mid-stream: httpx's error, not an API answer
            outcome["result"] = f"cut: {type(exc).__name__}"

    t = threading.Thread(target=long_stream)
    t.start()
    try:
        wait_for(lambda: "first_delta" in outcome, 60, "the stream to start")
        proxy.stopProcess(f"workers:{FP32}")
        t.join(timeout=60)
        assert outcome["result"].startswith("cut"), outcome
        assert re.findall(r"stopped: (\S+) \((.*?)\)", log.read_text()[before:]) == [(FP32, "exit status 0")]
    finally:
        proxy.startProcess(f"workers:{FP32}")
    wait_for(lambda: answers(client, FP32), 180, "fp32 back")


def test_request_to_a_dead_worker_gets_503_naming_it(bundle):
    proxy = rpc(bundle["env"]).supervisor
    proxy.stopProcess(f"workers:{FP32}")
    try:
        # Until the controller expires it, the dead worker is still listed: the API must say so clearly.
        r = requests.post(f"http://127.0.0.1:{bundle['ports']['api']}/v1/chat/completions", timeout=30, json={
            "model": FP32, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert r.status_code in (400, 503), r.text
        assert "stopped answering" in r.json()["message"] or "Only" in r.json()["message"]
    finally:
        proxy.startProcess(f"workers:{FP32}")
    wait_for(lambda: FP32 in registered(bundle) and answers(bundle["client"], FP32), 120, "fp32 back")


def test_controller_restart_every_worker_back_within_heartbeat(bundle):
    proxy = rpc(bundle["env"]).supervisor
    proxy.stopProcess("controller:controller")
    proxy.startProcess("controller:controller")
    restarted_at = time.monotonic()
    wait_for(lambda: registered(bundle) == {INT8, FP32}, 60, "workers to re-register")
    elapsed = time.monotonic() - restarted_at
    # A worker re-registers on its first heartbeat after the restart: within one tuned interval
    # (3 s) plus scheduling slack; FastChat's defaults would take up to 45 s.
    assert elapsed < 4 * HEARTBEAT_S, elapsed
    assert "Paris" in ask(bundle["client"], INT8)


def test_stop_leaves_no_bundle_process(bundle):
    assert bundle_processes(bundle["var"])
    log = bundle["var"] / "logs" / "supervisord.log"
    before = len(log.read_text())
    stopped = bundle_cli(bundle["env"], "stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    time.sleep(1)
    assert bundle_processes(bundle["var"]) == []
    assert "not running" in bundle_cli(bundle["env"], "status").stdout
    # Each program ended as a Python program ends (its exit handlers ran: nothing of it is left in /tmp), not by the
    # signal's default action ("terminated by SIGTERM").
    ended = dict(re.findall(r"stopped: (\S+) \((.*?)\)", log.read_text()[before:]))
    assert ended == dict.fromkeys(("controller", "api", "web", INT8, FP32), "exit status 0"), ended


def test_incomplete_model_folder_is_refused_before_anything_starts(tmp_path, embedded_model):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    conf, _ = write_deployment(tmp_path, [
        {"names": ["broken"], "source": {"path": str(broken)}, "backend": "fp32", "port": free_port(), "threads": 1},
    ])
    env = bundle_env(BUNDLE_VAR_DIR=str(tmp_path / "var"), BUNDLE_MODELS_DIR=str(embedded_model.parent))
    result = bundle_cli(env, "start", "--profile", conf)
    assert result.returncode == 2
    assert "Cannot start: models[broken]: model folder" in result.stdout and "no weights" in result.stdout
    assert bundle_processes(tmp_path / "var") == []
    prepared = bundle_cli(env, "prepare", "--profile", conf)  # the same steps, the same refusal
    assert prepared.returncode == 2
    assert "Cannot prepare: models[broken]: model folder" in prepared.stdout and "no weights" in prepared.stdout


def test_program_that_fails_to_start_is_named_with_its_log(tmp_path, embedded_model):
    _, conf = unloadable_model(tmp_path, embedded_model, "fp32")  # the worker dies while loading
    env = bundle_env(BUNDLE_VAR_DIR=str(tmp_path / "var"), BUNDLE_MODELS_DIR=str(embedded_model.parent))
    result = bundle_cli(env, "start", "--profile", conf, "--timeout", "300")
    try:
        assert result.returncode == 1
        assert "Program 'broken' failed to start" in result.stdout
        assert "Traceback" in result.stdout or "Error" in result.stdout  # the last lines of its log
        assert "Stopping the bundle" in result.stdout
        assert bundle_processes(tmp_path / "var") == []
    finally:
        bundle_cli(env, "stop")
