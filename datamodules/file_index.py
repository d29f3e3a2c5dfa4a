"""The file list of a ``root/<class>/**`` tree, made fast and cached next to the data.

* One recursive ``os.scandir`` walk per class folder, then each file's ``check`` (a reason to skip
  it, or ``None``). ``os.scandir``, ``stat``, ``open``/``read`` and image decoding release the GIL,
  so a thread pool overlaps the waits of slow (cold, network) storage and decoding; but where each
  call returns at once (a warm page cache) the threads only hand the GIL to each other (header
  checks over 2x slower with 8 threads on 2 cores). So class folders are indexed one after another while
  they average less than ``SLOW_FILE_NS`` per file; the rest then go to the pool. The order is
  deterministic either way: paths sorted within each class, classes in label order.
* The result is cached in ``<root>/.lightning_ssl_index.<mode>.<hash of the class list>.json.gz``, or
  in ``$XDG_CACHE_HOME/lightning-ssl/index/`` (default ``~/.cache/...``, named by a hash of the
  absolute root) where the data folder cannot be written. gzip'd JSON: 1M paths take 2.7 MB instead
  of ~30 MB and read back in ~0.1 s, and ``zcat`` shows them. One file per class list, so runs on a
  class subset (ImageNet-100) and on the whole folder do not overwrite each other's cache. Written
  atomically (temporary file, then ``os.replace``); a cache that cannot be read is ignored, one that
  cannot be written anywhere gives one warning per process; neither stops a run.
* The cache is used only when the mode, the class list and every directory walked (its inode and
  ``st_mtime_ns``, taken before it was listed) are unchanged. A directory's mtime changes when an
  entry is added, removed or renamed in it, so one ``stat`` per directory (thousands, not millions)
  sees files added, removed, renamed or moved at any depth; the class folders' inodes see class
  folders swapped or replaced. (The root's own mtime is not used: writing the cache next to the data
  changes it.) A tree with a directory changed in the last 2 s is not cached, since a change within
  the file system's timestamp resolution could go unseen.
* What the cache cannot see: a file whose content changes in place (overwritten rather than replaced
  by a rename), and changes on file systems whose directory mtimes do not follow their entries (some
  FUSE mounts of object stores); pass ``cache=False`` there (``index_cache=False`` to the datasets).
  A file that no longer decodes is still handled when training reads it (see ``unreadable``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

__all__ = ["FolderIndex", "index_folder", "walk_folder", "cache_files", "write_atomic", "default_threads"]

FORMAT = 1
CACHE_NAME = ".lightning_ssl_index"
RACY_NS = 2_000_000_000  # directories changed this recently are not trusted to show the next change
SLOW_FILE_NS = 40_000  # per file, above a warm page cache's ~1 (walk) to ~10 (header) microseconds
_WARNED: set[str] = set()


@dataclass
class FolderIndex:
    """The listing: ``samples`` ``(path, label)``, their ``targets`` and ``skipped`` ``"path (reason)"``,
    in label order; ``cache_file`` is the cache it was read from or written to (``None``: neither)."""

    samples: list[tuple[str, int]]
    targets: list[int]
    skipped: list[str]
    from_cache: bool = False
    cache_file: Path | None = None


def default_threads() -> int:
    return min(32, 4 * (os.cpu_count() or 1))


def walk_folder(folder: str) -> tuple[list[str], list[tuple[str, int, int]]]:
    """The non-hidden files under ``folder`` at any depth, relative to it (unsorted), and
    ``(relative path, inode, mtime_ns)`` of every directory walked (``""``: ``folder``; others end
    with a separator), taken before it is listed."""
    files: list[str] = []
    dirs: list[tuple[str, int, int]] = []
    stack = [""]
    while stack:
        rel = stack.pop()
        path = folder + os.sep + rel if rel else folder
        st = os.stat(path)
        dirs.append((rel, st.st_ino, st.st_mtime_ns))
        with os.scandir(path) as it:
            for entry in it:
                name = entry.name
                if name[0] == ".":
                    continue
                if entry.is_dir():
                    stack.append(rel + name + os.sep)
                elif entry.is_file():
                    files.append(rel + name)
    return files, dirs


def _digest(text: str, n: int) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:n]


def cache_files(root: str | os.PathLike, mode: str, classes: Sequence[str]) -> list[Path]:
    """Where the cache of ``root`` may be: next to the data first, then under the user's cache folder."""
    name = f"{mode}.{_digest(json.dumps(list(classes)), 12)}.json.gz"
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lightning-ssl" / "index"
    absolute = os.path.realpath(root)
    return [Path(root) / f"{CACHE_NAME}.{name}", home / f"{Path(absolute).name}-{_digest(absolute, 16)}.{name}"]


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _prefixes(root: str | os.PathLike, classes: Sequence[str]) -> list[str]:
    """Each class folder as the walk spells it (``str(Path(root) / cls)``), with a trailing separator."""
    return [str(Path(root) / c) + os.sep for c in classes]


