"""The docs say what exists: every key of the deployment schema is in docs/configuration.md, every
`scripts/<name>` the docs mention exists and every `bundle <command>` is a real subcommand, and every
relative Markdown link (and its #anchor) resolves. Pure: reads files and the pydantic schema only."""
from __future__ import annotations

import contextlib
import io
import re
import typing
import unicodedata
from pathlib import Path

import pytest
from pydantic import BaseModel

from workers.config.paths import ROOT
from workers.config.schema import Deployment

DOCS = [ROOT / "README.md", ROOT / "README.zh.md", *sorted((ROOT / "docs").glob("*.md"))]
CONFIGURATION = ROOT / "docs" / "configuration.md"

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)
LINK = re.compile(r"\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$", re.M)
SCRIPT = re.compile(r"(?<![\w./-])scripts/([A-Za-z0-9_.-]+)")
REPO_PATH = re.compile(r"(?<![\w./<-])((?:workers|tests|conf|deploy|docs)/[\w./-]*[\w/])")  # no placeholders
EXAMPLES = {"conf/mine.yaml"}  # a file the README shows how to write
MODULE = re.compile(r"-m (workers(?:\.\w+)+)(?![\w.])")  # not a placeholder like workers.x.<name>
CONSOLE_SCRIPT = re.compile(r"(?<![\w./-])(bundle-[a-z-]*[a-z])")
BUNDLE_COMMAND = re.compile(r"(?:^|[;&|(]\s*|\$\s*)bundle ([a-z][a-z-]*)", re.M)  # a command: starts a line or span


def _models_in(annotation) -> list[tuple[str, type[BaseModel]]]:
    """('', Model), ('[]', Model) or ('.<name>', Model) for each pydantic model an annotation holds."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [("", annotation)]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (list, tuple, set, frozenset):
        return [("[]" + suffix, m) for a in args for suffix, m in _models_in(a)]
    if origin is dict:
        return [(".<name>" + suffix, m) for suffix, m in _models_in(args[1])]
    return [found for a in args for found in _models_in(a)]


def schema_keys(model: type[BaseModel] = Deployment, prefix: str = "") -> list[str]:
    """Every key a deployment file may hold, as the docs write it: `models[].int8.group_size`,
    `hosts.<name>.cores`. A key holding one mapping (`controller:`) stands for its keys; a list or a
    dict of mappings (`models:`, `hosts:`) is a key of its own too."""
    keys = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        nested = _models_in(field.annotation)
        if not nested or any(suffix for suffix, _ in nested):
            keys.append(path)
        for suffix, sub in nested:
            keys += schema_keys(sub, f"{path}{suffix}.")
    return keys


def _prose(text: str) -> str:
    """The text without fenced code blocks and code spans (their brackets are not links)."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def _code(text: str) -> list[str]:
    """The lines of fenced code blocks (shell comments dropped) and the code spans, stripped."""
    blocks = [re.sub(r"(^|\s)#.*$", "", line) for m in FENCE.finditer(text) for line in m.group(0).splitlines()[1:-1]]
    return [c.strip() for c in blocks + [m.group(2) for m in CODE_SPAN.finditer(FENCE.sub("", text))]]


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: markup dropped, lowercase, punctuation removed, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").lower()
    kept = "".join(ch for ch in text
                   if ch.isalnum() or ch in "-_ " or unicodedata.category(ch).startswith("M"))
    return kept.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for m in HEADING.finditer(FENCE.sub("", path.read_text(encoding="utf-8"))):
        slug = github_anchor(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def bundle_subcommands() -> set[str]:
    """The subcommands `bundle --help` lists (workers/ops/cli.py's parser)."""
    from workers.ops import cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        cli.main(["--help"])
    choices = re.search(r"\{([a-z,-]+)\}", out.getvalue())
    assert choices, f"no subcommand list in `bundle --help`:\n{out.getvalue()}"
    return set(choices.group(1).split(","))


def test_the_docs_exist():
    missing = [str(p.relative_to(ROOT)) for p in DOCS if not p.is_file()]
    assert not missing and CONFIGURATION in DOCS, f"missing docs: {missing}"


def test_every_schema_key_is_in_configuration_md():
    text = CONFIGURATION.read_text(encoding="utf-8")
    keys = schema_keys()
    assert "models[].int8.group_size" in keys and "hosts.<name>.address" in keys  # the walk reaches nested models
    undocumented = [k for k in keys if f"`{k}`" not in text]
    assert not undocumented, f"docs/configuration.md does not document these deployment keys: {undocumented}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_script_mentioned_exists(doc):
    text = doc.read_text(encoding="utf-8")
    missing = sorted({name for name in SCRIPT.findall(text) if not (ROOT / "scripts" / name).is_file()})
    assert not missing, f"{doc.name} mentions scripts that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_repository_path_mentioned_exists(doc):
    """workers/..., tests/..., conf/..., deploy/..., docs/... paths (files moved by a refactor leave stale docs)."""
    text = doc.read_text(encoding="utf-8")
    missing = sorted({p for p in REPO_PATH.findall(text) if p not in EXAMPLES and not (ROOT / p).exists()})
    assert not missing, f"{doc.name} mentions paths that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_module_and_console_command_mentioned_exists(doc):
    text = doc.read_text(encoding="utf-8")
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    modules = [m for m in MODULE.findall(text) if not (ROOT / (m.replace(".", "/") + ".py")).is_file()]
    commands = [c for c in CONSOLE_SCRIPT.findall(text) if not re.search(rf"^{re.escape(c)} = ", pyproject, re.M)]
    assert not modules and not commands, f"{doc.name} mentions modules or console commands that do not exist: " \
                                         f"{sorted(set(modules + commands))}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_bundle_command_mentioned_exists(doc):
    real = bundle_subcommands()
    mentioned = {cmd for code in _code(doc.read_text(encoding="utf-8")) for cmd in BUNDLE_COMMAND.findall(code)}
    assert not mentioned - real, f"{doc.name} mentions `bundle` subcommands that do not exist: " \
                                 f"{sorted(mentioned - real)} (real: {sorted(real)})"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc):
    broken = []
    for target in LINK.findall(_prose(doc.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        path = (doc.parent / file_part).resolve() if file_part else doc
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target}: no heading with anchor #{anchor} in {path.relative_to(ROOT)}")
    assert not broken, f"{doc.name} has broken links:\n" + "\n".join(broken)
