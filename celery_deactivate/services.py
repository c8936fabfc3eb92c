"""Every change of an object's deactivation state goes through these functions.

The task, the worker's crash handler, the admin actions and the management command all call them,
so they all write the same fields with targeted updates and send the same signals.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

from django.db import connections, router, transaction
from django.db.models import Case, F, Field, Model, Q, Value, When
from django.db.models.sql import UpdateQuery
from django.dispatch import Signal
from django.utils import timezone

from . import signals
from .target import Target, resolve_target

logger = logging.getLogger("celery_deactivate")

#: Backends whose UPDATE ... RETURNING lets one statement both change and read the row.
RETURNING_VENDORS = frozenset({"postgresql", "sqlite"})


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
    values = _failure_values(target, exc, threshold)
    with bounded(using, timeout):
        instance = _update_returning(target, pk, values, using)
    if instance is None:
        return FailureOutcome(None, False, None)
    count = getattr(instance, target.failure_count) if target.failure_count else None
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
    values = _deactivation_values(target, exception, error=exception is not None)
    instance = _update_returning(target, pk, values, using)
    if instance is not None:
        count = getattr(instance, target.failure_count) if target.failure_count else None
        _send(
            signals.object_deactivated,
            target,
            model,
            instance,
            exception=exception,
            task_id=None,
            failure_count=count,
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
    values: dict[str, Any] = {target.active: True}
    if target.error:
        values[target.error] = False
    if target.error_message:
        values[target.error_message] = ""
    if target.deactivated_at:
        values[target.deactivated_at] = None
    if target.failure_count:
        values[target.failure_count] = 0
    instance = _update_returning(target, pk, values, using, active=False)
    if instance is not None:
        _send(signals.object_reactivated, target, model, instance)
    return instance


def target_for(model: type[Model], fields: Mapping[str, str | None] | None = None) -> Target:
    """The :class:`Target` of a model outside any task (admin, command)."""
    return resolve_target(model, tuple(sorted((fields or {}).items())), model._meta.label)


def _deactivation_values(
    target: Target, exc: BaseException | None, *, error: bool = True
) -> dict[str, Any]:
    values: dict[str, Any] = {target.active: False}
    if target.error:
        values[target.error] = error
    if target.error_message:
        values[target.error_message] = format_error(exc, target.error_message_max_length)
    if target.deactivated_at:
        values[target.deactivated_at] = timezone.now()
    return values


def _failure_values(target: Target, exc: BaseException, threshold: int) -> dict[str, Any]:
    deactivation = _deactivation_values(target, exc)
    if threshold <= 1 or not target.failure_count:
        values = deactivation
    else:
        # SET expressions see the row as it was: the failure that reaches the threshold flips it.
        reached = Q(**{f"{target.failure_count}__gte": threshold - 1})
        meta = target.model._meta
        values = {
            name: Case(
                When(
                    reached,
                    then=Value(new, output_field=cast("Field[Any, Any]", meta.get_field(name))),
                ),
                default=F(name),
            )
            for name, new in deactivation.items()
        }
    if target.failure_count:
        values[target.failure_count] = F(target.failure_count) + 1
    return values


def _update_returning(
    target: Target, pk: Any, values: dict[str, Any], using: str, *, active: bool = True
) -> Model | None:
    """``UPDATE`` the row if its active flag is ``active``; return it as it is after the change."""
    queryset = target.model._base_manager.db_manager(using).filter(pk=pk, **{target.active: active})
    connection = connections[using]
    if (
        connection.vendor in RETURNING_VENDORS
        and connection.features.can_return_columns_from_insert
    ):
        return _update_with_returning(queryset, values, using)
    return _update_then_select(queryset, pk, values, using)


def _update_with_returning(queryset: Any, values: dict[str, Any], using: str) -> Model | None:
    """One statement: ``UPDATE ... RETURNING`` every concrete column (PostgreSQL, SQLite)."""
    model = queryset.model
    query = queryset.query.chain(UpdateQuery)
    query.add_update_values(values)
    statement, params = query.get_compiler(using).as_sql()
    fields = model._meta.concrete_fields
    quote = connections[using].ops.quote_name
    returning = ", ".join(quote(field.column) for field in fields)
    with connections[using].cursor() as cursor:
        cursor.execute(f"{statement} RETURNING {returning}", params)
        row = cursor.fetchone()
    if row is None:
        return None
    select = queryset.query.get_compiler(using)
    converters = select.get_converters([field.get_col(model._meta.db_table) for field in fields])
    (converted,) = select.apply_converters([list(row)], converters) if converters else [row]
    instance: Model = model.from_db(using, [field.attname for field in fields], list(converted))
    return instance


def _update_then_select(queryset: Any, pk: Any, values: dict[str, Any], using: str) -> Model | None:
    """Other backends: the update and a read of the row in one transaction (row lock held)."""
    with transaction.atomic(using=using):
        if not queryset.update(**values):
            return None
        instance: Model = queryset.model._base_manager.db_manager(using).get(pk=pk)
        return instance


@contextmanager
def bounded(using: str, seconds: float | None) -> Iterator[None]:
    """Bound how long the statements inside may wait for locks and run (PostgreSQL).

    SQLite bounds lock waits by its own busy timeout.
    """
    connection = connections[using]
    if not seconds or connection.vendor != "postgresql":
        yield
        return
    millis = max(int(seconds * 1000), 1)
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
                _signal_name(signal),
                target.identity(instance.pk),
                result,
                exc_info=result,
            )


def _signal_name(signal: Signal) -> str:
    for name in ("object_deactivated", "object_reactivated", "failure_counted"):
        if getattr(signals, name) is signal:
            return name
    return repr(signal)
