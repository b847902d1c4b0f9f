"""The layout the README and docs/layout.md promise: few top-level modules, short modules, imports that point
down only, a short README, and documentation whose links and code imports resolve."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Lowest first; a module may import from its own layer and the layers below (docs/layout.md).
LAYERS = [
    {"common"},
    {"facts", "sources"},
    {"models"},
    {"knowledge_neurons", "attention_neurons", "causal_tracing"},
    {"analysis"},
    {"report"},
    {"editing"},
    {"run"},
    {"main"},
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def project_modules() -> list[Path]:
    """Every .py file of the project outside tests/, benchmarks/ and tools/."""
    skip = {"tests", "benchmarks", "tools", ".venv"}
    return [p for p in sorted(ROOT.rglob("*.py")) if not skip & set(p.relative_to(ROOT).parts)]


def top_name(path: Path) -> str:
    """The layer name of a module: its package, or its own name at the top level."""
    parts = path.relative_to(ROOT).parts
    return parts[0] if len(parts) > 1 else path.stem


def imported_names(path: Path) -> set[str]:
    """The first component of every absolute import in a module (also imports inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_every_module_has_a_layer():
    assert {top_name(p) for p in project_modules()} <= set(RANK)


def test_imports_point_down_only():
    upward = []
    for path in project_modules():
        here = RANK[top_name(path)]
        upward += [f"{path.relative_to(ROOT)} imports {name}" for name in imported_names(path)
                   if name in RANK and RANK[name] > here]
    assert not upward


def test_at_most_seven_top_level_modules_and_none_over_450_lines():
    assert len(list(ROOT.glob("*.py"))) <= 7
    long = [f"{p.relative_to(ROOT)}: {n}" for p in project_modules()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 450]
    assert not long


def test_every_package_says_what_it_holds():
    for init in ROOT.glob("*/__init__.py"):
        if init.parent.name in {"tests", "benchmarks", "tools"}:
            continue
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
        assert doc and "import" in doc, f"{init.relative_to(ROOT)} has no docstring that says what it may import"


def test_readme_is_short_and_has_the_two_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text) <= 15_000
    first_screen = text[:4000]
    assert "make run" in first_screen and "make test" in first_screen


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_links_resolve(doc):
    text = doc.read_text(encoding="utf-8")
    anchors_of = {}
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        if not path.exists():
            broken.append(target)
        elif anchor and path.suffix == ".md":
            if path not in anchors_of:
                headings = re.findall(r"^#+ (.+)$", path.read_text(encoding="utf-8"), re.M)
                anchors_of[path] = {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}
            if anchor not in anchors_of[path]:
                broken.append(target)
    assert not broken


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_imports_in_python_code_blocks_resolve(doc):
    """Every `from X import a, b` and `import X` line of a ```python block imports as written."""
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(encoding="utf-8"), re.S)
    for block in blocks:
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.ImportFrom):
                module = importlib.import_module(node.module)
                missing = [a.name for a in node.names if not hasattr(module, a.name)]
                assert not missing, f"{doc.name}: {node.module} has no {missing}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    importlib.import_module(alias.name)
