"""Each object's history in the admin: the newest events on its change page
(:func:`history_table`), and all of them in the read-only changelist of
:class:`~celery_deactivate.models.HistoryEvent` (:class:`HistoryEventAdmin`, registered by
``celery_deactivate.admin``).

A user sees the events of the models they may view (or change), and nothing of the others; the
``celery_deactivate.view_historyevent`` permission shows every model's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from django.apps import apps
from django.contrib import admin
from django.db.models import Model, QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString
from django.utils.text import Truncator
from django.utils.translation import gettext_lazy as _

from . import _history
from .models import HistoryEvent

if TYPE_CHECKING:
    _ModelAdmin = admin.ModelAdmin[Any]
else:
    _ModelAdmin = admin.ModelAdmin

#: Events an object's change page shows, the newest first.
SHOWN = 20
#: Characters of an event's error in a table (the whole error, up to 1,000, on hover).
ERROR_SHOWN = 120


def changelist_url(site: admin.AdminSite, model: type[Model], pk: Any) -> str | None:
    """The history changelist filtered to one object, if the site shows the history."""
    if not site.is_registered(HistoryEvent):
        return None
    url = reverse("admin:celery_deactivate_historyevent_changelist", current_app=site.name)
    return f"{url}?{urlencode({'model': _history.label_of(model), 'object_pk': str(pk)})}"


def history_table(site: admin.AdminSite, obj: Model) -> SafeString:
    """The object's newest :data:`SHOWN` events as a small table, with a link to all of them."""
    model = type(obj)
    events = list(_history.of_object(model, obj.pk)[: SHOWN + 1])
    if not events:
        return format_html("<p>{}</p>", _("No event recorded."))
    rows = format_html_join(
        "",
        '<tr data-kind="{}"><td class="nowrap">{}</td><td>{}</td><td>{}</td>'
        '<td title="{}">{}</td></tr>',
        (
            (
                event.kind,
                event.at.isoformat(" ", "seconds"),
                _history.what(event),
                _history.who(event),
                event.error,
                Truncator(event.error.splitlines()[0] if event.error else "").chars(ERROR_SHOWN),
            )
            for event in events[:SHOWN]
        ),
    )
    table = format_html(
        '<table class="deactivation-history"><thead><tr><th>{}</th><th>{}</th><th>{}</th>'
        "<th>{}</th></tr></thead><tbody>{}</tbody></table>",
        _("when"),
        _("what"),
        _("by"),
        _("error"),
        rows,
    )
    url = changelist_url(site, model, obj.pk)
    if url is None:
        return table
    more = _("All events") if len(events) > SHOWN else _("The events in a list")
    return format_html('{}<p><a href="{}">{}</a></p>', table, url, more)


def viewable_labels(request: HttpRequest) -> set[str]:
    """The ``app_label.Model`` labels whose objects the user may view (or change)."""
    user = request.user
    return {
        model._meta.label
        for model in apps.get_models()
        if any(
            user.has_perm(f"{model._meta.app_label}.{action}_{model._meta.model_name}")
            for action in ("view", "change")
        )
    }


class ReadOnlyAdmin(_ModelAdmin):
    """A ``ModelAdmin`` to read with: shown on the index to whoever may view it; nothing to add,
    change or delete."""

    def has_module_permission(self, request: HttpRequest) -> bool:
        return self.has_view_permission(request)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class HistoryEventAdmin(ReadOnlyAdmin):
    """The history, read-only: filter it by model and object (``?model=app.Model&object_pk=42``,
    the change page's link), by kind and by cause; search the task, the person and the error."""

    list_display = ("at", "model", "object_pk", "event", "by", "error_head")
    list_filter = ("kind", "cause", "model")
    search_fields = ("object_pk", "task", "task_id", "actor", "error")
    list_per_page = 50
    show_full_result_count = False

    @admin.display(description=_("what"))
    def event(self, obj: HistoryEvent) -> str:
        return _history.what(obj)

    @admin.display(description=_("by"))
    def by(self, obj: HistoryEvent) -> str:
        return _history.who(obj)

    @admin.display(description=_("error"))
    def error_head(self, obj: HistoryEvent) -> SafeString | str:
        if not obj.error:
            return ""
        head = Truncator(obj.error.splitlines()[0]).chars(ERROR_SHOWN)
        return format_html('<span title="{}">{}</span>', obj.error, head)

    def get_queryset(self, request: HttpRequest) -> QuerySet[HistoryEvent]:
        rows = super().get_queryset(request)
        if request.user.has_perm("celery_deactivate.view_historyevent"):
            return rows
        visible: QuerySet[HistoryEvent] = rows.filter(model__in=viewable_labels(request))
        return visible

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        if super().has_view_permission(request, obj):
            return True
        labels = viewable_labels(request)
        return bool(labels) if obj is None else obj.model in labels
