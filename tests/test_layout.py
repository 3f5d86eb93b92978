"""The package's shape: dependencies point one way (ARCHITECTURE.md), importing it loads nothing,
scripts use public names only, and tests mirror the package."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "qlora_engine"

# package (or top-level module) -> what it may import; ARCHITECTURE.md's table
ALLOWED = {
    "errors": set(), "machine": {"errors"}, "progress": set(),
    "quant": set(),
    "models": {"errors", "progress", "quant"},
    "lora": {"errors", "machine", "quant", "models"},
    "train": {"errors", "machine", "progress", "quant", "models", "lora", "generate"},
    "plan": {"errors", "machine", "models", "lora", "train"},
    "export": {"errors", "machine", "progress", "quant", "models", "lora", "train"},
    "generate": set(),
    "serve": {"errors", "quant", "models", "lora", "generate"},
    "run": {"errors", "machine", "models", "lora", "train", "plan", "export", "generate"},
}  # fmt: skip


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_main_guard(node) -> bool:
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and getattr(node.test.left, "id", "") == "__name__")  # fmt: skip


def _imports(path: Path) -> set[str]:
    """qlora_engine modules `path` imports, outside `if __name__ == "__main__":` blocks."""
    name = _module_name(path)
    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    stack = list(ast.parse(path.read_text()).body)
    while stack:
        node = stack.pop()
        if _is_main_guard(node):
            continue
        stack.extend(ast.iter_child_nodes(node))
        if isinstance(node, ast.ImportFrom) and node.level:
            target = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            found |= {f"{target}.{a.name}" for a in node.names} | {target}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qlora_engine"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("qlora_engine")}
    return found


def _unit(module: str, units: set[str]) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in units else None


def test_dependencies_point_one_way():
    units = {p.stem if p.is_file() else p.name for p in PKG.iterdir() if (p.suffix == ".py" or (p / "__init__.py").exists())}
    units -= {"__init__", "__main__"}
    edges: dict[str, set[str]] = defaultdict(set)
    for path in PKG.rglob("*.py"):
        if path.name == "__main__.py":
            continue  # entry points: `python -m qlora_engine[.plan|.export]` hand over to cli; nothing imports them
        src = _unit(_module_name(path), units)
        for target in _imports(path):
            dst = _unit(target, units)
            if src and dst and dst != src:
                edges[src].add(dst)
    for src, dsts in edges.items():
        if src in ALLOWED:
            assert dsts <= ALLOWED[src], f"{src} imports {sorted(dsts - ALLOWED[src])}, which ARCHITECTURE.md does not allow"
    # no cycles, whatever the table says
    for start in edges:
        seen, todo = set(), list(edges[start])
        while todo:
            u = todo.pop()
            assert u != start, f"import cycle through {start}"
            if u not in seen:
                seen.add(u)
                todo += edges.get(u, ())
    # cli is the top floor: only entry points import it
    importers = {src for src, dsts in edges.items() if "cli" in dsts}
    assert importers <= {"quantize", "ext"}, f"{sorted(importers)} import cli"


def test_importing_the_package_loads_nothing():
    code = "import sys, qlora_engine; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'qlora_engine')))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert r.stdout.strip() == "['qlora_engine']"


def test_the_api_names_resolve():
    import qlora_engine

    for name in qlora_engine.__all__:
        assert getattr(qlora_engine, name) is not None, name


def test_scripts_use_public_names_only():
    for path in sorted((ROOT / "scripts").glob("*.py")):
        tree = ast.parse(path.read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qlora_engine"):
                assert not any(part.startswith("_") for part in node.module.split(".")), (path.name, node.module)
                for a in node.names:
                    assert not a.name.startswith("_"), f"{path.name} imports the private {node.module}.{a.name}"
                    imported.add(a.asname or a.name)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in imported:
                assert not node.attr.startswith("_"), f"{path.name} uses the private {node.value.id}.{node.attr}"


def test_tests_mirror_the_package():
    for d in (ROOT / "tests").iterdir():
        if d.is_dir() and not d.name.startswith(("_", ".")):
            assert (PKG / d.name).is_dir(), f"tests/{d.name} has no qlora_engine/{d.name}"
    for t in (ROOT / "tests").glob("test_*.py"):
        stem = t.stem[len("test_"):]
        assert stem in ("layout", "api", "reliability") or (PKG / f"{stem}.py").exists(), f"{t.name} mirrors no module"
