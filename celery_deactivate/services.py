"""Every change of an object's deactivation state goes through these functions.

The task, the worker's crash handler, the admin actions and the management command all call them,
so they all write the same fields and send the same signals.  Each change is one ORM ``UPDATE``
of the library's own columns, conditioned on the row's active flag (so concurrent callers change
a row once), and a read of the row in the same transaction; the signal is sent in that
transaction, like Django's model signals.  (A failure with nothing but the notice depending on
the read is recorded without a transaction of its own: see :func:`record_failure`.)  Everything
goes through Django's ``QuerySet`` or ``connection.cursor()``, on every backend.
"""

from __future__ import annotations

import logging
import re
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache
from typing import Any, cast

from django.core.exceptions import ObjectDoesNotExist
from django.db import connections, router, transaction
from django.db.models import Case, F, Field, Model, Q, QuerySet, Value, When
from django.dispatch import Signal
from django.utils import timezone

from . import signals
from .target import Target, resolve_target

logger = logging.getLogger("celery_deactivate")


@dataclass(frozen=True)
class FailureOutcome:
    """What :func:`record_failure` did.  ``instance`` is ``None`` when nothing changed."""

    instance: Model | None
    deactivated: bool
    failure_count: int | None
    #: The failure was a cool-down probe's: the object stays deactivated, its cool-down doubled.
    probed: bool = False


# -- describing an exception ------------------------------------------------------------------

#: Characters of an exception's text the library records (the object's ``error_message``, the
#: failure table's ``error``) and logs: the head of a longer text, ending with "…".  A column
#: with a smaller ``max_length`` cuts it further.
ERROR_LENGTH = 64 * 1024

#: Code points no encoder takes (a file name that is not UTF-8, decoded by ``os.fsdecode``).
_LONE_SURROGATES = re.compile("[\ud800-\udfff]")


def describe(exc: BaseException | None) -> str:
    """``"ValueError: the text"``; never raises, whatever the exception's ``__str__`` does.

    The type's name is always there; text that cannot be rendered becomes a placeholder.  At
    most :data:`ERROR_LENGTH` characters, and text any encoder takes (:func:`cut`): a mail, a
    JSON body, a log file, a database column.
    """
    if exc is None:
        return ""
    name = type(exc).__qualname__
    try:
        text = str(exc)
    except Exception as error:  # a broken __str__ must not hide the failure
        text = f"<str() raised {type(error).__qualname__}>"
    return cut(f"{name}: {text}" if text else name, ERROR_LENGTH)


def cut(text: str, limit: int | None) -> str:
    """``text``, its head when it is longer than ``limit`` characters (ending with "…"), with
    lone surrogates replaced by U+FFFD, so that any encoder takes it."""
    if limit is not None and len(text) > limit:
        text = text[: max(limit - 1, 0)] + "…"
    return _LONE_SURROGATES.sub("\ufffd", text)


def format_error(exc: BaseException | None, max_length: int | None) -> str:
    """:func:`describe`, made storable: NUL bytes (PostgreSQL text cannot hold them) and lone
    surrogates replaced, cut to fit a column of ``max_length`` characters, and to
    :data:`ERROR_LENGTH` without one."""
    return _fit(describe(exc), max_length)


def _fit(text: str, max_length: int | None) -> str:
    limit = ERROR_LENGTH if max_length is None else min(max_length, ERROR_LENGTH)
    return cut(text.replace("\x00", "\ufffd"), limit)


