"""The feed poller: a deactivating task.

``poll`` runs in one transaction on an active feed.  If it fails for good, celery-deactivate rolls
the transaction back (no half-stored entries), deactivates the feed (``active=False``,
``error=True``, ``error_message``...), sends ``object_deactivated``, mails the admins and
re-raises the exception for Celery.  A deactivated feed is skipped by later polls.

When most polls fail at once (the upstream is down), the outage guard stops deactivating feeds,
re-activates the ones it just deactivated and sends one outage notice; the settings choose its
thresholds (``CELERY_DEACTIVATE_OUTAGE_*``).
"""

from __future__ import annotations

from email.utils import parsedate_to_datetime
from xml.etree import ElementTree

from celery import shared_task
from django.conf import settings
from django.utils import timezone

from celery_deactivate import DeactivatingTask

from .models import Entry, Feed


class UpstreamUnavailable(ConnectionError):
    """The feeds' upstream answers 503: every feed fails, none of them is broken."""


def download(feed: Feed) -> str:
    """The feed's RSS document.  A real project fetches ``feed.url``; the example keeps the
    document in the row, and the upstream is "down" while the file ``UPSTREAM_DOWN_FLAG``
    exists (the demo creates it)."""
    if settings.UPSTREAM_DOWN_FLAG.exists():
        raise UpstreamUnavailable(f"{feed.url}: 503 Service Unavailable")
    return feed.document


@shared_task(base=DeactivatingTask, model=Feed)
def poll(pk: int) -> int:
    """Parse the feed's RSS document and store its items; return how many."""
    feed = Feed.objects.get(pk=pk)
    channel = ElementTree.fromstring(download(feed)).find("channel")
    if channel is None:
        raise ValueError(f"{feed.url}: not an RSS document (no <channel>)")
    stored = 0
    for item in channel.iter("item"):
        # A malformed date raises here, after earlier items were stored: the rollback undoes them.
        published_at = parsedate_to_datetime(item.findtext("pubDate", ""))
        Entry.objects.update_or_create(
            feed=feed,
            guid=item.findtext("guid") or item.findtext("link", ""),
            defaults={
                "title": item.findtext("title", ""),
                "link": item.findtext("link", ""),
                "published_at": published_at,
            },
        )
        stored += 1
    Feed.objects.filter(pk=pk).update(
        title=channel.findtext("title") or feed.title, last_polled_at=timezone.now()
    )
    return stored
