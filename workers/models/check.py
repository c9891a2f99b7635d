"""Is a model folder complete enough to serve? Checked before any worker may use it.

- config.json present and valid;
- every weight shard named in the index present, and complete: safetensors files are opened with
  the `safetensors` library (which rejects a file shorter than its header declares); .bin shards
  must be complete zip archives (torch.save format);
- the tokenizer files its family needs (families.py; Qwen: qwen.tiktoken; ChatGLM3: tokenizer.model;
  today's families (families.MODEL_FILES): tokenizer_config.json, tokenizer.json or tokenizer.model, and a
  chat template);
- a folder downloaded from a ModelScope id the bundle knows (families.KNOWN_MODELS) holds that model:
  config.json's model_type is the one the id's model has;
- sharded weights come with their index (model.safetensors.index.json names every shard);
- the remote-code files named in auto_map (config.json and tokenizer_config.json), and every local
  module they import, recursively (`from .x import y` anywhere in the code, as transformers copies
  them; an absolute `import x` when x.py is in the folder): Qwen's modeling_qwen.py imports
  qwen_generation_utils and cpp_kernels.
"""
from __future__ import annotations

import ast
import json
import re
import zipfile
from pathlib import Path

from safetensors import safe_open

from workers.models.families import CHAT_TEMPLATE_FILES, family_for_config, known_model, model_files

GENERIC_TOKENIZER_FILES = (("tokenizer.json", "tokenizer.model", "vocab.json"),)
SHARD_NAME = re.compile(r"-\d+-of-\d+\.(safetensors|bin)$")


class IncompleteModel(RuntimeError):
    pass


def weight_file_names() -> tuple[tuple[str, str], tuple[str, str]]:
    """(index files, single weight files) by transformers' own names. Imported here, not at the top: importing
    transformers imports torch, about 2 s that every `bundle` command (stop, status) would pay."""
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

    return (SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_INDEX_NAME), (SAFE_WEIGHTS_NAME, WEIGHTS_NAME)


def _shard_problem(path: Path) -> str | None:
    if not path.is_file():
        return f"weight shard {path.name} is missing"
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except Exception as exc:  # safetensors raises its own error types
            return f"weight shard {path.name} is incomplete or corrupt ({exc})"
    elif path.suffix == ".bin":
        if not zipfile.is_zipfile(path):
            return f"weight shard {path.name} is incomplete or corrupt (not a complete torch zip archive)"
    return None


def _auto_map_files(config: dict) -> set[str]:
    files = set()
    for ref in (config.get("auto_map") or {}).values():
        for item in ref if isinstance(ref, list) else [ref]:
            if item and "." in item:
                files.add(item.split("--")[-1].rsplit(".", 1)[0] + ".py")
    return files


def _local_imports(source: str) -> tuple[set[str], set[str]]:
    """(files a module needs by relative import, files it may need by absolute import if local)."""
    relative, absolute = set(), set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            relative.add(node.module.replace(".", "/") + ".py")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            absolute.add(node.module.split(".")[0] + ".py")
        elif isinstance(node, ast.Import):
            absolute |= {a.name.split(".")[0] + ".py" for a in node.names}
    return relative, absolute


def _imported_files(folder: Path, roots: set[str]) -> tuple[dict[str, str], list[str]]:
    """{local module file: the file importing it} over the remote code, recursively, and problems."""
    needed: dict[str, str] = {}
    found: list[str] = []
    todo, seen = sorted(roots), set()
    while todo:
        name = todo.pop(0)
        if name in seen or not (folder / name).is_file():
            continue
        seen.add(name)
        try:
            relative, absolute = _local_imports((folder / name).read_text(encoding="utf-8", errors="replace"))
        except SyntaxError as exc:
            found.append(f"remote-code file {name} is not valid Python ({exc.msg}, line {exc.lineno})")
            continue
        local = relative | {f for f in absolute if (folder / f).is_file()}
        for dep in sorted(local - roots):
            needed.setdefault(dep, name)
        todo += sorted(local - seen)
    return needed, found


def _has_chat_template(folder: Path) -> bool:
    if any((folder / name).is_file() for name in CHAT_TEMPLATE_FILES):
        return True
    try:
        return bool(json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template"))
    except (FileNotFoundError, ValueError, AttributeError):
        return False


def problems(folder: Path, modelscope: str | None = None) -> list[str]:
    """What keeps the folder from being served; `modelscope`: the id it was downloaded from, if any."""
    if not folder.is_dir():
        return [f"{folder} does not exist"]
    found: list[str] = []
    try:
        config = json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        return [f"config.json is missing in {folder}"]
    except ValueError as exc:
        return [f"config.json in {folder} is not valid JSON ({exc})"]

    index_files, single_files = weight_file_names()
    index = next((folder / n for n in index_files if (folder / n).is_file()), None)
    if index is not None:
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as exc:
            return found + [f"{index.name} is not a valid weight index ({exc})"]
        found += [p for p in (_shard_problem(folder / s) for s in shards) if p]
    else:
        singles = [folder / n for n in single_files if (folder / n).is_file()]
        shards = sorted(p.name for p in folder.iterdir() if SHARD_NAME.search(p.name))
        if not singles and shards:
            found.append(f"the weight index is missing: {shards[0]} and {len(shards) - 1} more shard(s) are there, "
                         f"but none of {', '.join(index_files)} names them")
        elif not singles:
            found.append(f"no weights: none of {', '.join(index_files + single_files)} is present")
        found += [p for p in (_shard_problem(s) for s in singles) if p]

    known = known_model(modelscope) if modelscope else None
    if known is not None and config.get("model_type") != known.model_type:
        found.append(f"{folder} holds a {config.get('model_type')!r} model, but {known.modelscope} is a "
                     f"{known.model_type!r} model: the folder is not (all) that download")
    family = family_for_config(config)
    for name in family.tokenizer_files if family else ():
        if not (folder / name).is_file():
            found.append(f"tokenizer file {name} is missing (needed by {config.get('model_type')} models)")
    files = model_files(config)
    if files is not None:
        for alternatives in files.tokenizer:
            if not any((folder / a).is_file() for a in alternatives):
                found.append(f"tokenizer file {' or '.join(alternatives)} is missing (needed by "
                             f"{config.get('model_type')} models)")
        if files.chat_template and not _has_chat_template(folder):
            found.append(f"no chat template: tokenizer_config.json has no chat_template and none of "
                         f"{', '.join(CHAT_TEMPLATE_FILES)} is present ({config.get('model_type')} models chat by it)")
    elif family is None or not family.tokenizer_files:
        for alternatives in GENERIC_TOKENIZER_FILES:
            if not any((folder / a).is_file() for a in alternatives):
                found.append(f"no tokenizer: none of {', '.join(alternatives)} is present")

    code = _auto_map_files(config)
    tok_config = folder / "tokenizer_config.json"
    if tok_config.is_file():
        try:
            code |= _auto_map_files(json.loads(tok_config.read_text()))
        except ValueError as exc:
            found.append(f"tokenizer_config.json is not valid JSON ({exc})")
    found += [f"remote-code file {f} is missing (named in auto_map)" for f in sorted(code) if not (folder / f).is_file()]
    imported, unreadable = _imported_files(folder, code)
    found += unreadable
    found += [f"remote-code file {f} is missing (imported by {by})" for f, by in sorted(imported.items())
              if not (folder / f).is_file()]
    return found


def require_complete(folder: Path, modelscope: str | None = None) -> None:
    found = problems(folder, modelscope)
    if found:
        raise IncompleteModel(f"model folder {folder} is incomplete:\n  - " + "\n  - ".join(found))