def _stat_ok(dirs: list[tuple[str, int, int]]) -> bool:
    try:
        return all((st := os.stat(p)).st_ino == ino and st.st_mtime_ns == mtime for p, ino, mtime in dirs)
    except OSError:
        return False


def _assemble(
    prefixes: list[str], kept: list[list[str]], skipped: list[str], paths: list[list[str]] | None = None
) -> tuple[list[tuple[str, int]], list[int], list[str]]:
    """``samples``, ``targets`` and ``skipped`` from each class's kept files (relative, or full ``paths``)."""
    flat: list[str] = []
    targets: list[int] = []
    for label, (prefix, rels) in enumerate(zip(prefixes, kept)):
        flat += paths[label] if paths is not None else map(prefix.__add__, rels)
        targets += [label] * len(rels)
    return list(zip(flat, targets)), targets, skipped


def _read(
    file: Path, prefixes: list[str], classes: list[str], mode: str, pool: ThreadPoolExecutor
) -> FolderIndex | None:
    """The index stored in ``file`` if it is intact and the tree is unchanged, else ``None``."""
    try:
        payload = json.loads(gzip.decompress(file.read_bytes()))
        if payload["format"] != FORMAT or payload["mode"] != mode or payload["classes"] != classes:
            return None
        dirs = [(prefixes[c][:-1] if not rel else prefixes[c] + rel, ino, m) for c, rel, ino, m in payload["dirs"]]
        if not all(pool.map(_stat_ok, [dirs[i : i + 256] for i in range(0, len(dirs), 256)])):
            return None
        skipped = [f"{prefixes[label]}{rel} ({reason})" for label, rel, reason in payload["skipped"]]
        return FolderIndex(*_assemble(prefixes, payload["files"], skipped), from_cache=True, cache_file=file)
    except Exception:  # a missing, corrupt or foreign cache file is ignored (and replaced)
        return None


def _write(files: list[Path], payload: dict) -> Path | None:
    data = gzip.compress(json.dumps(payload, separators=(",", ":")).encode("ascii"), compresslevel=1, mtime=0)
    errors = []
    for file in files:
        try:
            write_atomic(file, data)
            return file
        except OSError as err:
            errors.append(f"{file.parent}: {err.strerror or err}")
    if files[0].parent.as_posix() not in _WARNED:
        _WARNED.add(files[0].parent.as_posix())
        warnings.warn(
            f"cannot write the file index cache ({'; '.join(errors)}); indexing again next time", stacklevel=3
        )
    return None


def _index_class(
    prefix: str, check: Callable[[str], str | None]
) -> tuple[list[str], list[str], list[tuple[str, str]], list[tuple[str, int, int]]]:
    """Walk one class folder and check its files: the kept files (relative to the folder, and full
    paths), the ``(file, reason)`` of the others (sorted) and the directories."""
    found, dirs = walk_folder(prefix[:-1])
    found.sort()
    paths = list(map(prefix.__add__, found))
    reasons = list(map(check, paths))
    if not any(reasons):
        return found, paths, [], dirs
    keep = [reason is None for reason in reasons]
    bad = [(rel, reason) for rel, reason, ok in zip(found, reasons, keep) if not ok]
    return [r for r, ok in zip(found, keep) if ok], [p for p, ok in zip(paths, keep) if ok], bad, dirs


def index_folder(
    root: str | os.PathLike,
    classes: Sequence[str],
    check: Callable[[str], str | None],
    mode: str,
    cache: bool = True,
    threads: int | None = None,
) -> FolderIndex:
    """List ``root/<class>/**`` (hidden entries left out) and ``check`` each file; ``mode`` names what
    ``check`` does (the cache of one mode is not used for another). ``check`` may run in threads, at
    most ``threads`` (default ``default_threads()``), on slow storage."""
    classes = list(classes)
    files = cache_files(root, mode, classes) if cache else []
    prefixes = _prefixes(root, classes)
    workers = threads or default_threads()
    with ThreadPoolExecutor(workers) as pool:
        for file in files:
            if (index := _read(file, prefixes, classes, mode, pool)) is not None:
                return index
        start = time.time_ns()
        results, seen, began = [], 0, time.perf_counter_ns()
        for prefix in prefixes:
            results.append(_index_class(prefix, check))
            seen += len(results[-1][0]) + len(results[-1][2])
            if workers > 1 and time.perf_counter_ns() - began > SLOW_FILE_NS * max(seen, 10):
                rest = prefixes[len(results) :]
                results += pool.map(_index_class, rest, [check] * len(rest))
                break
        kept = [r[0] for r in results]
        dropped = [[label, rel, reason] for label, r in enumerate(results) for rel, reason in r[2]]
        skipped = [f"{prefixes[label]}{rel} ({reason})" for label, rel, reason in dropped]
        index = FolderIndex(*_assemble(prefixes, kept, skipped, [r[1] for r in results]))
        dirs = [(label, *d) for label, r in enumerate(results) for d in r[3]]
        if files and all(m < start - RACY_NS for *_, m in dirs):
            payload = dict(format=FORMAT, mode=mode, classes=classes, dirs=dirs, files=kept, skipped=dropped)
            index.cache_file = _write(files, payload)
    return index
