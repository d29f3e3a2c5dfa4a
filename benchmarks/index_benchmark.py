"""Seconds to index a huge image folder: a generated tree of ``--files`` empty ``.JPEG`` files in
``--classes`` class folders (made once under ``--root``, reused), listed

* by the sequential walk ``RobustImageFolder`` made before ``file_index`` (for reference);
* by ``file_index`` as it runs (in the calling thread, the storage being fast), and with its thread
  pool forced on (what slow storage gets);
* by ``RobustImageFolder(verify="none")`` without the cache, on a first start (indexes, writes the
  cache) and on a second start (reads it).

Empty files are all "empty file" to ``verify="header"``, so the main figures use ``verify="none"``;
the same rows then run with ``verify="header"`` on a smaller tree (``--header-files``) of files
holding a JPEG's first bytes. Warm page cache (the trees were just listed or made); cold storage,
especially over a network, is slower, and gains more from the threads and the cache.

    python -m benchmarks.index_benchmark --files 1000000 --classes 1000 --root /tmp/index-bench
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.common import header, print_table, write_json
from lightning_ssl.datamodules import file_index
from lightning_ssl.datamodules.image_folder import RobustImageFolder

JPEG_START = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01"  # a JPEG's first 16 bytes


def make_tree(root: Path, files: int, classes: int, content: bytes) -> tuple[Path, float]:
    """``root/n<class>/n<class>_<i>.JPEG``, ``files`` in all; made once (``root/.complete`` marks a
    finished tree). Returns the tree and the seconds spent making it (0 when reused)."""
    if (root / ".complete").is_file():
        return root, 0.0
    if root.exists() and any(root.iterdir()):
        raise SystemExit(f"{root} exists but is not a finished benchmark tree; remove it or pass another --root")
    start = time.perf_counter()
    for c in range(classes):
        folder = root / f"n{c:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(c, files, classes):
            fd = os.open(folder / f"n{c:08d}_{i}.JPEG", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            if content:
                os.write(fd, content)
            os.close(fd)
    (root / ".complete").write_text(f"{files} files in {classes} classes\n")
    return root, time.perf_counter() - start


def sequential_index(root: Path, classes: list[str], verify: str) -> int:
    """The listing as ``RobustImageFolder`` made it before ``file_index``: one class after another, the
    samples, targets and class counts built as it built them."""
    samples, skipped = [], []
    for label, cls in enumerate(classes):
        out, stack = [], [str(root / cls)]
        while stack:
            with os.scandir(stack.pop()) as it:
                for entry in it:
                    if entry.name.startswith("."):
                        continue
                    if entry.is_dir():
                        stack.append(entry.path)
                    elif entry.is_file():
                        out.append(entry.path)
        for path in sorted(out):
            reason = RobustImageFolder._check(path, verify)
            if reason is None:
                samples.append((path, label))
            else:
                skipped.append(f"{path} ({reason})")
    targets = [t for _, t in samples]
    np.bincount([t for _, t in samples], minlength=len(classes))
    return len(targets)


def remove_caches(root: Path, verify: str, classes: list[str]) -> None:
    for file in file_index.cache_files(root, verify, classes):
        file.unlink(missing_ok=True)


def wait_out_racy_window(root: Path) -> None:
    """A tree changed in the last 2 s is not cached; wait until it is older."""
    newest = max(os.stat(e.path).st_mtime_ns for e in os.scandir(root) if e.is_dir())
    wait = (newest + file_index.RACY_NS - time.time_ns()) / 1e9 + 0.1
    if wait > 0:
        time.sleep(wait)


def pooled(fn: Callable[[], int]) -> int:
    """``fn()`` with every class folder counted as slow, so all but the first go to the thread pool."""
    threshold, file_index.SLOW_FILE_NS = file_index.SLOW_FILE_NS, 0
    try:
        return fn()
    finally:
        file_index.SLOW_FILE_NS = threshold


def measure(root: Path, verify: str, repeats: int, sequential: bool) -> list[dict]:
    """Median seconds of each case over ``repeats`` rounds; the cases take turns within a round, so a
    burst of load from elsewhere on the machine does not fall on one case only."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    check = lambda path: RobustImageFolder._check(path, verify)
    cache = file_index.cache_files(root, verify, classes)[0]
    wait_out_racy_window(root)
    cases: list[tuple[str, Callable[[], int]]] = []
    if sequential:
        cases.append(("sequential walk (before file_index)", lambda: sequential_index(root, classes, verify)))
    index = lambda: len(file_index.index_folder(root, classes, check, verify, cache=False).samples)
    cases.append(("file_index, no cache (threads only on slow storage)", index))
    cases.append((f"file_index, no cache, always {file_index.default_threads()} threads", lambda: pooled(index)))
    folder = lambda: len(RobustImageFolder(root, verify=verify))
    cases.append(
        ("RobustImageFolder, index_cache=False", lambda: len(RobustImageFolder(root, verify=verify, index_cache=False)))
    )
    cases.append(("RobustImageFolder, first start (indexes, writes the cache)", folder))
    cases.append(("RobustImageFolder, second start (cache)", folder))
    times: list[list[float]] = [[] for _ in cases]
    samples = [0] * len(cases)
    for _ in range(repeats):
        remove_caches(root, verify, classes)
        for i, (name, fn) in enumerate(cases):
            written = cache.stat() if cache.is_file() else None
            start = time.perf_counter()
            samples[i] = fn()
            times[i].append(time.perf_counter() - start)
            if name.endswith("(cache)") and (written is None or cache.stat().st_mtime_ns != written.st_mtime_ns):
                raise SystemExit(f"the second start on {root} did not read the cache {cache}")
    rows = []
    for (name, _), seconds, n in zip(cases, map(statistics.median, times), samples):
        rows.append(dict(verify=verify, case=name, seconds=seconds, files_per_s=n / seconds, samples=n))
    rows[-1]["cache_mb"] = cache.stat().st_size / 1e6
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=1_000_000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--root", type=Path, default=Path("/tmp/lightning-ssl-index-benchmark"))
    parser.add_argument("--header-files", type=int, default=100_000, help="files of the verify='header' tree (0: skip)")
    parser.add_argument("--repeats", type=int, default=3, help="median of this many runs per row")
    parser.add_argument("--no-sequential", action="store_true", help="skip the sequential reference walk")
    parser.add_argument("--json", type=Path, help="also write the arguments and results here")
    args = parser.parse_args()

    print(header(f"index benchmark: {args.files:,} files in {args.classes:,} classes under {args.root}"))
    print(
        f"# load average at start {os.getloadavg()[0]:.1f}; file_index default threads {file_index.default_threads()}"
    )
    trees = [(args.root / f"empty-{args.files}-{args.classes}", args.files, b"", "none")]
    if args.header_files:
        trees.append((args.root / f"jpeg-{args.header_files}-{args.classes}", args.header_files, JPEG_START, "header"))
    rows = []
    for root, files, content, verify in trees:
        root, made = make_tree(root, files, args.classes, content)
        print(f"# {root}: " + (f"made in {made:.1f} s" if made else "reused"), flush=True)
        rows += measure(root, verify, args.repeats, not args.no_sequential)
    print(f"# load average at end {os.getloadavg()[0]:.1f}")
    columns = [
        ("verify", "verify", "s"),
        ("samples", "samples", ","),
        ("seconds", "seconds", ".3f"),
        ("files_per_s", "files/s", ",.0f"),
        ("cache_mb", "cache MB", ".1f"),
        ("case", "case", "s"),
    ]
    print_table(rows, columns)
    write_json(args.json, args, rows)


if __name__ == "__main__":
    main()
