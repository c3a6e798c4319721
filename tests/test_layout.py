"""Project rules that code review would otherwise have to catch: import direction, installability."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OTHER_PACKAGES = ("training", "server", "clients")


def imported_modules(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            prefix = "." * node.level
            names.append(prefix + (node.module or ""))
    return names


def test_models_imports_nothing_from_the_other_packages():
    offenders = []
    for path in (REPO / "models").rglob("*.py"):
        for name in imported_modules(path):
            if name.startswith("..") or any(name.startswith(f"reefcap.{p}") for p in OTHER_PACKAGES):
                offenders.append(f"{path.relative_to(REPO)}: {name}")
    assert not offenders, offenders


def test_models_package_imports_without_torch_being_loaded():
    import subprocess
    import sys

    code = "import sys, reefcap.models; assert 'torch' not in sys.modules, 'torch imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
