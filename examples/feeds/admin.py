"""The feeds in the Django admin: which are active, which were deactivated and why."""

from django.contrib import admin

from .models import Entry, Feed


class EntryInline(admin.TabularInline):
    model = Entry
    extra = 0
    fields = ("title", "link", "published_at")
    readonly_fields = fields
    show_change_link = True


@admin.register(Feed)
class FeedAdmin(admin.ModelAdmin):
    list_display = (
        "title",
        "url",
        "active",
        "error",
        "failure_count",
        "deactivated_at",
        "last_polled_at",
    )
    list_filter = ("active", "error")
    search_fields = ("title", "url", "error_message")
    readonly_fields = ("error_message", "deactivated_at", "failure_count", "last_polled_at")
    inlines = (EntryInline,)


@admin.register(Entry)
class EntryAdmin(admin.ModelAdmin):
    list_display = ("title", "feed", "published_at")
    list_filter = ("feed",)
    search_fields = ("title", "guid")
