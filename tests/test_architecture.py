"""The packages' layering (STYLE.md): webhook/ and worker/ depend on shared/, never on each other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_packages(path: Path) -> set[str]:
    """The top-level packages a module imports anywhere in it, a function's lazy imports included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize(("package", "other"), [("webhook", "worker"), ("worker", "webhook")])
def test_webhook_and_worker_never_import_each_other(package: str, other: str) -> None:
    """No module of one package imports the other, not even lazily inside a function."""
    offenders = sorted(str(path.relative_to(ROOT)) for path in (ROOT / package).rglob("*.py")
                       if other in imported_packages(path))
    assert [] == offenders


def test_shared_imports_neither_webhook_nor_worker() -> None:
    """What both need lives in shared/, which depends on neither."""
    offenders = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "shared").rglob("*.py")
                       if imported_packages(path) & {"webhook", "worker", "cli"})
    assert [] == offenders
