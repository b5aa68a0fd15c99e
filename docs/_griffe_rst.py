"""Griffe extension: renders the reST bits of keras_sam docstrings as Markdown.

The docstrings are Google style (read by mkdocstrings) but use a few reST
constructs that also read well in ``help()``:

* ``.. math::`` blocks become ``$$ ... $$`` (rendered by MathJax via arithmatex);
* ``:class:`~pkg.Name```, ``:func:``, ``:meth:``, ``:attr:`` roles become code spans;
* the ``{{base_optimizer_keyword_args}}`` placeholder (filled from Keras at import
  time, but seen raw by static analysis) becomes an ``**kwargs`` entry.

Only the rendered documentation changes; the docstrings in the package are untouched.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|func|meth|attr|mod|obj|data|exc):`~?([^`]+)`")
_ROLE_TILDE = re.compile(r":(?:class|func|meth|attr|mod|obj|data|exc):`~([^`]+)`")

_OPTIMIZER_KWARGS = (
    ("clipnorm", "clip each gradient to this norm (Keras)."),
    ("clipvalue", "clip each gradient element to this value (Keras)."),
    ("global_clipnorm", "clip all gradients together to this global norm (Keras)."),
    ("use_ema", "keep an exponential moving average of the weights (Keras)."),
    ("ema_momentum", "momentum of that average (Keras)."),
    (
        "ema_overwrite_frequency",
        "overwrite the weights with the average every this many steps (Keras).",
    ),
    ("loss_scale_factor", "static loss scale (Keras)."),
    ("gradient_accumulation_steps", "apply the averaged gradient every this many steps (Keras)."),
    ("name", "the optimizer's name."),
    ("**kwargs", "any other `keras.optimizers.Optimizer` argument."),
)
_PLACEHOLDER = re.compile(r"^([ \t]*)\{\{base_optimizer_keyword_args\}\}[ \t]*$", re.MULTILINE)


def _optimizer_kwargs(match: re.Match) -> str:
    indent = match.group(1)
    return "\n".join(f"{indent}{name}: {text}" for name, text in _OPTIMIZER_KWARGS)


def _roles(text: str) -> str:
    text = _ROLE_TILDE.sub(lambda m: f"`{m.group(1).rsplit('.', 1)[-1]}`", text)
    return _ROLE.sub(lambda m: f"`{m.group(1)}`", text)


def _math_blocks(text: str) -> str:
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped != ".. math::":
            out.append(line)
            i += 1
            continue
        indent = line[: len(line) - len(line.lstrip())]
        i += 1
        body: list[str] = []
        while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > len(indent)):
            body.append(lines[i])
            i += 1
        while body and not body[-1].strip():
            body.pop()
        content = [b for b in body if b.strip()]
        common = min((_indent(b) for b in content), default=0)
        out.append(f"{indent}$$")
        out.extend(f"{indent}{b[common:]}" if b.strip() else "" for b in body if b.strip())
        out.append(f"{indent}$$")
        if i < len(lines):
            out.append("")
    return "\n".join(out)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


_LITERAL_MARKER = re.compile(r"(\S)::$", re.MULTILINE)


def convert(text: str) -> str:
    """The Markdown rendering of one docstring."""
    text = _PLACEHOLDER.sub(_optimizer_kwargs, text)
    text = _LITERAL_MARKER.sub(r"\1:", text)  # reST "text::" before an indented block
    return _roles(_math_blocks(text))


class RstToMarkdown(griffe.Extension):
    """Rewrites each docstring once, when griffe creates the object."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = convert(obj.docstring.value)