# -- the state changes ----------------------------------------------------------------------


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
    cooldown: tuple[float, float] | None = None,
) -> FailureOutcome:
    """Count one final failure of an active object, deactivating it at ``threshold``.

    One conditioned ``UPDATE`` (``failure_count = failure_count + 1``, and the deactivation when
    the count reaches ``threshold``, ``WHERE pk AND active``), so concurrent failures of the same
    object never lose an increment nor deactivate it twice.  An inactive or missing object is left
    alone.  Sends :data:`~celery_deactivate.signals.object_deactivated` or
    :data:`~celery_deactivate.signals.failure_counted` when the row changed.

    The read of the changed row follows in the same transaction (the row locked in between) when
    more than the notice depends on it: a receiver of those signals (its writes commit or roll
    back with the change), a ``threshold`` above 1 with a counter (the read says whether this
    failure reached it), a ``timeout`` (bounded per transaction), a caller's transaction (a
    savepoint keeps it usable if a statement fails), cool-down probes (a probe's failure is
    recorded in the same transaction).  Otherwise no transaction is opened: the row
    is read, then updated on the same conditions, and the instance returned is the row as read
    with the values written (the counter as read, plus one): two statements, as the recipe's
    ``get()`` and ``save()``.  A failed read changes nothing; the update alone decides.

    ``cooldown`` is ``(seconds, max_seconds)`` when cool-down probes are on: a deactivation
    schedules the first probe, and the failure of a probe (a deactivated object with a probe
    out) doubles the cool-down up to the maximum and schedules the next one.
    """
    using = using or db_for(target)
    values = _failure_values(target, exc, threshold, cooldown[0] if cooldown else None)
    if not _needs_transaction(target, threshold, sender, timeout, cooldown, using):
        instance = _change_alone(target, pk, values, using)
        if instance is None:
            return FailureOutcome(None, False, None)
        return FailureOutcome(instance, True, target.count_of(instance))
    with transaction.atomic(using=using), bounded(using, timeout):
        instance = _change(target, pk, values, True, using)
        if instance is None:
            # With probes on, the update (a write even when it matched nothing) took the row's
            # lock first, before the probe's read: on SQLite no lock upgrade can fail.
            if cooldown is not None:
                probed = _probe_failed(target, pk, exc, cooldown[1], using)
                if probed is not None:
                    return FailureOutcome(probed, False, target.count_of(probed), probed=True)
            return FailureOutcome(None, False, None)
        count = target.count_of(instance)
        deactivated = not getattr(instance, target.active)
        signal = signals.object_deactivated if deactivated else signals.failure_counted
        send(signal, target, sender, instance, exception=exc, task_id=task_id, failure_count=count)
    return FailureOutcome(instance, deactivated, count)


def _needs_transaction(
    target: Target,
    threshold: int,
    sender: Any,
    timeout: float | None,
    cooldown: tuple[float, float] | None,
    using: str,
) -> bool:
    """Whether a failure is recorded in a transaction of its own (see :func:`record_failure`)."""
    return bool(
        timeout
        or cooldown is not None
        or (threshold > 1 and target.failure_count)
        or signals.object_deactivated.has_listeners(sender)
        or signals.failure_counted.has_listeners(sender)
        or connections[using].in_atomic_block
    )


def reset_failures(target: Target, pk: Any, *, using: str | None = None) -> int:
    """Set a positive failure count of an active object back to 0 (a success ends the run of
    failures; a deactivation that raced it keeps its count)."""
    if not target.failure_count:
        return 0
    where = {target.active: True, f"{target.failure_count}__gt": 0}
    changed: int = _rows(target, pk, using or db_for(target), **where).update(
        **{target.failure_count: 0}
    )
    return changed


def deactivate(
    model: type[Model],
    pk: Any,
    *,
    exception: BaseException | str | None = None,
    fields: Mapping[str, str | None] | None = None,
    using: str | None = None,
) -> Model | None:
    """Deactivate one object by hand (admin, command, ``instance.deactivate()``); ``None`` if
    nothing changed.

    An active object is recorded as deactivated by an error when an ``exception`` (or a message)
    is given, else as deactivated by hand, and
    :data:`~celery_deactivate.signals.object_deactivated` is sent.  Either way it is never probed
    (cool-down probes follow failures only).

    The operator's word wins over a probe: an object a failure deactivated, with a probe
    scheduled or out, has its probe turned off (no probe is sent, and one out does not
    re-activate it: :func:`end_probe` needs it to be still out).  Its error and the time of its
    deactivation stay as the failure recorded them, and no signal is sent: it was deactivated
    already.  An inactive object without a probe is left alone.
    """
    target = target_for(model, fields)
    using = using or db_for(target)
    values = _deactivation(target, exception, error=exception is not None)
    with transaction.atomic(using=using):
        instance = _change(target, pk, values, True, using)
        if instance is None:
            return _stop_probes(target, pk, using)
        send(
            signals.object_deactivated,
            target,
            model,
            instance,
            exception=exception,
            task_id=None,
            failure_count=target.count_of(instance),
        )
    return instance


