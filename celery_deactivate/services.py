"""Every change of an object's deactivation state goes through these functions.

The task, the worker's crash handler, the admin actions and the management command all call them,
so they all write the same fields with targeted updates and send the same signals.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, cast

from django.db import connections, router, transaction
from django.db.models import Case, F, Field, Model, Q, Value, When
from django.dispatch import Signal
from django.utils import timezone

from . import signals
from .begin import begin_with_next_query, fetch_one
from .target import Target, resolve_target

logger = logging.getLogger("celery_deactivate")

#: Backends on which the hot paths use hand-written SQL: ``UPDATE ... RETURNING`` lets one
#: statement both change and read the row.  Others take the ORM (one statement more).
FAST_VENDORS = frozenset({"postgresql", "sqlite"})


@dataclass(frozen=True)
class FailureOutcome:
    """What :func:`record_failure` did.  ``instance`` is ``None`` when nothing changed."""

    instance: Model | None
    deactivated: bool
    failure_count: int | None


def format_error(exc: BaseException | None, max_length: int | None) -> str:
    """``"ValueError: the text"``, cut to fit a column of ``max_length`` characters."""
    if exc is None:
        return ""
    text = f"{type(exc).__qualname__}: {exc}"
    if max_length is not None and len(text) > max_length:
        text = text[: max(max_length - 1, 0)] + "…"
    return text


def db_for(target: Target) -> str:
    return router.db_for_write(target.model)


def record_failure(
    target: Target,
    pk: Any,
    exc: BaseException,
    *,
    threshold: int,
    sender: Any,
    task_id: str | None = None,
    using: str | None = None,
    timeout: float | None = None,
) -> FailureOutcome:
    """Count one final failure of an active object, deactivating it at ``threshold``.

    One statement does it (``UPDATE ... WHERE pk AND active RETURNING``), so concurrent failures of
    the same object never lose an increment nor deactivate it twice.  An inactive or missing object
    is left alone.  Sends :data:`~celery_deactivate.signals.object_deactivated` or
    :data:`~celery_deactivate.signals.failure_counted` when the row changed.
    """
    using = using or db_for(target)
    sets = _failure_values(target, exc, threshold)
    with bounded(using, timeout):
        instance = _update_returning(target, pk, sets, using)
    if instance is None:
        return FailureOutcome(None, False, None)
    count = target.count_of(instance)
    deactivated = not getattr(instance, target.active)
    signal = signals.object_deactivated if deactivated else signals.failure_counted
    _send(signal, target, sender, instance, exception=exc, task_id=task_id, failure_count=count)
    return FailureOutcome(instance, deactivated, count)


def reset_failures(target: Target, pk: Any, *, using: str | None = None) -> int:
    """Set a positive failure count back to 0 (a success ends the run of failures)."""
    if not target.failure_count:
        return 0
    manager = target.model._base_manager.db_manager(using or db_for(target))
    updated: int = manager.filter(pk=pk, **{f"{target.failure_count}__gt": 0}).update(
        **{target.failure_count: 0}
    )
    return updated


def deactivate(
    model: type[Model],
    pk: Any,
    *,
    exception: BaseException | None = None,
    fields: Mapping[str, str | None] | None = None,
    using: str | None = None,
) -> Model | None:
    """Deactivate one active object by hand (admin, command); ``None`` if it was not active."""
    target = target_for(model, fields)
    using = using or db_for(target)
    sets = _deactivation(target, exception, error=exception is not None)
    instance = _update_returning(target, pk, sets, using)
    if instance is not None:
        _send(
            signals.object_deactivated,
            target,
            model,
            instance,
            exception=exception,
            task_id=None,
            failure_count=target.count_of(instance),
        )
    return instance


def reactivate(
    model: type[Model],
    pk: Any,
    *,
    fields: Mapping[str, str | None] | None = None,
    using: str | None = None,
) -> Model | None:
    """Make one inactive object active again and clear its error; ``None`` if it was active."""
    target = target_for(model, fields)
    using = using or db_for(target)
    sets = [Assign(target.active, True)]
    if target.error:
        sets.append(Assign(target.error, False))
    if target.error_message:
        sets.append(Assign(target.error_message, ""))
    if target.deactivated_at:
        sets.append(Assign(target.deactivated_at, None))
    if target.failure_count:
        sets.append(Assign(target.failure_count, 0))
    instance = _update_returning(target, pk, sets, using, active=False)
    if instance is not None:
        _send(signals.object_reactivated, target, model, instance)
    return instance


def target_for(model: type[Model], fields: Mapping[str, str | None] | None = None) -> Target:
    """The :class:`Target` of a model outside any task (admin, command)."""
    return resolve_target(model, tuple(sorted((fields or {}).items())), model._meta.label)


@dataclass(frozen=True)
class Assign:
    """One column of a targeted update: ``name = value``, ``name = name + 1`` (``increment``),
    or ``name = value`` only on the failure that reaches ``threshold`` (``when_count_reaches``).

    It renders to hand-written SQL on the fast path and to Django expressions on the fallback.
    """

    name: str
    value: Any = None
    increment: bool = False
    when_count_reaches: tuple[str, int] | None = None  # (failure_count field, threshold)

    def sql(self, model: type[Model], connection: Any) -> tuple[str, list[Any]]:
        quote = connection.ops.quote_name
        column = quote(_column(model, self.name))
        if self.increment:
            return f"{column} = {column} + 1", []
        value = _field(model, self.name).get_db_prep_save(self.value, connection)
        if self.when_count_reaches is None:
            return f"{column} = %s", [value]
        counter, threshold = self.when_count_reaches
        count = quote(_column(model, counter))
        return f"{column} = CASE WHEN {count} >= %s THEN %s ELSE {column} END", [
            threshold - 1,
            value,
        ]

    def expression(self, model: type[Model]) -> Any:
        if self.increment:
            return F(self.name) + 1
        if self.when_count_reaches is None:
            return self.value
        counter, threshold = self.when_count_reaches
        return Case(
            When(
                Q(**{f"{counter}__gte": threshold - 1}),
                then=Value(self.value, output_field=_field(model, self.name)),
            ),
            default=F(self.name),
        )


def _field(model: type[Model], name: str) -> Field[Any, Any]:
    return cast("Field[Any, Any]", model._meta.get_field(name))


def _column(model: type[Model], name: str) -> str:
    return cast(str, _field(model, name).column)


def _pk(model: type[Model]) -> tuple[Field[Any, Any], str]:
    """The primary key field and its column."""
    pk = cast("Field[Any, Any]", model._meta.pk)
    return pk, cast(str, pk.column)


def _deactivation(target: Target, exc: BaseException | None, *, error: bool = True) -> list[Assign]:
    sets = [Assign(target.active, False)]
    if target.error:
        sets.append(Assign(target.error, error))
    if target.error_message:
        sets.append(
            Assign(target.error_message, format_error(exc, target.error_message_max_length))
        )
    if target.deactivated_at:
        sets.append(Assign(target.deactivated_at, timezone.now()))
    return sets


def _failure_values(target: Target, exc: BaseException, threshold: int) -> list[Assign]:
    sets = _deactivation(target, exc)
    if target.failure_count:
        if threshold > 1:
            # SET expressions see the row as it was: the failure that reaches the threshold
            # flips it.
            reached = (target.failure_count, threshold)
            sets = [Assign(a.name, a.value, when_count_reaches=reached) for a in sets]
        sets.append(Assign(target.failure_count, increment=True))
    return sets


def read_state(target: Target, pk: Any, using: str, fold: bool = False) -> tuple[Any, ...]:
    """``(active, failure_count)`` of the row (``(active,)`` without a counter): one SELECT.

    As the first query of a transaction (PostgreSQL, psycopg 3, ``fold``: the task's
    ``deactivate_fold_begin``), it carries the transaction's BEGIN, and on a direct connection
    it is a prepared statement (:mod:`celery_deactivate.begin`).  Raises the model's
    ``DoesNotExist`` for a missing row.
    """
    model = target.model
    if not _by_hand(target, using):
        manager = model._base_manager.db_manager(using)
        with begin_with_next_query(using, fold):
            state: tuple[Any, ...] = manager.values_list(*target.state_fields()).get(pk=pk)
        return state
    return _row_by_pk(model, _state_sql(target, using), pk, using, fold)


def read_object(target: Target, pk: Any, using: str, fold: bool = False) -> Model:
    """The row as a model instance (``Model.from_db``), like ``_base_manager.get(pk=pk)``: one
    SELECT written by hand (no query compilation), carrying the BEGIN like :func:`read_state`.
    Raises the model's ``DoesNotExist`` for a missing row."""
    model = target.model
    if not _by_hand(target, using):
        with begin_with_next_query(using, fold):
            found: Model = model._base_manager.db_manager(using).get(pk=pk)
        return found
    return _instance(model, using, _row_by_pk(model, _object_sql(model, using), pk, using, fold))


