"""The app's receivers of celery-deactivate's signals (connected in ``FeedsConfig.ready``)."""

from __future__ import annotations

import logging
from typing import Any

from django.dispatch import receiver

from celery_deactivate.signals import object_deactivated

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
