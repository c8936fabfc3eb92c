"""The outage guard in the shapes users deploy (issue #17): a fresh worker right after a deploy,
pool children recycled by ``--max-tasks-per-child``, a child killed by SIGKILL.  Real prefork
workers, the guard's defaults but for ``deactivate_outage_objects`` where a test says so."""

from __future__ import annotations

from collections.abc import Callable

import django
import pytest
from django.db import connection
from django.db.models import Sum

from celery_deactivate import _store
from celery_deactivate.models import TaskRuns
from tests.conftest import mail_kinds, wait_for
from tests.testapp.models import Feed

from .conftest import state
from .test_outage import TASKS, logged, send_all
from .worker import Meeting, Worker

pytestmark = [pytest.mark.crash, pytest.mark.django_db(transaction=True)]

#: The library's default notice window (the crash tests' workers notify every deactivation).
DEFAULT_WINDOW = {"DEACTIVATE_NOTIFY_WINDOW": ""}


def table(count: int, behaviour: Callable[[int], str]) -> list[int]:
    """``count`` feeds in key order, feed ``n`` behaving as ``behaviour(n)`` says."""
    feeds = Feed.objects.bulk_create(
        Feed(title=f"feed {n}", behaviour=behaviour(n)) for n in range(count)
    )
    return [feed.pk for feed in feeds]


def counted(task: str) -> tuple[int, int]:
    """``(runs, failures)`` of ``task`` in the guard's table."""
    totals = TaskRuns.objects.filter(task=TASKS + task).aggregate(
        runs=Sum("runs"), failures=Sum("failures")
    )
    return int(totals["runs"] or 0), int(totals["failures"] or 0)


def test_a_fresh_worker_with_the_broken_objects_first_starts_no_outage(
    meeting: Meeting,
) -> None:
    # Given a worker started right after a deploy (nothing counted yet) and 300 objects whose
    # first 15 in key order are broken (5 %), sent in key order as dispatch_active() does,
    pks = table(300, lambda n: "fail" if n < 15 else "ok")
    with Worker(meeting, "fresh", queue="fresh", concurrency=2, env=DEFAULT_WINDOW) as worker:
        results = send_all(worker, "fresh", pks, timeout=180)

        # the broken objects are deactivated in the first round, and no outage started:
        assert sum(result.state == "FAILURE" for result in results.results) == 15
        assert set(Feed.objects.filter(active=False).values_list("pk", flat=True)) == set(pks[:15])
        assert logged("outage_started") == []
        assert logged("object_reactivated") == []
        # one notice at once (the first of a quiet period), the rest wait for the digest.
        wait_for(lambda: meeting.mails())
        assert mail_kinds(meeting.mails()) == ["deactivated"]
        assert "too few runs to judge" in worker.log()


def test_counts_survive_children_recycled_after_every_task(meeting: Meeting) -> None:
    # Given a worker whose children exit after each task, and 60 objects, every 20th broken,
    pks = table(60, lambda n: "fail" if n % 20 == 7 else "ok")
    args = ("--max-tasks-per-child=1",)
    with Worker(meeting, "recycled", queue="recycled", concurrency=2, args=args) as worker:
        send_all(worker, "recycled", pks, timeout=240)

        # every child wrote what it counted when it exited, successes and failures alike,
        wait_for(lambda: counted("recycled") == (60, 3), timeout=60)
    # so no outage started, and each broken object was deactivated on its own.
    assert logged("outage_started") == []
    assert Feed.objects.filter(active=False).count() == 3


def test_a_child_killed_by_sigkill_biases_the_rate_neither_way(meeting: Meeting) -> None:
    # Given one child that runs 10 failures, then 10 successes, then is killed by SIGKILL (as by
    # the OOM killer),
    behaviours = ["fail"] * 10 + ["ok"] * 10 + ["kill"]
    pks = table(len(behaviours), lambda n: behaviours[n])
    with Worker(meeting, "killed", queue="killed", concurrency=1) as worker:
        results = send_all(worker, "killed", pks).results
        # (the worker's main process records the crash at once: one run, one failure)
        wait_for(lambda: counted("killed")[1] >= 1)
    assert results[-1].state == "FAILURE"
    assert "WorkerLostError" in worker.log()

    # what the child lost, it lost of both kinds: the table holds the runs up to its last write,
    # in the order they ran (failures first), never the failures without the successes after.
    runs, failures = counted("killed")
    ran_for = (results[-2].date_done - results[0].date_done).total_seconds()
    if ran_for < _store.FLUSH_EVERY:  # no write was due before the kill: only the crash
        assert (runs, failures) == (1, 1)
    else:
        written = runs - 1
        assert failures - 1 == min(written, 10), (runs, failures)


@pytest.mark.parametrize("recycle", [(), ("--max-tasks-per-child=1",)], ids=["", "recycled"])
def test_crashes_are_recorded_through_djangos_connection_pool(
    meeting: Meeting, recycle: tuple[str, ...]
) -> None:
    if connection.vendor != "postgresql" or django.VERSION < (5, 1):
        pytest.skip("Django's connection pool: PostgreSQL and Django 5.1+")
    # Given a prefork worker on Django's connection pool, whose main process records each crash
    # while the pool forks a child in place of the one that died,
    feeds = Feed.objects.bulk_create(Feed(title=f"crash {n}", behaviour="kill") for n in range(4))
    env = {"DB_POOL": "1"}
    with Worker(meeting, "pooled", queue="pooled", concurrency=2, env=env, args=recycle) as worker:
        # every one of four crashes in a row is recorded (no connection crossed a fork).
        for feed in feeds:
            result = worker.send("tests.testapp.crash_tasks.crash", feed.pk)
            wait_for(result.ready, timeout=60)
            wait_for(lambda feed=feed: not state(feed)[0], timeout=30)
        assert worker.error_lines("celery_deactivate") == []
    assert Feed.objects.filter(active=False).count() == 4
