"""MkDocs hooks: a placeholder Benchmarks page until docs/benchmarks/index.md exists."""

from __future__ import annotations

from typing import Any

from mkdocs.structure.files import File, Files

_PLACEHOLDER = """# Benchmarks

The speed and generalization benchmarks (tables and plots) will appear here.
Until then, `python -m keras_sam.demo` prints test accuracy, step time relative
to the base optimizer and extra memory for every method on scikit-learn's digits.
"""


def on_files(files: Files, config: Any, **kwargs: Any) -> Files:
    if files.get_file_from_path("benchmarks/index.md") is None:
        files.append(File.generated(config, "benchmarks/index.md", content=_PLACEHOLDER))
    return files
