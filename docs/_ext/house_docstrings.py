"""Two conventions of celery_deactivate's docstrings, for autodoc.

* An indented block after a paragraph is an example (``poll.dispatch_active()``), as in Celery's
  and Django's docstrings read in a terminal: it is rendered as code, not as a block quote.
* A paragraph of ``name: meaning`` lines lists keyword arguments (the signals' comments): it is
  rendered as a field list, a continuation line indented under its name.
* A short cross-reference (``:class:`Target```, ``:exc:`DeactivateConfigError```) names an object
  of the package documented in another module: it links to the one documented object of that
  name, as ``:class:`~.Target``` would.
"""

from __future__ import annotations

import re
from typing import Any

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment

PACKAGE = "celery_deactivate."
#: ``sender: the task ...``: one keyword argument and its meaning.
_KEYWORD_LINE = re.compile(r"^[a-z_][a-z0-9_]*: ")
#: Lines that already introduce an indented block of their own.
_INTRODUCES_BLOCK = re.compile(r"^(\.\. |:|[-*+] |\d+\. |>>>)|::$")


def examples_as_code(
    app: Sphinx, what: str, name: str, obj: Any, options: Any, lines: list[str]
) -> None:
    """Insert ``::`` before an indented block that follows a blank line and a plain paragraph."""
    index = 2
    while index < len(lines):
        before, blank, line = lines[index - 2], lines[index - 1], lines[index]
        if (
            line.startswith("    ")
            and not blank.strip()
            and before.strip()
            and not before.startswith(" ")
            and not _INTRODUCES_BLOCK.search(before.strip())
        ):
            lines[index:index] = ["::", ""]  # a paragraph of "::" alone is not rendered
            index += 2
        index += 1


def keywords_as_fields(
    app: Sphinx, what: str, name: str, obj: Any, options: Any, lines: list[str]
) -> None:
    """Turn a paragraph made only of ``name: meaning`` lines into a field list."""
    start = 0
    while start < len(lines):
        end = start
        while end < len(lines) and lines[end].strip():
            end += 1
        heads = [i for i in range(start, end) if not lines[i].startswith(" ")]
        if len(heads) >= 2 and all(_KEYWORD_LINE.match(lines[i]) for i in heads):
            for i in heads:
                lines[i] = ":" + lines[i]  # "sender: the task" -> ":sender: the task"
        start = end + 1


def resolve_short_names(
    app: Sphinx, env: BuildEnvironment, node: Any, contnode: nodes.Element
) -> nodes.Element | None:
    """Resolve ``Name`` to the package's single documented object ``celery_deactivate...Name``."""
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "")
    if not target or "." in target:
        return None
    domain: Any = env.get_domain("py")
    found = [
        full
        for full, entry in domain.objects.items()
        if full.startswith(PACKAGE) and full.rsplit(".", 1)[-1] == target and not entry.aliased
    ]
    if len(found) != 1:
        return None
    resolved: nodes.Element | None = domain.resolve_xref(
        env, node["refdoc"], app.builder, node["reftype"], found[0], node, contnode
    )
    return resolved


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("autodoc-process-docstring", examples_as_code)
    app.connect("autodoc-process-docstring", keywords_as_fields)
    app.connect("missing-reference", resolve_short_names)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
