"""What differs between the supported databases (issue #19, docs/versions.md): each test runs on
the database of the run (``DATABASE_URL``: PostgreSQL, MySQL or MariaDB; SQLite without one),
and those of one family only say so in their skip reason."""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from io import StringIO
from typing import Any

import pytest
from billiard.exceptions import WorkerLostError
from celery import Celery, states
from django.apps import apps
from django.core import checks
from django.core.management import call_command
from django.db import OperationalError, connection, transaction
from django.db.backends.signals import connection_created

from celery_deactivate import _transaction, maintain_entry, request
from celery_deactivate.models import TaskFailure
from tests.testapp import tasks
from tests.testapp.models import Feed, NarrowFeed

pytestmark = pytest.mark.django_db(transaction=True)

needs_mysql = pytest.mark.skipif(
    connection.vendor != "mysql", reason="a column's character set: MySQL and MariaDB"
)

# -- item 2: a 4-byte character in a 3-byte column ------------------------------------------------

#: The text columns put in utf8mb3, as in a table created before utf8mb4 was MySQL's default.
NARROWED = {
    NarrowFeed._meta.db_table: {"error_message": "longtext"},
    TaskFailure._meta.db_table: {
        "error": "longtext",
        "traceback": "longtext",
        "object_repr": "varchar(200)",
    },
}


def charsets(table: str) -> dict[str, tuple[str, str]]:
    """``column -> (character set, collation)`` of ``table``'s text columns."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT column_name, character_set_name, collation_name "
            "FROM information_schema.columns WHERE table_schema = DATABASE() "
            "AND table_name = %s AND character_set_name IS NOT NULL",
            [table],
        )
        return {name: (charset, collation) for name, charset, collation in cursor.fetchall()}


def convert(table: str, columns: dict[str, str], charsets: dict[str, tuple[str, str]]) -> None:
    changes = ", ".join(
        f"MODIFY {connection.ops.quote_name(column)} {kind} "
        f"CHARACTER SET {charsets[column][0]} COLLATE {charsets[column][1]} NOT NULL"
        for column, kind in columns.items()
    )
    with connection.cursor() as cursor:
        cursor.execute(f"ALTER TABLE {connection.ops.quote_name(table)} {changes}")


@pytest.fixture
def narrow_columns() -> Iterator[None]:
    """``NarrowFeed.error_message`` and the failure table's texts in utf8mb3 for the test."""
    before = {table: charsets(table) for table in NARROWED}
    narrow = ("utf8mb3", "utf8mb3_general_ci")
    try:
        for table, columns in NARROWED.items():
            convert(table, columns, dict.fromkeys(columns, narrow))
            assert {charsets(table)[column][0] for column in columns} == {"utf8mb3"}
        yield
    finally:
        for table, columns in NARROWED.items():
            convert(table, columns, before[table])


@needs_mysql
def test_a_4_byte_character_is_stored_replaced_in_a_utf8mb3_column(narrow_columns: None) -> None:
    # Given a failure whose text holds an emoji, on an object whose error column is utf8mb3
    narrow = NarrowFeed.objects.create(title="feed \U0001f525", behaviour="fail")
    wide = Feed.objects.create(title="feed \U0001f525", behaviour="fail")

    result = tasks.poll_narrow.apply((narrow.pk,))
    tasks.poll.apply((wide.pk,))

    # Then Celery got the exception as it was
    assert result.state == states.FAILURE
    assert str(result.result) == "feed \U0001f525 is broken"
    # And the failure is recorded, the emoji replaced where the column cannot hold it
    narrow.refresh_from_db()
    assert (narrow.active, narrow.error) == (False, True)
    assert narrow.error_message == "Boom: feed \ufffd is broken"
    failure = TaskFailure.objects.get(task=tasks.poll_narrow.name, object_pk=str(narrow.pk))
    assert (failure.error, failure.object_repr) == ("Boom: feed \ufffd is broken", "feed \ufffd")
    assert failure.traceback.endswith('raise Boom(f"{obj.title} is broken")')
    # And kept where it can (Feed's utf8mb4 column)
    wide.refresh_from_db()
    assert (wide.active, wide.error_message) == (False, "Boom: feed \U0001f525 is broken")


@needs_mysql
def test_a_deactivation_by_hand_with_a_4_byte_character(narrow_columns: None) -> None:
    narrow = NarrowFeed.objects.create(title="by hand")

    assert narrow.deactivate("quota exceeded \U0001f4b8") is True

    narrow.refresh_from_db()
    assert (narrow.active, narrow.error_message) == (False, "quota exceeded \ufffd")


# -- item 3: deactivate_crash_timeout bounds a lock wait ------------------------------------------

needs_row_locks = pytest.mark.skipif(
    connection.vendor not in ("postgresql", "mysql"),
    reason="row locks held by another connection: PostgreSQL, MySQL, MariaDB",
)


