"""conf/ validation: every rule gives a clear error naming the file and the field."""
from __future__ import annotations

import socket
from pathlib import Path

import pytest
import yaml

from workers.config import deployment, rules
from workers.config.deployment import DeploymentError
from workers.config.schema import Deployment
from workers.ops import supervisor_conf


def model(name="m1", port=22002, **extra):
    return {"names": [name], "source": {"embedded": "smollm2-135m-instruct"}, "port": port, "threads": 1, **extra}


def write(tmp_path: Path, data: dict) -> str:
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def load_error(tmp_path, data, cpu_count=2) -> str:
    with pytest.raises(DeploymentError) as info:
        deployment.load(write(tmp_path, data), cpu_count=cpu_count)
    return str(info.value)


def test_shipped_profiles_are_valid():
    dep = deployment.load("default", cpu_count=2)
    assert [m.backend for m in dep.models] == ["itrex-int8", "fp32"]
    assert {m.source.embedded for m in dep.models} == {"smollm2-135m-instruct"}


def test_unknown_key_is_named(tmp_path):
    err = load_error(tmp_path, {"models": [model(thread=2)]})
    assert "models[0].thread: unknown key" in err and "deploy.yaml" in err


def test_unknown_top_level_key_is_named(tmp_path):
    assert "contoller: unknown key" in load_error(tmp_path, {"contoller": {"port": 1}, "models": [model()]})


def test_duplicate_model_names(tmp_path):
    err = load_error(tmp_path, {"models": [model("a", 22002), model("a", 22003)]})
    assert "models[1].names: 'a' is already used by models[0]" in err


def test_duplicate_ports(tmp_path):
    err = load_error(tmp_path, {"models": [model("a", 22002), model("b", 22002)]})
    assert "models[1].port: port 22002 is already used by models[0].port" in err
    err = load_error(tmp_path, {"api": {"port": 7860}, "models": [model()]})
    assert "web.port: port 7860 is already used by api.port" in err


