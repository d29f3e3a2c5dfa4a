"""Reading a sample of a folder dataset while skipping unreadable files, shared by the image and audio
folders: an unreadable file is replaced by the next readable sample, recorded in ``bad_files`` (per
process) and warned about once; ``strict=True`` raises instead; ``max_retries + 1`` unreadable files
in a row stop with an error naming them."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["load_skipping_unreadable", "summarize"]

T = TypeVar("T")
_MAX_NAMED = 10  # bad files named in a warning or error


def summarize(paths: Sequence[Any]) -> str:
    """The first few paths, then how many more."""
    names = ", ".join(str(p) for p in paths[:_MAX_NAMED])
    return names + (f" and {len(paths) - _MAX_NAMED} more" if len(paths) > _MAX_NAMED else "")


def load_skipping_unreadable(
    samples: Sequence[tuple[str, int]],
    index: int,
    read: Callable[[int], T],
    errors: tuple[type[BaseException], ...],
    *,
    kind: str,
    bad_files: list[str],
    strict: bool,
    max_retries: int,
    root: str | Path,
) -> tuple[T, int]:
    """``(read(i), label)`` of sample ``i = index``, or of the next readable sample after it; ``read``
    gets the sample's position in ``samples`` (whose paths name it in messages).

    ``kind`` names the files in messages ("image", "audio"); ``bad_files`` is the dataset's list of
    unreadable paths met so far, appended to here.
    """
    for attempt in range(max_retries + 1):
        position = (index + attempt) % len(samples)
        path, label = samples[position]
        try:
            return read(position), label
        except errors as err:
            if strict:
                raise ValueError(f"cannot decode {kind} {path}: {type(err).__name__}: {err} (strict=True)") from err
            if path not in bad_files:
                bad_files.append(path)
                warnings.warn(
                    f"cannot decode {kind} {path} ({type(err).__name__}: {err}); replaced by another sample "
                    f"({len(bad_files)} unreadable file(s) so far in this process)",
                    stacklevel=3,
                )
    raise RuntimeError(
        f"{max_retries + 1} consecutive unreadable {kind} files from {samples[index][0]}: "
        f"{summarize(bad_files)}; check the dataset at {root}"
    )
