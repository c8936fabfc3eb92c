"""BEGIN sent with the first read of a task's transaction (PostgreSQL + psycopg 3).

The messages on the wire are read from libpq's protocol trace: one client ``Query`` message is
one round trip.  The fold must leave the transaction exactly as psycopg would have: open on the
server from the first query on, with the connection's isolation level, committed or rolled back
by Django.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import Celery
from django.db import ProgrammingError, connection, connections, transaction
from django.test import override_settings
from django.test.utils import CaptureQueriesContext

from celery_deactivate.begin import begin_statement, begin_with_next_query, fetch_one
from tests.testapp import tasks
from tests.testapp.models import Feed

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("unprepared"),  # the plain statements (test_prepare.py: prepared)
    pytest.mark.skipif(
        connection.vendor != "postgresql", reason="the fold is for PostgreSQL with psycopg 3"
    ),
]

STATE_SQL = 'SELECT "active" FROM "testapp_feed" WHERE "id" = %s'
INTRANS = 2  # psycopg.pq.TransactionStatus.INTRANS


def messages(run: Callable[[], Any], using: str = "default") -> list[str]:
    """The simple-protocol queries ``run`` sends on the wire, one per round trip."""
    from psycopg import pq

    connections[using].ensure_connection()
    pgconn = connections[using].connection.pgconn
    with tempfile.TemporaryFile("w+b") as trace:
        pgconn.trace(trace.fileno())
        pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)
        try:
            run()
        finally:
            pgconn.untrace()
        trace.seek(0)
        text = trace.read().decode()
    return re.findall(r'^F\t\d+\tQuery\t "(.*?)"$', text, flags=re.MULTILINE | re.DOTALL)


def recipe_body(pk: int) -> None:
    """What the recipe runs: the body (tasks.work) on its own object, in a transaction."""
    with transaction.atomic():
        tasks.work(Feed.objects.get(pk=pk))


def test_the_drop_in_task_makes_as_many_round_trips_as_the_recipe(eager: Celery) -> None:
    other, feed = Feed.objects.create(title="a"), Feed.objects.create(title="b")
    recipe = messages(lambda: recipe_body(other.pk))

    task = messages(lambda: tasks.poll.delay(feed.pk).get())

    assert recipe[0] == "BEGIN" and recipe[-1] == "COMMIT"
    assert len(task) == len(recipe)
    begin, read = task[0].split(";\n", 1)
    assert begin == begin_statement(connection.connection)
    assert read.startswith('SELECT "active", "failure_count" FROM "testapp_feed"')
    assert [m.split()[0] for m in task[1:]] == [m.split()[0] for m in recipe[1:]]
    assert Feed.objects.get(pk=feed.pk).polls == 1


def test_the_loaded_object_task_makes_one_round_trip_fewer(eager: Celery) -> None:
    other, feed = Feed.objects.create(title="a"), Feed.objects.create(title="b")
    recipe = messages(lambda: recipe_body(other.pk))

    task = messages(lambda: tasks.poll_object.delay(feed.pk).get())

    assert len(task) == len(recipe) - 1
    assert task[0].startswith(begin_statement(connection.connection) + ";\nSELECT")
    assert Feed.objects.get(pk=feed.pk).polls == 1


def test_the_option_turns_it_off(eager: Celery, conf: Callable[..., None]) -> None:
    conf(deactivate_fold_begin=False)
    feed = Feed.objects.create(title="a")

    task = messages(lambda: tasks.poll.delay(feed.pk).get())

    assert task[0] == "BEGIN" and task[1].startswith('SELECT "active"')


@pytest.mark.parametrize("where", ["task", "app", "django"])
def test_a_change_of_the_option_reaches_the_next_run(
    eager: Celery, conf: Callable[..., None], where: str
) -> None:
    # The hot path keeps the options it resolved while what they are resolved from is unchanged.
    feed = Feed.objects.create(title="a")

    def run() -> str:
        return messages(lambda: tasks.poll.delay(feed.pk).get())[0]

    assert run().startswith("BEGIN;")  # resolved, kept

    if where == "task":
        tasks.poll.deactivate_fold_begin = False
        try:
            changed = run()
        finally:
            del tasks.poll.deactivate_fold_begin
    elif where == "app":
        conf(deactivate_fold_begin=False)
        changed = run()
        conf(deactivate_fold_begin=True)
    else:
        with override_settings(CELERY_DEACTIVATE_FOLD_BEGIN=False):
            changed = run()

    assert changed == "BEGIN"
    assert run().startswith("BEGIN;")  # and back
    assert Feed.objects.get(pk=feed.pk).polls == 3


def test_django_s_query_log_records_the_read(eager: Celery) -> None:
    feed = Feed.objects.create(title="a")
    with CaptureQueriesContext(connection) as captured:
        tasks.poll.delay(feed.pk).get()
    logged = [q["sql"] for q in captured.captured_queries]
    assert any(sql.startswith("BEGIN") and '"failure_count"' in sql for sql in logged)


def test_an_execute_wrapper_sees_the_read(eager: Celery) -> None:
    feed = Feed.objects.create(title="a")
    seen: list[str] = []

    def spy(execute: Callable[..., Any], sql: str, *args: Any) -> Any:
        seen.append(sql)
        return execute(sql, *args)

    with connection.execute_wrapper(spy):
        wire = messages(lambda: tasks.poll.delay(feed.pk).get())

    assert seen[0].startswith('SELECT "active", "failure_count"')  # the wrapper sees the query
    assert wire[0].startswith("BEGIN") and '"failure_count"' in wire[0]  # still one message
    assert Feed.objects.get(pk=feed.pk).polls == 1


def xact_id() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_current_xact_id()::text::bigint")
        value: int = cursor.fetchone()[0]
        return value


@pytest.mark.parametrize("form", ["message", "wrapper"])
def test_the_block_is_one_transaction_that_commits(form: str) -> None:
    feed = Feed.objects.create(title="a")
    with transaction.atomic():
        if form == "message":
            assert fetch_one(connections["default"], STATE_SQL, [feed.pk], fold=True) == (True,)
        else:
            with begin_with_next_query("default", True):
                assert Feed.objects.get(pk=feed.pk).polls == 0
        assert connection.connection.pgconn.transaction_status == INTRANS
        first = xact_id()
        Feed.objects.filter(pk=feed.pk).update(polls=5)
        assert xact_id() == first
    assert xact_id() != first
    assert Feed.objects.get(pk=feed.pk).polls == 5
    # Django switched autocommit back on: its view and the driver's agree.
    assert connection.get_autocommit() and connection.connection.autocommit


def test_an_exception_rolls_the_block_back() -> None:
    feed = Feed.objects.create(title="a")

    def block() -> None:
        with transaction.atomic():
            fetch_one(connections["default"], STATE_SQL, [feed.pk], fold=True)
            Feed.objects.filter(pk=feed.pk).update(polls=5)
            raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        block()
    assert Feed.objects.get(pk=feed.pk).polls == 0
    with transaction.atomic():  # the next block starts as usual
        Feed.objects.filter(pk=feed.pk).update(polls=1)
    assert Feed.objects.get(pk=feed.pk).polls == 1


def test_a_failing_read_raises_django_s_error_and_rolls_back() -> None:
    feed = Feed.objects.create(title="a")
    with pytest.raises(ProgrammingError, match="no_such_table"), transaction.atomic():
        fetch_one(
            connections["default"], "SELECT * FROM no_such_table WHERE id = %s", [1], fold=True
        )
    assert connection.get_autocommit() and connection.connection.autocommit
    Feed.objects.filter(pk=feed.pk).update(polls=2)
    assert Feed.objects.get(pk=feed.pk).polls == 2


def test_the_message_inlines_parameters_as_the_wire_shows_them() -> None:
    """An integer key is written into the precomputed ASCII head; every other case takes
    psycopg's literals (quoting, escaped percent signs, non-ASCII names)."""
    feed = Feed.objects.create(title="a")
    sent = messages(lambda: fetch_one(connections["default"], STATE_SQL, [feed.pk]))
    assert sent == [STATE_SQL % feed.pk]
    escaped = 'SELECT 100 %% 7 AS "mod", %s::int'
    assert fetch_one(connections["default"], escaped, [5]) == (2, 5)
    assert messages(lambda: fetch_one(connections["default"], escaped, [5])) == [
        'SELECT 100 % 7 AS "mod", 5::int'
    ]
    non_ascii = "SELECT 'clé', %s::int"
    assert fetch_one(connections["default"], non_ascii, [7]) == ("clé", 7)
    assert fetch_one(connections["default"], "SELECT %s::bool", [True]) == (True,)