@needs_row_locks
def test_a_bounded_change_gives_up_on_a_locked_row_within_the_bound() -> None:
    # Given the row locked by another connection (an operator's transaction, a stuck body)
    feed = Feed.objects.create(title="locked elsewhere")
    locker = connection.copy()
    try:
        with locker.cursor() as cursor:
            cursor.execute("BEGIN")
            cursor.execute(
                f"SELECT id FROM {Feed._meta.db_table} WHERE id = %s FOR UPDATE", [feed.pk]
            )
            # When a change bounded to 1 s waits for it (the crash path's deactivate_crash_timeout)
            started = time.monotonic()
            bound = _transaction.bounded("default", 1.0)
            with pytest.raises(OperationalError), transaction.atomic(), bound:
                Feed.objects.filter(pk=feed.pk).update(active=False)
            waited = time.monotonic() - started
            cursor.execute("ROLLBACK")
    finally:
        locker.close()

    # Then it gave up after about the bound (InnoDB's default lock wait is 50 s), the row as it was
    assert 0.9 <= waited < 5.0, waited
    assert Feed.objects.get(pk=feed.pk).active is True


@needs_row_locks
def test_the_bound_ends_with_the_change() -> None:
    def lock_wait() -> object:
        with connection.cursor() as cursor:
            cursor.execute(
                "SHOW lock_timeout"
                if connection.vendor == "postgresql"
                else "SELECT @@SESSION.innodb_lock_wait_timeout"
            )
            return cursor.fetchone()[0]

    before = lock_wait()
    with transaction.atomic(), _transaction.bounded("default", 2.0):
        assert lock_wait() in ("2s", 2)
    assert lock_wait() == before != 2


# -- item 4: the library's migrations and models are clean on every backend ------------------------


def test_migrate_and_check_report_nothing_about_the_library(
    celery_app: Celery, conf: Callable[..., None]
) -> None:
    # Given the test project's app, current, with maintain in its beat schedule (else W002)
    celery_app.set_current()
    conf(beat_schedule={"celery-deactivate": maintain_entry(every=60)})
    # MariaDB and MySQL have no partial index: a conditional index was models.W037 on both.
    library = [apps.get_app_config("celery_deactivate")]
    assert checks.run_checks(app_configs=library, databases=["default"]) == []

    out, err = StringIO(), StringIO()
    call_command("migrate", "celery_deactivate", stdout=out, stderr=err, no_color=True)
    assert "No migrations to apply" in out.getvalue()
    assert err.getvalue() == ""  # no "System check identified some issues"
    # and the migrations hold the models as they are
    call_command("makemigrations", "celery_deactivate", check=True, dry_run=True, stdout=out)


# -- the crash tests on MariaDB: a fork waits while a crash recording sets up ---------------------


def fork_and_wait() -> tuple[float, int]:
    """Fork as the pool does; return how long the fork took and the child's exit code (3 if a
    recording of the parent's was still setting up there).  Python 3.12+ warns that a process
    with threads forks: that is what these tests do, as the worker's main process does."""
    started = time.monotonic()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "This process .* is multi-threaded", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        os._exit(3 if request._setting_up.threads else 0)
    took = time.monotonic() - started
    _, status = os.waitpid(pid, 0)
    return took, os.waitstatus_to_exitcode(status)


@contextmanager
def held_elsewhere(hold: Callable[[], Any]) -> Iterator[threading.Event]:
    """Run ``hold`` in a transaction of another connection (an operator's, a stuck body's), which
    stays open until the block ends or the event it yields is set."""
    held, release = threading.Event(), threading.Event()

    def holding() -> None:
        try:
            with transaction.atomic():
                hold()
                held.set()
                release.wait(30)
        finally:
            connection.close()

    holder = threading.Thread(target=holding)
    holder.start()
    try:
        assert held.wait(30)
        yield release
    finally:
        release.set()
        holder.join(30)


def test_a_fork_waits_while_a_crash_recording_connects() -> None:
    """The pool forks a child in place of the one that died while its crash is being recorded in
    a thread of the main process.  Forked while that thread connects (mysqlclient imports its
    connection module then, on the process's first connection), the child inherited the module's
    import lock, held by a thread it does not have, and hung at its first task (seen on MariaDB)."""
    feed = Feed.objects.create(title="crashed")
    connecting, go_on = threading.Event(), threading.Event()

    def slow_connect(sender: Any, connection: Any, **kwargs: Any) -> None:
        if threading.current_thread().name == "celery-deactivate-crash-while-connecting":
            connecting.set()
            go_on.wait(30)

    connection_created.connect(slow_connect)
    try:
        # Given a crash being recorded, its thread connecting
        recording, _ = request.record_in_thread(
            tasks.poll, WorkerLostError("lost"), feed.pk, "crash-while-connecting"
        )
        assert connecting.wait(30)
        threading.Timer(1.0, go_on.set).start()
        # When the process forks meanwhile
        took, exit_code = fork_and_wait()
    finally:
        go_on.set()
        connection_created.disconnect(slow_connect)
    recording.join(30)

    # Then the fork waited for the connection, and the child had no recording setting up
    assert took >= 0.9, took
    assert exit_code == 0
    feed.refresh_from_db()
    assert (feed.active, feed.failure_count) == (False, 1)
    assert "WorkerLostError" in feed.error_message