def _stop_probes(target: Target, pk: Any, using: str) -> Model | None:
    """Turn off the probes of a deactivated object (one scheduled or out); ``None`` if it had
    none."""
    if not target.probes:
        return None
    next_probe_at, probing_since = cast(str, target.next_probe_at), cast(str, target.probing_since)
    probing = Q(**{f"{next_probe_at}__isnull": False}) | Q(**{f"{probing_since}__isnull": False})
    rows = _rows(target, pk, using, **{target.active: False}).filter(probing)
    values = {next_probe_at: None, cast(str, target.cooldown): None, probing_since: None}
    if not rows.update(**values):
        return None
    logger.info(
        "celery_deactivate: %s was deactivated already; deactivated by hand, its cool-down "
        "probes are off",
        target.identity(pk),
    )
    return _read_changed(target, pk, using)


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
    with transaction.atomic(using=using):
        instance = _change(target, pk, _reactivation(target), False, using)
        if instance is not None:
            send(signals.object_reactivated, target, model, instance)
    return instance


def end_probe(target: Target, pk: Any, *, using: str | None = None) -> Model | None:
    """A cool-down probe succeeded: re-activate the object (as :func:`reactivate` does, sending
    :data:`~celery_deactivate.signals.object_reactivated`); ``None`` if no probe was out."""
    using = using or db_for(target)
    assert target.probing_since is not None
    with transaction.atomic(using=using):
        where = {f"{target.probing_since}__isnull": False, target.active: False}
        if not _rows(target, pk, using, **where).update(**_reactivation(target)):
            return None
        instance = _read_changed(target, pk, using)
        send(signals.object_reactivated, target, target.model, instance)
    return instance


def claim_probe(target: Target, pk: Any, now: Any, stale_before: Any, *, using: str) -> bool:
    """Mark a probe of this deactivated object as out, if one is due and none is out (or the
    one out is older than ``stale_before``: lost).  One conditioned ``UPDATE``: however many
    callers try at once, one wins."""
    rows = _rows(target, pk, using).filter(probe_due(target, now, stale_before))
    return bool(rows.update(**{cast(str, target.probing_since): now}))


def release_probe(target: Target, pk: Any, claimed_at: Any, *, using: str) -> bool:
    """Give back the claim :func:`claim_probe` made at ``claimed_at`` (its probe was not sent)."""
    probing = cast(str, target.probing_since)
    rows = _rows(target, pk, using).filter(**{probing: claimed_at})
    return bool(rows.update(**{probing: None}))


def probe_due(target: Target, now: Any, stale_before: Any) -> Q:
    """Deactivated objects whose probe is due and not out, or out since before
    ``stale_before`` (lost)."""
    assert target.next_probe_at
    assert target.probing_since
    due = Q(**{f"{target.next_probe_at}__lte": now, f"{target.probing_since}__isnull": True})
    lost = Q(**{f"{target.probing_since}__lt": stale_before})
    return (due | lost) & Q(**{target.active: False})


def _probe_failed(
    target: Target, pk: Any, exc: BaseException, cooldown_max: float, using: str
) -> Model | None:
    """The probe out for this deactivated object failed: double its cool-down (up to
    ``cooldown_max``), schedule the next probe, count the failure, keep the new error."""
    if not target.probes:
        return None
    rows = _rows(
        target, pk, using, **{target.active: False, f"{target.probing_since}__isnull": False}
    )
    current = rows.select_for_update().values_list(target.cooldown, flat=True).first()
    if current is None and not rows.exists():
        return None
    cooldown = min(float(current or 0) * 2 or cooldown_max, cooldown_max)
    values: dict[str, Any] = {
        cast(str, target.cooldown): cooldown,
        cast(str, target.next_probe_at): timezone.now() + timedelta(seconds=cooldown),
        cast(str, target.probing_since): None,
    }
    if target.error_message:
        values[target.error_message] = format_error(exc, target.error_message_max_length)
    if target.failure_count:
        values[target.failure_count] = F(target.failure_count) + 1
    if not rows.update(**values):
        return None
    return _read_changed(target, pk, using)


