"""Reading checkpoint files with errors a user can act on.

``read_checkpoint(path)`` is ``torch.load`` for a Lightning ``.ckpt``: a missing file, a file cut
short (a copy or a save interrupted) or a file that is not a checkpoint each give one line naming the
file; for an incomplete file the line also names the newest complete checkpoint in the same folder,
so a killed run can be resumed from there.

``method_mismatch(path, written_by, model)`` is the one-line message for a checkpoint of another
method (``--ckpt_path`` of a BYOL run given to a SimCLR config), or ``None`` when they agree.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

__all__ = ["read_checkpoint", "complete_checkpoints", "method_mismatch", "IncompleteCheckpointError"]


class IncompleteCheckpointError(ValueError):
    """A checkpoint file that cannot be read to its end."""


def _is_complete(path: Path) -> bool:
    """Whether ``path`` is a whole ``torch.save`` archive: its zip directory (written last) is present
    and every member it lists is there. Cheap: reads the directory, not the tensors."""
    try:
        with zipfile.ZipFile(path) as archive:
            size = path.stat().st_size
            return all(info.header_offset + info.compress_size <= size for info in archive.infolist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def complete_checkpoints(folder: Path, exclude: Path | None = None) -> list[Path]:
    """The complete ``*.ckpt`` files of ``folder``, newest first (``exclude`` left out)."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob("*.ckpt") if p != exclude and p.is_file() and _is_complete(p)]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def read_checkpoint(path: str | Path, weights_only: bool = False) -> dict:
    """The dictionary saved in the Lightning checkpoint ``path`` (on the CPU)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; give the path of a Lightning .ckpt file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=weights_only)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as err:
        if _is_complete(path) and not isinstance(err, EOFError):
            raise ValueError(f"checkpoint {path} could not be read: {str(err).splitlines()[0]}") from None
        others = complete_checkpoints(path.parent, exclude=path)
        hint = f"; {others[0]} is complete and can be used instead" if others else "; no other checkpoint is there"
        raise IncompleteCheckpointError(
            f"checkpoint {path} is incomplete ({path.stat().st_size} bytes: the save or copy was cut short){hint}"
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not a Lightning checkpoint (no 'state_dict' entry)")
    return ckpt


def method_mismatch(path: str | Path, written_by: type | None, model: type) -> str | None:
    """The message for ``path``, a checkpoint of ``written_by``, given to a run of ``model``; ``None``
    when the checkpoint does not say or is of ``model`` (or a subclass of it)."""
    if written_by is None or issubclass(written_by, model):
        return None
    ours, theirs = model.__name__, written_by.__name__
    return (
        f"{path} is a checkpoint of {theirs}, but this run's model is {ours}: give a {ours} checkpoint, or use "
        f"the {theirs} run's config (--model {theirs}) for this one; nothing was written"
    )
