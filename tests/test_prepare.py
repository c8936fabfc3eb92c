"""The read before the body as a server-side prepared statement (PostgreSQL, psycopg 3).

On a direct connection the first folded read checks that the server is the one the connection
was opened to, the second prepares the statement, later ones only execute it; a statement
that cannot be used is sent again unprepared; the settings documented for transaction pooling
turn it off.  The messages are read from libpq's protocol trace (``test_begin.messages``).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from django.conf import settings
from django.db import connection, connections, transaction
from django.test import override_settings

from celery_deactivate.begin import begin_statement, fetch_one
from tests.test_begin import messages, recipe_body
from tests.testapp import tasks
from tests.testapp.models import Feed

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        connection.vendor != "postgresql", reason="prepared reads are for PostgreSQL"
    ),
]

STATE = 'SELECT "active", "failure_count" FROM "testapp_feed" WHERE "id" = '
NAME = r"celery_deactivate_[0-9a-f]{20}"


@pytest.fixture
def fresh() -> Iterator[None]:
    """A new connection for the test (what it prepared is gone with it afterwards)."""
    connection.close()
    yield
    connection.close()


def poll(feed: Feed, using: str = "default") -> list[str]:
    """The messages of one drop-in task on ``feed``, run eagerly on this thread's connection."""
    return messages(lambda: tasks.poll.delay(feed.pk).get(), using)


def begin() -> str:
    return begin_statement(connection.connection) + ";\n"


def backend_pid(database: Any) -> int:
    with database.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        pid: int = cursor.fetchone()[0]
        return pid


def prepared_statements() -> dict[str, str]:
    with connection.cursor() as cursor:  # statement: the text of the message that prepared it
        cursor.execute("SELECT name, statement FROM pg_prepared_statements")
        return dict(cursor.fetchall())


def test_the_read_is_checked_then_prepared_then_executed(eager: Celery, fresh: None) -> None:
    feeds = [Feed.objects.create(title=str(i)) for i in range(4)]
    recipe = messages(lambda: recipe_body(feeds[0].pk))

    wires = [poll(feed) for feed in feeds[1:]]

    first, second, third = (wire[0] for wire in wires)
    assert first == f"{begin()}SELECT pg_backend_pid();\n{STATE}{feeds[1].pk}"
    match = re.fullmatch(
        f"{re.escape(begin())}PREPARE ({NAME}) AS {re.escape(STATE)}\\$1;\n"
        f"EXECUTE ({NAME})\\({feeds[2].pk}\\)",
        second,
    )
    assert match and match[1] == match[2]
    assert third == f"{begin()}EXECUTE {match[1]}({feeds[3].pk})"
    assert all(len(wire) == len(recipe) for wire in wires)  # no round trip added, ever
    assert [Feed.objects.get(pk=feed.pk).polls for feed in feeds[1:]] == [1, 1, 1]
    assert f"PREPARE {match[1]} AS {STATE}$1;" in prepared_statements()[match[1]]


def test_the_prepared_read_sees_an_inactive_object(eager: Celery, fresh: None) -> None:
    warm, feed = Feed.objects.create(title="warm"), Feed.objects.create(title="off")
    poll(warm), poll(warm)  # checked, prepared
    Feed.objects.filter(pk=feed.pk).update(active=False)

    wire = poll(feed)

    assert re.fullmatch(f"{re.escape(begin())}EXECUTE {NAME}\\({feed.pk}\\)", wire[0])
    assert Feed.objects.get(pk=feed.pk).polls == 0  # the body did not run
    assert poll(warm)[0].startswith(begin() + "EXECUTE ")
    assert Feed.objects.get(pk=warm.pk).polls == 3


def test_the_loaded_object_read_is_prepared_too(eager: Celery, fresh: None) -> None:
    feed = Feed.objects.create(title="a")

    wires = [messages(lambda: tasks.poll_object.delay(feed.pk).get()) for _ in range(3)]

    assert wires[2][0].startswith(begin() + "EXECUTE celery_deactivate_")
    assert Feed.objects.get(pk=feed.pk).polls == 3


@pytest.mark.parametrize(
    ("break_it", "undo"),
    [
        ("DEALLOCATE ALL", None),  # the statement is gone
        (  # the table changed under the cached plan: 'cached plan must not change result type'
            "ALTER TABLE testapp_feed ALTER COLUMN failure_count TYPE bigint",
            "ALTER TABLE testapp_feed ALTER COLUMN failure_count TYPE integer",
        ),
    ],
    ids=["deallocated", "stale-plan"],
)
def test_an_unusable_statement_is_sent_again_unprepared(
    eager: Celery, fresh: None, caplog: pytest.LogCaptureFixture, break_it: str, undo: str | None
) -> None:
    feeds = [Feed.objects.create(title=str(i)) for i in range(4)]
    poll(feeds[0]), poll(feeds[1])  # checked, prepared
    with connection.cursor() as cursor:
        cursor.execute(break_it)
    try:
        with caplog.at_level(logging.INFO, logger="celery_deactivate"):
            wire = poll(feeds[2])
        after = poll(feeds[3])
    finally:
        if undo:
            with connection.cursor() as cursor:
                cursor.execute(undo)

    assert re.fullmatch(f"{re.escape(begin())}EXECUTE {NAME}\\({feeds[2].pk}\\)", wire[0])
    assert wire[1:3] == ["ROLLBACK", f"{begin()}{STATE}{feeds[2].pk}"]
    assert "prepared statements off for this connection" in caplog.text
    assert after[0] == f"{begin()}{STATE}{feeds[3].pk}"  # the connection prepares no more
    assert [Feed.objects.get(pk=feed.pk).polls for feed in feeds] == [1, 1, 1, 1]


