"""Issue 3, behaviour 6: concurrent workers end exactly where a sequential model says."""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass

import pytest
from celery.result import ResultSet
from django.db import connection
from django.db.models import Count

from tests.conftest import wait_for
from tests.testapp import crash_tasks
from tests.testapp.models import Feed, SignalLog

from .conftest import state
from .worker import Meeting, Worker

pytestmark = [pytest.mark.crash, pytest.mark.django_db(transaction=True)]

AFTER = 3  # deactivate_after of crash_tasks.mixed


@dataclass(frozen=True)
class Expected:
    polls: int
    failure_count: int
    active: bool
    counted: int  # failure_counted signals
    deactivated: int  # object_deactivated signals, and mails


def sequential_model(first_failure: int, initial_count: int, runs: int) -> Expected:
    """What ``runs`` messages of ``mixed`` do to one feed when they run one after the other."""
    polls, count, active, counted, deactivated = 0, initial_count, True, 0, 0
    for _ in range(runs):
        if not active:  # the body is skipped
            continue
        if polls < first_failure:
            polls, count = polls + 1, 0
        else:
            count += 1
            if count >= AFTER:
                active, deactivated = False, deactivated + 1
            else:
                counted += 1
    return Expected(polls, count, active, counted, deactivated)


def test_two_workers_match_the_sequential_model(meeting: Meeting) -> None:
    # Given a few hundred feeds that succeed until their n-th poll and then fail for good,
    # some with failures counted already,
    objects, runs = int(os.environ.get("CRASH_OBJECTS", 200)), 10
    rng = random.Random(6)
    plan = {}
    for index in range(objects):
        feed = Feed.objects.create(
            title=f"feed {index}", behaviour="mixed", failure_count=index % AFTER
        )
        plan[feed.pk] = (rng.randrange(0, runs + 3), index % AFTER)
    # each feed's messages in a row, so that both workers' children run the same feed at once,
    workers = [Worker(meeting, f"busy{number}", queue="busy", concurrency=2) for number in (1, 2)]
    try:
        for worker in workers:
            worker.start()
        started = time.monotonic()
        results = ResultSet(
            [
                workers[0].send("tests.testapp.crash_tasks.mixed", pk, first_failure)
                for pk, (first_failure, _) in plan.items()
                for _ in range(runs)
            ]
        )
        # When every message ran,
        wait_for(results.ready, timeout=120, interval=0.5)
        elapsed = time.monotonic() - started
    finally:
        for worker in workers:
            worker.stop()

    # then every feed is where the sequential model puts it, with as many signals and mails.
    signals = {
        (row["feed_id"], row["signal"]): row["n"]
        for row in SignalLog.objects.values("feed_id", "signal").annotate(n=Count("pk"))
    }
    mails: dict[int, int] = {}
    for message in meeting.mails():
        for pk in plan:
            if f"testapp.Feed pk={pk}\n" in message:
                mails[pk] = mails.get(pk, 0) + 1
    mismatches = []
    for feed in Feed.objects.filter(pk__in=plan):
        first_failure, initial = plan[feed.pk]
        expected = sequential_model(first_failure, initial, runs)
        actual = Expected(
            feed.polls,
            feed.failure_count,
            feed.active,
            signals.get((str(feed.pk), "failure_counted"), 0),
            signals.get((str(feed.pk), "object_deactivated"), 0),
        )
        if actual != expected or mails.get(feed.pk, 0) != expected.deactivated:
            mismatches.append((feed.pk, plan[feed.pk], expected, actual, mails.get(feed.pk, 0)))
        assert feed.error is (not expected.active)
    assert mismatches == [], mismatches[:5]
    deactivated = sum(not sequential_model(*plan[pk], runs).active for pk in plan)
    assert 0 < deactivated < len(plan)  # the plan really mixes outcomes
    print(f"{len(results)} tasks over {len(plan)} feeds in {elapsed:.1f}s")


@pytest.mark.skipif(
    connection.vendor == "sqlite",
    reason="SQLite: the body's open transaction blocks any concurrent writer until it ends",
)
@pytest.mark.parametrize("behaviour", ["wait_fail", "wait_kill"], ids=["body-raises", "sigkill"])
def test_concurrent_writer_keeps_its_change(shared_worker: Worker, behaviour: str) -> None:
    feed = Feed.objects.create(title="shared row", behaviour=behaviour, note="before")
    result = shared_worker.send("tests.testapp.crash_tasks.crash", feed.pk)
    wait_for(lambda: crash_tasks.started(result.id))

    # Another process changes another field while the task is failing.
    Feed.objects.filter(pk=feed.pk).update(note="written meanwhile")
    crash_tasks.go(result.id)

    wait_for(lambda: not state(feed)[0])
    assert state(feed) == (False, True, 1)
    assert feed.note == "written meanwhile"
