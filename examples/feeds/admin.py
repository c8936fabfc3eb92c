"""The feeds in the Django admin: which are active, which were deactivated and why."""

from django.contrib import admin

from celery_deactivate.admin import DeactivatableAdmin

from .models import Entry, Feed


class EntryInline(admin.TabularInline):
    model = Entry
    extra = 0
    fields = ("title", "link", "published_at")
    readonly_fields = fields
    show_change_link = True


@admin.register(Feed)
class FeedAdmin(DeactivatableAdmin):
    """State at a glance (icon, when, why), a filter by state, the error in full on the change
    page, and the "Re-activate selected" / "Deactivate selected" actions."""

    list_display = (
        "title",
        "url",
        "deactivation_state",
        "deactivated_at",
        "deactivation_message",
        "last_polled_at",
    )
    search_fields = ("title", "url")  # and the error message
    readonly_fields = ("last_polled_at",)
    inlines = (EntryInline,)


@admin.register(Entry)
class EntryAdmin(admin.ModelAdmin):
    list_display = ("title", "feed", "published_at")
    list_filter = ("feed",)
    search_fields = ("title", "guid")
