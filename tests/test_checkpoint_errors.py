"""A checkpoint of another method, or a checkpoint file cut short, stops the CLI with one line and
changes nothing on disk (the hashes of every file in the run folders before and after)."""

from __future__ import annotations

import hashlib
import textwrap
from pathlib import Path

import pytest

from lightning_ssl import SimCLR, SSLMethod
from lightning_ssl.checkpoints import IncompleteCheckpointError, read_checkpoint
from lightning_ssl.cli import main
from lightning_ssl.evaluation import load_encoder

CONFIG = """
seed_everything: 0
trainer:
  accelerator: cpu
  max_steps: 2
  logger:
    class_path: pytorch_lightning.loggers.CSVLogger
    init_args: {{save_dir: {run}}}
  default_root_dir: {run}
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: pytorch_lightning.callbacks.ModelCheckpoint
      init_args: {{dirpath: {run}/checkpoints, save_last: true}}
model:
  class_path: lightning_ssl.{method}
  init_args: {{backbone: resnet18, small_image: true, projection_dim: 16}}
data:
  class_path: lightning_ssl.datamodules.DigitsDataModule
  init_args: {{batch_size: 8, image_size: 16, num_workers: 0}}
"""


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Two finished 2-step runs side by side, ``SimCLR/`` and ``BYOL/``, each with ``checkpoints/last.ckpt``."""
    root = tmp_path_factory.mktemp("runs")
    for method in ("SimCLR", "BYOL"):
        config = root / f"{method}.yaml"
        config.write_text(textwrap.dedent(CONFIG.format(run=root / method, method=method)))
        main(["fit", "--config", str(config)])
    return root


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    lines = [line for line in err if line.startswith("lightning-ssl: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("subcommand", ["fit", "validate", "predict"])
@pytest.mark.parametrize("how", ["path", "last"])
def test_a_checkpoint_of_another_method_stops_and_writes_nothing(runs, subcommand, how, capsys):
    byol_ckpt = runs / "BYOL" / "checkpoints" / "last.ckpt"
    if how == "last":  # the other method's file sits where `--ckpt_path last` looks (a copied folder, say)
        simclr_last = runs / "SimCLR" / "checkpoints" / "last.ckpt"
        saved = simclr_last.read_bytes()
        simclr_last.write_bytes(byol_ckpt.read_bytes())
    before = _hashes(runs)
    try:
        with pytest.raises(SystemExit) as stop:
            main(
                [
                    subcommand,
                    "--config",
                    str(runs / "SimCLR.yaml"),
                    "--ckpt_path",
                    "last" if how == "last" else str(byol_ckpt),
                ]
            )
        assert stop.value.code == 1
        line = _error_line(capsys)
        assert "checkpoint of BYOL" in line and "model is SimCLR" in line and "--model BYOL" in line
        assert _hashes(runs) == before
    finally:
        if how == "last":
            simclr_last.write_bytes(saved)


def test_export_with_model_refuses_another_methods_checkpoint(runs, tmp_path, capsys):
    before = _hashes(runs)
    with pytest.raises(SystemExit):
        main(
            ["export", str(runs / "BYOL" / "checkpoints" / "last.ckpt"), str(tmp_path / "out.pt"), "--model", "SimCLR"]
        )
    line = _error_line(capsys)
    assert "checkpoint of BYOL" in line and "model is SimCLR" in line
    assert not (tmp_path / "out.pt").exists() and _hashes(runs) == before
    main(["export", str(runs / "SimCLR" / "checkpoints" / "last.ckpt"), str(tmp_path / "out.pt"), "--model", "SimCLR"])
    assert (tmp_path / "out.pt").is_file()


def test_load_from_checkpoint_of_another_method_names_both(runs):
    with pytest.raises(TypeError, match="checkpoint of BYOL, not of SimCLR"):
        SimCLR.load_from_checkpoint(runs / "BYOL" / "checkpoints" / "last.ckpt")


@pytest.fixture()
def truncated(runs, tmp_path) -> Path:
    """A copy of the SimCLR run's folder whose newest checkpoint is cut at half its size."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    whole = (runs / "SimCLR" / "checkpoints" / "last.ckpt").read_bytes()
    (folder / "epoch=0-step=2.ckpt").write_bytes(whole)
    (folder / "last.ckpt").write_bytes(whole[: len(whole) // 2])
    return folder / "last.ckpt"


def test_a_truncated_checkpoint_is_one_line_naming_a_complete_one(truncated, runs, capsys):
    message = f"checkpoint {truncated} is incomplete"
    with pytest.raises(IncompleteCheckpointError, match="epoch=0-step=2.ckpt is complete"):
        read_checkpoint(truncated)
    for call in (
        lambda: SSLMethod.load_from_checkpoint(truncated),
        lambda: load_encoder(truncated),
    ):
        with pytest.raises(IncompleteCheckpointError) as err:
            call()
        assert str(err.value).startswith(message) and "\n" not in str(err.value)
    before = _hashes(runs)
    for argv in (
        ["fit", "--config", str(runs / "SimCLR.yaml"), "--ckpt_path", str(truncated)],
        ["export", str(truncated), str(truncated.parent / "out.pt")],
    ):
        with pytest.raises(SystemExit):
            main(argv)
        line = _error_line(capsys)
        assert message in line and "epoch=0-step=2.ckpt is complete and can be used instead" in line
    assert _hashes(runs) == before and not (truncated.parent / "out.pt").exists()


def test_a_truncated_checkpoint_alone_says_there_is_no_other(tmp_path):
    path = tmp_path / "last.ckpt"
    path.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(IncompleteCheckpointError, match="no other checkpoint is there"):
        read_checkpoint(path)