def _row_by_pk(model: type[Model], sql: str, pk: Any, using: str, fold: bool) -> tuple[Any, ...]:
    """The row a ``... WHERE pk = %s`` statement reads; the model's ``DoesNotExist`` if none."""
    connection = connections[using]
    row = fetch_one(connection, sql, [_pk_value(model, pk, connection)], fold)
    if row is None:
        raise _does_not_exist(model)
    return row


def _pk_value(model: type[Model], pk: Any, connection: Any) -> Any:
    """The primary key as the database takes it (the field's ``get_db_prep_value``)."""
    return cast("Field[Any, Any]", model._meta.pk).get_db_prep_value(pk, connection)


def _does_not_exist(model: type[Model]) -> Exception:
    missing: type[Exception] = cast(Any, model).DoesNotExist
    return missing(f"{model._meta.object_name} matching query does not exist.")


@lru_cache(maxsize=256)
def _by_hand(target: Target, using: str) -> bool:
    """Whether the hot statements may be written by hand: one table, a backend with
    ``UPDATE ... RETURNING`` (SQLite >= 3.35 reports it as returning columns from inserts)."""
    connection = connections[using]
    return (
        target.single_table
        and connection.vendor in FAST_VENDORS
        and connection.features.can_return_columns_from_insert
    )


