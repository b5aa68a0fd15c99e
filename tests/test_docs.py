"""The documentation site builds with ``mkdocs build --strict`` (no warning allowed).

Strict mode fails on broken links and anchors, missing pages, unresolved
cross-references and docstrings mkdocstrings cannot parse, so this also guards
the API reference generated from keras_sam's docstrings. No network is needed.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS_PACKAGES = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")


def _missing() -> list[str]:
    missing = []
    for name in DOCS_PACKAGES:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.append(name)
    return missing


@pytest.mark.skipif(
    bool(_missing()),
    reason=f'docs toolchain not installed ({", ".join(_missing())}); pip install -e ".[docs]"',
)
def test_mkdocs_build_strict(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "DISABLE_MKDOCS_2_WARNING": "true"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr[-6000:]}"
    site = tmp_path / "site"
    for page in (
        "index.html",
        "api/wrappers/index.html",
        "changelog/index.html",
        "benchmarks/index.html",
        "concepts/methods/index.html",
    ):
        assert (site / page).is_file(), page
    api = (site / "api" / "wrappers" / "index.html").read_text(encoding="utf-8")
    for name in ("SAM", "ASAM", "KSAM", "LayerwiseSAM", "SharpnessAwareTrainer"):
        assert f'id="keras_sam.{name}"' in api, f"API reference lacks keras_sam.{name}"
