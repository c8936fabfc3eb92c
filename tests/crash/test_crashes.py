"""Issue 3, behaviours 1-3: crashes that kill the pool child count once, in the main process."""

from __future__ import annotations

import celery
import pytest
from billiard.exceptions import TimeLimitExceeded, WorkerLostError
from celery import states
from celery.exceptions import SoftTimeLimitExceeded

from tests.conftest import wait_for
from tests.testapp import crash_tasks
from tests.testapp.models import Feed

from .conftest import processes_of, signals_of, state
from .worker import Meeting, Worker

pytestmark = [pytest.mark.crash, pytest.mark.django_db(transaction=True)]

TASKS = "tests.testapp.crash_tasks."
#: How each kind of crash is provoked: (task without and with deactivate_after=2, behaviour).
CRASHES = {
    "sigkill": (TASKS + "crash", TASKS + "crash_after2", "kill"),
    "hard-time-limit": (TASKS + "timed", TASKS + "timed_after2", "sleep"),
}


def finished(result: object, timeout: float = 30.0) -> None:
    wait_for(result.ready, timeout=timeout)  # type: ignore[attr-defined]


# -- 1. a crash is one final failure ----------------------------------------------------------


@pytest.mark.parametrize(
    ("crash", "exception", "message"),
    [
        ("sigkill", WorkerLostError, "WorkerLostError: Worker exited prematurely"),
        ("hard-time-limit", TimeLimitExceeded, "TimeLimitExceeded: "),
    ],
)
def test_crash_deactivates_in_the_main_process(
    shared_worker: Worker,
    meeting: Meeting,
    crash: str,
    exception: type[BaseException],
    message: str,
) -> None:
    task, _, behaviour = CRASHES[crash]
    feed = Feed.objects.create(title="crashing", behaviour=behaviour)

    result = shared_worker.send(task, feed.pk)

    finished(result)
    assert result.state == states.FAILURE
    assert isinstance(result.result, exception)
    wait_for(lambda: not state(feed)[0])
    assert state(feed) == (False, True, 1)
    assert feed.error_message.startswith(message)
    assert feed.deactivated_at is not None
    assert feed.polls == 0  # the body's write died with it
    wait_for(lambda: meeting.mails_about(feed.pk))
    assert signals_of(feed) == [("object_deactivated", 1)]
    assert len(meeting.mails_about(feed.pk)) == 1
    log = shared_worker.log()
    assert f"testapp.Feed pk={feed.pk} deactivated after 1 failure(s)" in log
    assert processes_of(feed) == ["MainProcess"]
    assert shared_worker.ping()  # the worker lives on


def test_soft_time_limit_is_an_ordinary_failure(shared_worker: Worker, meeting: Meeting) -> None:
    feed = Feed.objects.create(title="slow", behaviour="sleep")

    result = shared_worker.send(TASKS + "crash_soft", feed.pk)

    finished(result)
    assert result.state == states.FAILURE
    assert isinstance(result.result, SoftTimeLimitExceeded)
    # Celery stores the result before it calls Task.on_failure: wait for the mail, sent last.
    wait_for(lambda: meeting.mails_about(feed.pk))
    assert state(feed) == (False, True, 1)
    assert feed.error_message.startswith("SoftTimeLimitExceeded")
    assert feed.polls == 0
    assert signals_of(feed) == [("object_deactivated", 1)]
    # Recorded by the child (Task.on_failure), like any exception of the body.
    assert processes_of(feed)[0].startswith("ForkPoolWorker")
    assert len(meeting.mails_about(feed.pk)) == 1


# -- 2. exactly once ------------------------------------------------------------------------------


