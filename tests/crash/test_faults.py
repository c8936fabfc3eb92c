"""Issue 3, behaviour 5: faults while deactivating never change what Celery sees.

The task's own exception reaches Celery unchanged, what was committed stays, and the fault is
logged at ERROR with the object's identity; the worker's main process is never stuck.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from billiard.exceptions import WorkerLostError
from celery import states
from celery.result import AsyncResult
from django.db import connection

from tests.conftest import wait_for
from tests.testapp import crash_tasks
from tests.testapp.models import Feed
from tests.testapp.tasks import Boom

from .conftest import signals_of, state
from .worker import Meeting, Worker

pytestmark = [pytest.mark.crash, pytest.mark.django_db(transaction=True)]

TASKS = "tests.testapp.crash_tasks."
#: A failure of the body (recorded by the child) and a crash (recorded by the main process).
FAILURES = {"body-raises": ("fail", Boom), "sigkill": ("kill", WorkerLostError)}

needs_postgresql = pytest.mark.skipif(
    connection.vendor != "postgresql",
    reason="the database made unreachable by the test (ALTER DATABASE ... ALLOW_CONNECTIONS "
    "false): PostgreSQL's; MySQL and MariaDB have no switch that refuses one database's "
    "connections, SQLite has no connection to refuse",
)


def identity(feed: Feed) -> str:
    return f"testapp.Feed pk={feed.pk}"


@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_raising_signal_receiver(shared_worker: Worker, meeting: Meeting, failure: str) -> None:
    behaviour, exception = FAILURES[failure]
    feed = Feed.objects.create(title="raise-in-receiver", behaviour=behaviour)

    result = shared_worker.send(TASKS + "crash", feed.pk)

    wait_for(result.ready)
    assert result.state == states.FAILURE
    assert type(result.result) is exception
    wait_for(lambda: shared_worker.error_lines("receiver", identity(feed)))
    assert state(feed) == (False, True, 1)  # the change commits whatever the receivers do
    # The receivers run in a savepoint of the change's transaction: one raised, so what the
    # others wrote (the SignalLog row) was rolled back with it.
    assert signals_of(feed) == []
    wait_for(lambda: meeting.mails_about(feed.pk))  # the notifier still ran
    assert len(meeting.mails_about(feed.pk)) == 1


def test_mail_server_down(meeting: Meeting) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Every deactivation is notified (no notice window): each notifier call fails and is logged.
    env = {"EMAIL_FILE_PATH": "", "EMAIL_PORT": str(port), "DEACTIVATE_NOTIFY_WINDOW": "0"}
    feeds = {
        name: Feed.objects.create(title=f"no mail {name}", behaviour=behaviour)
        for name, (behaviour, _) in FAILURES.items()
    }
    with Worker(meeting, "nomail", concurrency=2, env=env) as worker:
        results = {name: worker.send(TASKS + "crash", feed.pk) for name, feed in feeds.items()}

        for name, result in results.items():
            feed = feeds[name]
            wait_for(result.ready)
            assert result.state == states.FAILURE
            assert type(result.result) is FAILURES[name][1]
            wait_for(lambda feed=feed: worker.error_lines("notifier", identity(feed)))
            assert state(feed) == (False, True, 1)
            assert signals_of(feed) == [("object_deactivated", 1)]
        assert worker.ping()
    assert meeting.mails() == []


@contextmanager
def database_unreachable() -> Iterator[None]:
    """Refuse new connections to the test database and end the workers' open ones."""
    import psycopg

    settings = connection.settings_dict
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (own,) = cursor.fetchone()
    admin = psycopg.connect(
        dbname="postgres",
        user=settings["USER"],
        password=settings["PASSWORD"] or None,
        host=settings["HOST"],
        port=settings["PORT"],
        autocommit=True,
    )
    name = settings["NAME"]
    try:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> %s",
            [name, own],
        )
        yield
    finally:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        admin.close()


