"""The example's feeds: what ``make demo`` (``examples/demo.py``) and ``manage.py seed_demo``
create.  Plain data, no Django: the demo reads it before it sets Django up."""

from __future__ import annotations

from collections.abc import Sequence

GOOD_DATES = [
    "Mon, 03 Nov 2025 08:00:00 +0000",
    "Tue, 04 Nov 2025 08:00:00 +0000",
    "Wed, 05 Nov 2025 08:00:00 +0000",
]
BAD_DATE = "yesterday, around midnight"
BROKEN_TITLE = "Night Owl Radio"

#: (title, slug, item dates): the third item of the broken feed has a date nobody can parse.
FEEDS = [
    ("Morning Digest", "digest", GOOD_DATES),
    ("Kernel Notes", "kernel", GOOD_DATES[:2]),
    (BROKEN_TITLE, "nightowl", [*GOOD_DATES[:2], BAD_DATE]),
    ("Garden Journal", "garden", GOOD_DATES),
    ("Chess Weekly", "chess", GOOD_DATES[:1]),
]


def rss(title: str, slug: str, dates: Sequence[str]) -> str:
    """The feed's RSS document, one item per date."""
    items = "".join(
        f"<item><title>{title} #{n}</title><link>https://{slug}.example.com/{n}</link>"
        f"<guid>{slug}-{n}</guid><pubDate>{date}</pubDate></item>"
        for n, date in enumerate(dates, start=1)
    )
    channel = f"<channel><title>{title}</title>{items}</channel>"
    return f'<?xml version="1.0"?><rss version="2.0">{channel}</rss>'
