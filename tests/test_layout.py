"""Project rules that code review would otherwise have to catch: import direction, installability."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

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
