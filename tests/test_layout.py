"""Project rules that code review would otherwise have to catch: import direction, installability."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OTHER_PACKAGES = ("training", "server", "clients", "bench")
# Folder -> installed package (pyproject's package-dir).
PACKAGES = {"models": "reefcap.models", "training": "reefcap.training", "server": "reefcap.server"}
PACKAGES |= {"clients": "reefcap.clients", "bench": "reefcap.bench", "reefcap": "reefcap"}
LIBRARY = ("models", "training", "server", "clients")


def imported_modules(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            prefix = "." * node.level
            names.append(prefix + (node.module or ""))
            # `from reefcap import training` / `from .. import training` name the package in the alias.
            base = f"{prefix}{node.module}." if node.module else prefix
            names.extend(base + alias.name for alias in node.names)
    return names


def test_models_imports_nothing_from_the_other_packages():
    offenders = []
    for path in (REPO / "models").rglob("*.py"):
        for name in imported_modules(path):
            if name.startswith("..") or any(name.startswith(f"reefcap.{p}") for p in OTHER_PACKAGES):
                offenders.append(f"{path.relative_to(REPO)}: {name}")
    assert not offenders, offenders


@pytest.mark.parametrize("package", ["server", "clients"])
def test_serving_and_clients_import_nothing_from_training(package):
    """``pip install reefcap`` serves and captions without the ``train`` extra: what the server and the
    clients share with training (image quality, caption metrics, dataset records) lives in models/."""
    offenders = []
    for path in (REPO / package).rglob("*.py"):
        for name in imported_modules(path):
            if name.startswith("reefcap.training") or name.startswith("..training"):
                offenders.append(f"{path.relative_to(REPO)}: {name}")
    assert not offenders, offenders


def test_models_package_imports_without_torch_being_loaded():
    import subprocess
    import sys

    code = "import sys, reefcap.models; assert 'torch' not in sys.modules, 'torch imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_sample_photos_ship_in_the_repo_with_their_licence():
    from reefcap.models.samples import EUVP_DIR, sample_photos

    raw, enhanced = sample_photos("raw"), sample_photos("enhanced")
    assert len(raw) == 23 and [p.name for p in raw] == [p.name for p in enhanced]
    assert [p.stem for p in raw[:3]] == ["1", "2", "3"]  # numeric order, not 1, 10, 11
    assert "MIT License" in (EUVP_DIR / "LICENSE").read_text()
    assert "FUnIE-GAN" in (EUVP_DIR / "README.md").read_text()


def test_nothing_reads_the_folder_beside_the_clone():
    """A user's clone has no ../shared beside it: code, tests, Makefile and docs must not point there."""
    skip = {".git", ".venv", "build", "__pycache__", ".pytest_cache", ".ruff_cache", ".whl", ".gl"}
    needles = ("../shared", "REEFCAP_SHARED", 'parent / "shared"')
    offenders = []
    for path in REPO.rglob("*"):
        rel = path.relative_to(REPO)
        if (
            path.is_dir()
            or set(rel.parts) & skip
            or rel.parts[0].endswith(".egg-info")
            or path.suffix not in {"", ".py", ".md", ".toml", ".sh", ".cfg"}
        ):
            continue
        text = path.read_text(errors="ignore")
        offenders += [f"{rel}: {n}" for n in needles if n in text and path != Path(__file__)]
    assert not offenders, offenders


def _modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in (REPO / folder).rglob("*.py"):
            parts = list(path.relative_to(REPO / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def _targets(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports, anywhere in the file (inside functions too)."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([node.module] if node.module else []))
            candidates = [base, *(f"{base}.{a.name}" for a in node.names)]
        else:
            continue
        for target in candidates:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def test_no_import_circles_counting_imports_inside_functions():
    modules = _modules()
    graph = {name: _targets(name, path, modules) for name, path in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append(trail[trail.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not circles, circles


def test_models_keeps_at_most_twelve_modules_at_the_top_and_rooms_below():
    top = sorted(p.name for p in (REPO / "models").glob("*.py"))
    assert len(top) <= 12, top
    rooms = sorted(p.parent.name for p in (REPO / "models").glob("*/__init__.py"))
    assert rooms == ["data", "engines", "export", "policy", "reefscenes"]
    for room in rooms:  # each room says what it holds
        assert ast.get_docstring(ast.parse((REPO / "models" / room / "__init__.py").read_text()))


def test_no_private_names_imported_across_rooms():
    """A room's private names stay in it; what crosses rooms is public (a room: a package, or a models/ room)."""

    def room(name: str) -> str:
        parts = name.split(".")
        return ".".join(parts[:3]) if parts[:2] == ["reefcap", "models"] and len(parts) > 3 else ".".join(parts[:2])

    modules, offenders = _modules(), []
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("reefcap"):
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                if private and room(node.module) != room(name):
                    offenders.append(f"{path.relative_to(REPO)}: {node.module} {private}")
    assert not offenders, offenders


def test_library_files_and_functions_stay_readable_in_one_sitting():
    """No library file over 400 lines and no function over 60 (tests and bench/ aside)."""
    offenders = []
    for folder in LIBRARY:
        for path in (REPO / folder).rglob("*.py"):
            text = path.read_text()
            if len(text.splitlines()) > 400:
                offenders.append(f"{path.relative_to(REPO)}: {len(text.splitlines())} lines")
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}")
    assert not offenders, offenders


def test_nothing_on_the_serving_or_training_path_imports_bench():
    offenders = [
        f"{path.relative_to(REPO)}: {name}"
        for folder in LIBRARY
        for path in (REPO / folder).rglob("*.py")
        for name in imported_modules(path)
        if name.startswith("reefcap.bench")
    ]
    assert not offenders, offenders
