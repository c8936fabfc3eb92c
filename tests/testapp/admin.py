from django.contrib import admin

from celery_deactivate.admin import DeactivatableAdminMixin

from .models import Feed, Renamed


@admin.register(Feed)
class FeedAdmin(DeactivatableAdminMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("title", "active", "error", "failure_count", "error_message")
    list_filter = ("active", "error")


@admin.register(Renamed)
class RenamedAdmin(DeactivatableAdminMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    deactivate_fields = {"active": "enabled", "error": "broken", "error_message": "last_error"}
