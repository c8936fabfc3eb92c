"""The Django admin for deactivatable models: their state at a glance, and the way back.

:class:`DeactivatableAdminMixin` adds to any ``ModelAdmin`` the "Re-activate selected" and
"Deactivate selected" actions (through :mod:`celery_deactivate.services`, so they write the same
fields and send the same signals as the task), and the pieces a changelist needs to show the
state: the ``deactivation_state`` and ``deactivation_message`` columns and the
:class:`DeactivationStateFilter`.  :class:`DeactivatableAdmin` is a ready ``ModelAdmin`` that
puts them together.  Neither registers anything::

    from django.contrib import admin
    from celery_deactivate.admin import DeactivatableAdmin

    @admin.register(Feed)
    class FeedAdmin(DeactivatableAdmin):
        search_fields = ("title",)  # the error message is searched as well

Both show an object's state with the names of :mod:`celery_deactivate.states` (the command and
the other operators' views use the same), and keep the library's fields read-only in the change
form (the state changes only through the actions, which go through the services and send the
signals; ``celery_deactivate.E005`` reports one in ``list_editable``), and record each change
an action makes in the admin's history (``LogEntry``, as "Delete selected" does).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from django.contrib import admin, messages
from django.core import checks
from django.db.models import Model, QuerySet
from django.http import HttpRequest
from django.templatetags.static import static
from django.utils.html import format_html
from django.utils.safestring import SafeString
from django.utils.text import Truncator, capfirst
from django.utils.translation import gettext, ngettext_lazy
from django.utils.translation import gettext_lazy as _

from . import _errors, _history_admin, _status, services
from .models import HistoryEvent, TaskStatus
from .states import State, condition, detail, state_of, states
from .target import Target

if TYPE_CHECKING:
    from django_stubs_ext import StrOrPromise

    _ModelAdmin = admin.ModelAdmin[Any]
else:
    _ModelAdmin = admin.ModelAdmin

__all__ = ["DeactivatableAdmin", "DeactivatableAdminMixin", "DeactivationStateFilter"]

#: The mixin's actions, added to a ``ModelAdmin``'s own ``actions``.
DEACTIVATION_ACTIONS = ("reactivate_selected", "deactivate_selected")

#: What the actions report: (changed, left unchanged), plural forms on ``count``.
_REACTIVATED = (
    ngettext_lazy("Re-activated %(count)d %(name)s.", "Re-activated %(count)d %(names)s.", "count"),
    ngettext_lazy(
        "%(count)d %(name)s was already active.",
        "%(count)d %(names)s were already active.",
        "count",
    ),
)
_DEACTIVATED = (
    ngettext_lazy("Deactivated %(count)d %(name)s.", "Deactivated %(count)d %(names)s.", "count"),
    ngettext_lazy(
        "%(count)d %(name)s was already deactivated.",
        "%(count)d %(names)s were already deactivated.",
        "count",
    ),
)

#: Django's default ``list_display``: a class that keeps it gets the state columns.
DJANGO_LIST_DISPLAY = ("__str__",)

#: Each state's icon, one of the admin's own images (``admin/img/...``).
ICONS = {
    State.ACTIVE: "icon-yes.svg",
    State.BY_ERROR: "icon-no.svg",
    State.BY_HAND: "icon-alert.svg",
    State.DEACTIVATED: "icon-no.svg",
    State.PROBING: "icon-clock.svg",
}


class DeactivationStateFilter(admin.SimpleListFilter):
    """The changelist's filter by state (:func:`celery_deactivate.states.states`): active,
    deactivated by error, deactivated by hand, probing.

    Works on a ``ModelAdmin`` with :class:`DeactivatableAdminMixin` (its ``deactivate_fields``),
    and on any other for a model with the default field names.
    """

    title = _("state")
    parameter_name = "deactivation"

    def __init__(
        self,
        request: HttpRequest,
        params: dict[str, list[str]],
        model: type[Model],
        model_admin: admin.ModelAdmin[Any],
    ) -> None:
        self._target = _target_of(model_admin)
        super().__init__(request, params, model, model_admin)

    def lookups(
        self, request: HttpRequest, model_admin: admin.ModelAdmin[Any]
    ) -> list[tuple[str, StrOrPromise]]:
        return [(state.value, capfirst(state.label)) for state in states(self._target)]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any] | None:
        chosen = [state for state in states(self._target) if state.value == self.value()]
        return queryset.filter(condition(self._target, chosen[0])) if chosen else queryset


def _target_of(model_admin: admin.ModelAdmin[Any]) -> Target:
    if isinstance(model_admin, DeactivatableAdminMixin):
        return model_admin.deactivation_target
    return services.target_for(model_admin.model)


class DeactivatableAdminMixin(_ModelAdmin):
    """Mix into a ``ModelAdmin``: the state at a glance, and actions to take the selected objects
    out of scheduling and back.

    "Re-activate selected" and "Deactivate selected" go through :func:`services.reactivate
    <celery_deactivate.services.reactivate>` and :func:`services.deactivate
    <celery_deactivate.services.deactivate>`, object by object, so they write the same fields and
    send the same signals as the task.  They need the model's *change* permission: a user who may
    only view the model neither sees them nor can run them.  They are added to the class's own
    ``actions`` (and Django's site-wide actions such as "Delete selected" stay); ``actions = None``
    still turns every action off.  Each object an action changes gets an entry in the admin's
    history (``LogEntry``, through ``log_change()``): who, when and what.

    The library's fields (every role of :data:`~celery_deactivate.target.ROLES` the model has)
    are read-only in the change form, besides the class's own ``readonly_fields``: ticking
    ``active`` there would skip the services (no signal, no beat rows re-enabled).  One of them
    in ``list_editable`` is the system check error ``celery_deactivate.E005``.

    The columns ``deactivation_state`` (an icon and the state's name) and
    ``deactivation_message`` (the error's first line, shortened; its head on hover) and
    the :class:`DeactivationStateFilter` can be named in ``list_display`` / ``list_filter``.
    """

    #: Field names by role, as the task's ``deactivate_fields`` option (``None``: the defaults).
    deactivate_fields: Mapping[str, str | None] | None = None

    #: Characters of the error message the ``deactivation_message`` column shows.
    deactivation_message_length: int = 80

    #: Characters of the error message in the column's tooltip (the change page shows it all):
    #: a changelist of 100 rows stays small whatever the errors.
    deactivation_message_title_length: int = 1000

    def __init__(self, model: type[Model], admin_site: admin.AdminSite) -> None:
        super().__init__(model, admin_site)
        # Fail at start-up, naming model and field, when deactivate_fields does not fit the model.
        services.target_for(model, self.deactivate_fields)
        if self.actions is not None:
            own = {getattr(action, "__name__", action) for action in self.actions}
            self.actions = [
                *self.actions,
                *(name for name in DEACTIVATION_ACTIONS if name not in own),
            ]

    @property
    def deactivation_target(self) -> Target:
        """The model and its deactivation fields by role (after ``deactivate_fields``)."""
        return services.target_for(self.model, self.deactivate_fields)

    def get_readonly_fields(
        self, request: HttpRequest, obj: Model | None = None
    ) -> tuple[str, ...]:
        """The class's ``readonly_fields``, the library's fields, the ``deactivation_state`` and,
        on a change page, the ``deactivation_history``."""
        fields = tuple(super().get_readonly_fields(request, obj))
        history = ("deactivation_history",) if obj is not None else ()
        ours = ("deactivation_state", *history, *self.deactivation_target.recorded())
        return fields + tuple(name for name in ours if name not in fields)

    def check(self, **kwargs: Any) -> list[checks.CheckMessage]:
        """Django's checks of the class, and ``celery_deactivate.E005`` for a field of the library
        in ``list_editable`` (the changelist would write it, skipping the services)."""
        errors = list(super().check(**kwargs))
        ours = set(self.deactivation_target.recorded())
        errors += [
            checks.Error(
                f"{type(self).__qualname__}.list_editable names {name!r}, a field "
                f"celery-deactivate records on {self.model._meta.label}",
                hint="Remove it: the state changes through the actions, which send the signals.",
                obj=type(self),
                id="celery_deactivate.E005",
            )
            for name in self.list_editable
            if name in ours
        ]
        return errors

    # ---- actions -------------------------------------------------------------------------------

    @admin.action(
        permissions=["change"],
        description=_("Re-activate selected %(verbose_name_plural)s"),
    )
    def reactivate_selected(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        """Make the selected inactive objects active again, clearing their error and count."""
        self._change_each(request, queryset, services.reactivate, *_REACTIVATED)

    @admin.action(
        permissions=["change"],
        description=_("Deactivate selected %(verbose_name_plural)s"),
    )
    def deactivate_selected(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        """Take the selected active objects out of scheduling (deactivated by hand, no error),
        and turn off the probes of those a failure deactivated."""
        self._change_each(request, queryset, services.deactivate, *_DEACTIVATED)

    def _change_each(
        self,
        request: HttpRequest,
        queryset: QuerySet[Any],
        change: Callable[..., Model | None],
        done: StrOrPromise,
        left: StrOrPromise,
    ) -> None:
        """Apply a service function to each selected object, log each change in the admin's
        history, and say how many it changed.

        What changed is reported at SUCCESS; what was left alone at INFO beside it, at WARNING
        when nothing changed.  ``done`` and ``left`` are plural forms (``ngettext_lazy`` on
        ``"count"``) with ``%(name)s`` / ``%(names)s`` for the model's verbose names.
        """
        target = self.deactivation_target
        changed = unchanged = 0
        for pk, was_active in list(queryset.values_list("pk", target.active)):
            instance = change(self.model, pk, fields=self.deactivate_fields, by=request.user)
            if instance is None:
                unchanged += 1
                continue
            changed += 1
            self.log_change(request, instance, _history(target, instance, was_active))
        opts = self.model._meta
        names = {"name": opts.verbose_name, "names": opts.verbose_name_plural}
        if changed:
            self.message_user(request, done % {"count": changed, **names}, messages.SUCCESS)
        if unchanged:
            level = messages.INFO if changed else messages.WARNING
            self.message_user(request, left % {"count": unchanged, **names}, level)

    # ---- columns -------------------------------------------------------------------------------

    @admin.display(description=_("state"))
    def deactivation_state(self, obj: Model) -> SafeString:
        """The object's state: one of the admin's icons and the state's name (on one line, with
        the admin's own ``nowrap`` class)."""
        target = self.deactivation_target
        state = state_of(target, obj)
        extra = detail(target, obj)
        return format_html(
            '<span class="nowrap"><img src="{}" alt="" width="13" height="13"> {}{}</span>',
            static(f"admin/img/{ICONS[state]}"),
            capfirst(state.label),
            f" ({extra})" if extra else "",
        )

    @admin.display(description=_("history"))
    def deactivation_history(self, obj: Model) -> SafeString:
        """The object's newest events, with a link to all of them (name it in ``fieldsets``)."""
        return _history_admin.history_table(self.admin_site, obj)

    @admin.display(description=_("error"))
    def deactivation_message(self, obj: Model) -> SafeString | str:
        """The error message's first line, shortened; its head as the tooltip (at most
        ``deactivation_message_title_length`` characters)."""
        field = self.deactivation_target.error_message
        text = str(getattr(obj, field) or "").strip() if field else ""
        if not text:
            return ""
        title = _errors.cut(text, self.deactivation_message_title_length)
        first = Truncator(title.splitlines()[0]).chars(self.deactivation_message_length)
        return format_html('<span title="{}">{}</span>', title, first)


class DeactivatableAdmin(DeactivatableAdminMixin, _ModelAdmin):
    """A ready ``ModelAdmin`` for a deactivatable model (register it yourself): the mixin (its
    actions, history entries and read-only fields) and the list defaults.

    Unless the class sets them: the changelist shows the object, its state, when it was
    deactivated and its error (``list_display``) and filters by state (``list_filter``).  Always:
    the error message is searched besides ``search_fields``; the change page shows the library's
    fields, the full error included, in a "Deactivation" section (unless the class sets
    ``fieldsets``).
    """

    list_filter = (DeactivationStateFilter,)

    def get_list_display(self, request: HttpRequest) -> tuple[Any, ...]:
        """The class's ``list_display``, or: the object, state, deactivated at, error."""
        if tuple(self.list_display) != DJANGO_LIST_DISPLAY:
            return tuple(super().get_list_display(request))
        target = self.deactivation_target
        return (
            "__str__",
            "deactivation_state",
            *([target.deactivated_at] if target.deactivated_at else []),
            *(["deactivation_message"] if target.error_message else []),
        )

    def get_search_fields(self, request: HttpRequest) -> tuple[str, ...]:
        """The class's ``search_fields`` and the error message."""
        fields = tuple(super().get_search_fields(request))
        message = self.deactivation_target.error_message
        if message and not any(_field_of(lookup) == message for lookup in fields):
            fields += (message,)
        return fields

    def get_fieldsets(
        self, request: HttpRequest, obj: Model | None = None
    ) -> tuple[tuple[StrOrPromise | None, Any], ...]:
        """The class's ``fieldsets``, or the model's own fields and then a "Deactivation" section
        (state, deactivated at, failure count, the full error) on the change page."""
        if self.fieldsets:
            return tuple(super().get_fieldsets(request, obj))
        target = self.deactivation_target
        ours = {"deactivation_state", "deactivation_history", *target.recorded()}
        own = {"fields": tuple(f for f in _flat(self.get_fields(request, obj)) if f not in ours)}
        if obj is None:
            return ((None, own),)
        shown = (
            "deactivation_state",
            *(name for name in (target.deactivated_at, target.failure_count) if name),
            *([target.error_message] if target.error_message else []),
        )
        history = (_("History"), {"fields": ("deactivation_history",)})
        return ((None, own), (_("Deactivation"), {"fields": shown}), history)


def _history(target: Target, instance: Model, was_active: bool) -> str:
    """What an action did to one object, for its history: "Re-activated.", "Deactivated by
    hand.", or, for an object a failure had deactivated, its probes turned off."""
    state = state_of(target, instance)
    if state is State.ACTIVE:
        return gettext("Re-activated.")
    if was_active:
        return f"{capfirst(state.label)}."
    return gettext("Cool-down probes turned off; still %(state)s.") % {"state": state.label}


def _flat(fields: Sequence[Any]) -> list[str]:
    """Field names of ``get_fields``, with the names grouped on one line taken apart."""
    return [
        name for field in fields for name in ([field] if isinstance(field, str) else list(field))
    ]


def _field_of(lookup: str) -> str:
    """The field a ``search_fields`` entry searches: ``"^title"`` and ``"title__iexact"``
    search ``title``."""
    return lookup.lstrip("^=@").split("__", 1)[0]


admin.site.register(HistoryEvent, _history_admin.HistoryEventAdmin)


@admin.register(TaskStatus)
class TaskStatusAdmin(_status.TaskStatusAdmin):
    """The status page of the deactivating tasks."""
