"""``DeactivatableModel``: an abstract model with every field a deactivating task records."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar, cast

from django.db import models

_M = TypeVar("_M", bound=models.Model)


class DeactivatableQuerySet(models.QuerySet[_M]):
    def active(self) -> DeactivatableQuerySet[_M]:
        """Objects a scheduler may pick."""
        return cast("DeactivatableQuerySet[_M]", self.filter(active=True))

    def deactivated(self) -> DeactivatableQuerySet[_M]:
        """Objects taken out of scheduling (by a failure or by hand)."""
        return cast("DeactivatableQuerySet[_M]", self.filter(active=False))


if TYPE_CHECKING:
    DeactivatableManager = models.Manager
else:
    DeactivatableManager = models.Manager.from_queryset(DeactivatableQuerySet)


class DeactivatableModel(models.Model):
    """Adds ``active``, ``error``, ``error_message``, ``deactivated_at`` and ``failure_count``.

    ``objects`` is a manager with ``active()`` and ``deactivated()``; it returns every row, as
    Django's default manager does.
    """

    active = models.BooleanField(default=True, db_index=True)
    error = models.BooleanField(default=False)
    error_message = models.TextField(blank=True, default="")
    deactivated_at = models.DateTimeField(null=True, blank=True)
    failure_count = models.PositiveIntegerField(default=0)

    objects = DeactivatableManager()

    class Meta:
        abstract = True
