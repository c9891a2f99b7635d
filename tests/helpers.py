"""Helpers for tests that run the real thing: processes, ports, deployments, generations run together."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import requests
import yaml

from workers.config import deployment
from workers.ops import supervisor_client

ROOT = Path(__file__).resolve().parent.parent
HEARTBEAT_S = 3


_GIVEN_PORTS: set[int] = set()


def free_port() -> int:
    """A free port not handed out before in this process: the kernel may give a just-closed port again, and two
    such in one deployment (a worker's and the API's) make it invalid."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN_PORTS:
            _GIVEN_PORTS.add(port)
            return port


def bundle_env(**extra: str) -> dict:
    return {**os.environ, **extra}


def start(args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """Start a Python module in its own process group, output to `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, *args], stdout=out, stderr=subprocess.STDOUT,
            env=env or bundle_env(), cwd=log.parent, start_new_session=True,
        )


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = predicate()
            if result:
                return result
        except (requests.RequestException, OSError, ValueError):
            pass
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log else ""
            raise AssertionError(f"process exited ({proc.returncode}) while waiting for {what}\n{tail}")
        time.sleep(0.5)
    tail = log.read_text()[-3000:] if log else ""
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")


def bundle_cli(env: dict, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).with_name("bundle")), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def write_deployment(var, models: list[dict], **extra) -> tuple[str, dict]:
    ports = {"controller": free_port(), "api": free_port(), "web": free_port()}
    data = {
        "controller": {"port": ports["controller"]},
        "api": {"port": ports["api"]},
        "web": {"port": ports["web"]},
        "heartbeat": {"worker_interval_s": HEARTBEAT_S, "expiration_s": 10},
        "models": models,
    }
    for section, values in extra.items():  # merged into the defaults above, e.g. api={"api_keys_env": ...}
        data[section] = {**data.get(section, {}), **values}
    path = var / "deploy.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path), ports


def rpc(env):
    return supervisor_client.proxy(Path(env["BUNDLE_VAR_DIR"]) / "run")


def snapshot_for(var: Path, models: list[dict], **extra) -> tuple[Path, dict]:
    """A validated deployment snapshot, as `start` writes it, for launching one program by hand."""
    conf, ports = write_deployment(var, models, **extra)
    return deployment.write_snapshot(deployment.load(conf), conf, var / "deployment.json"), ports


def bundle_processes(var) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline", "environ"]):
        try:
            if str(var) in " ".join(p.info["cmdline"] or []) or str(var) == (p.info["environ"] or {}).get("BUNDLE_VAR_DIR"):
                found.append(p)
        except psutil.Error:
            pass
    return found




EMBEDDED = {"embedded": "smollm2-135m-instruct"}
# A chat answer that outlasts every client wait in the tests (client gives up, worker killed mid-answer). Greedy,
# because a sampled story may end early (158 tokens was seen): on a fast CI machine it finished inside the 3 s a
# client waited, and nothing was dropped. SmolLM2's greedy story loops until max_tokens (2000 seen).
LONG_STORY = [{"role": "user", "content": "Write a very long story about a dragon and a knight."}]
NEVER_ENDS = {"max_tokens": 1000, "temperature": 0}


def int8_and_fp32(int8_name: str, fp32_name: str, **extra) -> list[dict]:
    """The default deployment's shape: the embedded model in INT8 on core 0 and in fp32 on core 1."""
    return [
        {"names": [int8_name], "source": EMBEDDED, "backend": "itrex-int8", "port": free_port(), "threads": 1,
         "cpu_cores": [0], **extra},
        {"names": [fp32_name], "source": EMBEDDED, "backend": "fp32", "port": free_port(), "threads": 1,
         "cpu_cores": [1], **extra},
    ]


@contextlib.contextmanager
def running_bundle(var: Path, models: list[dict], models_dir: Path, int8_cache: Path, env_extra: dict | None = None,
                   **sections):
    """The whole bundle under its own supervisord, state in `var`; stopped, with nothing left, on exit."""
    conf, ports = write_deployment(var, models, **sections)
    env = bundle_env(BUNDLE_VAR_DIR=str(var), BUNDLE_MODELS_DIR=str(models_dir), BUNDLE_INT8_CACHE_DIR=str(int8_cache),
                     **(env_extra or {}))
    started = bundle_cli(env, "start", "--profile", conf, "--timeout", "600")
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield {"env": env, "var": var, "ports": ports, "conf": conf, "start_output": started.stdout,
               "api": f"http://127.0.0.1:{ports['api']}/v1", "web": f"http://127.0.0.1:{ports['web']}/",
               "controller": f"http://127.0.0.1:{ports['controller']}"}
    finally:
        bundle_cli(env, "stop")
        for p in bundle_processes(var):
            p.kill()


def run_together(served, jobs, stagger_s=0.05) -> list:
    """Each job through `served.generate` from its own thread, started a little apart so later ones join a batch
    under way; the results in the jobs' order."""
    results = [None] * len(jobs)

    def one(i):
        time.sleep(i * stagger_s)
        results[i] = served.generate(jobs[i])

    workers = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout=600)
    return results


