"""The Python environments a model worker can run in, and where each lives.

Every program runs in `.venv` (the pinned stack: transformers 4.40.2, which ChatGLM3-6B's and Qwen-7B-Chat's
remote code needs). A model whose family needs a newer transformers (Qwen3, Gemma 2/3, Phi-3/4, GLM-4,
SmolLM3, Llama 3.1+ rope scaling: workers/models/families.py, `environment_for`) gets its worker, its
quantizer and its INT8 loader run by `.venv-current`'s Python instead. `scripts/setup.sh --env NAME`
builds an environment; `bundle start` builds one only when a model of the profile needs it.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from workers.config.paths import ROOT


@dataclass(frozen=True)
class Environment:
    name: str            # scripts/setup.sh --env NAME
    venv: str            # its folder in the project root
    transformers: str    # the transformers version it pins (requirements.txt, requirements-current.txt)
    base: "Environment | None" = None  # a layer over `base`: its own packages first, then the base's

    @property
    def folder(self) -> Path:
        return ROOT / self.venv

    def python(self) -> str:
        """Its Python executable (this process's own when this process runs in it)."""
        if Path(sys.prefix).resolve() == self.folder.resolve():
            return sys.executable
        return str(self.folder / "bin" / "python")

    def is_built(self) -> bool:
        return (self.folder / ".requirements.sha256").is_file()

    def is_this_process(self) -> bool:
        return Path(sys.prefix).resolve() == self.folder.resolve()


PINNED = Environment("pinned", ".venv", "4.40.2")
CURRENT = Environment("current", ".venv-current", "4.57.6", base=PINNED)
ENVIRONMENTS = (PINNED, CURRENT)


def by_name(name: str) -> Environment:
    for env in ENVIRONMENTS:
        if env.name == name:
            return env
    raise KeyError(f"no environment {name!r} (known: {', '.join(e.name for e in ENVIRONMENTS)})")


def versions(env: Environment, names: tuple[str, ...]) -> dict[str, str]:
    """Installed versions of `names` in `env` (read from its site-packages; nothing is imported)."""
    if env.is_this_process():
        return {name: metadata.version(name) for name in names}
    folders = []
    while env is not None:  # in sys.path's order: the layer's own packages, then its base's
        folders.append(str(env.folder))
        env = env.base
    return {name: _version_in(tuple(folders), name) for name in names}


@lru_cache(maxsize=None)
def _version_in(folders: tuple[str, ...], name: str) -> str:
    for folder in folders:
        paths = [str(p) for p in Path(folder).glob("lib/python*/site-packages")]
        for dist in metadata.distributions(name=name, path=paths):
            return dist.version
    raise metadata.PackageNotFoundError(f"{name} is not installed in {' or '.join(folders)}")
