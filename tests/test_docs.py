"""The documentation stays true: every relative link and every docs/ reference resolves, the README's
Python runs verbatim, its commands parse, and the documentation's Python is valid."""

from __future__ import annotations

import ast
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl

REPO = Path(__file__).resolve().parents[1]
MARKDOWN = [REPO / "README.md", REPO / "benchmarks" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SOURCES = [*MARKDOWN, *sorted(REPO.glob("lightning_ssl/**/*.py")), *sorted(REPO.glob("datamodules/*.py"))]
SOURCES += [
    *sorted(REPO.glob("callbacks/*.py")),
    *sorted(REPO.glob("benchmarks/*.py")),
    *sorted(REPO.glob("configs/*.yaml")),
]


def code_blocks(path: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", path.read_text(), re.S)


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(path):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        assert (path.parent / target).exists(), f"{path.relative_to(REPO)} links to missing {target}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_docs_references_resolve(path):
    """Every mention of docs/<page>.md, notebooks/<name>.ipynb or configs/<name>.yaml names a real file."""
    for ref in re.findall(r"\b((?:docs|notebooks|configs)/[\w.-]+\.(?:md|ipynb|yaml))", path.read_text()):
        assert (REPO / ref).exists(), f"{path.relative_to(REPO)} mentions missing {ref}"


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(REPO)))
def test_python_blocks_are_valid_python(path):
    for block in code_blocks(path, "python"):
        ast.parse(block)


def test_readme_python_runs_verbatim(monkeypatch, capsys, tmp_path):
    """The README's example, executed as written; only the Trainer is capped at 2 steps for the test."""
    monkeypatch.chdir(tmp_path)
    original = pl.Trainer.__init__

    def capped(self, *args, **kwargs):
        kwargs.update(max_steps=2, enable_progress_bar=False, logger=False, enable_checkpointing=False)
        original(self, *args, **kwargs)

    monkeypatch.setattr(pl.Trainer, "__init__", capped)
    namespace: dict = {}
    for block in code_blocks(REPO / "README.md", "python"):
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102
    assert not any(tmp_path.iterdir()), "a run with logger=False wrote files to the working directory"
    assert tuple(namespace["features"].shape) == (360, 512)
    assert "Weighted kNN top-1" in capsys.readouterr().out


def readme_commands() -> list[str]:
    """The README's ``lightning-ssl`` lines, with the shell variables its blocks set (``NAME="..."``)
    and ``$HOME`` expanded as the shell would."""
    commands = []
    for block in code_blocks(REPO / "README.md", "bash"):
        variables = {"HOME": str(Path.home())}
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip()
            for name, value in sorted(variables.items(), key=lambda kv: -len(kv[0])):
                line = line.replace(f"${name}", value)
            assignment = re.fullmatch(r"([A-Z_]+)=(.*)", line)
            if assignment:
                variables[assignment[1]] = shlex.split(assignment[2])[0]
            elif line.startswith("lightning-ssl "):
                assert "$" not in line, f"README command uses an unset variable: {line}"
                commands.append(line)
    return commands


@pytest.mark.parametrize("command", readme_commands())
def test_readme_commands_parse(command):
    """Each ``lightning-ssl`` command of the README parses against the code (``--print_config``)."""
    args = shlex.split(command)[1:]
    done = subprocess.run(
        [sys.executable, "-m", "lightning_ssl", *args, "--print_config"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "class_path: lightning_ssl." in done.stdout


def test_readme_setup_commands_are_what_ci_runs():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert '.venv/bin/pip install -e ".[dev]"' in readme and '.venv/bin/pip install -q -e ".[dev]"' in ci
    assert ".venv/bin/python -m pytest -q" in readme and ".venv/bin/python -m pytest -q" in ci
    assert len(readme.splitlines()) <= 150
