"""The hot statements on the wire (PostgreSQL, psycopg 3): one message each, BEGIN folded in.

Django opens a transaction by switching the driver's autocommit off; psycopg 3 then sends
``BEGIN`` on its own, and waits for the answer, before the first query of the transaction.  For
a task that reads its object before the body, that is a round trip (and the client and server
work of a message) on every run.  Here the ``BEGIN`` goes in the same message as the read
(``BEGIN; SELECT ...``: PostgreSQL's simple query protocol runs both, in order, and answers
once), and the transaction is left exactly where psycopg would have left it: open on the server,
committed or rolled back by Django when the ``atomic`` block ends.  The ``BEGIN`` is psycopg's
own (the connection's isolation level, read-only and deferrable settings).

Two forms:

- :func:`fetch_one`: the library's hand-written statements (the state read, the instance read,
  ``UPDATE ... RETURNING``).  When no execute wrapper is installed, the statement is sent
  through psycopg's connection-level API (``send_query`` and psycopg's own wait, so it stays
  interruptible and gevent-friendly), parameters bound client-side with psycopg's adapters as
  Django's default cursor does, without the cursor layers (about a third of a read's client
  time).  Django's checks before a query still run, its query log still records the statement
  and its errors are Django's.  With execute wrappers (instrumentation) it goes through a cursor.
- :func:`begin_with_next_query`: an execute wrapper that puts the BEGIN before the next query
  run through a cursor (an ORM read; needs client-side binding, Django's default).

The BEGIN is folded in only where that is exact: at the start of an outermost ``atomic`` block
that has sent nothing yet, outside pipeline mode.  The ``deactivate_fold_begin`` option turns
folding off (for a proxy that refuses several statements in one query).

A folded read by primary key is also a server-side prepared statement, so PostgreSQL parses
and plans it once per connection instead of on every task (``BEGIN; EXECUTE
celery_deactivate_<hash>(42)``; the ``PREPARE`` rides in the first such message, no round trip
is added).  Only on a direct connection to PostgreSQL: a transaction pooler (PgBouncer and the
like) may run the next transaction on another server connection, where the statement does not
exist.  The connection is checked once, in its first folded message: the backend's
``pg_backend_pid()`` must be the process id the server announced at connect time (a pooler
announces one of its own).  Nothing is prepared either when the database's ``OPTIONS`` set
psycopg's ``prepare_threshold`` to ``None`` or it sets ``DISABLE_SERVER_SIDE_CURSORS`` (what
Django and psycopg document for transaction pooling).  Django passes ``prepare_threshold=None``
to psycopg when ``OPTIONS`` do not name it, which keeps psycopg from preparing Django's own
statements; it is not read as a refusal here.  A statement that turns out unusable (missing
after ``DEALLOCATE ALL`` or ``DISCARD ALL``, a name already taken, a plan made stale by a
migration) is dealt with in the same call: the transaction its message began is rolled back, the
read is sent unprepared in a new one, and the connection prepares nothing more.
"""

from __future__ import annotations

import hashlib
import logging
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

from django.db import connections

logger = logging.getLogger("django.db.backends")  # the statements, as Django logs its own
events = logging.getLogger("celery_deactivate")

IDLE = 0  # psycopg.pq.TransactionStatus.IDLE (libpq's PQTRANS_IDLE)
PIPELINE_OFF = 0  # psycopg.pq.PipelineStatus.OFF
FATAL_ERROR = 7  # psycopg.pq.ExecStatus.FATAL_ERROR (libpq's PGRES_FATAL_ERROR)
SQLSTATE = ord("C")  # psycopg.pq.DiagnosticField.SQLSTATE

#: SQLSTATEs of a prepared statement that cannot be used: missing (26000), one of the same name
#: exists (42P05), its cached plan no longer fits the table (0A000).
UNUSABLE_PREPARED = frozenset({b"26000", b"42P05", b"0A000"})


