"""An ImageFolder dataset (``root/<class>/**/<image>``) that survives real-world folders.

* Construction lists files with ``os.scandir`` and, by default, reads only each file's first bytes
  (``verify="header"``): files without an image extension and files whose header is not an image
  are skipped, with ONE warning that counts and names them (``strict=True`` raises instead).
  ``verify="full"`` decodes everything up front (small trees); ``verify="none"`` trusts the listing
  (1.2M-file trees on slow storage). The listing and checks run in threads and are cached next to
  the data, so a second start on an unchanged tree opens no image (``file_index``; ``index_cache``).
* A file that fails to decode during an epoch (e.g. truncated) is replaced by the next readable
  sample and recorded in ``bad_files`` (per process) with one warning per file; an epoch never dies
  because of one file (``strict=True`` raises, naming it). A cut file fails to decode even where
  ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` was turned on (it pads a cut scan with gray), so no epoch
  trains on a half-gray image.
* Every image comes out as 8-bit RGB: grayscale, palette, CMYK, 16-bit and alpha images are
  converted (16-bit scaled to 8 bits, transparency composited on white).
* Empty class folders keep their class index (so labels agree across splits), with a warning.
* A missing root, split or class folder raises ``FileNotFoundError`` naming the path and the layout.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile
from torch.utils.data import Dataset

from lightning_ssl.datamodules.file_index import index_folder
from lightning_ssl.datamodules.unreadable import load_skipping_unreadable, summarize

__all__ = ["RobustImageFolder", "load_rgb", "IMAGE_EXTENSIONS", "LAYOUT_HINT", "DECODE_ERRORS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp", ".gif")
LAYOUT_HINT = "expected layout: <root>/<split>/<class>/<image>.jpg, e.g. imagenet/train/n01440764/n01440764_10026.JPEG"
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
_STRICT_DECODING = threading.Lock()


def _header_ok(header: bytes) -> bool:
    """Whether the first bytes of a file are the signature of an image format PIL reads."""
    return (
        header.startswith(b"\xff\xd8\xff")  # JPEG
        or header.startswith(b"\x89PNG\r\n\x1a\n")
        or header.startswith((b"GIF87a", b"GIF89a"))
        or header.startswith(b"BM")
        or (header.startswith(b"RIFF") and header[8:12] == b"WEBP")
        or header.startswith((b"II*\x00", b"MM\x00*"))  # TIFF
        or (len(header) > 2 and header[:1] == b"P" and header[1:2] in b"123456" and header[2:3].isspace())
    )


def _load_complete(img: Image.Image) -> None:
    """``img.load()``, raising on a truncated file even where a program (or a library it imports) set
    PIL's process-wide ``ImageFile.LOAD_TRUNCATED_IMAGES``; the setting is restored afterwards."""
    if not ImageFile.LOAD_TRUNCATED_IMAGES:
        img.load()
        return
    with _STRICT_DECODING:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            img.load()
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = True


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode an image fully and return it as 8-bit RGB (raises on unreadable or truncated files)."""
    with Image.open(path) as img:
        _load_complete(img)
        mode = img.mode
        if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):  # 16-bit (or 32-bit int) gray
            arr = np.asarray(img).astype(np.float64)
            if mode.startswith("I;16") or arr.max(initial=0) > 255:
                arr = arr / 257.0
            return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
        if mode == "F":
            arr = np.asarray(img, dtype=np.float64)
            if arr.max(initial=0) <= 1.0:
                arr = arr * 255.0
            return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
        if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return img.convert("RGB") if mode != "RGB" else img  # pixels stay loaded after the file closes


class RobustImageFolder(Dataset):
    """``(image, label)`` pairs from ``root/<class>/...``; ``image`` is an RGB PIL image, or
    ``transform(image)``.

    Args:
        root: the split folder (e.g. ``imagenet/train``).
        classes: class folder names to use, in label order (default: every sub-folder, sorted).
            Pass the training split's classes to the other splits so labels agree.
        transform: applied to the RGB PIL image.
        strict: raise on the first unreadable file instead of skipping it.
        verify: ``"header"`` (default; reads a few bytes per file), ``"full"`` (decodes every image
            now) or ``"none"``.
        max_retries: readable files tried in place of an unreadable one before giving up.
        index_cache: reuse (and write) the cached listing and checks of an unchanged tree; see
            ``file_index`` for what the cache can and cannot see.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        classes: Sequence[str] | None = None,
        transform: Callable | None = None,
        strict: bool = False,
        verify: str = "header",
        max_retries: int = 50,
        index_cache: bool = True,
    ):
        if verify not in ("header", "full", "none"):
            raise ValueError(f"verify must be 'header', 'full' or 'none', got {verify!r}")
        self.root = Path(root).expanduser()
        self.transform, self.strict, self.max_retries = transform, strict, max_retries
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist or is not a directory; {LAYOUT_HINT}")
        if classes is None:
            classes = sorted(e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith("."))
            if not classes:
                raise FileNotFoundError(f"no class folders in {self.root}; {LAYOUT_HINT}")
        else:
            classes = list(classes)
            missing = [c for c in classes if not (self.root / c).is_dir()]
            if missing:
                raise FileNotFoundError(f"class folder(s) missing in {self.root}: {summarize(missing)}; {LAYOUT_HINT}")
        self.classes = list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

        index = index_folder(self.root, self.classes, partial(self._check, verify=verify), verify, cache=index_cache)
        samples, targets, skipped = index.samples, index.targets, index.skipped
        if skipped:
            message = f"{len(skipped)} file(s) in {self.root} are not readable images: {summarize(skipped)}"
            if strict:
                raise ValueError(message + " (strict=True; remove them or pass strict=False to skip them)")
            warnings.warn(message + "; skipped", stacklevel=2)
        counts = np.bincount(targets, minlength=len(self.classes))
        empty = [c for c, n in zip(self.classes, counts) if n == 0]
        if len(empty) == len(self.classes):
            raise FileNotFoundError(f"no readable images under {self.root}; {LAYOUT_HINT}")
        if empty:
            warnings.warn(
                f"{len(empty)} class folder(s) in {self.root} hold no readable image: {summarize(empty)}; "
                "they keep their label index but contribute no samples",
                stacklevel=2,
            )
        self.samples = samples
        self.targets = targets
        self.skipped = skipped
        self.bad_files: list[str] = []  # found unreadable while loading, in this process

    @staticmethod
    def _check(path: str, verify: str) -> str | None:
        if not path.lower().endswith(IMAGE_EXTENSIONS):
            return "not an image file"
        if verify == "none":
            return None
        try:
            if verify == "full":
                load_rgb(path)
                return None
            with open(path, "rb") as f:
                header = f.read(16)
        except DECODE_ERRORS as err:
            return f"unreadable: {type(err).__name__}: {err}"
        if not header:
            return "empty file"
        return None if _header_ok(header) else "not an image header"

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[Image.Image, int]:
        """The RGB image at ``index`` (or the next readable one) and its label."""
        return load_skipping_unreadable(
            self.samples,
            index,
            lambda i: load_rgb(self.samples[i][0]),
            DECODE_ERRORS,
            kind="image",
            bad_files=self.bad_files,
            strict=self.strict,
            max_retries=self.max_retries,
            root=self.root,
        )

    def __getitem__(self, index: int):
        image, label = self.load(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, label
