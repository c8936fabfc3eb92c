"""The ``deactivate-options`` directive: the table of a deactivating task's options.

Generated from :data:`celery_deactivate.conf.OPTIONS` at build time, so the documented names,
defaults and meanings are the ones the code resolves, and cannot drift from it.  In a Markdown
page::

    ```{deactivate-options}
    ```
"""

from __future__ import annotations

import re
from typing import Any

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

HEADER = ("option and Django setting", "default", "meaning")
WIDTHS = (28, 22, 50)


def format_default(value: Any) -> str:
    """A default as a user would write it: ``(Exception,)``, not ``(<class 'Exception'>,)``."""
    if isinstance(value, type):
        module = value.__module__
        return value.__qualname__ if module == "builtins" else f"{module}.{value.__qualname__}"
    if isinstance(value, tuple):
        items = [format_default(item) for item in value]
        return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
    return repr(value)


def inline(text: str) -> list[nodes.Node]:
    """Plain text, with ````literal```` spans rendered as code (nothing else is parsed)."""
    parts = re.split(r"``(.+?)``", text)
    return [
        nodes.literal(part, part) if index % 2 else nodes.Text(part)
        for index, part in enumerate(parts)
        if part
    ]


def row(*cells: list[list[nodes.Node]]) -> nodes.row:
    """A table row; each cell is a list of paragraphs, each a list of inline nodes."""
    result = nodes.row()
    for paragraphs in cells:
        entry = nodes.entry()
        for content in paragraphs:
            entry += nodes.paragraph("", "", *content)
        result += entry
    return result


class OptionsTable(SphinxDirective):
    """One row per option: its name and the Django setting of the same name, default, meaning."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        from celery_deactivate import conf

        self.env.note_dependency(conf.__file__)  # rebuild the page when the options change
        rows = []
        for name, option in conf.OPTIONS.items():
            default = format_default(option.default)
            setting = f"CELERY_{name.upper()}"
            rows.append(
                row(
                    [[nodes.literal(name, name)], [nodes.literal(setting, setting)]],
                    [[nodes.literal(default, default)]],
                    [inline(option.doc)],
                )
            )
        return [table("deactivate-options", HEADER, WIDTHS, rows)]


def table(
    name: str, header: tuple[str, ...], widths: tuple[int, ...], rows: list[nodes.row]
) -> nodes.table:
    """A table of class ``name``: the header's titles, the columns' relative widths, the rows."""
    group = nodes.tgroup(cols=len(header))
    for width in widths:
        group += nodes.colspec(colwidth=width)
    head = nodes.thead()
    head += row(*([[nodes.Text(title)]] for title in header))
    group += head
    body = nodes.tbody()
    for line in rows:
        body += line
    group += body
    result = nodes.table(classes=[name, "colwidths-given"])
    result += group
    return result


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("deactivate-options", OptionsTable)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
