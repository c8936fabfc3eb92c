"""The admin's status page of the deactivating tasks (issue #20): its counts, links and
permissions, with the test client against the real admin (its chart in Chromium:
tests/test_admin_browser.py)."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
from celery import Celery
from django.utils import timezone

from celery_deactivate import _chart, _history, services
from celery_deactivate.models import HistoryEvent, TaskFailure, TaskState
from tests.conftest import staff_client as staff
from tests.testapp import tasks
from tests.testapp.models import Feed, Renamed

pytestmark = pytest.mark.django_db(transaction=True)

STATUS = "/admin/celery_deactivate/taskstatus/"


def row_of(response: Any, name: str) -> Any:
    return next(row for row in response.context["rows"] if row.name == name)


def figures(row: Any) -> dict[str, tuple[int, str | None]]:
    return {figure.key: (figure.value, figure.url) for figure in row.figures}


@pytest.fixture
def feeds(eager: Celery) -> dict[str, Feed]:
    """Two active feeds, one deactivated by a failure with a probe waiting, one by hand, one
    whose probe is out."""
    Feed.objects.create(title="a")
    Feed.objects.create(title="b")
    failed = Feed.objects.create(title="failed", behaviour="fail")
    tasks.poll_cooldown.delay(failed.pk)
    paused = Feed.objects.create(title="paused")
    services.deactivate(Feed, paused.pk)
    probing = Feed.objects.create(
        title="probing", active=False, error=True, probing_since=timezone.now()
    )
    return {"failed": failed, "paused": paused, "probing": probing}


def test_the_counts_of_each_task_link_to_the_filtered_changelist(feeds: dict[str, Feed]) -> None:
    response = staff("viewer", "view_feed").get(STATUS)

    assert response.status_code == 200
    row = row_of(response, tasks.poll_cooldown.name)
    assert row.model == "testapp.Feed"
    assert figures(row) == {
        "active": (2, "/admin/testapp/feed/?deactivation=active"),
        "probing": (1, "/admin/testapp/feed/?deactivation=probing"),
        "error": (1, "/admin/testapp/feed/?deactivation=error"),
        "hand": (1, "/admin/testapp/feed/?deactivation=hand"),
        "probe_waiting": (1, "/admin/testapp/feed/?deactivation=error"),
        "probe_running": (1, "/admin/testapp/feed/?deactivation=probing"),
    }
    failed = Feed.objects.get(pk=feeds["failed"].pk)
    assert row.next_probes == [
        (failed.next_probe_at, str(failed.pk), f"/admin/testapp/feed/{failed.pk}/change/")
    ]
    # The links filter: the changelist lists what the count says.
    client = staff("viewer2", "view_feed")
    for key, (value, url) in figures(row).items():
        if key in ("active", "error", "hand", "probing"):
            assert client.get(url).context["cl"].result_count == value, key
    html = response.content.decode()
    assert '<a class="figure" href="/admin/testapp/feed/?deactivation=hand">1</a>' in html


def test_the_guard_the_outage_and_the_digest(feeds: dict[str, Feed]) -> None:
    now = timezone.now()
    TaskState.objects.update_or_create(
        task=tasks.poll.name, defaults={"outage_started_at": now, "notify_until": now}
    )
    TaskFailure.objects.create(
        task=tasks.poll.name, object_pk="1", failed_at=now, notice_pending=True
    )

    response = staff("viewer", "view_feed").get(STATUS)

    row = row_of(response, tasks.poll.name)
    assert (row.outage_since, row.digest_pending, row.digest_due) == (now, 1, now)
    assert row.guard == {"runs": 0, "failures": 0, "objects": 1}
    quiet = row_of(response, tasks.poll_quiet.name)  # its own state: none
    assert (quiet.outage_since, quiet.digest_pending) == (None, 0)
    assert "open since" in response.content.decode()


def test_a_user_sees_only_the_tasks_of_the_models_they_may_view(feeds: dict[str, Feed]) -> None:
    names = {row.name for row in staff("viewer", "view_feed").get(STATUS).context["rows"]}
    assert tasks.poll.name in names and tasks.sync_renamed.name not in names

    renamed = staff("renamer", "view_renamed").get(STATUS)
    assert [row.name for row in renamed.context["rows"]] == [tasks.sync_renamed.name]
    assert "testapp.Feed" not in renamed.content.decode()

    nobody = staff("nobody")
    assert nobody.get(STATUS).status_code == 403
    assert STATUS not in nobody.get("/admin/").content.decode()
    assert STATUS in staff("viewer3", "view_feed").get("/admin/").content.decode()
    assert Renamed.objects.count() == 0


def test_nothing_to_add_change_or_delete(feeds: dict[str, Feed]) -> None:
    client = staff("viewer", "view_feed")
    assert client.get(f"{STATUS}add/").status_code == 404
    html = client.get("/admin/").content.decode()
    assert f'href="{STATUS}add/"' not in html


def test_the_chart_counts_the_history_per_hour(feeds: dict[str, Feed]) -> None:
    now = timezone.now()
    hour = now.replace(minute=30)

    def event(at: Any, kind: str) -> HistoryEvent:
        return HistoryEvent(at=at, kind=kind, model="testapp.Feed", object_pk="1", cause="hand")

    events = [event(hour - timedelta(hours=3), "deactivated") for _ in range(3)]
    events.append(event(hour - timedelta(hours=2), "reactivated"))
    events.append(event(now - timedelta(days=8), "deactivated"))  # older than the chart's 7 days
    HistoryEvent.objects.bulk_create(events)

    response = staff("viewer", "view_feed").get(STATUS)

    chart = str(row_of(response, tasks.poll.name).chart)
    bars = re.findall(r'data-kind="(\w+)" data-hour="([^"]+)" data-count="(\d+)"', chart)
    hour_of = lambda moment: moment.astimezone(_history.dt_timezone.utc).strftime("%Y-%m-%dT%H:00Z")  # noqa: E731
    deactivations_now = 1 + 1  # the fixture's: a failure, and by hand
    expected = {
        ("deactivated", hour_of(hour - timedelta(hours=3)), "3"),
        ("reactivated", hour_of(hour - timedelta(hours=2)), "1"),
        ("deactivated", hour_of(now), str(deactivations_now)),
    }
    assert set(bars) == expected
    assert "<title>" in chart and "var(--error-fg" in chart


def test_an_empty_chart_draws_no_bar() -> None:
    now = timezone.now()
    chart = str(_chart.svg({}, _history.first_hour(now, 168), 168))
    assert "<rect" not in chart and chart.startswith("<svg")
    # The legend, the scale, and a label per midnight in the span (the last one if it fits)
    assert "0 deactivated" in chart and "0 re-activated" in chart and "1/h" in chart
    assert 6 + 3 <= chart.count("<text") <= 7 + 3
