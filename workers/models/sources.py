"""Where each configured model source lives on disk, and making it ready before workers start."""
from __future__ import annotations

from pathlib import Path

from workers.config.rules import resolve_path
from workers.config.schema import Source
from workers.config.paths import models_dir


class SourceNotReady(RuntimeError):
    pass


def model_dir(source: Source) -> Path:
    if source.embedded is not None:
        return models_dir() / source.embedded
    if source.path is not None:
        return resolve_path(source.path)
    return models_dir() / "modelscope" / source.modelscope


def prepare(source: Source) -> Path:
    """Make the model folder ready: convert the embedded model, download a ModelScope model that
    is missing or incomplete, and check that the folder is complete."""
    from workers.models import check as model_check

    if source.embedded is not None:
        from workers.models.embedded import prepare as prepare_embedded

        return prepare_embedded(model_dir(source))
    folder = model_dir(source)
    if source.modelscope and model_check.problems(folder, source.modelscope):
        from workers.models.download import DownloadError, check_reachable, download

        try:
            check_reachable()
        except DownloadError as exc:
            raise SourceNotReady(
                f"{source.modelscope} is not downloaded yet (expected complete in {folder}) and {exc}"
            ) from None
        download(source.modelscope, source.revision, folder, None)
    try:
        model_check.require_complete(folder, source.modelscope)
    except model_check.IncompleteModel as exc:
        raise SourceNotReady(str(exc)) from None
    return folder
