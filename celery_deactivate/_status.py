"""The admin's status page of the deactivating tasks: one row per task of the Celery app, for the
tasks whose model the user may view (or change).

Per task: its model; how many of its objects are in each state, and waiting for or running a
probe, each count a link to the model's changelist filtered by
:class:`~celery_deactivate.admin.DeactivationStateFilter` (``?deactivation=error``); the outage
guard's runs and failures in its current window; an open outage and since when; the
deactivations waiting for a digest; the next probes due; a chart of the model's deactivations and
re-activations per hour over the last 7 days (:mod:`celery_deactivate._chart`, from the history).

It is the changelist of :class:`~celery_deactivate.models.TaskStatus`, a proxy model without rows
of its own, registered by ``celery_deactivate.admin``: it has its place on the admin index and
its URL (``admin:celery_deactivate_taskstatus_changelist``) like any model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from django.contrib import admin
from django.db import router
from django.db.models import Count, Model, Q
from django.http import HttpRequest
from django.template.response import TemplateResponse
from django.urls import NoReverseMatch, reverse
from django.utils import timezone
from django.utils.safestring import SafeString

from . import _chart, _guard, _history, _store
from ._history_admin import ReadOnlyAdmin
from ._options import Options
from .checks import deactivating_tasks
from .states import State, condition, states

if TYPE_CHECKING:
    from .task import DeactivatingTask

#: The chart's span, in hours (7 days).
CHART_HOURS = 7 * 24
#: Probes due listed per task.
NEXT_PROBES = 3


@dataclass(frozen=True)
class Figure:
    """A count on the page, with the changelist it links to (``None``: no link)."""

    label: str
    value: int
    url: str | None = None
    key: str = ""


@dataclass
class TaskRow:
    name: str
    model: str
    figures: list[Figure] = field(default_factory=list)
    guard: dict[str, int] | None = None
    outage_since: datetime | None = None
    digest_pending: int = 0
    digest_due: datetime | None = None
    next_probes: list[tuple[datetime, str, str | None]] = field(default_factory=list)
    chart: SafeString | None = None


def may_view(request: HttpRequest, model: type[Model]) -> bool:
    """Whether the user may view (or change) ``model``'s objects."""
    opts = model._meta
    user = request.user
    return any(
        user.has_perm(f"{opts.app_label}.{action}_{opts.model_name}")
        for action in ("view", "change")
    )


def visible_tasks(request: HttpRequest) -> list[DeactivatingTask]:
    """The app's deactivating tasks (loaded as a worker loads them) whose model the user may
    view; a task that cannot be resolved is left out."""
    tasks = []
    for task in deactivating_tasks(load=True):
        try:
            model = task.target.model
        except Exception:  # misconfigured: manage.py check says why
            continue
        if may_view(request, model):
            tasks.append(task)
    return tasks


def changelist(site: admin.AdminSite, model: type[Model]) -> str | None:
    if not site.is_registered(model):
        return None
    opts = model._meta
    try:
        return reverse(
            f"admin:{opts.app_label}_{opts.model_name}_changelist", current_app=site.name
        )
    except NoReverseMatch:
        return None


def change_page(site: admin.AdminSite, model: type[Model], pk: Any) -> str | None:
    opts = model._meta
    if not site.is_registered(model):
        return None
    return reverse(
        f"admin:{opts.app_label}_{opts.model_name}_change", args=(pk,), current_app=site.name
    )


def task_row(task: DeactivatingTask, site: admin.AdminSite, now: datetime) -> TaskRow:
    """What the page shows of one task."""
    target = task.target
    model = target.model
    row = TaskRow(task.name, target.label)
    base = changelist(site, model)
    manager = model._base_manager.db_manager(router.db_for_write(model))
    shown = states(target)
    # Named apart from the model's fields (an aggregate may not be called "active").
    aggregates = {
        f"n_{state.value}": Count("pk", filter=condition(target, state)) for state in shown
    }
    inactive = Q(**{target.active: False})
    if target.probes:
        due = Q(
            **{f"{target.next_probe_at}__isnull": False, f"{target.probing_since}__isnull": True}
        )
        aggregates["n_probe_waiting"] = Count("pk", filter=inactive & due)
        aggregates["n_probe_running"] = Count(
            "pk", filter=inactive & Q(**{f"{target.probing_since}__isnull": False})
        )
    counts = manager.aggregate(**aggregates)
    for state in shown:
        url = f"{base}?deactivation={state.value}" if base else None
        count = counts[f"n_{state.value}"]
        row.figures.append(Figure(str(state.label), count, url, state.value))
    # An object waiting for its probe is deactivated (by error), one whose probe runs is probing.
    waiting = State.BY_ERROR if State.BY_ERROR in shown else State.DEACTIVATED
    for key, label, state in (
        ("probe_waiting", "waiting for a probe", waiting),
        ("probe_running", "probe running", State.PROBING),
    ):
        if f"n_{key}" in counts:
            url = f"{base}?deactivation={state.value}" if base else None
            row.figures.append(Figure(label, counts[f"n_{key}"], url, key))
    options = Options(task)
    using = _store.db()
    if options.records:
        task_state = _store.read_state(task.name, using, create=False)
        if task_state is not None:
            row.outage_since = task_state.outage_started_at
            row.digest_due = task_state.notify_until
        if options.guard_on:
            row.guard = dict(_guard.counts_now(task))
        from .models import TaskFailure

        row.digest_pending = (
            TaskFailure.objects.using(using).filter(task=task.name, notice_pending=True).count()
        )
    if target.probes:
        due = manager.filter(
            inactive,
            **{f"{target.next_probe_at}__isnull": False, f"{target.probing_since}__isnull": True},
        )
        for pk, when in due.order_by(str(target.next_probe_at)).values_list(
            "pk", str(target.next_probe_at)
        )[:NEXT_PROBES]:
            row.next_probes.append((when, str(pk), change_page(site, model, pk)))
    counts = _history.per_hour(model, now, CHART_HOURS)
    row.chart = _chart.svg(counts, _history.first_hour(now, CHART_HOURS), CHART_HOURS)
    return row


class TaskStatusAdmin(ReadOnlyAdmin):
    """The status page, as the changelist of the ``TaskStatus`` proxy: read-only, for staff
    users who may view the model of at least one deactivating task (a task's row shows only to
    those who may view its model).  Its counts name the states as the admin's filter does
    (:mod:`celery_deactivate.states`)."""

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return bool(request.user.is_active and request.user.is_staff and visible_tasks(request))

    def get_urls(self) -> list[Any]:
        from django.urls import path

        name = f"{self.opts.app_label}_{self.opts.model_name}_changelist"
        return [path("", self.admin_site.admin_view(self.changelist_view), name=name)]

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> TemplateResponse:
        from django.core.exceptions import PermissionDenied

        if not self.has_view_permission(request):
            raise PermissionDenied
        now = timezone.now()
        rows = [task_row(task, self.admin_site, now) for task in visible_tasks(request)]
        context = {
            **self.admin_site.each_context(request),
            "title": "Deactivating tasks",
            "subtitle": None,
            "opts": self.opts,
            "rows": rows,
            "now": now,
            "chart_days": CHART_HOURS // 24,
            **(extra_context or {}),
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(request, "admin/celery_deactivate/task_status.html", context)
