"""Where each configured model source lives on disk, and making it ready before workers start."""
from __future__ import annotations

from pathlib import Path

from workers.deployment import Source, resolve_path
from workers.paths import models_dir


class SourceNotReady(RuntimeError):
    pass


def model_dir(source: Source) -> Path:
    if source.embedded is not None:
        return models_dir() / source.embedded
    if source.path is not None:
        return resolve_path(source.path)
    return models_dir() / "modelscope" / source.modelscope


def prepare(source: Source) -> Path:
    """Make the model folder ready (convert the embedded model; check a local folder)."""
    if source.embedded is not None:
        from workers.embedded_model import prepare as prepare_embedded

        return prepare_embedded(model_dir(source))
    folder = model_dir(source)
    if not folder.is_dir():
        if source.modelscope:
            raise SourceNotReady(
                f"{source.modelscope} is not downloaded yet (expected in {folder}); "
                f"download it with scripts/download_models.sh"
            )
        raise SourceNotReady(f"model folder {folder} does not exist")
    return folder
