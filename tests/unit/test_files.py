"""Publishing a file all at once (workers/config/files.py)."""
from __future__ import annotations

import stat
import threading

from workers.config.files import write_atomic


def test_threads_writing_the_same_file_at_once_all_succeed_and_leave_one_whole_version(tmp_path):
    path = tmp_path / "memo.json"
    texts = [f"version {i} " * 2000 for i in range(8)]
    errors = []
    start = threading.Barrier(len(texts))

    def write(text):
        start.wait()
        try:
            for _ in range(50):
                write_atomic(path, text)
        except Exception as exc:  # noqa: BLE001 - the test reports any failure
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(t,)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert path.read_text() in texts
    assert [p.name for p in tmp_path.iterdir()] == ["memo.json"]  # no temporary left
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
