"""Two-view images per second of the folder source against litdata shards, local and on an S3 server.

The same ``ImageNetDataModule`` (SimCLR views made in the loader workers) reads (a) the ImageFolder
tree, (b) its shards made by ``lightning-ssl prepare`` on the local disk, (c) the same shards uploaded
to an S3-compatible server (moto's server mode) on 127.0.0.1, streamed with litdata (chunks cached in
a temporary folder). The S3 figure measures a Python server on the same 2 cores, not a cloud store.
It also prints the time ``prepare`` took. 32x32: the CIFAR-10 JPEG copy's first ``--images`` training
images when present (else generated); 224: generated 500x375 JPEGs.

    python -m benchmarks.shard_throughput               # ~4 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import CIFAR_ROOT as CIFAR
from benchmarks.data_throughput import make_jpegs, measure, ours
from lightning_ssl.datamodules.prepare import prepare_image_folder


def cifar_subset(root: Path, n: int) -> Path:
    """The first ``n`` training images of the CIFAR-10 copy (in class order, round robin) as a tree."""
    classes = sorted(p.name for p in (CIFAR / "train").iterdir() if p.is_dir() and not p.name.startswith("."))
    files = {c: sorted((CIFAR / "train" / c).iterdir()) for c in classes}
    for i in range(n):
        c = classes[i % len(classes)]
        (root / "train" / c).mkdir(parents=True, exist_ok=True)
        shutil.copy(files[c][i // len(classes)], root / "train" / c)
    (root / "val").mkdir(exist_ok=True)
    return root


def s3_copy(local: Path) -> tuple[str, dict, object]:
    """Upload ``local`` to a fresh moto S3 server on 127.0.0.1; the URL, storage options and the server."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.setdefault(key, "benchmark")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket="bench")
    for path in local.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), "bench", f"data/{path.relative_to(local)}")
    return "s3://bench/data", {"endpoint_url": endpoint}, server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 224])
    parser.add_argument("--images", type=int, nargs=2, default=[10000, 384], help="images at 32 and at 224")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--batch", type=int, nargs=2, default=[128, 32], help="batch at 32 and at 224")
    parser.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, python {platform.python_version()}, "
        f"torch {torch.__version__}; workers: {args.workers}; {args.seconds:.0f} s per measurement; "
        f"load average at start {os.getloadavg()[0]:.1f}"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for size in args.sizes:
            small = size <= 64
            n, batch = (args.images[0], args.batch[0]) if small else (args.images[1], args.batch[1])
            tree = tmp / f"tree{size}"
            if small and (CIFAR / "train").is_dir():
                cifar_subset(tree, n)
                source = f"{n:,} CIFAR-10 JPEGs (32x32)"
            else:
                make_jpegs(tree, n, (32, 32) if small else (500, 375))
                source = f"{n:,} generated {'32x32' if small else '500x375'} JPEGs"
            start = time.perf_counter()
            prepare_image_folder(tree, tmp / f"shards{size}", splits=("train",), progress=False)
            prepare_s = time.perf_counter() - start
            url, options, server = s3_copy(tmp / f"shards{size}")
            try:
                for name, kwargs in (
                    ("folder", {"root": str(tree)}),
                    ("shards, local disk", {"shards": str(tmp / f"shards{size}")}),
                    (
                        "shards, S3 on 127.0.0.1",
                        {"shards": url, "storage_options": options, "shard_cache_dir": str(tmp / f"cache{size}")},
                    ),
                ):
                    dm = ours(kwargs.pop("root", None), size, batch, args.workers, False, **kwargs)
                    dm.setup("fit")
                    rate = measure(dm.train_dataloader(), args.seconds)
                    rows.append((size, source, name, rate))
                    print(f"{size:>4} px  {name:<24} {rate:8.0f} two-view images/s  ({source})", flush=True)
            finally:
                server.stop()
            print(f"{size:>4} px  prepare (decode check, {args.workers} processes): {prepare_s:.1f} s for {n:,} images")
    print("\n| size | source | two-view images/s |\n|---|---|---|")
    for size, _, name, rate in rows:
        print(f"| {size} | {name} | {rate:.0f} |")


if __name__ == "__main__":
    main()