@lru_cache(maxsize=1)
def _psycopg() -> Any:
    try:
        import psycopg
        import psycopg.adapt
        import psycopg.errors
        import psycopg.generators
        import psycopg.sql
    except ImportError:  # psycopg2 or another driver: nothing to fold
        return None
    if not callable(getattr(psycopg.generators, "execute", None)):
        return None
    return psycopg


def _psycopg_connection(connection: Any) -> Any:
    """The connected psycopg 3 connection behind a Django connection, outside pipeline mode."""
    raw = connection.connection
    if raw is None or connection.vendor != "postgresql":
        return None
    psycopg = _psycopg()
    if psycopg is None or not isinstance(raw, psycopg.Connection):
        return None
    if raw.pgconn.pipeline_status != PIPELINE_OFF:
        return None
    return raw


def _begins_here(connection: Any, raw: Any) -> bool:
    """Whether psycopg would send a BEGIN of its own before the next query: an ``atomic``
    block has switched autocommit off and nothing has been sent in it yet."""
    return bool(
        connection.in_atomic_block and not raw.autocommit and raw.pgconn.transaction_status == IDLE
    )


def _foldable(connection: Any) -> Any:
    """The psycopg connection whose next query would be preceded by its own BEGIN, or None."""
    raw = _psycopg_connection(connection)
    return raw if raw is not None and _begins_here(connection, raw) else None


def begin_statement(raw: Any) -> str:
    """The BEGIN psycopg 3 would send for this connection (its ``_get_tx_start_command``)."""
    parts = ["BEGIN"]
    if raw.isolation_level is not None:
        parts += ["ISOLATION LEVEL", raw.isolation_level.name.replace("_", " ")]
    if raw.read_only is not None:
        parts.append("READ ONLY" if raw.read_only else "READ WRITE")
    if raw.deferrable is not None:
        parts.append("DEFERRABLE" if raw.deferrable else "NOT DEFERRABLE")
    return " ".join(parts)


def fetch_one(
    connection: Any, sql: str, params: Sequence[Any], fold: bool = False
) -> tuple[Any, ...] | None:
    """The first row a statement returns (a SELECT, an ``UPDATE ... RETURNING``) on a Django
    connection, or None.

    The statement goes as one message, without the cursor layers, when nothing needs them: no
    execute wrapper installed, and psycopg would send no BEGIN of its own, or it is the first
    query of the transaction and ``fold`` (a task's ``deactivate_fold_begin``) puts the BEGIN in
    the message.  Otherwise it runs through a cursor (with the BEGIN folded in by
    :func:`begin_with_next_query` when ``fold``).
    """
    connection.close_if_health_check_failed()  # before taking its driver connection
    raw = None if connection.execute_wrappers else _psycopg_connection(connection)
    if raw is not None:
        begins = _begins_here(connection, raw)
        if fold or not begins:
            return _fetch_one_in_message(connection, raw, sql, params, begins)
    with begin_with_next_query(connection.alias, fold), connection.cursor() as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
        return None if row is None else tuple(row)


