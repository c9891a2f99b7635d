"""Which Python environment each model's worker runs in, and building the ones a deployment needs.

The choice is family data (workers/models/families.py, `environment_for`, from config.json); an
environment no model of the deployment needs is never built (`scripts/setup.sh --env NAME`).
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from workers.config.environments import Environment
from workers.config.paths import ROOT
from workers.models.families import environment_for


def for_models(folders: dict[str, Path]) -> dict[str, tuple[Environment, str]]:
    """program -> (its environment, why), from each model folder's config.json."""
    return {program: environment_for(json.loads((Path(folder) / "config.json").read_text()))
            for program, folder in folders.items()}


def build_missing(envs: list[Environment], say) -> str | None:
    """Build each environment in `envs` that is not built yet; None, or what failed."""
    for env in dict.fromkeys(envs):
        if env.is_built():
            continue
        say(f"  building the '{env.name}' environment ({env.venv}, transformers {env.transformers}): "
            f"scripts/setup.sh --env {env.name}")
        proc = subprocess.run([str(ROOT / "scripts" / "setup.sh"), "--env", env.name], cwd=ROOT)
        if proc.returncode != 0 or not env.is_built():
            return f"scripts/setup.sh --env {env.name} failed (exit code {proc.returncode}); see its output above"
    return None
