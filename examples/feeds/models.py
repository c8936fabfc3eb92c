"""Feeds and the entries their poll task stores."""

from django.db import models

from celery_deactivate import DeactivatableModel


class Feed(DeactivatableModel):
    """An RSS feed.  ``active``, ``error``, ``error_message``... come from the mixin.

    ``document`` holds the feed as last downloaded, so the example needs no network: a real
    project would fetch ``url`` in the task instead.
    """

    url = models.URLField(unique=True)
    title = models.CharField(max_length=200)
    document = models.TextField(blank=True, default="")
    last_polled_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ("pk",)

    def __str__(self) -> str:
        return self.title


class Entry(models.Model):
    """One item of a feed, stored by the poll task (in its transaction)."""

    feed = models.ForeignKey(Feed, on_delete=models.CASCADE, related_name="entries")
    guid = models.CharField(max_length=200)
    title = models.CharField(max_length=200)
    link = models.URLField(blank=True, default="")
    published_at = models.DateTimeField()

    class Meta:
        ordering = ("-published_at",)
        constraints = (
            models.UniqueConstraint(fields=("feed", "guid"), name="feeds_entry_unique_guid"),
        )
        verbose_name_plural = "entries"

    def __str__(self) -> str:
        return self.title
