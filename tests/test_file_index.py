"""The threaded folder index and its cache: the same listing as a plain sequential walk, a second start
read from the cache, every kind of change to the tree seen, and a cache that is corrupt, stale, for
another mode or unwritable never stopping a run."""

from __future__ import annotations

import gzip
import io
import json
import os
import threading
import warnings
from pathlib import Path

import pytest
from PIL import Image

import lightning_ssl.datamodules.file_index as file_index
from lightning_ssl.datamodules import CIFAR10DataModule, ImageNetDataModule
from lightning_ssl.datamodules.image_folder import IMAGE_EXTENSIONS, RobustImageFolder, load_rgb


def _encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 90)).save(buf, fmt)
    return buf.getvalue()


JPEG, PNG = _encoded("JPEG"), _encoded("PNG")


@pytest.fixture(autouse=True)
def _home_cache(tmp_path, monkeypatch) -> Path:
    """The user's cache folder, under ``tmp_path``."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home-cache"))
    return tmp_path / "home-cache" / "lightning-ssl" / "index"


def _tree(root: Path) -> Path:
    """Three classes with nested folders, hidden entries, non-images, empty and garbage files, and names
    whose sort order differs between a file and a folder of the same stem (``sub.jpg``, ``sub/``)."""
    files = {
        "a/a_0.jpg": JPEG,
        "a/a_1.JPEG": JPEG,
        "a/sub.jpg": JPEG,
        "a/sub/deeper/x.jpg": JPEG,
        "a/sub/y.png": PNG,
        "a/sub-z.png": PNG,
        "a/.DS_Store": b"\x00\x01",
        "a/.thumbs/t.jpg": JPEG,
        "a/notes.txt": b"checked by hand",
        "b/b_0.png": PNG,
        "b/b_1.jpg": JPEG,
        "b/empty.jpg": b"",
        "b/garbage.png": b"this is not a png at all",
        "b/2/deep/er/z.jpg": JPEG,
        "c/c_0.jpg": JPEG,
        "c/c_1.jpeg": JPEG,
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return _age(root)


def _age(root: Path) -> Path:
    """Date every directory to 2020 (the same instant for all, as a tar extraction may), so the tree is
    older than the cache's 2 s racy window."""
    then = 1_600_000_000 * 10**9
    for folder, _, _ in os.walk(root):
        os.utime(folder, ns=(then, then))
    return root