def test_port_already_in_use(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        dep = deployment.load(write(tmp_path, {"models": [model(port=busy)]}), cpu_count=2)
        problems = rules.ports_in_use(dep)
    assert any(p.startswith(f"models[0].port: port {busy} on 127.0.0.1 is already in use") for p in problems)


def test_more_threads_than_cores(tmp_path):
    assert "models[0].threads: 4 threads but this machine has 2 cores" in load_error(tmp_path, {"models": [model(threads=4)]})


def test_total_threads_oversubscribe(tmp_path):
    err = load_error(tmp_path, {"models": [model("a", 22002, threads=2), model("b", 22003, threads=2)]})
    assert "models: 4 threads in all on 2 cores oversubscribes" in err


def test_shared_threads_need_free_cores_and_no_pinning(tmp_path):
    assert "threads: shared uses whichever cores are free; remove cpu_cores" in load_error(
        tmp_path, {"models": [model(threads="shared", cpu_cores=[0])]})
    assert "none is left for the workers with threads: shared" in load_error(
        tmp_path, {"models": [model("a", 22002, threads=2), model("b", 22003, threads="shared")]})
    assert "threads must be at least 1 or 'shared'" in load_error(tmp_path, {"models": [model(threads=0)]})
    dep = deployment.load(write(tmp_path, {"models": [model("a", 22002, threads="shared"),
                                                      model("b", 22003, threads="shared")]}), cpu_count=2)
    assert rules.shared_cores(dep, cpu_count=2) == 2


def test_threads_exceed_pinned_cores_and_shared_cores(tmp_path):
    assert "models[0]: threads (2) exceeds the 1 pinned cpu_cores [0]" in load_error(
        tmp_path, {"models": [model(threads=2, cpu_cores=[0])]})
    err = load_error(tmp_path, {"models": [model("a", 22002, cpu_cores=[0]), model("b", 22003, cpu_cores=[0])]})
    assert "models[1].cpu_cores: core 0 is already pinned by models[0]" in err
    assert "core 5 does not exist" in load_error(tmp_path, {"models": [model(cpu_cores=[5])]})


def test_local_path_that_does_not_exist(tmp_path):
    err = load_error(tmp_path, {"models": [model(source={"path": str(tmp_path / "nope")})]})
    assert f"models[0].source.path: {tmp_path / 'nope'} does not exist" in err


def test_source_needs_exactly_one_kind(tmp_path):
    err = load_error(tmp_path, {"models": [model(source={"embedded": "smollm2-135m-instruct", "modelscope": "a/b"})]})
    assert "models[0].source: give exactly one of embedded, modelscope, path" in err
    assert "not a ModelScope id" in load_error(tmp_path, {"models": [model(source={"modelscope": "no-slash"})]})


def test_bad_backend_names_the_choices(tmp_path):
    err = load_error(tmp_path, {"models": [model(backend="int4")]})
    assert "models[0].backend: Input should be 'itrex-int8', 'fp32' or 'bf16'" in err


def test_heartbeat_expiration_must_exceed_interval(tmp_path):
    err = load_error(tmp_path, {"heartbeat": {"worker_interval_s": 5, "expiration_s": 6}, "models": [model()]})
    assert "heartbeat: expiration_s (6) must exceed twice worker_interval_s (5)" in err


def test_bad_yaml_and_unknown_profile(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [\n")
    with pytest.raises(DeploymentError, match="not valid YAML"):
        deployment.load(str(bad))
    with pytest.raises(DeploymentError, match=r"no such deployment file \(profiles in conf/: .*default"):
        deployment.load("nonexistent-profile")


def test_rendered_supervisord_config(tmp_path, monkeypatch):
    monkeypatch.setenv("BUNDLE_VAR_DIR", str(tmp_path))
    monkeypatch.setenv("BUNDLE_API_KEYS", "sk-secret-value")
    dep = deployment.load("default", cpu_count=2)
    snapshot = deployment.write_snapshot(dep, "default")
    text = supervisor_conf.render(dep, snapshot)
    for program in ("controller", "api", "web", "smollm2-135m-int8", "smollm2-135m-fp32"):
        assert f"[program:{program}]" in text
    assert "[group:workers]\nprograms = smollm2-135m-int8,smollm2-135m-fp32" in text
    assert text.count("stopasgroup = true") == 5 and text.count("killasgroup = true") == 5
    assert "chmod = 0700" in text and "username = bundle" in text
    assert 'FASTCHAT_WORKER_HEART_BEAT_INTERVAL="3"' in text
    # Every program reads its settings from the snapshot; no setting is re-declared as a flag.
    assert f"-m workers.serving.worker --deployment {snapshot} --model smollm2-135m-int8" in text
    assert f"-m workers.serving.api_server --deployment {snapshot}" in text
    assert "--threads" not in text and "--cpu-cores" not in text
    profile, running = deployment.read_snapshot(snapshot)
    assert profile == "default" and running == dep
    assert running.models[0].threads == 1 and running.models[0].cpu_cores == [0]
    assert running.api.api_keys_env == "BUNDLE_API_KEYS"
    assert "sk-secret-value" not in text + snapshot.read_text()  # keys are read by the API process, never written
    assert oct(snapshot.stat().st_mode & 0o777) == "0o600"
    assert oct((tmp_path / "run").stat().st_mode & 0o777) == "0o700"


def test_int8_compute_dtype_this_cpu_cannot_run_is_refused_before_start():
    dep = Deployment.model_validate({"models": [model(int8={"compute_dtype": "int8"})]})
    [problem] = rules.semantic_problems(dep, cpu_count=2, cpu_flags=frozenset({"avx2"}))
    assert problem.startswith("models[0].int8: compute_dtype='int8' needs AVX512-VNNI")
    assert rules.semantic_problems(dep, cpu_count=2, cpu_flags=frozenset({"avx512_vnni"})) == []


def test_qbits_int8_compute_is_refused_before_start_even_with_amx(embedded_model, tmp_path, monkeypatch, capsys):
    """Config checks what every runtime needs; the runtime chosen checks its own (engine/runtimes/registry), when
    `start` resolves each model's runtime: before anything is quantized or any worker starts."""
    from workers.config import cpu
    from workers.ops import cli

    amx = frozenset({"avx2", "avx512_vnni", "amx_int8"})
    dep = Deployment.model_validate({"models": [model(int8={"runtime": "qbits", "compute_dtype": "int8"})]})
    assert rules.semantic_problems(dep, cpu_count=2, cpu_flags=amx) == []  # which runtime is chosen is not config's
    monkeypatch.setattr(cpu, "flags", lambda: amx)
    monkeypatch.setenv("BUNDLE_INT8_CACHE_DIR", str(tmp_path / "cache"))
    problem = cli.prepare_int8_weights(dep, {dep.models[0].program: embedded_model})
    assert problem.startswith("models[m1].int8: compute_dtype='int8' gives wrong results in the qbits runtime"), problem
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