def test_a_crash_recording_whose_thread_cannot_start_leaves_no_fork_waiting(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    feed = Feed.objects.create(title="no thread")

    def cannot_start(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    # Given a process out of threads (its limit, its memory) as a crash is to be recorded
    monkeypatch.setattr(threading.Thread, "start", cannot_start)
    with caplog.at_level(logging.ERROR, logger="celery_deactivate"):
        recording = request.record_in_thread(
            tasks.poll, WorkerLostError("lost"), feed.pk, "no-thread"
        )
    monkeypatch.undo()

    # Then it is logged, not raised into Celery's failure handling, and no recording is setting
    # up: the next fork does not wait for one that never ran
    assert recording == (None, 0.0)
    assert "crash of tests.testapp.tasks.poll[no-thread]" in caplog.text
    assert "can't start new thread" in caplog.text
    assert not request._setting_up.threads
    took, exit_code = fork_and_wait()
    assert (took < 0.5, exit_code) == (True, 0)


@needs_row_locks
def test_a_fork_does_not_wait_for_a_crash_recording_waiting_for_a_row() -> None:
    feed = Feed.objects.create(title="locked elsewhere")

    with held_elsewhere(lambda: Feed.objects.select_for_update().get(pk=feed.pk)):
        # Given a crash being recorded, connected and waiting for the row
        recording, _ = request.record_in_thread(
            tasks.poll, WorkerLostError("lost"), feed.pk, "crash-on-a-locked-row"
        )
        deadline = time.monotonic() + 30
        while request._setting_up.threads and time.monotonic() < deadline:
            time.sleep(0.01)
        # When the process forks meanwhile
        took, exit_code = fork_and_wait()
        still_recording = recording.is_alive()
    recording.join(30)

    # Then the fork did not wait for the row (the consumer goes on), and the recording ended later
    assert still_recording
    assert took < 0.5, took
    assert exit_code == 0
    feed.refresh_from_db()
    assert (feed.active, feed.failure_count) == (False, 1)


@pytest.mark.skipif(connection.vendor != "sqlite", reason="SQLite: a library of the process")
def test_on_sqlite_a_fork_waits_for_the_whole_crash_recording() -> None:
    """SQLite runs in the worker's main process and holds mutexes of its own during a statement
    (those of its file locks, by file): a child forked while the recording's thread was in one
    inherited it held, and hung at its first connection, until its time limit killed it."""
    feed = Feed.objects.create(title="crashed")
    other = Feed.objects.create(title="written elsewhere")

    with held_elsewhere(lambda: Feed.objects.filter(pk=other.pk).update(polls=1)) as release:
        # Given a crash being recorded, set up and waiting inside SQLite for the write lock
        recording, _ = request.record_in_thread(
            tasks.poll, WorkerLostError("lost"), feed.pk, "crash-in-sqlite"
        )
        threading.Timer(1.0, release.set).start()
        # When the process forks meanwhile
        took, exit_code = fork_and_wait()
        recorded = not Feed.objects.get(pk=feed.pk).active  # committed before the fork went on
    recording.join(30)

    # Then the fork waited for the whole recording, and the child had none going on
    assert recorded
    assert took >= 0.9, took
    assert exit_code == 0
    feed.refresh_from_db()
    assert (feed.active, feed.failure_count) == (False, 1)


@pytest.mark.skipif(connection.vendor != "sqlite", reason="SQLite: a library of the process")
def test_on_sqlite_a_crash_recording_waits_for_the_write_lock_at_most_its_bound(
    conf: Callable[..., None], caplog: pytest.LogCaptureFixture
) -> None:
    """With ``"transaction_mode": "IMMEDIATE"`` the change's ``BEGIN`` waits for the write lock
    before its transaction's bound applies: the recording's connection is bounded as a whole."""
    conf(deactivate_crash_timeout=1.0)
    feed = Feed.objects.create(title="crashed")
    other = Feed.objects.create(title="written elsewhere")

    write_lock = held_elsewhere(lambda: Feed.objects.filter(pk=other.pk).update(polls=1))
    with write_lock, caplog.at_level(logging.ERROR, logger="celery_deactivate"):
        # Given a crash being recorded while another connection keeps the write lock
        recording, _ = request.record_in_thread(
            tasks.poll, WorkerLostError("lost"), feed.pk, "crash-on-a-locked-file"
        )
        # When the process forks meanwhile
        took, _ = fork_and_wait()
        recording.join(5)
        gave_up = not recording.is_alive()

    # Then each of the recording's lock waits gave up after its bound (1 s, not the connection's
    # 20 s: the guard's read, then the change), the fork's wait by its deadline (the bound + 1 s);
    # the failure is logged, the object as it was
    assert gave_up
    assert 0.9 <= took < 2.5, took
    assert "could not record the failure" in caplog.text
    assert Feed.objects.get(pk=feed.pk).active is True