@contextlib.contextmanager
def another_worker_flipping(other, period_s: float = 0.05):
    """While inside: another worker (`other`, a CoreShare) starts and stops generating, again and again."""
    stop = threading.Event()

    def flip():
        while not stop.is_set():
            other.begin()
            stop.wait(period_s)
            other.end()
            stop.wait(period_s)

    flipper = threading.Thread(target=flip)
    flipper.start()
    try:
        yield
    finally:
        stop.set()
        flipper.join()


def check_requests_beyond_the_slots_wait(two, reference) -> None:
    """On `two`, a served model with 2 KV cache slots (engine/slot_batcher.py): two greedy stories that cannot end
    within 60 tokens hold both slots, a third request and a fourth wait; the fourth, cancelled while it waits, leaves
    without a token; the others answer as `reference` (the same model, alone) does."""
    def job(sm, messages, n):
        return sm.job({"messages": messages, "temperature": 0, "max_new_tokens": n})[0]

    chats = [LONG_STORY, [{"role": "user", "content": "Tell me a long story about a ship."}],
             [{"role": "user", "content": "What is the capital of France?"}]]
    jobs = [job(two, chat, 60) for chat in chats]
    waiting = job(two, [{"role": "user", "content": "Write one sentence about the sea."}], 20)

    def cancel_once_both_wait():  # not on a timer: a fast CPU finished both stories within 0.25 s
        deadline = time.monotonic() + 60
        while two.engine.runner.waiting < 2 and time.monotonic() < deadline:
            time.sleep(0.001)
        waiting.cancel.set()

    threading.Thread(target=cancel_once_both_wait, daemon=True).start()
    results = run_together(two, jobs + [waiting], stagger_s=0.02)
    assert results[3].finish_reason == "cancelled" and results[3].completion_tokens == 0
    assert results[0].completion_tokens == results[1].completion_tokens == 60
    assert [outcome(r) for r in results[:3]] == [outcome(reference.generate(job(reference, chat, 60))) for chat in chats]
    assert two.engine.runner.widest == 2 and two.engine.runner.active == 0


def freed(ref, timeout_s: float = 5.0) -> bool:
    """Whether the object behind weak reference `ref` is collected within `timeout_s` (a thread that held it may
    still be ending)."""
    import gc

    deadline = time.monotonic() + timeout_s
    while True:
        gc.collect()
        if ref() is None:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


def outcome(result):
    """What a client sees of a generation: its text, token count and finish reason."""
    return result.text, result.completion_tokens, result.finish_reason


def ask_stream(client, model: str, messages: list[dict], max_tokens: int, **extra) -> dict:
    """A greedy streamed chat answer through the official client: its text, finish_reason, usage counts
    (None when the stream sent no usage), the non-empty content deltas in order, and a reasoning model's
    streamed reasoning_content."""
    stream = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=max_tokens,
                                            stream=True, stream_options={"include_usage": True}, **extra)
    pieces, reasoning, finish, usage = [], [], None, None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            reasoning.append(getattr(chunk.choices[0].delta, "reasoning_content", None) or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    return {"text": "".join(pieces), "finish_reason": finish,
            "prompt_tokens": usage.prompt_tokens if usage else None,
            "completion_tokens": usage.completion_tokens if usage else None,
            "deltas": [p for p in pieces if p], "reasoning": "".join(reasoning)}
