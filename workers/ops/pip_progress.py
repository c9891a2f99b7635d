"""pip's output as one progress line: `pip install ... 2>&1 | python3 pip_progress.py LOG LABEL`.

scripts/setup.sh runs it with the system python3 before .venv exists, so it uses the standard library only and
is run as a file, not imported. Every line pip writes goes to LOG (appended); the terminal gets one line that
counts what pip does (collecting N, downloading one, installing N) and, when pip ends, a summary. pip has no
machine-readable progress: these are its own line prefixes. Not a terminal (CI, a log): the summary only.
"""
from __future__ import annotations

import sys
import time

COLLECTING, DOWNLOADING, CACHED, INSTALLING = "Collecting ", "Downloading ", "Using cached ", "Installing collected packages: "
SATISFIED = "Requirement already satisfied: "


class Progress:
    def __init__(self, label: str, live: bool):
        self.label, self.live = label, live
        self.collected = self.downloaded = self.cached = self.satisfied = self.installing = 0
        self.failed = False
        self.t0 = time.monotonic()

    def feed(self, line: str) -> str | None:
        """The status after this pip line, or None when it changes nothing shown."""
        line = line.strip()
        if line.startswith("ERROR:"):
            self.failed = True
            return None
        if line.startswith(COLLECTING):
            self.collected += 1
            return f"collecting {self.collected}: {_name(line[len(COLLECTING):])}"
        if line.startswith(DOWNLOADING):
            self.downloaded += 1
            return f"collecting {self.collected}: downloading {_name(line[len(DOWNLOADING):])}"
        if line.startswith(CACHED):
            self.cached += 1
            return None
        if line.startswith(SATISFIED):
            self.satisfied += 1
            return None
        if line.startswith(INSTALLING):
            self.installing = len(line[len(INSTALLING):].split(","))
            return f"installing {self.installing} packages"
        return None

    def summary(self) -> str:
        seconds = time.monotonic() - self.t0
        if self.failed:
            parts = ["pip failed"]
        elif self.installing:
            parts = [f"{self.installing} installed"]
            if self.downloaded:
                parts.append(f"{self.downloaded} downloaded")
        else:
            parts = ["nothing to install"]
        return f"{self.label}: {', '.join(parts)} ({seconds:.0f} s)"

    def show(self, status: str) -> None:
        if self.live:
            width = 100
            text = f"{self.label}: {status}"[:width]
            sys.stdout.write(f"\r\033[K{text}")
            sys.stdout.flush()

    def end(self) -> None:
        if self.live:
            sys.stdout.write("\r\033[K")
        print(self.summary(), flush=True)


def _name(requirement: str) -> str:
    """'torch==2.3.0 (from -r requirements.txt (line 3))' -> 'torch==2.3.0'; a file name -> itself."""
    return requirement.split(" (from ")[0].split(" ")[0].rsplit("/", 1)[-1]


def main(argv: list[str]) -> int:
    log_path, label = argv[1], argv[2]
    progress = Progress(label, sys.stdout.isatty())
    with open(log_path, "a", encoding="utf-8", errors="replace") as log:
        for line in sys.stdin:
            log.write(line)
            status = progress.feed(line)
            if status is not None:
                progress.show(status)
    progress.end()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