@pytest.fixture(params=["prepare_threshold", "DISABLE_SERVER_SIDE_CURSORS"])
def pooled_settings(request: pytest.FixtureRequest) -> Iterator[None]:
    """The settings psycopg and Django document for a transaction pooler, on a new connection."""
    if request.param == "prepare_threshold":
        request.getfixturevalue("unprepared")  # OPTIONS: {"prepare_threshold": None}
        yield
        return
    config = connection.settings_dict
    saved = config.get("DISABLE_SERVER_SIDE_CURSORS")
    config["DISABLE_SERVER_SIDE_CURSORS"] = True
    connection.close()
    yield
    connection.close()
    config["DISABLE_SERVER_SIDE_CURSORS"] = saved


def test_the_pooler_settings_turn_it_off(eager: Celery, pooled_settings: None) -> None:
    feeds = [Feed.objects.create(title=str(i)) for i in range(3)]

    wires = [poll(feed) for feed in feeds]

    assert [wire[0] for wire in wires] == [f"{begin()}{STATE}{feed.pk}" for feed in feeds]
    assert not any(name.startswith("celery_deactivate_") for name in prepared_statements())


class ThroughThePooler:
    """A database router sending every query to the ``pooled`` alias (PgBouncer)."""

    def db_for_read(self, model: Any, **hints: Any) -> str:
        return "pooled"

    def db_for_write(self, model: Any, **hints: Any) -> str:
        return "pooled"


def pgbouncer(database: Any, **options: Any) -> Any:
    """A psycopg connection through the PgBouncer of ``database`` (another client)."""
    import psycopg

    config = database.settings_dict
    return psycopg.connect(host=config["HOST"], port=config["PORT"], user=config["USER"], **options)


@pytest.fixture
def pooled() -> Iterator[Any]:
    """The test database through PgBouncer (transaction pooling); its server connections are
    closed afterwards, so that the test database can be dropped."""
    database = connections["pooled"]
    database.close()
    yield database
    database.close()
    name = database.settings_dict["NAME"].encode()
    with pgbouncer(database, dbname="pgbouncer", autocommit=True) as admin:
        for command in (b"KILL ", b"RESUME "):  # the admin console takes simple queries only
            admin.pgconn.exec_(command + name)


@pytest.mark.skipif(
    "pooled" not in settings.DATABASES, reason="PgBouncer not running (PGBOUNCER_URL unset)"
)
@pytest.mark.django_db(transaction=True, databases=["default", "pooled"])
def test_behind_a_transaction_pooler_nothing_is_prepared(eager: Celery, pooled: Any) -> None:
    feeds = [Feed.objects.create(title=str(i)) for i in range(4)]
    # Two transactions at once: PgBouncer opens a second server connection, and from then on
    # hands them out in turn (server_round_robin), as a busy pool does.
    with transaction.atomic(using="pooled"):
        assert backend_pid(pooled)  # holds a server connection
        with pgbouncer(pooled, dbname=pooled.settings_dict["NAME"]) as other:
            other.execute("SELECT 1")  # needs another one

    with override_settings(DATABASE_ROUTERS=[ThroughThePooler()]):
        wires = [poll(feed, using="pooled") for feed in feeds]
        servers = {backend_pid(pooled) for _ in range(4)}

    assert len(servers) > 1  # the pooler does run transactions on different server connections
    assert pooled.connection.pgconn.backend_pid not in servers  # and announces its own pid
    begin = begin_statement(pooled.connection) + ";\n"
    assert wires[0][0] == f"{begin}SELECT pg_backend_pid();\n{STATE}{feeds[0].pk}"
    assert [wire[0] for wire in wires[1:]] == [f"{begin}{STATE}{feed.pk}" for feed in feeds[1:]]
    assert [Feed.objects.get(pk=feed.pk).polls for feed in feeds] == [1, 1, 1, 1]


@pytest.fixture
def django_pool() -> Iterator[Any]:
    """The test database through Django's connection pool of one psycopg connection; the pool
    is closed afterwards, so that the test database can be dropped."""
    yield connections["pool"]
    connections["pool"].close_pool()


@pytest.mark.skipif(
    "pool" not in settings.DATABASES,
    reason="Django's connection pool needs Django 5.1+ and psycopg_pool",
)
@pytest.mark.django_db(transaction=True, databases=["default", "pool"])
def test_a_pooled_connection_keeps_what_it_prepared_from_thread_to_thread(
    django_pool: Any,
) -> None:
    feed = Feed.objects.create(title="a")
    seen: list[tuple[int, str]] = []

    def read() -> None:  # in a thread of its own: a Django connection of its own
        database = connections["pool"]

        def block() -> None:
            with transaction.atomic(using="pool"):
                assert fetch_one(database, STATE + "%s", [feed.pk], fold=True) == (True, 0)

        try:
            wire = messages(block, using="pool")
            seen.append((id(database.connection), wire[0]))
        finally:
            database.close()  # the psycopg connection goes back to the pool

    for _ in range(3):
        thread = threading.Thread(target=read)
        thread.start()
        thread.join()

    assert len(seen) == 3 and len({raw for raw, _ in seen}) == 1  # one psycopg connection
    first, second, third = (message for _, message in seen)
    assert "SELECT pg_backend_pid()" in first
    assert "PREPARE celery_deactivate_" in second
    assert re.fullmatch(f"BEGIN[^;]*;\\nEXECUTE {NAME}\\({feed.pk}\\)", third)
