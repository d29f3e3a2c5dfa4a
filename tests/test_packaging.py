"""The wheel installs one import namespace, `lightning_ssl`, and imports without the repository."""

import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_installs_one_namespace_and_imports_in_a_clean_environment(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(REPO)],
        check=True,
        timeout=300,
        cwd=tmp_path,
    )
    wheel = next(dist.glob("lightning_ssl-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top_level == {"lightning_ssl"}, f"the wheel installs top-level names {sorted(top_level)}"
    for package in ("", "/methods", "/evaluation", "/datamodules", "/callbacks"):
        assert f"lightning_ssl{package}/__init__.py" in names, package
    dist_info = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))

    env_dir = tmp_path / "clean"
    venv.create(env_dir, with_pip=False)
    clean_python = env_dir / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(clean_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        check=True,
        timeout=300,
    )
    # Dependencies (torch, lightning, ...) come from this environment, appended after the clean site;
    # a path line in a .pth does not process that directory's own .pth files (no editable finder).
    (site / "zz_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # besides its metadata and the console script (bin/), the wheel puts one name into site-packages
    installed = sorted(
        p.name for p in site.iterdir() if not p.name.endswith((".dist-info", ".pth")) and p.name != "bin"
    )
    assert installed == ["lightning_ssl"], installed
    code = (
        "import importlib.util, lightning_ssl\n"
        "from lightning_ssl import SimCLR, MoCo, MoCoV2, BYOL, CPC, CPCv2, REGISTRY\n"
        "from lightning_ssl.datamodules import DigitsDataModule\n"
        "from lightning_ssl.callbacks import EMAUpdate, QueueUpdate, KNNMonitor\n"
        "assert importlib.util.find_spec('callbacks') is None and importlib.util.find_spec('datamodules') is None\n"
        "import lightning_ssl.datamodules as d, lightning_ssl.callbacks as c\n"
        "print(lightning_ssl.__file__); print(d.__file__); print(c.__file__)\n"
    )
    out = subprocess.run(
        [str(clean_python), "-I", "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert out.returncode == 0, out.stderr
    for line in out.stdout.split():
        assert line.startswith(str(site)), line
    entry_points = (site / f"{dist_info}" / "entry_points.txt").read_text()
    assert "lightning-ssl = lightning_ssl.cli:main" in entry_points
