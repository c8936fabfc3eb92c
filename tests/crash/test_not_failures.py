"""Issue 3, behaviour 4: revocations, shutdowns, ``Ignore`` and ``Reject`` never count."""

from __future__ import annotations

import signal

import celery
import pytest
from celery import states

from tests.conftest import wait_for
from tests.testapp import crash_tasks
from tests.testapp.models import Feed

from .conftest import signals_of, state
from .worker import Meeting, Worker

pytestmark = [pytest.mark.crash, pytest.mark.django_db(transaction=True)]

CRASH = "tests.testapp.crash_tasks.crash"  # deactivate_after=1: any count would deactivate


def assert_untouched(feed: Feed, meeting: Meeting, worker: Worker, polls: int = 0) -> None:
    assert state(feed) == (True, False, 0)
    assert feed.polls == polls
    assert feed.error_message == ""
    assert signals_of(feed) == []
    assert meeting.mails_about(feed.pk) == []
    assert worker.error_lines("celery_deactivate") == []


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGKILL"])
def test_revoke_terminate_is_not_a_failure(
    shared_worker: Worker, meeting: Meeting, signum: str
) -> None:
    feed = Feed.objects.create(title="revoked", behaviour="sleep")
    result = shared_worker.send(CRASH, feed.pk)
    wait_for(lambda: crash_tasks.started(result.id))

    meeting.client.control.revoke(result.id, terminate=True, signal=signum)

    wait_for(lambda: result.state == states.REVOKED)
    # The main process saw the child die and decided: not a failure of the object.
    wait_for(lambda: f"{result.id}] revoked, terminated or shut down" in shared_worker.log())
    assert_untouched(feed, meeting, shared_worker)
    assert shared_worker.ping()


def test_warm_shutdown_lets_the_task_finish_and_counts_nothing(meeting: Meeting) -> None:
    feed = Feed.objects.create(title="warm", behaviour="sleep_short", failure_count=0)
    with Worker(meeting, "warm") as worker:
        result = worker.send(CRASH, feed.pk)
        wait_for(lambda: crash_tasks.started(result.id))

        worker.send_signal(signal.SIGTERM)

        assert worker.wait_exit(timeout=30) is not None
        assert result.state == states.SUCCESS
        assert_untouched(feed, meeting, worker, polls=1)


@pytest.mark.parametrize("acks_late", [False, True], ids=["early-ack", "acks-late"])
def test_cold_shutdown_in_the_middle_of_a_task_counts_nothing(
    meeting: Meeting, acks_late: bool
) -> None:
    feed = Feed.objects.create(title="cold", behaviour="sleep")
    task = "tests.testapp.crash_tasks.crash_loop" if acks_late else CRASH
    with Worker(meeting, "cold") as worker:
        result = worker.send(task, feed.pk)
        wait_for(lambda: crash_tasks.started(result.id))

        worker.send_signal(signal.SIGQUIT)

        assert worker.wait_exit(timeout=30) is not None
        assert "Cold shutdown" in worker.log()
        assert result.state != states.SUCCESS
        if celery.VERSION >= (5, 7):  # earlier releases store FAILURE for the lost child
            assert result.state != states.FAILURE
        assert_untouched(feed, meeting, worker)


def test_ignore_is_not_a_failure(shared_worker: Worker, meeting: Meeting) -> None:
    feed = Feed.objects.create(title="ignored", behaviour="ignore")

    result = shared_worker.send(CRASH, feed.pk)

    wait_for(lambda: f"{result.id}] ignored" in shared_worker.log())
    assert result.state != states.FAILURE
    assert_untouched(feed, meeting, shared_worker)


def test_reject_requeue_is_not_a_failure(shared_worker: Worker, meeting: Meeting) -> None:
    feed = Feed.objects.create(title="rejected once", behaviour="reject_once")

    result = shared_worker.send("tests.testapp.crash_tasks.crash_requeue", feed.pk)

    # Rejected and requeued by its first run, it succeeds on the second.
    wait_for(lambda: result.state == states.SUCCESS)
    assert crash_tasks.runs(result.id) == 2
    assert_untouched(feed, meeting, shared_worker, polls=1)
