"""The status page's chart: deactivations and re-activations per hour, as inline SVG drawn on the
server (no JavaScript, no CDN).

Deactivations rise above the axis, re-activations hang below it, one bar per hour with a
``<title>`` (the hour and the count, shown on hover and read by screen readers) and
``data-hour``/``data-kind``/``data-count`` attributes.  Colours are the admin's own CSS variables
(``--error-fg``, ``--link-fg``, ``--hairline-color``, ``--body-quiet-color``), so the chart follows
the admin's light and dark themes.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

#: Pixels per hour, and of each half of the chart.
BAR = 4
HALF = 48
TOP = 14
LABELS = 16

KINDS = (
    ("deactivated", "deactivated", "var(--error-fg, #ba2121)", -1),
    ("reactivated", "re-activated", "var(--link-fg, #447e9b)", 1),
)


def svg(counts: dict[str, dict[datetime, int]], first_hour: datetime, hours: int) -> SafeString:
    """The chart of ``counts`` (``{kind: {hour: count}}``, hours in UTC) for the ``hours`` hours
    from ``first_hour``."""
    width = hours * BAR
    axis = TOP + HALF
    height = axis + HALF + LABELS
    peak = max([1, *(n for per_hour in counts.values() for n in per_hour.values())])
    bars = []
    for kind, words, colour, direction in KINDS:
        for hour, count in sorted(counts.get(kind, {}).items()):
            slot = int((hour - first_hour).total_seconds() // 3600)
            if not 0 <= slot < hours or not count:
                continue
            size = max(round(HALF * count / peak), 1)
            y = axis - size if direction < 0 else axis
            bars.append(
                (
                    kind,
                    hour.strftime("%Y-%m-%dT%H:00Z"),
                    count,
                    slot * BAR,
                    y,
                    BAR - 1,
                    size,
                    colour,
                    f"{hour:%Y-%m-%d %H}:00 UTC: {count} {words}",
                )
            )
    days = [
        (x, (first_hour + timedelta(hours=slot)).strftime("%b %d"))
        for slot in range(hours)
        if (first_hour + timedelta(hours=slot)).hour == 0
        for x in [slot * BAR]
        if x + 40 <= width  # a label that fits
    ]
    totals = {kind: sum(counts.get(kind, {}).values()) for kind, *_ in KINDS}
    return format_html(
        '<svg class="deactivation-chart" role="img" viewBox="0 0 {w} {h}" width="{w}" '
        'height="{h}" xmlns="http://www.w3.org/2000/svg" font-size="10" '
        'style="color: var(--body-quiet-color, #666); max-width: 100%">'
        "<title>{title}</title>"
        '<text x="0" y="10" fill="var(--error-fg, #ba2121)">▲ {off} deactivated</text>'
        '<text x="{w}" y="10" text-anchor="end" fill="var(--link-fg, #447e9b)">'
        "▼ {on} re-activated</text>"
        '<text x="{w}" y="{peak_y}" text-anchor="end" fill="currentColor">{peak}/h</text>'
        '<line x1="0" x2="{w}" y1="{axis}" y2="{axis}" '
        'stroke="var(--hairline-color, #ccc)" stroke-width="1"/>'
        "{days}{bars}</svg>",
        w=width,
        h=height,
        title=f"Deactivations and re-activations per hour, the last {hours // 24} days",
        off=totals["deactivated"],
        on=totals["reactivated"],
        peak=peak,
        peak_y=TOP + 10,
        axis=axis,
        days=format_html_join(
            "",
            '<line x1="{0}" x2="{0}" y1="{1}" y2="{2}" stroke="var(--hairline-color, #ccc)"/>'
            '<text x="{3}" y="{4}" fill="currentColor">{5}</text>',
            ((x, TOP, axis + HALF, x + 2, height - 4, label) for x, label in days),
        ),
        bars=format_html_join(
            "",
            '<rect class="bar" data-kind="{}" data-hour="{}" data-count="{}" x="{}" y="{}" '
            'width="{}" height="{}" fill="{}"><title>{}</title></rect>',
            bars,
        ),
    )