def run_while_unreachable(
    worker: Worker, task: str, feed: Feed, logged: Callable[[], Any]
) -> AsyncResult:
    """Send ``task`` on ``feed``, whose body waits for the go-ahead; let it carry on with the
    database unreachable, until its result is stored and ``logged`` holds."""
    result = worker.send(TASKS + task, feed.pk)
    wait_for(lambda: crash_tasks.started(result.id))
    with database_unreachable():
        crash_tasks.go(result.id)
        wait_for(result.ready)
        wait_for(logged)
    return result


@needs_postgresql
@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_database_unreachable_between_body_and_deactivation(
    shared_worker: Worker, meeting: Meeting, failure: str
) -> None:
    behaviour, exception = FAILURES[failure]
    feed = Feed.objects.create(title="db down", behaviour=f"wait_{behaviour}", note="kept")
    result = run_while_unreachable(
        shared_worker,
        "crash",
        feed,
        lambda: shared_worker.error_lines("could not record", identity(feed)),
    )

    # Celery got the body's own exception; nothing committed was lost, nothing was recorded.
    assert result.state == states.FAILURE
    assert type(result.result) is exception
    assert state(feed) == (True, False, 0)
    assert feed.note == "kept"
    assert signals_of(feed) == []
    # The worker carries on once the database is back.
    Feed.objects.filter(pk=feed.pk).update(behaviour="fail")
    after = shared_worker.send(TASKS + "crash", feed.pk)
    wait_for(after.ready)
    wait_for(lambda: not state(feed)[0])  # Celery stores the result before on_failure runs
    assert state(feed) == (False, True, 1)


@needs_postgresql
def test_a_failed_rollback_under_a_pass_object_body_names_the_object(
    shared_worker: Worker, meeting: Meeting
) -> None:
    # Given a body that was passed the instance and raises once the database is gone
    feed = Feed.objects.create(title="db down", behaviour="wait_fail")
    result = run_while_unreachable(
        shared_worker,
        "crash_object",
        feed,
        lambda: "the database failed at the rollback" in shared_worker.log(),
    )

    # Then Celery got the body's own exception, and the rollback's failure names the object
    assert type(result.result) is Boom
    assert f"crash_object on {identity(feed)}: the database failed at the rollback" in (
        shared_worker.log()
    )
    assert state(feed) == (True, False, 0)


@pytest.mark.skipif(
    connection.vendor not in ("postgresql", "mysql"),
    reason="row locks held by another connection: PostgreSQL, MySQL, MariaDB",
)
def test_main_process_waits_a_bounded_time_for_a_locked_row(
    shared_worker: Worker, meeting: Meeting
) -> None:
    """Someone else holds the row: the crash handler gives up after deactivate_crash_timeout."""
    feed = Feed.objects.create(title="locked elsewhere", behaviour="wait_kill")
    result = shared_worker.send(TASKS + "crash_bounded", feed.pk)
    wait_for(lambda: crash_tasks.started(result.id))

    locker = connection.copy()
    try:
        with locker.cursor() as cursor:
            cursor.execute("BEGIN")
            cursor.execute("SELECT id FROM testapp_feed WHERE id = %s FOR UPDATE", [feed.pk])
            crash_tasks.go(result.id)
            wait_for(result.ready)
            assert shared_worker.ping(timeout=1.0)  # the consumer is not blocked meanwhile
            wait_for(
                lambda: shared_worker.error_lines("could not record", identity(feed)), timeout=10
            )
            cursor.execute("ROLLBACK")
    finally:
        locker.close()

    assert isinstance(result.result, WorkerLostError)
    # the lock or statement timeout (PostgreSQL; MySQL or MariaDB)
    timeouts = ("canceling statement due to", "Lock wait timeout", "max_statement_time")
    assert any(timeout in shared_worker.log() for timeout in timeouts)
    assert state(feed) == (True, False, 0)
    assert signals_of(feed) == []