def _reference(root: Path, classes: list[str], verify: str) -> tuple[list[tuple[str, int]], list[str]]:
    """The listing the folder made before it had an index: a plain sequential walk and check."""
    samples, skipped = [], []
    for label, cls in enumerate(classes):
        found = []
        for folder, dirs, names in os.walk(str(root / cls)):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            found += [os.path.join(folder, n) for n in names if not n.startswith(".")]
        for path in sorted(found):
            if not path.lower().endswith(IMAGE_EXTENSIONS):
                reason = "not an image file"
            elif verify == "none":
                reason = None
            elif verify == "full":
                try:
                    load_rgb(path)
                    reason = None
                except OSError as err:
                    reason = f"unreadable: {type(err).__name__}: {err}"
            else:
                header = Path(path).read_bytes()[:16]
                ok = header.startswith((b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n"))
                reason = "empty file" if not header else None if ok else "not an image header"
            if reason is None:
                samples.append((path, label))
            else:
                skipped.append(f"{path} ({reason})")
    return samples, skipped


def _folder(root: Path, **kwargs) -> tuple[RobustImageFolder, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = RobustImageFolder(root, **kwargs)
    return ds, [str(w.message) for w in caught]


def _cache_files(root: Path) -> list[Path]:
    return sorted(root.glob(".lightning_ssl_index*"))


@pytest.fixture
def walks(monkeypatch) -> list[str]:
    """The class folders walked from now on."""
    seen: list[str] = []
    real = file_index.walk_folder

    def counting(folder):
        seen.append(folder)
        return real(folder)

    monkeypatch.setattr(file_index, "walk_folder", counting)
    return seen


def _no_walk(monkeypatch) -> None:
    def fail(folder):
        raise AssertionError(f"walked {folder}; the cache should have been used")

    monkeypatch.setattr(file_index, "walk_folder", fail)


@pytest.mark.parametrize("verify", ["header", "none", "full"])
@pytest.mark.parametrize("classes", [None, ["c", "a"]])
def test_listing_matches_a_sequential_walk_and_the_cache_gives_it_back(tmp_path, monkeypatch, verify, classes):
    root = _tree(tmp_path / "train")
    ds, messages = _folder(root, classes=classes, verify=verify)
    names = classes or ["a", "b", "c"]
    samples, skipped = _reference(root, names, verify)
    assert ds.classes == names and ds.class_to_idx == {c: i for i, c in enumerate(names)}
    assert ds.samples == samples and ds.targets == [t for _, t in samples] and ds.skipped == skipped
    assert len(_cache_files(root)) == 1 and len(messages) == 1 and messages[0].startswith(f"{len(skipped)} file(s)")
    _no_walk(monkeypatch)
    again, repeated = _folder(root, classes=classes, verify=verify)
    assert (again.samples, again.targets, again.skipped, again.classes) == (ds.samples, ds.targets, skipped, names)
    assert repeated == messages  # the same skipped-files warning, from the cache
    index = file_index.index_folder(root, names, lambda path: RobustImageFolder._check(path, verify), verify)
    assert index.from_cache and index.cache_file == _cache_files(root)[0] and index.samples == samples


def test_the_thread_pool_gives_the_same_listing(tmp_path, monkeypatch):
    """Slow storage (a folder slower than ``SLOW_FILE_NS`` per file) sends the class folders after it to
    the pool; the listing is the same as one made in the calling thread."""
    root = _tree(tmp_path / "train")
    check = lambda path: None if path.endswith(".jpg") else "not a jpg"
    threads: set[str] = set()
    real = file_index.walk_folder

    def walk(folder):
        threads.add(threading.current_thread().name)
        return real(folder)

    monkeypatch.setattr(file_index, "walk_folder", walk)
    monkeypatch.setattr(file_index, "SLOW_FILE_NS", 10**12)
    one = file_index.index_folder(root, ["b", "a", "c"], check, "test", cache=False)
    assert threads == {threading.current_thread().name}
    monkeypatch.setattr(file_index, "SLOW_FILE_NS", 0)
    many = file_index.index_folder(root, ["b", "a", "c"], check, "test", cache=False, threads=8)
    assert len(threads) > 1
    assert (one.samples, one.skipped) == (many.samples, many.skipped) and len(one.samples) == 7
    assert [label for _, label in one.samples] == sorted(label for _, label in one.samples)
    ds, _ = _folder(root, verify="full")  # decoding in threads
    assert (ds.samples, ds.skipped) == _reference(root, ["a", "b", "c"], "full")


def _add(root):
    (root / "a" / "new.jpg").write_bytes(JPEG)


def _remove(root):
    (root / "b" / "b_1.jpg").unlink()


def _rename(root):
    (root / "c" / "c_0.jpg").rename(root / "c" / "z.jpg")


def _add_nested(root):
    (root / "a" / "sub" / "deeper" / "w.png").write_bytes(PNG)


def _remove_nested(root):
    (root / "b" / "2" / "deep" / "er" / "z.jpg").unlink()


def _move_between_classes(root):
    (root / "a" / "sub" / "y.png").rename(root / "c" / "y.png")


def _swap_classes(root):
    (root / "a").rename(root / "tmp")
    (root / "b").rename(root / "a")
    (root / "tmp").rename(root / "b")


def _new_subfolder(root):
    (root / "c" / "more").mkdir()
    (root / "c" / "more" / "m.jpg").write_bytes(JPEG)


@pytest.mark.parametrize(
    "change",
    [_add, _remove, _rename, _add_nested, _remove_nested, _move_between_classes, _swap_classes, _new_subfolder],
)
def test_a_change_anywhere_in_the_tree_is_seen(tmp_path, walks, change):
    root = _tree(tmp_path / "train")
    _folder(root)
    assert len(walks) == 3 and len(_cache_files(root)) == 1
    _folder(root)
    assert len(walks) == 3  # unchanged: from the cache
    change(root)
    ds, _ = _folder(root)
    assert len(walks) == 6
    assert (ds.samples, ds.skipped) == _reference(root, ["a", "b", "c"], "header")


def test_class_folders_swapped_with_their_mtimes_kept_are_seen(tmp_path, walks):
    """Only the folders' inodes tell: the same layout, the same (restored) mtimes."""
    root = tmp_path / "train"
    for cls in ("x", "y"):
        (root / cls).mkdir(parents=True)
        (root / cls / "1.jpg").write_bytes(JPEG)
    (root / "y" / "2.jpg").write_bytes(JPEG)
    _age(root)
    assert _folder(root)[0].targets == [0, 1, 1]
    for old, new in [("x", "tmp"), ("y", "x"), ("tmp", "y")]:
        (root / old).rename(root / new)
    _age(root)
    assert _folder(root)[0].targets == [0, 0, 1] and len(walks) == 4


def test_another_mode_or_class_list_does_not_use_the_cache(tmp_path, walks):
    root = _tree(tmp_path / "train")
    header, _ = _folder(root)
    assert len(walks) == 3
    none, _ = _folder(root, verify="none")
    assert len(walks) == 6 and len(none.samples) > len(header.samples)  # the empty and garbage files are kept
    subset, _ = _folder(root, classes=["a", "b"])
    assert len(walks) == 8 and subset.samples == _reference(root, ["a", "b"], "header")[0]
    assert len(_cache_files(root)) == 3  # one per mode and class list: neither overwrites another
    for ds, kwargs in ((header, {}), (none, {"verify": "none"}), (subset, {"classes": ["a", "b"]})):
        assert _folder(root, **kwargs)[0].samples == ds.samples
    assert len(walks) == 8
    # a cache file holding another mode's listing under this mode's name is not trusted
    [none_file] = [f for f in _cache_files(root) if ".none." in f.name]
    header_file = file_index.cache_files(root, "header", ["a", "b", "c"])[0]
    header_file.write_bytes(none_file.read_bytes())
    assert _folder(root)[0].samples == header.samples and len(walks) == 11


@pytest.mark.parametrize(
    "content", [b"", b"not gzip", b"\x1f\x8b\x08\x00garbage", "gzip-json-list", "gzip-truncated", "wrong-dirs"]
)
def test_a_corrupt_cache_is_ignored_and_replaced(tmp_path, walks, monkeypatch, content):
    root = _tree(tmp_path / "train")
    first, messages = _folder(root)
    [file] = _cache_files(root)
    good = file.read_bytes()
    if content == "gzip-json-list":
        content = gzip.compress(b"[1, 2, 3]")
    elif content == "gzip-truncated":
        content = good[: len(good) // 2]
    elif content == "wrong-dirs":
        payload = json.loads(gzip.decompress(good))
        payload["dirs"] = [[0, "", "not an inode", None]]
        content = gzip.compress(json.dumps(payload).encode())
    file.write_bytes(content)
    ds, again = _folder(root)
    assert (ds.samples, ds.skipped, again) == (first.samples, first.skipped, messages) and len(walks) == 6
    assert file.read_bytes() == good  # rewritten
    _no_walk(monkeypatch)
    assert _folder(root)[0].samples == first.samples


def test_a_read_only_data_folder_falls_back_to_the_home_cache(tmp_path, monkeypatch, _home_cache):
    root = _tree(tmp_path / "train")
    real = file_index.write_atomic

    def read_only_data(path, data):
        if path.parent == root:
            raise PermissionError(13, "Permission denied")
        real(path, data)

    monkeypatch.setattr(file_index, "write_atomic", read_only_data)
    first, messages = _folder(root)
    assert _cache_files(root) == [] and len(messages) == 1  # only the skipped-files warning
    [home] = _home_cache.iterdir()
    assert home.name.startswith("train-") and ".header." in home.name
    _no_walk(monkeypatch)
    ds, _ = _folder(root)
    assert ds.samples == first.samples and ds.skipped == first.skipped


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_chmod_read_only_data_folder_falls_back_to_the_home_cache(tmp_path, monkeypatch, _home_cache):
    root = _tree(tmp_path / "train")
    root.chmod(0o555)
    try:
        first, _ = _folder(root)
        assert _cache_files(root) == [] and len(list(_home_cache.iterdir())) == 1
        _no_walk(monkeypatch)
        assert _folder(root)[0].samples == first.samples
    finally:
        root.chmod(0o755)


def test_a_cache_that_cannot_be_written_anywhere_warns_once_and_the_run_goes_on(tmp_path, monkeypatch, walks):
    root = _tree(tmp_path / "train")

    def nowhere(path, data):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(file_index, "write_atomic", nowhere)
    ds, messages = _folder(root, verify="none")
    cache_messages = [m for m in messages if "cannot write the file index cache" in m]
    assert len(ds.samples) == 13 and len(messages) == 2 and len(cache_messages) == 1
    assert "Read-only file system" in cache_messages[0] and str(root) in cache_messages[0]
    _, again = _folder(root, verify="none")
    assert len(again) == 1 and len(walks) == 6  # the skipped-files warning only


def test_index_cache_false_writes_and_reads_nothing(tmp_path, walks, _home_cache):
    root = _tree(tmp_path / "data" / "train")
    for _ in range(2):
        _folder(root, index_cache=False)
    assert len(walks) == 6 and _cache_files(root) == [] and not _home_cache.exists()
    _folder(root)  # a cache written now is not read with index_cache=False
    _folder(root, index_cache=False)
    assert len(walks) == 12


def test_the_datamodules_pass_index_cache_through(tmp_path):
    root = tmp_path / "data"
    for split in ("train", "val", "test"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            (root / split / cls / "x.jpg").write_bytes(JPEG)
    _age(root)
    for cache in (False, True):
        ImageNetDataModule(root=str(root), index_cache=cache, num_workers=0)._base_dataset("val")
        CIFAR10DataModule(root=str(root), index_cache=cache, num_workers=0)._base_dataset("val")
        assert [len(_cache_files(root / s)) for s in ("train", "val", "test")] == (
            [0, 0, 0] if not cache else [1, 1, 1]
        )


def test_a_tree_changed_in_the_last_seconds_is_not_cached(tmp_path):
    root = _tree(tmp_path / "train")
    (root / "b" / "fresh.jpg").write_bytes(JPEG)
    _folder(root)
    assert _cache_files(root) == []
    _age(root)
    _folder(root)
    assert len(_cache_files(root)) == 1
