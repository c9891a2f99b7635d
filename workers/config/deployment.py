"""Find, load and validate a deployment; snapshot the one that runs.

`load(profile)` reads conf/<profile>.yaml (or a path), checks the schema and the rules, and
raises DeploymentError naming file and field: `conf/default.yaml: models[1].threads: ...`.

`start` writes the validated deployment to var/run/deployment.json. Every program of the running
bundle is launched with that snapshot, and status/restart/stop read it, so an edited conf/ file
never makes them act on a deployment that is not the one running.
"""
from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError

from workers.config import files, rules
from workers.config.loading import ConfigError, format_errors, load_yaml
from workers.config.paths import CONF_DIR, ROOT, run_dir
from workers.config.schema import Deployment, ModelSpec

SNAPSHOT_NAME = "deployment.json"


class DeploymentError(ConfigError):
    """A deployment file is invalid, or no bundle runs to act on."""


def config_path(profile_or_path: str) -> Path:
    candidate = Path(profile_or_path)
    if candidate.suffix in (".yaml", ".yml"):
        return candidate
    return CONF_DIR / f"{profile_or_path}.yaml"


def load(profile_or_path: str = "default", cpu_count: int | None = None, host: str | None = None) -> Deployment:
    """The validated deployment; machine checks apply to `host`'s models (default: this machine's host)."""
    path = config_path(profile_or_path)
    if not path.is_file():
        profiles = sorted(p.stem for p in CONF_DIR.glob("*.yaml"))
        raise DeploymentError(f"{path}: no such deployment file (profiles in conf/: {', '.join(profiles)})")
    dep = load_yaml(path, Deployment, DeploymentError)
    problems = rules.semantic_problems(dep, cpu_count, base_dir=ROOT, host=host)
    if problems:
        raise DeploymentError("\n".join(f"{path}: {p}" for p in problems))
    return dep


def snapshot_path() -> Path:
    return run_dir() / SNAPSHOT_NAME


def write_snapshot(dep: Deployment, profile: str, path: Path | None = None, host: str | None = None) -> Path:
    """Record what is about to run: the validated deployment, the profile it came from and the
    host of the deployment that this machine runs."""
    path = path or snapshot_path()
    data = {"profile": profile, "deployment": dep.model_dump(mode="json")}
    if host is not None:
        data["host"] = host
    files.write_atomic(path, json.dumps(data, indent=2) + "\n")
    return path


def read_snapshot(path: Path | None = None) -> tuple[str, Deployment]:
    """(profile, deployment) of the running bundle."""
    path = path or snapshot_path()
    try:
        data = json.loads(path.read_text())
        return data["profile"], Deployment.model_validate(data["deployment"])
    except FileNotFoundError:
        raise DeploymentError(f"{path}: no running deployment (start the bundle with scripts/start_all.sh)") from None
    except (ValueError, KeyError) as exc:
        raise DeploymentError(f"{path}: not a deployment snapshot ({exc})") from None
    except ValidationError as exc:
        raise DeploymentError(format_errors(exc, str(path))) from None


def snapshot_host(path: Path | None = None) -> str | None:
    """The host this machine runs, as `start` recorded it (None in snapshots from before hosts)."""
    try:
        return json.loads((path or snapshot_path()).read_text()).get("host")
    except (OSError, ValueError, AttributeError):
        return None


def model_by_name(dep: Deployment, name: str) -> ModelSpec:
    for m in dep.models:
        if name in m.names:
            return m
    raise DeploymentError(f"no model named {name!r}; configured: {', '.join(n for m in dep.models for n in m.names)}")
