"""Every config's header states what it uses: one machine-readable line

    # Uses: augmentation <preset>, optimizer <name>, base_lr <v>, weight_decay <v>, temperature <v>,
    #       max_epochs <n>, batch_size <n>     (on one line)

(the keys that apply; ``lr`` in place of ``base_lr`` when the config sets the peak lr), whose every
value must be stated explicitly in the YAML and equal it; and every one of these keys that the YAML
sets must be named. Parsed generically, so configs added later are checked too."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
# header key -> where the YAML states it
WHERE = {
    "augmentation": ("data", "init_args"),
    "optimizer": ("model", "init_args"),
    "base_lr": ("model", "init_args"),
    "lr": ("model", "init_args"),
    "weight_decay": ("model", "init_args"),
    "temperature": ("model", "init_args"),
    "max_epochs": ("trainer",),
    "batch_size": ("data", "init_args"),
}
USES = re.compile(r"^#\s*Uses:\s*(.+?)\s*$")


def header_lines(text: str) -> list[str]:
    """The comment lines before the first YAML line."""
    lines = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            break
        lines.append(line.strip())
    return lines


def uses(path: Path) -> dict[str, str]:
    """The ``# Uses:`` line of ``path``'s header as ``{key: value as written}``."""
    found = [m.group(1) for m in map(USES.match, header_lines(path.read_text())) if m]
    assert len(found) == 1, f"{path.name}: the header needs exactly one '# Uses: ...' line, found {len(found)}"
    named: dict[str, str] = {}
    for item in found[0].split(","):
        parts = item.split()
        assert len(parts) == 2, f"{path.name}: '# Uses:' item {item.strip()!r} is not '<key> <value>'"
        key, value = parts
        assert key in WHERE, f"{path.name}: '# Uses:' names unknown key {key!r}; known: {', '.join(WHERE)}"
        assert key not in named, f"{path.name}: '# Uses:' names {key!r} twice"
        named[key] = value
    assert not {"lr", "base_lr"} <= set(named), f"{path.name}: name either lr or base_lr, not both"
    return named


def section(config: dict, where: tuple[str, ...]) -> dict:
    node = config
    for key in where:
        node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else {}


def test_there_are_configs():
    assert CONFIGS, "no configs/*.yaml found"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_header_uses_line_matches_the_yaml(path):
    config = yaml.safe_load(path.read_text())
    named = uses(path)
    for key, written in named.items():
        where = WHERE[key]
        values = section(config, where)
        assert key in values, (
            f"{path.name}: the header names {key} {written}, but the YAML does not state {'.'.join((*where, key))}"
        )
        assert yaml.safe_load(written) == values[key], (
            f"{path.name}: the header says {key} {written}, the YAML has {'.'.join((*where, key))}: {values[key]!r}"
        )
    for key, where in WHERE.items():
        stated = key in section(config, where)
        assert not stated or key in named, (
            f"{path.name}: the YAML sets {'.'.join((*where, key))} but the '# Uses:' line does not name {key}"
        )


def test_the_check_catches_a_wrong_value(tmp_path):
    """The checker itself: a header that disagrees with its YAML fails with the config and key named."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("# Uses: optimizer sgd, base_lr 0.03\nmodel:\n  init_args:\n    optimizer: sgd\n    base_lr: 0.06\n")
    with pytest.raises(AssertionError, match=r"bad.yaml: the header says base_lr 0.03"):
        test_header_uses_line_matches_the_yaml(bad)
    missing = tmp_path / "missing.yaml"
    missing.write_text("# a header without the line\nmodel: {}\n")
    with pytest.raises(AssertionError, match=r"missing.yaml: the header needs exactly one"):
        test_header_uses_line_matches_the_yaml(missing)
    unnamed = tmp_path / "unnamed.yaml"
    unnamed.write_text("# Uses: optimizer sgd\nmodel:\n  init_args:\n    optimizer: sgd\n    temperature: 0.2\n")
    with pytest.raises(AssertionError, match=r"unnamed.yaml: the YAML sets model.init_args.temperature"):
        test_header_uses_line_matches_the_yaml(unnamed)
