from typing import Any

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest

from celery_deactivate.admin import DeactivatableAdmin, DeactivatableAdminMixin

from .models import Feed, KeyedFeed, ProxyFeed, RecipeObject, Renamed, UuidFeed


@admin.register(Feed)
class FeedAdmin(DeactivatableAdmin):
    """The ready admin, with a search field of the model's own (the error is searched too)."""

    search_fields = ("title",)


@admin.register(Renamed)
class RenamedAdmin(DeactivatableAdminMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    """The mixin on a plain ModelAdmin, with actions of its own and renamed fields."""

    deactivate_fields = {"active": "enabled", "error": "broken", "error_message": "last_error"}
    actions = ("mark_checked",)
    list_display = ("title", "enabled", "broken", "last_error")

    @admin.action(description="Mark selected as checked")
    def mark_checked(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        """An action of the class's own, kept beside the mixin's."""
        self.message_user(request, f"Checked {queryset.count()}.")


@admin.register(RecipeObject)
class RecipeObjectAdmin(DeactivatableAdmin):
    """The seed recipe's model: active and error only (no message, time or count)."""


@admin.register(ProxyFeed)
class UnrecordedErrorAdmin(DeactivatableAdmin):
    """Feeds seen as a model that records no error: only active and deactivated."""

    deactivate_fields = {"error": None}


@admin.register(UuidFeed)
class UuidFeedAdmin(DeactivatableAdminMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    """The mixin alone on a DeactivatableModel (every field role), with read-only fields of its
    own."""

    readonly_fields = ("behaviour",)


admin.site.register(KeyedFeed, DeactivatableAdmin)
