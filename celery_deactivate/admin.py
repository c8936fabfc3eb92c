"""``DeactivatableAdminMixin``: admin actions to take objects out of scheduling and back."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from django.contrib import admin, messages
from django.db.models import Model, QuerySet
from django.http import HttpRequest

from . import services


class DeactivatableAdminMixin:
    """Mix into a ``ModelAdmin``: "Reactivate" and "Deactivate" actions for the selection.

    Both go through :mod:`celery_deactivate.services`, so they send the same signals as the task.
    """

    #: Field names by role, as the task's ``deactivate_fields`` option (``None``: the defaults).
    deactivate_fields: Mapping[str, str | None] | None = None

    actions = ("reactivate_selected", "deactivate_selected")

    model: type[Model]
    message_user: Callable[..., None]

    @admin.action(description="Reactivate the selected objects (clear their error)")
    def reactivate_selected(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        self._apply(request, queryset, services.reactivate, "reactivated", "already active")

    @admin.action(description="Deactivate the selected objects (stop scheduling them)")
    def deactivate_selected(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        self._apply(request, queryset, services.deactivate, "deactivated", "already inactive")

    def _apply(
        self,
        request: HttpRequest,
        queryset: QuerySet[Any],
        change: Callable[..., Model | None],
        done: str,
        unchanged: str,
    ) -> None:
        changed = skipped = 0
        for pk in queryset.values_list("pk", flat=True).iterator():
            if change(self.model, pk, fields=self.deactivate_fields) is None:
                skipped += 1
            else:
                changed += 1
        self.message_user(request, f"{changed} {done}, {skipped} {unchanged}.", messages.SUCCESS)
