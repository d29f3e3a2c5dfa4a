"""The structure stays easy to see: imports run one way between the library's packages, nothing
hides a cycle in a function-local import, no module reaches for another module's private names,
and the library and its tests never import the repository's folders by their bare names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# import name -> folder in the repository (setup.cfg's package_dir)
ROOTS = {
    "lightning_ssl": REPO / "lightning_ssl",
    "lightning_ssl.datamodules": REPO / "datamodules",
    "lightning_ssl.callbacks": REPO / "callbacks",
}


def library_modules() -> dict[str, Path]:
    modules = {}
    for prefix, folder in ROOTS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([prefix, *parts])] = path
    return modules


MODULES = library_modules()


def imports(path: Path, top_level_only: bool) -> list[tuple[str, list[str], int]]:
    """``(module, names, line)`` of the imports in ``path`` (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = []
    for node in nodes:
        if isinstance(node, ast.Import):
            out += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                raise AssertionError(f"{path}:{node.lineno}: relative import; use lightning_ssl.* paths")
            out.append((module, [alias.name for alias in node.names], node.lineno))
    return out


def internal_targets(module: str, names: list[str]) -> list[str]:
    """The library modules an import statement loads (``from pkg import submodule`` included)."""
    targets = [module] if module in MODULES else []
    targets += [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES]
    return targets


def component(module: str) -> str:
    for package in ("methods", "callbacks", "datamodules", "evaluation"):
        if module == f"lightning_ssl.{package}" or module.startswith(f"lightning_ssl.{package}."):
            return package
    if module in ("lightning_ssl.cli", "lightning_ssl.__main__"):
        return "cli"
    return "api" if module == "lightning_ssl" else "core"


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for target_module, names, _ in imports(path, top_level_only=False):
            edges[module].update(t for t in internal_targets(target_module, names) if t != module)
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_walker_finds_every_package_and_a_planted_cycle():
    assert {component(m) for m in MODULES} == {
        "api",
        "core",
        "methods",
        "callbacks",
        "datamodules",
        "evaluation",
        "cli",
    }
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_between_modules():
    assert find_cycle(graph()) is None


def test_imports_run_one_way_between_packages():
    """core <- evaluation <- callbacks <- methods <- api/cli; datamodules on core only."""
    packages: dict[str, set[str]] = {}
    for module, targets in graph().items():
        for target in targets:
            a, b = component(module), component(target)
            if a != b:
                packages.setdefault(a, set()).add(b)
    assert find_cycle(packages) is None, packages
    allowed = {
        "core": set(),
        "datamodules": {"core"},
        "evaluation": {"core"},
        "callbacks": {"core", "evaluation"},
        "methods": {"core", "evaluation", "callbacks"},
        "api": {"core", "methods"},
        "cli": {"core", "methods", "callbacks", "datamodules", "evaluation"},
    }
    for package, targets in packages.items():
        assert targets <= allowed[package], f"{package} imports {sorted(targets - allowed[package])}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_function_local_library_imports_and_no_private_names(module):
    path = MODULES[module]
    top = {(m, tuple(n), line) for m, n, line in imports(path, top_level_only=True)}
    for target, names, line in imports(path, top_level_only=False):
        where = f"{path.relative_to(REPO)}:{line}"
        assert target.split(".")[0] not in ("datamodules", "callbacks", "benchmarks", "tests"), where
        if not target.startswith("lightning_ssl"):
            continue
        assert (target, tuple(names), line) in top, f"{where}: import {target} inside a function or class"
        private = [n for n in names if n.startswith("_") and not n.endswith("__")]
        assert not private, f"{where}: imports private names {private} from {target}"
        if component(module) != "api":
            assert target != "lightning_ssl", f"{where}: import from the package root; import the module itself"


def test_contracts_are_protocols_not_getattr_probes():
    for path in MODULES.values():
        text = path.read_text()
        assert "callable(getattr(" not in text, f"{path.relative_to(REPO)} probes a contract with getattr"


def edits_sys_path(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr in ("insert", "append", "extend"):
            value = node.value
            if isinstance(value, ast.Attribute) and value.attr == "path" and getattr(value.value, "id", "") == "sys":
                return True
    return False


def test_tests_and_benchmarks_use_the_installed_namespace():
    for folder in ("tests", "benchmarks", "notebooks"):
        for path in (REPO / folder).rglob("*.py"):
            for target, _, line in imports(path, top_level_only=False):
                assert target.split(".")[0] not in ("datamodules", "callbacks"), f"{path.relative_to(REPO)}:{line}"
                if folder == "tests":
                    assert target.split(".")[0] != "benchmarks", (
                        f"{path.relative_to(REPO)}:{line}: tests run benchmarks as scripts"
                    )
            assert not edits_sys_path(path), f"{path.relative_to(REPO)} edits sys.path"