def _fetch_one_in_message(
    connection: Any, raw: Any, sql: str, params: Sequence[Any], begin: bool
) -> tuple[Any, ...] | None:
    # What Django checks before a cursor runs a query (the health check ran in fetch_one).
    connection.validate_thread_sharing()
    connection.validate_no_broken_transaction()
    prepared = _prepared_on(connection, raw, sql) if begin else None
    message = _message(raw, sql, params) if prepared is None else prepared.message(raw, sql, params)
    if begin:
        message = _begin(raw) + message
    logged = connection.queries_logged
    start = time.monotonic() if logged else 0.0
    # psycopg sends a BEGIN of its own only before a query of its own, and only when the server
    # is outside a transaction: once this message has run, it sees the one ours began.
    with connection.wrap_database_errors, raw.lock:
        results = _run(raw, message)
        if prepared is not None:
            if prepared.allowed and _unusable(results):
                # The message began the transaction and nothing else ran in it: start again.
                prepared.allowed = False
                events.info(
                    "celery_deactivate: prepared statements off for this connection (%s)",
                    results[-1].error_message.decode(raw.info.encoding, "replace").strip(),
                )
                _run(raw, b"ROLLBACK")
                message = _begin(raw) + _message(raw, sql, params)
                results = _run(raw, message)
            else:
                prepared.learn(raw, sql, results)
        for result in results:
            if result.status == FATAL_ERROR:
                raise _psycopg().errors.error_from_result(result, encoding=raw.info.encoding)
    if logged:  # as Django's debug cursor records a query
        duration = time.monotonic() - start
        text = message.decode(raw.info.encoding)
        connection.queries_log.append({"sql": text, "time": f"{duration:.3f}"})
        logger.debug("(%.3f) %s; args=None; alias=%s", duration, text, connection.alias)
    rows = results[-1]
    if not rows.ntuples:
        return None
    return _load_row(raw, rows)


def _begin(raw: Any) -> bytes:
    return f"{begin_statement(raw)};\n".encode()


def _run(raw: Any, message: bytes) -> list[Any]:
    """Send one simple-protocol query and wait for its results (psycopg's wait)."""
    pgconn = raw.pgconn
    pgconn.send_query(message)
    results: list[Any] = raw.wait(_psycopg().generators.execute(pgconn))
    return results


def _unusable(results: list[Any]) -> bool:
    last = results[-1]
    return bool(last.status == FATAL_ERROR and last.error_field(SQLSTATE) in UNUSABLE_PREPARED)


#: A statement's prepared form: its name, its ``PREPARE`` and its ``EXECUTE name(%s)``.
Preparable = tuple[bytes, bytes, str]


@lru_cache(maxsize=256)
def _preparable(sql: str) -> Preparable | None:
    """The prepared form of a statement with one final ``%s`` (a read by primary key), else
    None.  The name is a hash of the statement: the same name, the same statement."""
    head = _ascii_head(sql)
    if head is None:
        return None
    text = head + b"$1"
    name = "celery_deactivate_" + hashlib.sha1(text).hexdigest()[:20]
    return name.encode(), f"PREPARE {name} AS ".encode() + text, f"EXECUTE {name}(%s)"


class _Prepared:
    """The statements one psycopg connection has prepared, and whether it may prepare.

    ``allowed`` is ``None`` until the first folded message has compared the backend's process id
    with the one announced at connect time.
    """

    __slots__ = ("allowed", "names")

    def __init__(self, allowed: bool | None) -> None:
        self.allowed = allowed
        self.names: set[bytes] = set()

    def message(self, raw: Any, sql: str, params: Sequence[Any]) -> bytes:
        """What follows the BEGIN for a preparable ``sql``: the check and the plain statement on
        first use, then the prepared statement (prepared in the first message that executes it)."""
        if self.allowed is None:
            return b"SELECT pg_backend_pid();\n" + _message(raw, sql, params)
        form = _preparable(sql)
        assert form is not None  # _prepared_on() gives a _Prepared for a preparable sql only
        name, prepare, execute_sql = form
        execute = _message(raw, execute_sql, params)
        return execute if name in self.names else prepare + b";\n" + execute

    def learn(self, raw: Any, sql: str, results: list[Any]) -> None:
        """Record what a message that ran did: the check's answer, a statement now prepared."""
        if self.allowed is None:
            if not any(result.status == FATAL_ERROR for result in results):
                pid = results[-2].get_value(0, 0)
                self.allowed = pid is not None and int(pid) == raw.pgconn.backend_pid
        elif results[-1].status != FATAL_ERROR:  # an error ends the message where it occurs
            form = _preparable(sql)
            assert form is not None
            self.names.add(form[0])