def record_probe_failure(
    target: Target,
    pk: Any,
    exc: BaseException,
    *,
    cooldown: tuple[float, float] | None,
    using: str | None = None,
    timeout: float | None = None,
) -> FailureOutcome | None:
    """Record the failure of the cool-down probe out for this deactivated object (as
    :func:`record_failure` does for one), and nothing else: ``None`` if no probe was out or
    probes are off.  For a failure during the task's outage, which changes no active object."""
    if cooldown is None:
        return None
    using = using or db_for(target)
    with transaction.atomic(using=using), bounded(using, timeout):
        probed = _probe_failed(target, pk, exc, cooldown[1], using)
    if probed is None:
        return None
    return FailureOutcome(probed, False, target.count_of(probed), probed=True)


def target_for(model: type[Model], fields: Mapping[str, str | None] | None = None) -> Target:
    """The :class:`Target` of a model outside any task (admin, command)."""
    return resolve_target(model, tuple(sorted((fields or {}).items())), model._meta.label)


def _rows(target: Target, pk: Any, using: str, **where: Any) -> QuerySet[Any]:
    """The object's row (if it matches ``where``), as a queryset an ``UPDATE`` of the library's
    columns can run on.

    Through the model's base manager.  With multi-table inheritance the columns live in an
    ancestor's table: the update runs on that table, restricted to the rows the model's base
    manager has (a subquery), so it stays one ``UPDATE`` whose conditions hold under concurrency
    (the ORM's update of a child model selects the keys first and drops the conditions).
    """
    manager = target.model._base_manager.db_manager(using)
    if not target.inherited:
        mine: QuerySet[Any] = manager.filter(pk=pk, **where)
        return mine
    rows: QuerySet[Any] = manager.filter(pk=pk)
    owner = cast("type[Model]", target.owner)
    owned: QuerySet[Any] = owner._base_manager.db_manager(using).filter(
        pk=pk, pk__in=rows.values("pk"), **where
    )
    return owned


def _change_alone(target: Target, pk: Any, values: Mapping[str, Any], using: str) -> Model | None:
    """Without a transaction: read the row, then ``UPDATE`` it if it is active; the instance as
    read with the values written set on it (the counter as read, plus one)."""
    try:
        instance = read_object(target, pk, using)
    except ObjectDoesNotExist:
        return None
    if not _rows(target, pk, using, **{target.active: True}).update(**values):
        return None
    for name, value in values.items():
        if name == target.failure_count:
            value = (getattr(instance, name) or 0) + 1
        setattr(instance, name, value)
    return instance


def _change(
    target: Target, pk: Any, values: Mapping[str, Any], active: bool, using: str
) -> Model | None:
    """``UPDATE`` the row if its active flag is ``active``; return it as it is after the change
    (:func:`read_object`).  In a transaction, the row stays locked between the two."""
    if not _rows(target, pk, using, **{target.active: active}).update(**values):
        return None
    return _read_changed(target, pk, using)


def _read_changed(target: Target, pk: Any, using: str) -> Model:
    """The row an ``UPDATE`` through the base manager just changed, as :func:`read_object`
    returns it, by primary key alone: the change may hide it from a base manager that filters
    on the library's columns (one that hides inactive rows), and the outcome must not depend on
    whether the row is read after the change or before it (:func:`_change_alone`)."""
    if target.plain_rows:
        return read_object(target, pk, using)
    found: Model = QuerySet(model=target.model, using=using).get(pk=pk)
    return found


def _field(model: type[Model], name: str) -> Field[Any, Any]:
    return cast("Field[Any, Any]", model._meta.get_field(name))


