"""The wheel built from the repository installs and imports without the repository on sys.path."""
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_installs_and_imports_in_a_clean_environment(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(REPO)],
                   check=True, timeout=300, cwd=tmp_path)
    wheel = next(dist.glob("lightning_ssl-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for package in ("lightning_ssl", "datamodules", "callbacks", "lightning_ssl/methods", "lightning_ssl/evaluation"):
        assert f"{package}/__init__.py" in names, package
    assert not any(n.startswith("tests/") for n in names)

    env_dir = tmp_path / "clean"
    venv.create(env_dir, with_pip=False)
    clean_python = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(clean_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)], check=True, timeout=300)
    # Dependencies (torch, lightning, ...) come from this environment, appended after the clean site;
    # a path line in a .pth does not process that directory's own .pth files (no editable finder).
    (site / "zz_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    code = (
        "import lightning_ssl, datamodules, callbacks\n"
        "from lightning_ssl import SimCLR, MoCo, MoCoV2, BYOL\n"
        "from datamodules import DigitsDataModule\n"
        "from callbacks import MomentumUpdate, QueueUpdate, KNNMonitor\n"
        "print(lightning_ssl.__file__); print(datamodules.__file__); print(callbacks.__file__)\n"
    )
    out = subprocess.run([str(clean_python), "-I", "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    for line in out.stdout.split():
        assert line.startswith(str(site)), line
    entry_points = (site / f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info" / "entry_points.txt").read_text()
    assert "lightning-ssl = lightning_ssl.cli:main" in entry_points
