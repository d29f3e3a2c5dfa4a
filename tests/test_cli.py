"""The lightning-ssl command: every config parses; the quickstart config trains and reports."""

import subprocess
import sys
from pathlib import Path

import pytest

from lightning_ssl.cli import main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_there_are_configs_for_every_method():
    names = {p.stem for p in CONFIGS}
    assert "quickstart" in names
    for method in ("simclr", "moco", "mocov2", "byol"):
        assert any(n.startswith(method + "_") for n in names), method


@pytest.mark.parametrize("config", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path: lightning_ssl." in printed


def test_quickstart_config_runs_a_few_steps(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the config checkpoints to outputs/quickstart/checkpoints under the working directory
    main(
        [
            "fit",
            "--config",
            str(REPO / "configs" / "quickstart.yaml"),
            "--trainer.max_steps",
            "2",
            "--trainer.max_epochs",
            "1",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.log_every_n_steps",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert "Weighted kNN top-1" in out and "10 per class" in out
    assert list(tmp_path.rglob("*.ckpt")) and list(tmp_path.rglob("metrics.csv"))


def test_a_typo_in_an_argument_is_an_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "configs" / "quickstart.yaml"), "--model.init_args.temprature", "0.1"])
    assert exit_info.value.code != 0
    assert "temprature" in capsys.readouterr().err


def test_module_entry_point_and_help():
    out = subprocess.run([sys.executable, "-m", "lightning_ssl", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "fit" in out.stdout and "validate" in out.stdout
