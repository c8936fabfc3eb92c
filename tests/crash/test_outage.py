"""The outage guard and the notice windows on two prefork workers × two children (issue #12): the
state is shared by four processes through the database."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

import pytest
from celery.result import ResultSet

from celery_deactivate.models import TaskFailure, TaskRuns
from tests.conftest import mail_kinds, wait_for
from tests.testapp.models import Feed, SignalLog

from .worker import Meeting, Worker

pytestmark = [pytest.mark.crash, pytest.mark.django_db(transaction=True)]

TASKS = "tests.testapp.outage_tasks."


@pytest.fixture(scope="module")
def workers(meeting: Meeting) -> Iterator[list[Worker]]:
    """Two prefork workers of two children each, consuming one queue, with the library's default
    notice window (the crash tests' workers notify every deactivation at once)."""
    env = {"DEACTIVATE_NOTIFY_WINDOW": ""}
    pair = [Worker(meeting, f"guard{n}", queue="outage", concurrency=2, env=env) for n in (1, 2)]
    try:
        for worker in pair:
            worker.start()
        yield pair
    finally:
        for worker in pair:
            worker.stop()


def send_all(worker: Worker, task: str, pks: list[int], timeout: float = 120) -> ResultSet:
    results = ResultSet([worker.send(TASKS + task, pk) for pk in pks])
    wait_for(results.ready, timeout=timeout, interval=0.2)
    return results


def table(count: int, broken: Any = lambda n: True, prefix: str = "feed") -> list[int]:
    Feed.objects.bulk_create(
        Feed(title=f"{prefix} {n}", behaviour="fail" if broken(n) else "ok") for n in range(count)
    )
    return list(Feed.objects.filter(title__startswith=f"{prefix} ").values_list("pk", flat=True))


def logged(signal: str) -> list[SignalLog]:
    return list(SignalLog.objects.filter(signal=signal).order_by("pk"))


def processes(restart: list[Worker]) -> set[str]:
    """The processes that wrote counts into the guard's table, once ``restart`` are restarted (as
    by a deploy): a process writes what it counted every 2 s of work and when it exits in order,
    and an idle one has nothing due."""
    for worker in restart:
        worker.stop()
        worker.start()
    return set(TaskRuns.objects.values_list("process", flat=True))


def test_a_burst_across_many_objects_trips_the_guard_and_leaves_every_object_active(
    workers: list[Worker], meeting: Meeting
) -> None:
    # Given 200 objects that all fail (the upstream is down), polled by four processes,
    pks = table(200)

    results = send_all(workers[0], "burst", pks)

    # Celery recorded every failure; the guard tripped once, whichever process saw it first,
    assert all(result.state == "FAILURE" for result in results.results)
    wait_for(lambda: logged("outage_started"))
    assert len(logged("outage_started")) == 1
    # no object is left deactivated (the victims were re-activated, one signal each) or counted,
    wait_for(lambda: not Feed.objects.filter(active=False).exists())
    deactivated = {row.feed_id for row in logged("object_deactivated")}
    reactivated = [row.feed_id for row in logged("object_reactivated")]
    assert 1 <= len(deactivated) <= 5 + 3  # the threshold, and at most one per other process
    assert sorted(reactivated) == sorted(deactivated)
    assert set(Feed.objects.values_list("failure_count", "error")) == {(0, False)}
    # one outage notice was mailed, not a mail per object,
    wait_for(lambda: "outage_started" in mail_kinds(meeting.mails()))
    # exactly: the outage notice, and the notice of the first deactivation of the quiet period
    # unless the outage re-activated that object before its failure was through,
    assert sorted(mail_kinds(meeting.mails())) in (
        ["deactivated", "outage_started"],
        ["outage_started"],
    )
    for worker in workers:
        assert "outage of tests.testapp.outage_tasks.burst" in worker.log() or any(
            "not deactivated nor counted" in line for line in worker.log().splitlines()
        )
    # and the four processes counted into the same table.
    assert len(processes(restart=workers)) >= 3


def test_a_broken_tenth_is_deactivated_object_by_object_without_an_outage(
    workers: list[Worker],
) -> None:
    # Given a healthy table of 200 objects, every tenth of them broken,
    pks = table(200, broken=lambda n: n % 10 == 4)
    broken = set(Feed.objects.filter(behaviour="fail").values_list("pk", flat=True))

    send_all(workers[1], "share", pks)

    # each broken object is deactivated, the healthy ones stay active, no outage.
    wait_for(
        lambda: Feed.objects.filter(active=False).count() == len(broken) or logged("outage_started")
    )
    assert [row.task_id for row in logged("outage_started")] == []
    assert set(Feed.objects.filter(active=False).values_list("pk", flat=True)) == broken
    assert len(logged("object_deactivated")) == 20
    assert len(processes(restart=workers)) >= 3


def test_recovery_sends_one_outage_ended(workers: list[Worker], meeting: Meeting) -> None:
    # Given an outage of the task (window: 4 s),
    pks = table(40)
    send_all(workers[0], "recovery", pks)
    wait_for(lambda: logged("outage_started"))

    # when the upstream is back and the task polls on while maintain runs on both workers,
    Feed.objects.update(behaviour="ok")
    deadline = time.monotonic() + 60
    rounds = 0
    while time.monotonic() < deadline and (rounds < 3 or not logged("outage_ended")):
        for worker in workers:
            worker.send("celery_deactivate.maintain")
        send_all(workers[rounds % 2], "recovery", pks)
        rounds += 1

    # the outage ended once, whichever process noticed it first, with one recovery notice;
    assert len(logged("outage_ended")) == 1, rounds
    wait_for(lambda: "outage_ended" in mail_kinds(meeting.mails()))
    assert mail_kinds(meeting.mails()).count("outage_ended") == 1
    assert len(logged("outage_started")) == 1
    # and the feeds poll again.
    assert Feed.objects.filter(active=True, polls__gt=0).count() == 40


def test_a_burst_of_500_deactivations_sends_a_few_mails_naming_every_object(
    workers: list[Worker], meeting: Meeting
) -> None:
    # Given 500 objects that break at once, without the guard, a notice window of 3 s,
    pks = table(500, prefix="storm")
    started = time.monotonic()

    send_all(workers[0], "storm", pks, timeout=300)
    took = time.monotonic() - started
    wait_for(lambda: Feed.objects.filter(active=False).count() == 500, timeout=60)

    # after the window, maintain sends what is left in one digest,
    def digests_sent() -> bool:
        workers[1].send("celery_deactivate.maintain")
        return not TaskFailure.objects.filter(notice_pending=True).exists()

    wait_for(digests_sent, timeout=60, interval=1.0)
    wait_for(lambda: sum(message.count("testapp.Feed pk=") for message in meeting.mails()) >= 500)

    # a bounded number of mails (the first at once, then one digest per window), naming each
    # object exactly once.
    mails = meeting.mails()
    assert mail_kinds(mails).count("deactivated") == 1
    assert len(mails) <= 2 + math.ceil(took / 3), (len(mails), took)
    assert len(mails) <= 12
    for pk in pks:
        assert (
            sum(f"testapp.Feed pk={pk} " in m or f"testapp.Feed pk={pk}\n" in m for m in mails) == 1
        )
    print(f"500 deactivations in {took:.1f}s: {len(mails)} mails")
