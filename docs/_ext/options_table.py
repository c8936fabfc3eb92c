"""The options of a deactivating task, documented from :data:`celery_deactivate.conf.OPTIONS`.

Generated at build time, so the documented names, defaults and meanings are the ones the code
resolves, and cannot drift from it.

* ``deactivate-options``: the table of the options.  In a Markdown page::

    ```{deactivate-options}
    ```

* ``deactivate-task-options``: the options as attributes of ``DeactivatingTask``, in the
  content of its ``autoclass`` (docs/api/task.rst), each with its effective default: the class
  attribute is ``None`` ("take the worker-wide setting, else the default"), which autodoc would
  show as the value of every option.  autodoc skips those attributes (``autodoc-skip-member``);
  this directive writes them with the ``#:`` comment of each.
"""

from __future__ import annotations

import re
from typing import Any

from docutils.statemachine import StringList

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.pycode import ModuleAnalyzer
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

HEADER = ("option and Django setting", "default", "meaning")
WIDTHS = (28, 22, 50)


def format_default(value: Any) -> str:
    """A default as a user would write it: ``(Exception,)``, not ``(<class 'Exception'>,)``;
    ``300``, not ``300.0``."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
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


class TaskOptions(SphinxDirective):
    """``py:attribute`` entries of the task keywords among the options, in the class's order,
    each with its effective default as value and its annotation without ``ClassVar``."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        from celery_deactivate import conf
        from celery_deactivate.task import DeactivatingTask

        self.env.note_dependency(conf.__file__)
        comments = ModuleAnalyzer.for_module(DeactivatingTask.__module__).find_attr_docs()
        lines = []
        for name, annotation in DeactivatingTask.__annotations__.items():
            option = conf.OPTIONS.get(name)
            if option is None or option.worker_wide:
                continue
            default = format_default(option.default)
            lines += [f".. py:attribute:: {name}", f"   :value: {default}"]
            shown = type_of(str(annotation), option.default)
            if shown:
                lines.append(f"   :type: {shown}")
            lines.append("")
            lines += ["   " + line for line in comments.get(("DeactivatingTask", name), [])]
            lines.append("")
        node = nodes.container()
        nested_parse_with_titles(self.state, StringList(lines, "deactivate-task-options"), node)
        return node.children


def type_of(annotation: str, default: Any) -> str:
    """``ClassVar[int | None]`` with a default of ``1`` is shown as ``int``; ``Any`` not at
    all."""
    shown = re.sub(r"^ClassVar\[(.*)\]$", r"\1", annotation)
    if default is not None:
        shown = shown.removesuffix(" | None")
    return "" if shown == "Any" else shown


def skip_options(app: Sphinx, what: str, name: str, obj: Any, skip: bool, options: Any) -> Any:
    """autodoc leaves the options of ``DeactivatingTask`` to ``deactivate-task-options``."""
    from celery_deactivate import conf

    if what == "class" and name in conf.OPTIONS:
        return True
    return None


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
    app.add_directive("deactivate-task-options", TaskOptions)
    app.connect("autodoc-skip-member", skip_options)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
