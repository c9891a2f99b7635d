"""Where the bundle keeps what it generates. Everything lives under one ignored folder."""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = ROOT / "conf"


def var_dir() -> Path:
    """Root of generated state (models, INT8 cache, logs, run files, reports).

    BUNDLE_VAR_DIR moves it, which is how tests keep their state in temporary folders.
    """
    return Path(os.environ.get("BUNDLE_VAR_DIR", ROOT / "var")).resolve()


def models_dir() -> Path:
    return Path(os.environ.get("BUNDLE_MODELS_DIR", var_dir() / "models")).resolve()


def int8_cache_dir() -> Path:
    return Path(os.environ.get("BUNDLE_INT8_CACHE_DIR", var_dir() / "int8-cache")).resolve()


def logs_dir() -> Path:
    return var_dir() / "logs"


def run_dir() -> Path:
    return var_dir() / "run"


def reports_dir() -> Path:
    return var_dir() / "reports"
