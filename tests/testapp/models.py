from __future__ import annotations

import uuid
from typing import Any

import django
from django.db import models

from celery_deactivate import DeactivatableModel


class Feed(DeactivatableModel):
    """A feed whose ``behaviour`` decides what its task body does (ok, fail, ...)."""

    title = models.CharField(max_length=100)
    behaviour = models.CharField(max_length=20, default="ok")
    polls = models.PositiveIntegerField(default=0)
    note = models.CharField(max_length=100, blank=True, default="")

    def __str__(self) -> str:
        return self.title


class SpecialFeed(Feed):
    """Multi-table inheritance: the deactivation fields live in the parent's table."""

    kind = models.CharField(max_length=20, default="")


class Entry(models.Model):
    """Rows a task body writes: they must be rolled back when the body fails."""

    feed = models.ForeignKey(Feed, on_delete=models.CASCADE, related_name="entries")
    text = models.CharField(max_length=100)


class RecipeObject(models.Model):
    """Exactly the recipe's model: ``active`` and ``error`` only, no mixin."""

    title = models.CharField(max_length=100)
    active = models.BooleanField(default=False)
    error = models.BooleanField(default=False)

    def __str__(self) -> str:
        return self.title


class Renamed(models.Model):
    """Custom field names, and a short message column that the error text must fit."""

    title = models.CharField(max_length=100)
    enabled = models.BooleanField(default=True)
    broken = models.BooleanField(default=False)
    last_error = models.CharField(max_length=24, blank=True, default="")
    failures = models.IntegerField(default=0)

    def __str__(self) -> str:
        return self.title


class NoActive(models.Model):
    title = models.CharField(max_length=100)


class WrongActive(models.Model):
    active = models.CharField(max_length=10)


class SignalLog(models.Model):
    """One row per ``object_deactivated`` / ``failure_counted`` a crash-test worker received."""

    signal = models.CharField(max_length=30)
    feed_id = models.CharField(max_length=64)  # any key type, as text
    task_id = models.CharField(max_length=64, blank=True, default="")
    failure_count = models.IntegerField(null=True)
    exception = models.TextField(blank=True, default="")
    process = models.CharField(max_length=40, blank=True, default="")


class UuidFeed(DeactivatableModel):
    """A UUID primary key (no MIN/MAX in PostgreSQL)."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    title = models.CharField(max_length=100)
    behaviour = models.CharField(max_length=20, default="ok")

    def __str__(self) -> str:
        return self.title


class NarrowFeed(DeactivatableModel):
    """On MySQL and MariaDB its ``error_message`` column is put in a 3-byte character set
    (``utf8mb3``: no emoji) by the test that needs it (tests/test_databases.py)."""

    title = models.CharField(max_length=100)
    behaviour = models.CharField(max_length=20, default="ok")

    def __str__(self) -> str:
        return self.title


class KeyedFeed(DeactivatableModel):
    """A string primary key."""

    key = models.CharField(primary_key=True, max_length=40)
    title = models.CharField(max_length=100)
    behaviour = models.CharField(max_length=20, default="ok")

    def __str__(self) -> str:
        return self.title


class ProxyFeed(Feed):
    """A proxy of Feed: same table, its own class."""

    class Meta:
        proxy = True


class VisibleManager(models.Manager):  # type: ignore[type-arg]
    """Hides archived rows, even from related lookups (the model's base manager)."""

    def get_queryset(self) -> Any:
        return super().get_queryset().filter(archived=False)


class HiddenFeed(DeactivatableModel):
    """A filtering base manager (``Meta.base_manager_name``): archived rows do not exist."""

    title = models.CharField(max_length=100)
    behaviour = models.CharField(max_length=20, default="ok")
    archived = models.BooleanField(default=False)

    objects = VisibleManager()  # type: ignore[misc]

    class Meta:
        base_manager_name = "objects"

    def __str__(self) -> str:
        return self.title


class ActiveManager(models.Manager):  # type: ignore[type-arg]
    """Hides inactive rows, even from related lookups (the model's base manager)."""

    def get_queryset(self) -> Any:
        return super().get_queryset().filter(active=True)


class ActiveOnlyFeed(DeactivatableModel):
    """A base manager that hides inactive rows: a deactivation hides the row it changed."""

    title = models.CharField(max_length=100)
    behaviour = models.CharField(max_length=20, default="ok")

    objects = ActiveManager()  # type: ignore[misc]
    every_row = models.Manager()

    class Meta:
        base_manager_name = "objects"

    def __str__(self) -> str:
        return self.title


class DeepFeed(SpecialFeed):
    """Two levels of multi-table inheritance (its key links to a key that links to Feed's),
    ordered through its parents' columns."""

    depth = models.PositiveIntegerField(default=2)

    class Meta:
        ordering = ["-depth", "title"]


#: The tenant whose rows :class:`TenantFeed`'s base manager shows, as a multi-tenant project
#: sets it per request or task.
TENANT = ["a"]


class TenantManager(models.Manager):  # type: ignore[type-arg]
    """The current tenant's rows only: a queryset that changes from call to call."""

    def get_queryset(self) -> Any:
        return super().get_queryset().filter(tenant=TENANT[0])


class TenantFeed(DeactivatableModel):
    """A base manager whose rows depend on the moment (:data:`TENANT`)."""

    title = models.CharField(max_length=100)
    tenant = models.CharField(max_length=20)

    objects = TenantManager()  # type: ignore[misc]

    class Meta:
        base_manager_name = "objects"

    def __str__(self) -> str:
        return self.title


class Article(models.Model):
    """A concrete parent without the deactivation fields."""

    title = models.CharField(max_length=100)

    def __str__(self) -> str:
        return self.title


class TrackedArticle(Article, DeactivatableModel):
    """Multi-table inheritance the other way round: the deactivation fields in the child's table,
    the parent's columns in another."""

    behaviour = models.CharField(max_length=20, default="ok")


if django.VERSION >= (5, 2):  # models.CompositePrimaryKey is new in Django 5.2

    class CompositeFeed(models.Model):
        """A composite primary key: refused by the library, at declaration."""

        pk = models.CompositePrimaryKey("source", "number")
        source = models.CharField(max_length=40)
        number = models.IntegerField()
        active = models.BooleanField(default=True)
        error = models.BooleanField(default=False)