def _deactivation(
    target: Target,
    exc: BaseException | str | None,
    *,
    error: bool = True,
    cooldown: float | None = None,
) -> dict[str, Any]:
    """The columns of a deactivation; ``cooldown``: schedule the first probe that far ahead."""
    now = timezone.now()
    values: dict[str, Any] = {target.active: False}
    if target.error:
        values[target.error] = error
    if target.error_message:
        text = exc if isinstance(exc, str) else format_error(exc, None)
        values[target.error_message] = _fit(text, target.error_message_max_length)
    if target.deactivated_at:
        values[target.deactivated_at] = now
    if target.probes:
        probe = cooldown is not None
        values[cast(str, target.next_probe_at)] = (
            now + timedelta(seconds=cooldown) if cooldown is not None else None
        )
        values[cast(str, target.cooldown)] = cooldown if probe else None
        values[cast(str, target.probing_since)] = None
    return values


def _reactivation(target: Target) -> dict[str, Any]:
    """The columns of a re-activation: active, error and failures cleared, no probe."""
    cleared = {
        target.active: True,
        target.error: False,
        target.error_message: "",
        target.deactivated_at: None,
        target.failure_count: 0,
        target.next_probe_at: None,
        target.cooldown: None,
        target.probing_since: None,
    }
    return {name: value for name, value in cleared.items() if name}


def _failure_values(
    target: Target, exc: BaseException, threshold: int, cooldown: float | None
) -> dict[str, Any]:
    values = _deactivation(target, exc, cooldown=cooldown)
    if not target.failure_count:
        return values
    counter = target.failure_count
    if threshold > 1:
        # An UPDATE's expressions see the row as it was: the failure that reaches the threshold
        # deactivates; earlier ones leave the columns as they are.
        reached = Q(**{f"{counter}__gte": threshold - 1})
        model = target.model
        values = {
            name: Case(
                When(reached, then=Value(value, output_field=_field(model, name))),
                default=F(name),
            )
            for name, value in values.items()
        }
    values[counter] = F(counter) + 1
    return values


# -- the read before the body ----------------------------------------------------------------


def read_state(target: Target, pk: Any, using: str) -> tuple[Any, ...]:
    """``(active, failure_count)`` of the row (``(active,)`` without a counter): one SELECT.

    A plain ``SELECT`` built once per model, run through ``connection.cursor()`` (no query
    compilation per task); through the base manager for models whose rows it filters or joins.
    Raises the model's ``DoesNotExist`` for a missing row.
    """
    names = target.state_fields()
    if not target.plain_rows:
        manager = target.model._base_manager.db_manager(using)
        state: tuple[Any, ...] = manager.values_list(*names).get(pk=pk)
        return state
    connection = connections[using]
    with connection.cursor() as cursor:
        cursor.execute(_select_sql(target.model, using, names), [_pk_value(target, pk, using)])
        row = cursor.fetchone()
    if row is None:
        raise _does_not_exist(target.model)
    return tuple(row)


def read_object(target: Target, pk: Any, using: str) -> Model:
    """The row as a model instance, what ``Model._base_manager.get(pk=pk)`` returns: for a plain
    model one ``SELECT`` of every concrete column built once per model, turned into an instance
    with ``Model.from_db()`` and the fields' converters.  Raises ``DoesNotExist``."""
    model = target.model
    if not target.plain_rows:
        found: Model = model._base_manager.db_manager(using).get(pk=pk)
        return found
    fields = model._meta.concrete_fields
    connection = connections[using]
    with connection.cursor() as cursor:
        names = tuple(field.name for field in fields)
        cursor.execute(_select_sql(model, using, names), [_pk_value(target, pk, using)])
        row = cursor.fetchone()
    if row is None:
        raise _does_not_exist(model)
    values = list(row)
    for index, converters, expression in _converters(connection, model):
        for convert in converters:
            values[index] = convert(values[index], expression, connection)
    instance: Model = model.from_db(using, [field.attname for field in fields], values)
    return instance


@lru_cache(maxsize=512)
def _select_sql(model: type[Model], using: str, names: tuple[str, ...]) -> str:
    """``SELECT <columns> FROM <table> WHERE <pk> = %s``, quoted for the alias's backend."""
    quote = connections[using].ops.quote_name
    meta = model._meta
    columns = ", ".join(quote(cast(str, _field(model, name).column)) for name in names)
    pk_column = quote(cast(str, cast("Field[Any, Any]", meta.pk).column))
    return f"SELECT {columns} FROM {quote(meta.db_table)} WHERE {pk_column} = %s"