def test_a_missing_row_is_none_and_parameters_are_quoted() -> None:
    with transaction.atomic():
        assert fetch_one(connections["default"], STATE_SQL, [-1], fold=True) is None
    with transaction.atomic():
        assert fetch_one(connections["default"], "SELECT %s::text", ["it's 100%s"], fold=True) == (
            "it's 100%s",
        )


@pytest.fixture
def isolation() -> Iterator[Callable[..., None]]:
    connection.ensure_connection()
    raw = connection.connection
    saved = raw.isolation_level, raw.read_only

    def set_level(level: Any, read_only: bool | None = None) -> None:
        raw.isolation_level, raw.read_only = level, read_only

    yield set_level
    raw.isolation_level, raw.read_only = saved


@pytest.mark.parametrize("form", ["message", "wrapper"])
def test_the_connection_s_isolation_level_applies_from_the_first_query(
    isolation: Callable[..., None], form: str
) -> None:
    from psycopg import IsolationLevel

    feed = Feed.objects.create(title="a")
    isolation(IsolationLevel.REPEATABLE_READ, True)
    expected = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
    assert begin_statement(connection.connection) == expected

    def block() -> None:
        with transaction.atomic():
            if form == "message":
                fetch_one(connections["default"], STATE_SQL, [feed.pk], fold=True)
            else:
                with begin_with_next_query("default", True):
                    Feed.objects.get(pk=feed.pk)
            with connection.cursor() as cursor:
                cursor.execute("SELECT current_setting('transaction_isolation')")
                assert cursor.fetchone() == ("repeatable read",)
                cursor.execute("SHOW transaction_read_only")
                assert cursor.fetchone() == ("on",)

    assert messages(block)[0].startswith(expected + ";\nSELECT")