@lru_cache(maxsize=256)
def _object_sql(model: type[Model], using: str) -> str:
    _, columns, _ = _row_reader(model, using)
    return _select_by_pk(model, using, columns)


@lru_cache(maxsize=256)
def _state_sql(target: Target, using: str) -> str:
    quote = connections[using].ops.quote_name
    names = target.state_fields()
    return _select_by_pk(
        target.model, using, ", ".join(quote(_column(target.model, n)) for n in names)
    )


def _select_by_pk(model: type[Model], using: str, columns: str) -> str:
    quote = connections[using].ops.quote_name
    _, pk_column = _pk(model)
    return f"SELECT {columns} FROM {quote(model._meta.db_table)} WHERE {quote(pk_column)} = %s"


def _update_returning(
    target: Target, pk: Any, sets: list[Assign], using: str, *, active: bool = True
) -> Model | None:
    """``UPDATE`` the row if its active flag is ``active``; return it as it is after the change."""
    if _by_hand(target, using):
        return _update_with_returning(target, pk, sets, using, active)
    queryset = target.model._base_manager.db_manager(using).filter(pk=pk, **{target.active: active})
    return _update_then_select(queryset, pk, sets, using)


def _update_with_returning(
    target: Target, pk: Any, sets: list[Assign], using: str, active: bool
) -> Model | None:
    """One statement, written by hand (the ORM compiles no ``RETURNING`` for updates):
    ``UPDATE t SET ... WHERE pk = %s AND active = %s RETURNING <every column>``."""
    model = target.model
    meta = model._meta
    connection = connections[using]
    quote = connection.ops.quote_name
    assignments, params = [], []
    for assign in sets:
        sql, values = assign.sql(model, connection)
        assignments.append(sql)
        params.extend(values)
    _, pk_column = _pk(model)
    params.append(_pk_value(model, pk, connection))
    params.append(_field(model, target.active).get_db_prep_value(active, connection))
    _, returning, _ = _row_reader(model, using)
    statement = (
        f"UPDATE {quote(meta.db_table)} SET {', '.join(assignments)} "
        f"WHERE {quote(pk_column)} = %s AND {quote(_column(model, target.active))} = %s "
        f"RETURNING {returning}"
    )
    row = fetch_one(connection, statement, params)
    return None if row is None else _instance(model, using, row)


