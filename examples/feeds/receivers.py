"""The app's receivers of celery-deactivate's signals (connected in ``FeedsConfig.ready``)."""

from __future__ import annotations

import logging
from typing import Any

from django.dispatch import receiver

from celery_deactivate.signals import (
    object_deactivated,
    object_reactivated,
    outage_ended,
    outage_started,
)

from .models import Feed

logger = logging.getLogger("feeds")


@receiver(object_deactivated, dispatch_uid="feeds.feed_deactivated")
def feed_deactivated(sender: Any, instance: Any, task_id: str | None, **kwargs: Any) -> None:
    """Say which feed left the polling rotation, and why (in the worker's log)."""
    if isinstance(instance, Feed):
        logger.warning(
            "object_deactivated: feed %s <%s> is out of the polling rotation (task %s): %s",
            instance.pk,
            instance.url,
            task_id,
            instance.error_message or "deactivated by hand",
        )


@receiver(object_reactivated, dispatch_uid="feeds.feed_reactivated")
def feed_reactivated(sender: Any, instance: Any, **kwargs: Any) -> None:
    if isinstance(instance, Feed):
        logger.warning(
            "object_reactivated: feed %s <%s> is back in the polling rotation",
            instance.pk,
            instance.url,
        )


@receiver(outage_started, dispatch_uid="feeds.outage_started")
def poll_outage_started(sender: Any, counts: Any, reactivated: Any, **kwargs: Any) -> None:
    """Say that the task stopped deactivating feeds (e.g. page the on-call team here)."""
    logger.warning(
        "outage_started: %s: %d of %d polls failed on %d feeds; %d feed(s) re-activated",
        sender.name,
        counts["failures"],
        counts["runs"],
        counts["objects"],
        len(reactivated),
    )


@receiver(outage_ended, dispatch_uid="feeds.outage_ended")
def poll_outage_ended(sender: Any, started_at: Any, ended_at: Any, **kwargs: Any) -> None:
    logger.warning("outage_ended: %s, after %s", sender.name, ended_at - started_at)
