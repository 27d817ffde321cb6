"""The model layer's shape: no import cycle in the package (imports inside functions count), one list of
families, and a base adapter that names none of them."""

from __future__ import annotations

import ast
from pathlib import Path

import radial_lora
from radial_lora.constants import FAMILIES
from radial_lora.models import families

PACKAGE = Path(radial_lora.__file__).parent


def _imports() -> dict[str, set[str]]:
    """Module -> package modules it imports anywhere in its file (``if TYPE_CHECKING:`` blocks excepted)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        skipped = {
            id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)
        }  # fmt: skip
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and id(node) not in skipped and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import) and id(node) not in skipped:
                targets = [a.name for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in modules and t != name and not name.startswith(t + ".")}
        graph[name] = deps
    return graph


def _reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph[todo.pop()] - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


def test_no_import_cycle_counting_imports_inside_functions():
    graph = _imports()
    cycles = sorted(m for m in graph if m in _reaches(graph, m))
    assert not cycles, f"modules on an import cycle: {cycles}"
    registry = "radial_lora.models.registry"
    assert "radial_lora.models.adapter" in _reaches(graph, registry)
    assert all(registry not in _reaches(graph, dep) for dep in graph[registry]), "nothing imports the registry back"


def test_one_list_of_families_and_a_base_adapter_that_names_none():
    assert sorted(families()) == sorted(FAMILIES)
    base = (PACKAGE / "models" / "adapter.py").read_text()
    assert not [f for f in FAMILIES if f'"{f}"' in base]
    assert "radial_lora.models.registry" not in _reaches(_imports(), "radial_lora.models.adapter")
