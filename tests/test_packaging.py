"""What publishing needs: valid configs for the docs service, CI and releases, a typed
wheel, one version everywhere. Every check runs offline (schemas ship with
check-jsonschema)."""

from __future__ import annotations

import importlib.metadata
import pathlib
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

import keras_sam

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _tool(name: str) -> str:
    path = shutil.which(name) or str(pathlib.Path(sys.executable).parent / name)
    if not pathlib.Path(path).exists():
        pytest.skip(f"{name} is not installed (pip install -e '.[test]')")
    return path


@pytest.mark.parametrize(
    ("schema", "files"),
    [
        ("vendor.github-workflows", [".github/workflows/ci.yml", ".github/workflows/release.yml"]),
        ("vendor.readthedocs", [".readthedocs.yaml"]),
        ("vendor.citation-file-format", ["CITATION.cff"]),
    ],
)
def test_config_files_match_their_published_schemas(schema, files):
    result = _run(_tool("check-jsonschema"), "--builtin-schema", schema, *files)
    assert result.returncode == 0, result.stdout + result.stderr


def test_pyproject_is_valid():
    result = _run(_tool("validate-pyproject"), "pyproject.toml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_version_is_defined_once():
    assert importlib.metadata.version("keras-sam") == keras_sam.__version__
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert 'dynamic = ["version"]' in pyproject
    project_table = pyproject.split("[project]", 1)[1].split("\n[", 1)[0]
    assert re.search(r"^version\s*=", project_table, re.M) is None
    citation = (ROOT / "CITATION.cff").read_text(encoding="utf-8")
    assert f'version: "{keras_sam.__version__}"' in citation
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert "## [Unreleased]" in changelog or f"## [{keras_sam.__version__}]" in changelog


def test_readthedocs_builds_the_strict_site_ci_builds():
    config = (ROOT / ".readthedocs.yaml").read_text(encoding="utf-8")
    assert "configuration: mkdocs.yml" in config
    assert "fail_on_warning: true" in config
    assert "- docs" in config


def test_wheel_ships_py_typed(tmp_path):
    result = _run(sys.executable, "-m", "pip", "wheel", ".", "--no-deps",
                  "--no-build-isolation", "-w", str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    wheel = next(tmp_path.glob("keras_sam-*.whl"))
    assert wheel.name.startswith(f"keras_sam-{keras_sam.__version__}-")
    names = zipfile.ZipFile(wheel).namelist()
    assert "keras_sam/py.typed" in names
    assert "keras_sam/models/gsam.py" in names
    assert not any(name.startswith(("tests/", "benchmarks/")) for name in names)


def test_imports_with_docstrings_stripped():
    """``python -OO`` drops docstrings; the package must not depend on them."""
    result = _run(sys.executable, "-OO", "-c", "import keras_sam, keras_sam.demo; print('ok')")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