#: What each psycopg connection has prepared.  Kept with the psycopg connection, not the Django
#: one: Django's connection pool hands a psycopg connection to one thread after another.
_prepared: weakref.WeakKeyDictionary[Any, _Prepared] = weakref.WeakKeyDictionary()


def _prepared_on(connection: Any, raw: Any, sql: str) -> _Prepared | None:
    """What a Django connection's psycopg connection has prepared, or None when ``sql`` has no
    prepared form or the settings say not to prepare."""
    if _preparable(sql) is None:
        return None
    prepared = _prepared.get(raw)
    if prepared is None:
        settings = connection.settings_dict
        # Django passes prepare_threshold=None to psycopg unless OPTIONS sets it (its statements
        # are never prepared by default); a None set in OPTIONS says "no prepared statements".
        refused = (
            "prepare_threshold" in settings["OPTIONS"]
            and settings["OPTIONS"]["prepare_threshold"] is None
        ) or settings.get("DISABLE_SERVER_SIDE_CURSORS")
        prepared = _prepared[raw] = _Prepared(False if refused else None)
    return prepared if prepared.allowed is not False else None


def _message(raw: Any, sql: str, params: Sequence[Any]) -> bytes:
    """The statement with its parameters inlined as literals, in the connection's encoding."""
    if len(params) == 1 and type(params[0]) is int:
        head = _ascii_head(sql)
        if head is not None:  # the hot case: "... WHERE pk = %s" with an integer key
            return b"%s%d" % (head, params[0])
    text = sql % tuple([_literal(raw, value) for value in params])
    encoded: bytes = text.encode(raw.info.encoding)
    return encoded


@lru_cache(maxsize=256)
def _ascii_head(sql: str) -> bytes | None:
    """The bytes before a statement's one and final ``%s``, when the statement is ASCII (the
    same bytes in every client encoding PostgreSQL offers), else None."""
    head, placeholder, tail = sql.rpartition("%s")
    if not placeholder or tail or "%" in head or not head.isascii():
        return None
    return head.encode("ascii")


def _load_row(raw: Any, rows: Any) -> tuple[Any, ...]:
    """The first row of a result, loaded by the connection's adapters as its cursors would."""
    loader = _psycopg().adapt.Transformer(raw)
    loader.set_pgresult(rows)
    row: tuple[Any, ...] = loader.load_row(0, tuple)
    return row


def _literal(raw: Any, value: Any) -> str:
    if type(value) is int:
        return str(value)
    literal: bytes = _psycopg().sql.Literal(value).as_bytes(raw)
    return literal.decode(raw.info.encoding)


@contextmanager
def begin_with_next_query(using: str, enabled: bool) -> Iterator[None]:
    """Inside, the first single query run through a cursor on ``using`` carries the
    transaction's BEGIN."""
    connection = connections[using]
    raw = _foldable(connection) if enabled else None
    if raw is None or not issubclass(raw.cursor_factory, _psycopg().ClientCursor):
        yield  # server-side binding cannot send two statements in one query
        return
    armed = True

    def wrapper(
        execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any
    ) -> Any:
        nonlocal armed
        if not armed or many or raw.pgconn.transaction_status != IDLE:
            return execute(sql, params, many, context)
        armed = False
        # psycopg's cursor would send a BEGIN of its own before the query: autocommit keeps it
        # from doing so.  Once the query has run, the server holds the transaction and
        # autocommit stays on (psycopg commits and rolls back by the server's transaction status;
        # Django switches autocommit back when the block ends).  If the BEGIN did not take
        # effect, it is switched back off at once.
        raw.autocommit = True
        try:
            # BEGIN first, so that an isolation level applies to the query too.
            result = execute(f"{begin_statement(raw)};\n{sql}", params, many, context)
            context["cursor"].nextset()  # the query's result, after BEGIN's
        finally:
            if raw.pgconn.transaction_status == IDLE:
                raw.autocommit = False
        return result

    with connection.execute_wrapper(wrapper):
        yield
