"""OpenTelemetry metrics (issue #20, part A, item 4): the counters through real task runs, read
with the SDK's in-memory reader from a real ``MeterProvider`` set as the global one.

The global provider can be set once per process: the first test that asks sets it (for the rest
of the session); the reader takes deltas, so each test drains it first and sees its own counts.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from datetime import timedelta
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from django.contrib.auth.models import User
from django.core.management import call_command
from django.test import Client
from django.utils import timezone
from opentelemetry import metrics as otel
from opentelemetry.sdk.metrics import Counter, MeterProvider
from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader

from celery_deactivate import probes
from celery_deactivate.signals import object_reactivated
from celery_deactivate.tasks import maintain_guard
from tests.conftest import run_to_end, wait_for
from tests.testapp import outage_tasks, tasks
from tests.testapp.models import Feed

pytestmark = pytest.mark.django_db(transaction=True)

FEED = "testapp.Feed"
_reader: InMemoryMetricReader | None = None


class Counts:
    """What the counters counted since the test began, by name and attributes."""

    def __init__(self, reader: InMemoryMetricReader) -> None:
        self.reader = reader
        self.seen: dict[tuple[str, frozenset[tuple[str, Any]]], float] = {}

    def read(self) -> dict[tuple[str, frozenset[tuple[str, Any]]], float]:
        data = self.reader.get_metrics_data()
        for resource in data.resource_metrics if data else ():
            for scope in resource.scope_metrics:
                if scope.scope.name != "celery_deactivate":
                    continue
                for metric in scope.metrics:
                    for point in metric.data.data_points:
                        key = (metric.name, frozenset((point.attributes or {}).items()))
                        self.seen[key] = self.seen.get(key, 0) + point.value
        return self.seen

    def __call__(self, name: str, **attributes: str) -> float:
        """The count of ``name`` whose attributes include ``attributes`` (``task=``,
        ``model=``, ``cause=``, ``notice_kind=``), summed."""
        wanted = {
            f"celery_deactivate.{key.replace('notice_kind', 'notice.kind')}": value
            for key, value in attributes.items()
        }
        return sum(
            value
            for (metric, attrs), value in self.read().items()
            if metric == f"celery_deactivate.{name}" and wanted.items() <= dict(attrs).items()
        )

    def names(self) -> set[str]:
        return {metric for metric, _ in self.read()}


@pytest.fixture
def counts() -> Counts:
    global _reader
    if _reader is None:
        _reader = InMemoryMetricReader(
            preferred_temporality={Counter: AggregationTemporality.DELTA}
        )
        otel.set_meter_provider(MeterProvider(metric_readers=[_reader]))
    _reader.get_metrics_data()  # drain what earlier tests counted
    return Counts(_reader)


@pytest.fixture
def reactivated() -> Iterator[list[Any]]:
    calls: list[Any] = []
    object_reactivated.connect(lambda **kw: calls.append(kw), weak=False, dispatch_uid="met")
    yield calls
    object_reactivated.disconnect(dispatch_uid="met")


def test_failures_and_the_deactivation_they_cause(eager: Celery, counts: Counts) -> None:
    feed = Feed.objects.create(title="broken", behaviour="fail")
    name = tasks.poll_after3.name

    for _ in range(3):
        tasks.poll_after3.delay(feed.pk)

    assert counts("failures", task=name, model=FEED) == 3
    assert counts("deactivations", task=name, model=FEED, cause="failure") == 1
    assert counts("deactivations") == 1
    # The first deactivation of a quiet period is notified at once (the admins' mail).
    assert counts("notices.sent", task=name, notice_kind="deactivated") == 1
    assert counts("notices.failed") == 0
    # An inactive object is skipped: nothing more is counted.
    tasks.poll_after3.delay(feed.pk)
    assert counts("failures") == 3


def test_a_success_counts_nothing(eager: Celery, counts: Counts) -> None:
    feed = Feed.objects.create(title="fine")

    tasks.poll.delay(feed.pk)

    assert counts.names() == set()


def test_changes_by_hand_carry_who_asked(eager: Celery, counts: Counts) -> None:
    feed = Feed.objects.create(title="feed")
    client = Client()
    client.force_login(User.objects.create_superuser("ops", "ops@example.com", "secret"))

    def act(action: str) -> None:
        data = {"action": action, "_selected_action": [feed.pk]}
        assert client.post("/admin/testapp/feed/", data).status_code == 302

    assert feed.deactivate() is True
    assert feed.deactivate() is False  # no change: not counted
    act("reactivate_selected")
    act("reactivate_selected")  # active already: not counted
    act("deactivate_selected")
    call_command("deactivated", FEED, "--reactivate", str(feed.pk), stdout=StringIO())

    assert counts("deactivations", model=FEED, cause="code") == 1
    assert counts("deactivations", model=FEED, cause="admin") == 1
    assert counts("reactivations", model=FEED, cause="admin") == 1
    assert counts("reactivations", model=FEED, cause="command") == 1
    assert counts("deactivations") == counts("reactivations") == 2


def test_probes_sent_failed_and_succeeded(eager: Celery, counts: Counts) -> None:
    # Given a feed a failure deactivated, with cool-down probes on
    feed = Feed.objects.create(title="flaky", behaviour="fail")
    task = tasks.poll_cooldown
    task.delay(feed.pk)
    assert counts("deactivations", task=task.name, cause="failure") == 1

    # When its probe runs and fails (eager: the probe runs as it is sent)
    assert probes.maintain(eager, now=timezone.now() + timedelta(seconds=61)) == 1
    assert counts("probes.sent", task=task.name, model=FEED) == 1
    assert counts("probes.failed", task=task.name, model=FEED) == 1
    assert counts("failures") == 1  # the probe's failure is the probe's, not one more

    # and then, the upstream back, the next one succeeds
    Feed.objects.filter(pk=feed.pk).update(behaviour="ok")
    assert probes.maintain(eager, now=timezone.now() + timedelta(seconds=200)) == 1

    assert counts("probes.sent", task=task.name) == 2
    assert counts("probes.succeeded", task=task.name, model=FEED) == 1
    assert counts("reactivations", task=task.name, model=FEED, cause="probe") == 1
    feed.refresh_from_db()
    assert feed.active is True


def test_an_outage_started_and_ended(eager: Celery, counts: Counts, reactivated: list[Any]) -> None:
    task = outage_tasks.guarded_briefly
    down = [Feed.objects.create(title=f"feed {n}", behaviour="fail") for n in range(6)]

    # When every object fails: the guard trips, re-activating its first victims
    for feed in down:
        task.delay(feed.pk)

    assert counts("outages.started", task=task.name, model=FEED) == 1
    assert counts("notices.sent", task=task.name, notice_kind="outage_started") == 1
    assert reactivated, "the outage re-activated its victims"
    assert counts("reactivations", model=FEED, cause="outage") == len(reactivated)

    # When the upstream is back and the 3 s window has no failure: maintain ends it
    Feed.objects.update(behaviour="ok")
    wait_for(lambda: maintain_guard(eager)["outages_ended"], timeout=15)

    assert counts("outages.ended", task=task.name, model=FEED) == 1
    assert counts("notices.sent", task=task.name, notice_kind="outage_ended") == 1


def broken_notifier(**kwargs: Any) -> None:
    raise ConnectionRefusedError("the mail server is down")


def test_a_notice_the_notifier_failed_on(
    eager: Celery, counts: Counts, conf: Callable[..., None]
) -> None:
    conf(deactivate_notifier=broken_notifier, deactivate_notify_window=0)
    feed = Feed.objects.create(title="broken", behaviour="fail")

    tasks.poll.delay(feed.pk)

    assert counts("notices.failed", task=tasks.poll.name, notice_kind="deactivated") == 1
    assert counts("notices.sent") == 0


@pytest.mark.usefixtures("worker")
def test_counted_in_a_real_worker(counts: Counts) -> None:
    feed = Feed.objects.create(title="broken", behaviour="fail")

    run_to_end(tasks.poll, [(feed.pk,)])  # the failure recorded, its notice sent

    assert counts("deactivations", task=tasks.poll.name, model=FEED, cause="failure") == 1
    assert counts("failures", task=tasks.poll.name, model=FEED) == 1
    wait_for(lambda: counts("notices.sent", task=tasks.poll.name) == 1)


@pytest.mark.parametrize(
    ("setup", "api"),
    [
        # The [otel] extra not installed: the hooks return at once.
        ("sys.modules['opentelemetry'] = None", "False"),
        # The API installed, no SDK configured: the API's no-op instruments take the calls.
        ("", "True"),
    ],
    ids=["no-api", "no-sdk"],
)
def test_without_the_api_or_an_sdk_the_hooks_do_nothing(setup: str, api: str) -> None:
    script = textwrap.dedent(
        f"""
        import sys
        {setup}
        import django
        django.setup()
        from celery_deactivate import _metrics
        _metrics.add("celery_deactivate.failures", task="t", model="m")
        _metrics.notice("t", "deactivated", delivered=True)
        print(_metrics._otel is not None, "ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [api, "ok"]
