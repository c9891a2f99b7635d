"""The API benchmark runs against the real bundle and writes its table and plot (figures are not asserted)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import API_KEYS, SERVED_FP32, SERVED_INT8
from tests.helpers import ROOT, bundle_env


def test_bench_api_writes_table_and_plot(served_bundle, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "workers.tools.bench_api", "--profile", served_bundle["conf"], "--concurrency", "1", "2",
         "--requests-per-client", "1", "--rounds", "1", "--no-in-process", "--max-tokens", "12", "--turns", "2", "--constrained", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
        env=bundle_env(BUNDLE_VAR_DIR=str(tmp_path), BUNDLE_TEST_API_KEYS=",".join(API_KEYS)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = (tmp_path / "reports" / "bench-api" / "bench-api.md").read_text()
    levels = table.split("Time to first token per turn")[0].splitlines()
    rows = [line for line in levels if line.startswith(f"| {SERVED_INT8} |") or line.startswith(f"| {SERVED_FP32} |")]
    assert len(rows) == 4  # two models x two concurrency levels
    assert all(row.rstrip().endswith("| 0 |") for row in rows), rows  # no failed request
    # The growing chat: a time to first token for each turn of each model, and the ratio.
    chat = table.split("Time to first token per turn")[1].split("Decode tok/s")[0].splitlines()
    turns = [line for line in chat if line.startswith("| smol-")]
    assert len(turns) == 2 and all("–" not in line and line.count("|") == 5 for line in turns), turns
    # Alone vs all busy: both speeds measured for both models.
    assert "the model alone vs every model busy at once" in table
    busy = table.split("every model busy at once")[1].split("Constrained decoding")[0].splitlines()
    assert sum(1 for line in busy if line.startswith("| smol-") and " 0.0 |" not in line) == 2, busy
    # Constrained decoding: free and constrained ms per token and their difference, for both models.
    constrained = [line for line in table.split("Constrained decoding")[1].splitlines() if line.startswith("| smol-")]
    assert len(constrained) == 2 and all("–" not in line for line in constrained), constrained
    png = tmp_path / "reports" / "bench-api" / "bench-api.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_api_says_the_bundle_is_down_instead_of_failing_every_request(tmp_path):
    """Before its first question: one line naming the address and what to run, exit code 1, no report."""
    import yaml

    from tests.helpers import free_port

    conf = yaml.safe_load((ROOT / "conf" / "default.yaml").read_text())
    conf["api"]["port"] = free_port()  # nothing listens there
    (tmp_path / "down.yaml").write_text(yaml.safe_dump(conf))
    proc = subprocess.run([sys.executable, "-m", "workers.tools.bench_api", "--profile", str(tmp_path / "down.yaml")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env=bundle_env(BUNDLE_VAR_DIR=str(tmp_path)))
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert f"the API at http://127.0.0.1:{conf['api']['port']}/v1 does not answer" in proc.stderr
    assert "start the bundle with scripts/start_all.sh" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "reports" / "bench-api").exists()


def test_another_program_on_the_api_port_is_named_not_a_traceback(tmp_path):
    """Something answers 200 at /v1/models but is not the bundle's API (here a static file server)."""
    import functools
    import http.server
    import threading

    from workers.tools.api_client import NotServed, served_models

    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "models").write_text("<html>hello</html>")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        api = f"http://127.0.0.1:{server.server_address[1]}/v1"
        with pytest.raises(NotServed, match="not with an OpenAI model list") as caught:
            served_models(api, "none", ["smol"])
        assert caught.value.exit_code == 1
    finally:
        server.shutdown()
        server.server_close()
