"""The layers go one way, read off every import statement in the source (those inside
functions and under ``if TYPE_CHECKING`` included):

    looptune.runtime.compiler   the schedule language and compiler (bottom)
    looptune.database           the schedule store, built on the compiler's grammar and workload
    looptune.runtime            api, resolve, settings, hooks: what applications call
    looptune.tuner              measurement, agent, search, ship, CLI (top)

A module may import its own layer or lower ones.  The runtime reaches the tuner only through
the registered live-tuner hook (``looptune.runtime.hooks``), never by importing it; torch is
imported by the agent's training modules (and bench's optional comparison) only.  The module graph has no cycle, and no module
is longer than ``MAX_LINES``.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"runtime": "looptune.runtime", "database": "looptune.database", "tuner": "looptune.tuner"}
LAYERS = (("looptune.runtime.compiler", 0), ("looptune.database", 1), ("looptune.runtime", 2), ("looptune.tuner", 3))
TORCH_MODULES = {"looptune.tuner.agent.dqn", "looptune.tuner.agent.ppo", "looptune.tuner.agent.nets",
                 "looptune.tuner.ship.bench"}   # training, and bench's optional torch comparison
MAX_LINES = 450
MAX_TUNER_TOP_LEVEL = 6


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


MODULES = _modules()


def layer(module: str) -> int | None:
    for prefix, number in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return number
    return None


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
    return f"{base}.{node.module}" if node.module else base


def imports_of(module: str, path: Path) -> set[str]:
    """Every module ``module`` imports, wherever the statement sits; ``from p import name``
    counts as importing ``p.name`` when that is one of our modules."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, path, node)
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES)
    return found


GRAPH = {m: imports_of(m, p) for m, p in MODULES.items()}


def _ours(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    return {m: {t for t in targets if t in MODULES and t != m} for m, targets in graph.items()}


def test_every_module_is_in_a_layer():
    assert [m for m in MODULES if layer(m) is None] == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down(module):
    mine = layer(module)
    upward = sorted(t for t in GRAPH[module] if t.startswith("looptune.") and (layer(t) or 0) > mine)
    assert upward == [], f"{module} (layer {mine}) imports a higher layer: {upward}"


def test_runtime_and_database_never_import_the_tuner_or_torch():
    bad = {m: sorted(t for t in targets if t.startswith("looptune.tuner") or t.split(".")[0] == "torch")
           for m, targets in GRAPH.items() if layer(m) is not None and layer(m) < 3}
    assert {m: t for m, t in bad.items() if t} == {}


def test_only_training_modules_import_torch():
    users = {m for m, targets in GRAPH.items() if any(t == "torch" or t.startswith("torch.") for t in targets)}
    assert users <= TORCH_MODULES, f"torch imported outside training: {sorted(users - TORCH_MODULES)}"


def test_no_import_cycle():
    graph = _ours(GRAPH)
    # a package's __init__ may re-export its own submodules lazily; that is not a dependency
    for m in graph:
        if MODULES[m].name == "__init__.py":
            graph[m] = {t for t in graph[m] if not t.startswith(m + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_size(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[module].relative_to(ROOT)} has {lines} lines (limit {MAX_LINES})"


def test_tuner_top_level_is_small():
    top = sorted(p.name for p in (ROOT / "tuner").glob("*.py"))
    assert len(top) <= MAX_TUNER_TOP_LEVEL, top
