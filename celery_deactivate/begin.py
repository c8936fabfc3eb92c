"""The task's first read and its transaction's BEGIN in one message (PostgreSQL, psycopg 3).

Django opens a transaction by switching the driver's autocommit off; psycopg 3 then sends
``BEGIN`` on its own, and waits for the answer, before the first query of the transaction.  For
a task that reads its object's state before the body, that is a round trip (and the client and
server work of a message) on every run.  Here the ``BEGIN`` goes in the same message as the
read (``BEGIN; SELECT ...``: PostgreSQL's simple query protocol runs both, in order, and answers
once), and the transaction is left exactly where psycopg would have left it: open on the server,
committed or rolled back by Django when the ``atomic`` block ends.  The ``BEGIN`` is psycopg's
own (the connection's isolation level, read-only and deferrable settings).

Two forms:

- :func:`select_one`: the hand-written state read.  When no execute wrapper is installed it
  sends the message through psycopg's connection-level API (``send_query`` and psycopg's own
  wait, so it stays interruptible and gevent-friendly), without the cursor layers: the read
  then costs about a third of the client time.  Django's query log still records it, and its
  errors are Django's.  With execute wrappers (instrumentation) it goes through a cursor.
- :func:`begin_with_next_query`: an execute wrapper that puts the BEGIN before the next query
  run through a cursor (an ORM read; needs client-side binding, Django's default).

Both apply only where they are exact: at the start of an outermost ``atomic`` block that has sent
nothing yet, on psycopg 3, outside pipeline mode.  Anywhere else the query runs as it would
have.  The ``deactivate_fold_begin`` option turns both off (for a proxy that refuses several
statements in one query).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

from django.db import connections

logger = logging.getLogger("django.db.backends")


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


def _foldable(connection: Any) -> Any:
    """The psycopg connection whose next query would be preceded by its own BEGIN, or None."""
    if connection.vendor != "postgresql" or not connection.in_atomic_block:
        return None
    psycopg = _psycopg()
    raw = connection.connection
    if psycopg is None or not isinstance(raw, psycopg.Connection):
        return None
    pq = psycopg.pq
    pgconn = raw.pgconn
    if (
        raw.autocommit
        or pgconn.transaction_status != pq.TransactionStatus.IDLE
        or pgconn.pipeline_status != pq.PipelineStatus.OFF
    ):
        return None
    return raw


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


@contextmanager
def _begun_by_us(raw: Any) -> Iterator[None]:
    """Keep psycopg from sending a BEGIN of its own: ours is in the message.

    Once the message has run, the server holds the transaction open and psycopg's autocommit
    stays on (it can be switched back only outside a transaction, which Django does when the
    block ends; psycopg commits and rolls back by the server's transaction status).  If the
    BEGIN did not take effect, autocommit is switched back off at once.
    """
    raw.autocommit = True
    try:
        yield
    finally:
        if raw.pgconn.transaction_status == _psycopg().pq.TransactionStatus.IDLE:
            raw.autocommit = False


def select_one(
    using: str, sql: str, params: Sequence[Any], fold: bool = True
) -> tuple[Any, ...] | None:
    """The first row of a SELECT with one ``%s`` parameter, or None; when it is the first
    query of the transaction, with the BEGIN in the same message."""
    connection = connections[using]
    raw = _foldable(connection) if fold else None
    if raw is not None and not connection.execute_wrappers:
        return _select_one_in_message(connection, raw, sql, params)
    with begin_with_next_query(using, fold), connection.cursor() as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
        return None if row is None else tuple(row)


def _select_one_in_message(
    connection: Any, raw: Any, sql: str, params: Sequence[Any]
) -> tuple[Any, ...] | None:
    psycopg = _psycopg()
    query = sql % tuple(_literal(raw, value) for value in params)
    message = f"{begin_statement(raw)};\n{query}"
    start = time.monotonic()
    with connection.wrap_database_errors, _begun_by_us(raw), raw.lock:
        pgconn = raw.pgconn
        pgconn.send_query(message.encode(raw.info.encoding))
        results = raw.wait(psycopg.generators.execute(pgconn))
        for result in results:
            if result.status == psycopg.pq.ExecStatus.FATAL_ERROR:
                raise psycopg.errors.error_from_result(result, encoding=raw.info.encoding)
    if connection.queries_logged:  # as Django's debug cursor records a query
        duration = time.monotonic() - start
        connection.queries_log.append({"sql": message, "time": f"{duration:.3f}"})
        logger.debug("(%.3f) %s; args=None; alias=%s", duration, message, connection.alias)
    rows = results[-1]
    if not rows.ntuples:
        return None
    loader = psycopg.adapt.Transformer(raw)
    loader.set_pgresult(rows)
    row: tuple[Any, ...] = loader.load_row(0, tuple)
    return row


def _literal(raw: Any, value: Any) -> str:
    if type(value) is int:
        return str(value)
    literal: bytes = _psycopg().sql.Literal(value).as_bytes(raw)
    return literal.decode(raw.info.encoding)


@contextmanager
def begin_with_next_query(using: str, enabled: bool = True) -> Iterator[None]:
    """Inside, the first single query run through a cursor on ``using`` carries the
    transaction's BEGIN (see :func:`_begun_by_us` for the state it leaves)."""
    connection = connections[using]
    raw = _foldable(connection) if enabled else None
    if raw is None or not issubclass(raw.cursor_factory, _psycopg().ClientCursor):
        yield  # server-side binding cannot send two statements in one query
        return
    armed = True
    idle = _psycopg().pq.TransactionStatus.IDLE

    def wrapper(
        execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any
    ) -> Any:
        nonlocal armed
        if not armed or many or raw.pgconn.transaction_status != idle:
            return execute(sql, params, many, context)
        armed = False
        with _begun_by_us(raw):
            # BEGIN first, so that an isolation level applies to the query too.
            result = execute(f"{begin_statement(raw)};\n{sql}", params, many, context)
            context["cursor"].nextset()  # the query's result, after BEGIN's
        return result

    with connection.execute_wrapper(wrapper):
        yield