def _instance(model: type[Model], using: str, row: Any) -> Model:
    """A model instance from a row of every concrete column, converted as the ORM does."""
    attnames, _, converters = _row_reader(model, using)
    values = list(row)
    connection = connections[using]
    for index, (functions, expression) in converters:
        for convert in functions:
            values[index] = convert(values[index], expression, connection)
    instance: Model = model.from_db(using, attnames, values)
    return instance


@lru_cache(maxsize=256)
def _row_reader(
    model: type[Model], using: str
) -> tuple[list[str], str, list[tuple[int, tuple[list[Any], Any]]]]:
    """Attribute names, the column list (every concrete column) and the value converters of a
    model's row."""
    connection = connections[using]
    fields = model._meta.concrete_fields
    quote = connection.ops.quote_name
    converters = []
    for index, field in enumerate(fields):
        column = field.get_col(model._meta.db_table)
        functions = connection.ops.get_db_converters(column) + column.get_db_converters(connection)
        if functions:
            converters.append((index, (functions, column)))
    returning = ", ".join(quote(cast(str, field.column)) for field in fields)
    return [field.attname for field in fields], returning, converters


def _update_then_select(queryset: Any, pk: Any, sets: list[Assign], using: str) -> Model | None:
    """Other backends, and models whose fields span tables: the ORM's update and a read of the
    row, in one transaction (the row lock is held in between)."""
    model = queryset.model
    with transaction.atomic(using=using):
        if not queryset.update(**{assign.name: assign.expression(model) for assign in sets}):
            return None
        instance: Model = model._base_manager.db_manager(using).get(pk=pk)
        return instance


@contextmanager
def bounded(using: str, seconds: float | None) -> Iterator[None]:
    """Bound how long the statements inside may wait for locks and run.

    PostgreSQL: ``lock_timeout`` and ``statement_timeout`` for this transaction.  SQLite: the
    connection's busy timeout (the worker's crash handler runs on a connection of its own, closed
    when it is done).
    """
    connection = connections[using]
    if not seconds or connection.vendor not in FAST_VENDORS:
        yield
        return
    millis = max(int(seconds * 1000), 1)
    if connection.vendor == "sqlite":
        with connection.cursor() as cursor:
            cursor.execute(f"PRAGMA busy_timeout = {millis}")
        yield
        return
    with transaction.atomic(using=using), connection.cursor() as cursor:
        cursor.execute(f"SET LOCAL lock_timeout = {millis}")
        cursor.execute(f"SET LOCAL statement_timeout = {millis}")
        yield


def _send(signal: Signal, target: Target, sender: Any, instance: Model, **kwargs: Any) -> None:
    for receiver, result in signal.send_robust(sender=sender, instance=instance, **kwargs):
        if isinstance(result, Exception):
            logger.error(
                "celery_deactivate: receiver %r of %s raised for %s: %r",
                receiver,
                _SIGNAL_NAMES.get(id(signal), repr(signal)),
                target.identity(instance.pk),
                result,
                exc_info=result,
            )


_SIGNAL_NAMES = {
    id(signals.object_deactivated): "object_deactivated",
    id(signals.object_reactivated): "object_reactivated",
    id(signals.failure_counted): "failure_counted",
}
