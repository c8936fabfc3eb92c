"""Issue #11 on real prefork workers: concurrency for every model shape, the library's own
statements failing, SQLite with two processes."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from celery import states
from celery.result import ResultSet
from django.db import connection, models, transaction

from tests.conftest import quoted, wait_for
from tests.testapp.models import Feed, KeyedFeed, ProxyFeed, SignalLog, SpecialFeed, UuidFeed

from .worker import ROOT, Meeting, Worker

pytestmark = [pytest.mark.crash, pytest.mark.django_db(transaction=True)]

TASKS = "tests.testapp.tasks."

needs_server = pytest.mark.skipif(
    connection.vendor not in ("postgresql", "mysql"),
    reason="row locks and server-side connection ends: a database server (the suite runs on "
    "SQLite)",
)


def lock_waiters() -> int:
    """Connections to this database waiting for a lock (polled from inside a transaction)."""
    with connection.cursor() as cursor:
        if connection.vendor == "mysql":
            # UPDATEs in flight: with the row locked, waiting (MariaDB does not list a
            # transaction that waits before its first write in information_schema.innodb_trx).
            cursor.execute(
                "SELECT count(*) FROM information_schema.processlist WHERE db = DATABASE() "
                "AND id <> CONNECTION_ID() AND command = 'Query' AND info LIKE 'UPDATE %'"
            )
        else:
            cursor.execute("SELECT pg_stat_clear_snapshot()")  # else cached for the transaction
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock'"
            )
        count: int = cursor.fetchone()[0]
        return count


def end_other_connections() -> None:
    """End every other connection to this database, as a server restart or failover does."""
    with connection.cursor() as cursor:
        if connection.vendor == "mysql":
            cursor.execute(
                "SELECT id FROM information_schema.processlist "
                "WHERE db = DATABASE() AND id <> CONNECTION_ID()"
            )
            for (other,) in cursor.fetchall():
                cursor.execute(f"KILL CONNECTION {int(other)}")
        else:
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )


# -- 4. two final failures arriving together, every model shape -------------------------------

SHAPES: dict[str, tuple[type[models.Model], str, dict[str, Any]]] = {
    "single table": (Feed, "poll", {}),
    "proxy": (ProxyFeed, "poll_proxy", {}),
    "multi-table child": (SpecialFeed, "poll_special", {}),
    "uuid key": (UuidFeed, "poll_uuid", {}),
    "string key": (KeyedFeed, "poll_keyed", {"key": "feed/1"}),
}


@needs_server
@pytest.mark.parametrize("shape", list(SHAPES))
def test_two_final_failures_arriving_together_deactivate_once(
    shared_worker: Worker, meeting: Meeting, shape: str
) -> None:
    model, task, extra = SHAPES[shape]
    obj = model.objects.create(title="contended", behaviour="fail_fast", **extra)
    pk = str(obj.pk) if shape == "uuid key" else obj.pk
    owner = model._meta.get_field("active").model
    # Given the row locked by another transaction, so that both failures wait at their update
    with transaction.atomic():
        owner._base_manager.select_for_update().get(pk=obj.pk)
        results = ResultSet([shared_worker.send(TASKS + task, pk) for _ in range(2)])
        wait_for(lambda: lock_waiters() >= 2)
    # When the lock goes, they record one after the other
    wait_for(results.ready)
    wait_for(lambda: SignalLog.objects.filter(feed_id=str(obj.pk)).exists())
    wait_for(lambda: meeting.mails())

    # Then the object is deactivated once: one signal, one mail, one failure counted
    assert [result.state for result in results] == [states.FAILURE, states.FAILURE]
    obj.refresh_from_db()
    assert (obj.active, obj.failure_count) == (False, 1)
    logged = list(SignalLog.objects.filter(feed_id=str(obj.pk)).values_list("signal", flat=True))
    assert logged == ["object_deactivated"]
    mails = [mail for mail in meeting.mails() if str(obj.pk) in mail]
    assert len(mails) == 1, meeting.mails()


# -- 5. the library's own statement fails ----------------------------------------------------


@needs_server
def test_a_dropped_connection_is_not_the_object_s_fault(meeting: Meeting) -> None:
    # A worker that keeps its connections between tasks (CELERY_DB_REUSE_MAX), as in production
    feed = Feed.objects.create(title="innocent")
    with Worker(meeting, "reuse", queue="reuse", env={"DB_REUSE_MAX": "100"}) as worker:
        warm = worker.send(TASKS + "poll", feed.pk)
        wait_for(warm.ready)
        assert warm.state == states.SUCCESS
        # Given the server ends every other connection (a restart, a failover, an idle timeout)
        end_other_connections()

        # When the next task's read before the body meets the dead connection
        failed = worker.send(TASKS + "poll", feed.pk)
        wait_for(failed.ready)
        wait_for(lambda: "not counted against the object" in worker.log())
        # and the one after it gets a new connection
        again = worker.send(TASKS + "poll", feed.pk)
        wait_for(again.ready)

    # Then the task failed with the database's error, and the object is untouched
    assert failed.state == states.FAILURE
    assert type(failed.result).__name__ in {"OperationalError", "InterfaceError"}
    assert again.state == states.SUCCESS
    feed.refresh_from_db()
    assert (feed.active, feed.error, feed.failure_count, feed.polls) == (True, False, 0, 2)
    assert f"testapp.Feed pk={feed.pk}: the library's own read failed" in worker.log()
    assert meeting.mails_about(feed.pk) == []


# -- 6. SQLite with two worker processes, Django's default settings ---------------------------


def test_sqlite_with_two_processes_adds_no_lock_failures(meeting: Meeting) -> None:
    folder = Path(tempfile.mkdtemp(prefix="celery-deactivate-sqlite-"))
    database = folder / "db.sqlite3"
    env = {
        "DATABASE_URL": "",  # SQLite, Django's default (deferred) transactions, 5 s busy timeout
        "TEST_DATABASE_NAME": str(database),
        "SQLITE_TRANSACTION_MODE": "DEFERRED",
        "SQLITE_TIMEOUT": "5",
    }
    subprocess.run(
        [sys.executable, "-m", "django", "migrate", "--run-syncdb", "-v", "0"],
        cwd=ROOT,
        env=meeting.env(**env),
        check=True,
    )
    feeds = 30
    with sqlite3.connect(database) as db:
        db.executemany(
            "INSERT INTO testapp_feed (title, behaviour, polls, note, active, error, "
            "error_message, failure_count) VALUES (?, 'ok', 0, '', 1, 0, '', 0)",
            [(f"feed {n}",) for n in range(feeds)],
        )
        pks = [row[0] for row in db.execute("SELECT id FROM testapp_feed")]
    with Worker(meeting, "sqlite", queue="sqlite", concurrency=2, env=env) as worker:
        # When 150 tasks whose body writes first run on 30 objects in two processes at once,
        # and as many of the same body in a plain transaction.atomic() task
        sent = {
            name: ResultSet([worker.send(TASKS + name, pks[n % feeds]) for n in range(150)])
            for name in ("bump", "bump_plain")
        }
        for results in sent.values():
            wait_for(results.ready, timeout=120, interval=0.2)

    # Then neither failed, and no object was deactivated
    failures = {
        name: [str(result.result) for result in results if result.state != states.SUCCESS]
        for name, results in sent.items()
    }
    assert failures == {"bump": [], "bump_plain": []}
    with sqlite3.connect(database) as db:
        inactive = db.execute("SELECT count(*) FROM testapp_feed WHERE active = 0").fetchone()
        polls = db.execute("SELECT sum(polls) FROM testapp_feed").fetchone()
    assert inactive == (0,)
    assert polls == (300,)
    if not os.environ.get("CRASH_KEEP"):
        database.unlink()


# -- issue #10: instrumentation sees the crash path's statements too -------------------------


def test_the_crash_handler_s_statements_go_through_django_s_cursor(meeting: Meeting) -> None:
    # Given a worker with an execute hook installed the way Sentry's integration installs its own
    hook_log = meeting.folder / "sql-hook.log"
    feed = Feed.objects.create(title="killed", behaviour="kill")
    with Worker(meeting, "hooked", queue="hooked", env={"SQL_HOOK_LOG": str(hook_log)}) as worker:
        # When the pool child dies under the body and the main process records the crash
        result = worker.send("tests.testapp.crash_tasks.crash", feed.pk)
        wait_for(result.ready)
        wait_for(lambda: not Feed.objects.get(pk=feed.pk).active)

    # Then the hook saw the main process's read and update of the row
    lines = hook_log.read_text().splitlines()
    main = [
        sql
        for process, _, sql in (line.partition("\t") for line in lines)
        if process == "MainProcess"
    ]
    update = f"UPDATE {quoted('testapp_feed')} SET {quoted('active')}"
    assert any(sql.startswith(update) for sql in main), main
    assert any(sql.startswith("SELECT") and "testapp_feed" in sql for sql in main), main
