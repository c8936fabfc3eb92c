"""The ``deactivate-metrics`` directive: the table of the OpenTelemetry counters.

Generated from ``celery_deactivate._metrics.COUNTERS`` at build time, so the documented names,
units and attributes are the ones the code counts with.  In a Markdown page::

    ```{deactivate-metrics}
    ```
"""

from __future__ import annotations

from typing import Any

from docutils import nodes
from options_table import inline, row, table
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

HEADER = ("counter (Prometheus name)", "attributes", "what it counts")
WIDTHS = (34, 22, 44)


class MetricsTable(SphinxDirective):
    """One row per counter: its name and Prometheus name, attributes, meaning."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        from celery_deactivate import _metrics

        self.env.note_dependency(_metrics.__file__)  # rebuild the page when the counters change
        rows = []
        for name, (_unit, description, attributes) in _metrics.COUNTERS.items():
            prometheus = name.replace(".", "_") + "_total"
            rows.append(
                row(
                    [[nodes.literal(name, name)], [nodes.literal(prometheus, prometheus)]],
                    [inline(attributes)],
                    [inline(description)],
                )
            )
        return [table("deactivate-metrics", HEADER, WIDTHS, rows)]


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("deactivate-metrics", MetricsTable)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