def _pk_value(target: Target, pk: Any, using: str) -> Any:
    """The primary key as the database takes it (the field's ``get_db_prep_value``)."""
    field = cast("Field[Any, Any]", target.model._meta.pk)
    return field.get_db_prep_value(field.to_python(pk), connections[using])


#: Per connection (each thread has its own), per model: the converters the ORM applies to the
#: columns of a row, as ``(index, functions, column expression)``.
_row_converters: weakref.WeakKeyDictionary[Any, dict[type[Model], list[Any]]] = (
    weakref.WeakKeyDictionary()
)


def _converters(connection: Any, model: type[Model]) -> list[Any]:
    known = _row_converters.setdefault(connection, {})
    try:
        return known[model]
    except KeyError:
        pass
    found = []
    for index, field in enumerate(model._meta.concrete_fields):
        column = field.get_col(model._meta.db_table)
        # As the ORM's compiler: the column's converters (a foreign key's include its target's).
        functions = connection.ops.get_db_converters(column) + column.get_db_converters(connection)
        if functions:
            found.append((index, functions, column))
    known[model] = found
    return found


def _does_not_exist(model: type[Model]) -> Exception:
    missing: type[Exception] = cast(Any, model).DoesNotExist
    return missing(f"{model._meta.object_name} matching query does not exist.")


# -- bounds and signals -----------------------------------------------------------------------


@contextmanager
def bounded(using: str, seconds: float | None) -> Iterator[None]:
    """Bound how long the statements inside may wait for locks and run (called in a
    transaction).

    PostgreSQL: ``lock_timeout`` and ``statement_timeout`` for this transaction.  SQLite: the
    connection's busy timeout (the worker's crash handler runs on a connection of its own, closed
    when it is done).  Other backends: unbounded.
    """
    connection = connections[using]
    if not seconds or connection.vendor not in ("postgresql", "sqlite"):
        yield
        return
    millis = max(int(seconds * 1000), 1)
    with connection.cursor() as cursor:
        if connection.vendor == "sqlite":
            cursor.execute(f"PRAGMA busy_timeout = {millis}")
        else:
            cursor.execute(f"SET LOCAL lock_timeout = {millis}")
            cursor.execute(f"SET LOCAL statement_timeout = {millis}")
    yield


class _ReceiversFailed(Exception):
    """Rolls back what the receivers of one signal wrote when one of them raised."""

    def __init__(self, failures: list[tuple[Any, BaseException]]) -> None:
        super().__init__(failures)
        self.failures = failures


def send(signal: Signal, target: Target, sender: Any, instance: Model, **kwargs: Any) -> None:
    """Send an object's ``signal`` synchronously, in the caller's transaction, like Django's
    model signals (:func:`send_in_savepoint`)."""
    using = instance._state.db or db_for(target)
    about = target.identity(instance.pk)
    send_in_savepoint(signal, sender, using, about, instance=instance, **kwargs)


def send_in_savepoint(signal: Signal, sender: Any, using: str, about: str, **kwargs: Any) -> None:
    """Send ``signal`` in the caller's transaction on ``using``.

    Every receiver runs.  Their writes are in a savepoint: if one raises, the savepoint is rolled
    back (what the receivers wrote goes, the change that sent it stays) and each error is logged
    at ERROR with ``about`` (what the signal is about), never raised.
    """
    if not signal.has_listeners(sender):
        return
    try:
        with transaction.atomic(using=using):
            results = signal.send_robust(sender=sender, **kwargs)
            failures = [(r, e) for r, e in results if isinstance(e, BaseException)]
            if failures:
                raise _ReceiversFailed(failures)
    except _ReceiversFailed as failed:
        for receiver, error in failed.failures:
            logger.error(
                "celery_deactivate: receiver %r of %s raised for %s: %s",
                receiver,
                SIGNAL_NAMES.get(signal, repr(signal)),
                about,
                describe(error),
                exc_info=error,
            )


SIGNAL_NAMES = {
    signals.object_deactivated: "object_deactivated",
    signals.object_reactivated: "object_reactivated",
    signals.failure_counted: "failure_counted",
    signals.outage_started: "outage_started",
    signals.outage_ended: "outage_ended",
}