def not_folded(run: Callable[[], Any]) -> None:
    wire = messages(run)
    assert wire and not any(m.startswith("BEGIN") and ";" in m for m in wire)


def test_not_inside_an_outer_transaction() -> None:
    feed = Feed.objects.create(title="a")

    def nested() -> None:
        with transaction.atomic():
            Feed.objects.get(pk=feed.pk)
            with transaction.atomic():
                fetch_one(connections["default"], STATE_SQL, [feed.pk], fold=True)
                with begin_with_next_query("default", True):
                    Feed.objects.get(pk=feed.pk)

    not_folded(nested)


def test_not_outside_a_transaction() -> None:
    feed = Feed.objects.create(title="a")

    def autocommit() -> None:
        fetch_one(connections["default"], STATE_SQL, [feed.pk], fold=True)
        with begin_with_next_query("default", True):
            Feed.objects.get(pk=feed.pk)

    not_folded(autocommit)
    assert connection.connection.autocommit


@pytest.fixture
def server_side_binding() -> Iterator[None]:
    from django.db.backends.postgresql.base import ServerBindingCursor

    connection.ensure_connection()
    raw = connection.connection
    saved = raw.cursor_factory
    raw.cursor_factory = ServerBindingCursor
    yield
    raw.cursor_factory = saved


def test_the_wrapper_form_stays_off_with_server_side_binding(server_side_binding: None) -> None:
    feed = Feed.objects.create(title="a")

    def block() -> None:
        with transaction.atomic(), begin_with_next_query("default", True):
            Feed.objects.get(pk=feed.pk)

    not_folded(block)


def test_the_message_form_works_with_server_side_binding(server_side_binding: None) -> None:
    feed = Feed.objects.create(title="a")

    def block() -> None:
        with transaction.atomic():
            assert fetch_one(connections["default"], STATE_SQL, [feed.pk], fold=True) == (True,)
            Feed.objects.get(pk=feed.pk)

    assert messages(block)[0].startswith("BEGIN;\nSELECT")


def test_only_the_first_query_and_never_executemany() -> None:
    feed = Feed.objects.create(title="a")

    def executemany_first() -> None:
        with transaction.atomic(), begin_with_next_query("default", True):
            with connection.cursor() as cursor:
                cursor.executemany("SELECT %s", [(1,), (2,)])
            Feed.objects.get(pk=feed.pk)

    not_folded(executemany_first)

    def two_reads() -> None:
        with transaction.atomic(), begin_with_next_query("default", True):
            Feed.objects.get(pk=feed.pk)
            Feed.objects.get(pk=feed.pk)

    wire = messages(two_reads)
    assert [m.startswith("BEGIN") for m in wire] == [True, False, False]  # the last: COMMIT


def test_a_statement_in_autocommit_goes_alone_and_commits() -> None:
    feed = Feed.objects.create(title="a")
    update = 'UPDATE "testapp_feed" SET "polls" = %s WHERE "id" = %s RETURNING "polls"'

    wire = messages(lambda: fetch_one(connections["default"], update, [3, feed.pk]))

    assert wire == [update % (3, feed.pk)]
    assert Feed.objects.get(pk=feed.pk).polls == 3


def test_the_failure_write_is_one_message_and_a_wrapper_still_sees_it(eager: Celery) -> None:
    feed = Feed.objects.create(title="bad", behaviour="fail")
    wire = messages(lambda: tasks.poll.delay(feed.pk))
    assert wire[-1].startswith('UPDATE "testapp_feed"') and "RETURNING" in wire[-1]

    other = Feed.objects.create(title="bad", behaviour="fail")
    seen: list[str] = []

    def spy(execute: Callable[..., Any], sql: str, *args: Any) -> Any:
        seen.append(sql)
        return execute(sql, *args)

    with connection.execute_wrapper(spy):
        tasks.poll.delay(other.pk)
    assert seen[-1].startswith('UPDATE "testapp_feed"')
    assert not Feed.objects.get(pk=other.pk).active


def test_django_s_checks_run_first() -> None:
    from django.db.transaction import TransactionManagementError

    feed = Feed.objects.create(title="a")
    with transaction.atomic():
        fetch_one(connections["default"], STATE_SQL, [feed.pk], fold=True)
        transaction.set_rollback(True)
        with pytest.raises(TransactionManagementError):
            fetch_one(connections["default"], STATE_SQL, [feed.pk], fold=True)


def test_only_a_task_folds() -> None:
    """The option is a task's: a service called as the first statement of someone else's
    transaction leaves psycopg to send its own BEGIN."""
    from celery_deactivate import services

    feed = Feed.objects.create(title="a")

    def block() -> None:
        with transaction.atomic():
            services.deactivate(Feed, feed.pk)

    wire = messages(block)
    assert wire[0] == "BEGIN" and wire[1].startswith('UPDATE "testapp_feed"')
    assert Feed.objects.get(pk=feed.pk).active is False
