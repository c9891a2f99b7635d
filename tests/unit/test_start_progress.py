"""What `bundle start` shows of a worker's log while it waits: only lines this start wrote (the log is
appended across restarts, and an old "Finished server process" line read as if the new worker had quit)."""
from __future__ import annotations

from workers.ops.cli import log_tail


def test_log_tail_shows_only_what_was_written_after_the_offset(tmp_path, monkeypatch):
    monkeypatch.setenv("BUNDLE_VAR_DIR", str(tmp_path))
    log = tmp_path / "logs" / "w.log"
    log.parent.mkdir()
    log.write_text("old run\nINFO: Finished server process [1]\n")
    offset = log.stat().st_size
    assert log_tail("w", 1, offset) == "(nothing logged yet)"
    with log.open("a") as f:
        f.write("loading weights\n\n")
    assert log_tail("w", 1, offset) == "loading weights"
    assert log_tail("w", 5) == "old run\nINFO: Finished server process [1]\nloading weights"
    log.write_text("rotated\n")  # shorter than the offset: the whole new file
    assert log_tail("w", 1, offset) == "rotated"