@pytest.mark.parametrize("crash", sorted(CRASHES))
def test_one_crash_counts_once(shared_worker: Worker, meeting: Meeting, crash: str) -> None:
    _, task, behaviour = CRASHES[crash]
    feed = Feed.objects.create(title="crashing once", behaviour=behaviour)

    result = shared_worker.send(task, feed.pk)

    finished(result)
    assert result.state == states.FAILURE
    wait_for(lambda: signals_of(feed))
    # Every hook that could count it again has run once later tasks went through the worker.
    other = Feed.objects.create(title="after", behaviour="ok")
    for _ in range(2):
        finished(shared_worker.send(task, other.pk))
    assert state(feed) == (True, False, 1)
    assert signals_of(feed) == [("failure_counted", 1)]
    assert meeting.mails_about(feed.pk) == []

    # A second crash reaches deactivate_after=2.
    finished(shared_worker.send(task, feed.pk))
    wait_for(lambda: not state(feed)[0])
    assert state(feed) == (False, True, 2)
    wait_for(lambda: meeting.mails_about(feed.pk))
    assert signals_of(feed) == [("failure_counted", 1), ("object_deactivated", 2)]
    assert len(meeting.mails_about(feed.pk)) == 1


def test_main_process_does_not_deadlock_on_the_row_lock_of_the_dying_child(
    shared_worker: Worker, meeting: Meeting
) -> None:
    """Celery calls the hook before it kills the child, which holds ``SELECT ... FOR UPDATE``."""
    feed = Feed.objects.create(title="locker", behaviour="hold_lock")

    result = shared_worker.send(TASKS + "timed", feed.pk)

    wait_for(lambda: crash_tasks.started(result.id))
    finished(result)
    assert isinstance(result.result, TimeLimitExceeded)
    # Recorded once the child is gone, well within deactivate_crash_timeout (10 s), not on timeout.
    wait_for(lambda: not state(feed)[0], timeout=5)
    assert state(feed) == (False, True, 1)
    assert feed.title == "locker"  # the child's locked update was rolled back
    assert signals_of(feed) == [("object_deactivated", 1)]
    assert shared_worker.error_lines("could not record") == []
    assert shared_worker.ping()


# -- 3. no poison loop ----------------------------------------------------------------------------


def test_message_that_keeps_killing_its_worker_stops_coming_back(
    shared_worker: Worker, meeting: Meeting
) -> None:
    feed = Feed.objects.create(title="poison", behaviour="kill")

    result = shared_worker.send(TASKS + "crash_loop", feed.pk)

    # acks_late + reject_on_worker_lost requeue it after each crash; after deactivate_after=2
    # the redelivered message finds the object inactive: the body is skipped, the message acked.
    finished(result, timeout=60)
    assert result.state == states.SUCCESS
    assert result.result is None
    assert crash_tasks.runs(result.id) == 2
    assert state(feed) == (False, True, 2)
    assert signals_of(feed) == [("failure_counted", 1), ("object_deactivated", 2)]
    wait_for(lambda: meeting.mails_about(feed.pk))
    assert len(meeting.mails_about(feed.pk)) == 1


def test_retry_on_worker_lost_counts_only_the_exhausted_crash(
    shared_worker: Worker, meeting: Meeting
) -> None:
    if celery.VERSION < (5, 7):  # the task option exists from 5.7 on; older ones ignore it
        pytest.skip("retry_on_worker_lost needs Celery >= 5.7")
    feed = Feed.objects.create(title="retried", behaviour="kill")

    result = shared_worker.send(TASKS + "crash_retry", feed.pk)

    # max_retries=2: two crashes are retried without counting, the third is the final failure.
    wait_for(lambda: result.state == states.FAILURE, timeout=60)
    assert isinstance(result.result, WorkerLostError)
    assert crash_tasks.runs(result.id) == 3
    wait_for(lambda: not state(feed)[0])
    assert state(feed) == (False, True, 1)
    assert signals_of(feed) == [("object_deactivated", 1)]
    wait_for(lambda: meeting.mails_about(feed.pk))
    assert len(meeting.mails_about(feed.pk)) == 1
