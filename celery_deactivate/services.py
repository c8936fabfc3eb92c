"""Every change of an object's deactivation state goes through these functions.

The task, the worker's crash handler, the admin actions and the management command all call them,
so they all write the same fields and send the same signals.  Each change is one ORM ``UPDATE``
of the library's own columns, conditioned on the row's active flag (so concurrent callers change
a row once), a read of the row and the object's history event (one ``INSERT``, ``_history``) in
the same transaction; the signal is sent in that transaction, like Django's model signals.
Everything goes through Django's ``QuerySet``, on every backend.

The fields each change writes are looked up by role (:data:`~celery_deactivate.target.ROLES`).
The row's reads live in ``_reads``, the statements' bound and the signals' savepoint in
``_transaction``, an exception's text in ``_errors`` (:data:`ERROR_LENGTH` is its public
name).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

from django.db import router, transaction
from django.db.models import Case, F, Model, Q, Value, When
from django.utils import timezone

from . import _charset, _history, _metrics, signals
from ._errors import ERROR_LENGTH, fit, format_error
from ._reads import field_of, object_row, read_changed
from ._transaction import bounded, send
from .target import PROBE_ROLES, ROLES, Target, resolve_target

__all__ = ["ERROR_LENGTH", "FailureOutcome", "deactivate", "reactivate", "record_failure"]

logger = logging.getLogger("celery_deactivate")


@dataclass(frozen=True)
class FailureOutcome:
    """What :func:`record_failure` did.  ``instance`` is ``None`` when nothing changed."""

    instance: Model | None
    deactivated: bool
    failure_count: int | None
    #: The failure was a cool-down probe's: the object stays deactivated, its cool-down doubled.
    probed: bool = False


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
    cooldown: tuple[float, float] | None = None,
) -> FailureOutcome:
    """Count one final failure of an active object, deactivating it at ``threshold``.

    One conditioned ``UPDATE`` (``failure_count = failure_count + 1``, and the deactivation when
    the count reaches ``threshold``, ``WHERE pk AND active``), so concurrent failures of the same
    object never lose an increment nor deactivate it twice.  An inactive or missing object is left
    alone.  Sends :data:`~celery_deactivate.signals.object_deactivated` or
    :data:`~celery_deactivate.signals.failure_counted` when the row changed.

    One transaction, whoever listens: the caller's (the failure pipeline's, which writes the
    failure's notice and the guard's row in it too), else its own.  In it the ``UPDATE``, the
    read of the changed row (locked in between, so the read says whether this failure reached
    the threshold), the signal (its receivers' writes commit or roll back with the change) and,
    with cool-down probes, a probe's failure.  The caller bounds its transaction's waits (the
    crash path: the private ``_transaction.bounded()``).

    ``cooldown`` is ``(seconds, max_seconds)`` when cool-down probes are on: a deactivation
    schedules the first probe, and the failure of a probe (a deactivated object with a probe
    out) doubles the cool-down up to the maximum and schedules the next one.
    """
    using = using or db_for(target)
    values = _failure_values(target, exc, threshold, cooldown[0] if cooldown else None)
    with transaction.atomic(using=using, savepoint=False):
        instance = _change(target, pk, values, True, using)
        if instance is None:
            # With probes on, the update (a write even when it matched nothing) took the row's
            # lock first, before the probe's read: on SQLite no lock upgrade can fail.
            if cooldown is not None:
                probed = _probe_failed(target, pk, exc, cooldown[1], using)
                if probed is not None:
                    by = _history.By.run("probe", sender, task_id)
                    _history.record(using, target.model, pk, "probe_failed", by, exc)
                    return FailureOutcome(probed, False, target.count_of(probed), probed=True)
            return FailureOutcome(None, False, None)
        count = target.count_of(instance)
        deactivated = not getattr(instance, target.active)
        if deactivated:
            by = _history.By.run("failure", sender, task_id)
            _history.record(using, target.model, pk, "deactivated", by, exc)
        signal = signals.object_deactivated if deactivated else signals.failure_counted
        send(signal, target, sender, instance, exception=exc, task_id=task_id, failure_count=count)
    return FailureOutcome(instance, deactivated, count)


def reset_failures(target: Target, pk: Any, *, using: str | None = None) -> int:
    """Set a positive failure count of an active object back to 0 (a success ends the run of
    failures; a deactivation that raced it keeps its count)."""
    if not target.failure_count:
        return 0
    where = {target.active: True, f"{target.failure_count}__gt": 0}
    changed: int = object_row(target, pk, using or db_for(target), **where).update(
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
    by: Any = None,
) -> Model | None:
    """Deactivate one object by hand (admin, command, ``instance.deactivate()``); ``None`` if
    nothing changed.

    An active object is recorded as deactivated by an error when an ``exception`` (or a message)
    is given, else as deactivated by hand, and
    :data:`~celery_deactivate.signals.object_deactivated` is sent.  Either way it is never probed
    (cool-down probes follow failures only).

    The operator's word wins over a probe: an object a failure deactivated, with a probe
    scheduled or out, has its probe turned off (no probe is sent, and one out does not
    re-activate it: ``end_probe()`` needs it to be still out).  Its error and the time of its
    deactivation stay as the failure recorded them, and no signal is sent: it was deactivated
    already.  An inactive object without a probe is left alone.

    ``by`` is who did it, for the object's history and the metrics: a user (the admin passes
    ``request.user``) or a text (the management command passes ``"command"``); ``None``: code
    that did not say.
    """
    target = target_for(model, fields)
    using = using or db_for(target)
    values = _deactivation(target, exception, error=exception is not None)
    who = _history.By.of(by)
    with transaction.atomic(using=using):
        instance = _change(target, pk, values, True, using)
        if instance is None:
            return _stop_probes(target, pk, using, who)
        _history.record(using, model, pk, "deactivated", who, exception)
        send(
            signals.object_deactivated,
            target,
            model,
            instance,
            exception=exception,
            task_id=None,
            failure_count=target.count_of(instance),
        )
    _metrics.changed("celery_deactivate.deactivations", target.label, who.source, instance)
    return instance


def _stop_probes(target: Target, pk: Any, using: str, by: _history.By) -> Model | None:
    """Turn off the probes of a deactivated object (one scheduled or out); ``None`` if it had
    none."""
    if not target.probes:
        return None
    rows = object_row(target, pk, using, **{target.active: False}).filter(target.probe_pending())
    values = {cast(str, getattr(target, role)): None for role in PROBE_ROLES}
    if not rows.update(**values):
        return None
    _history.record(using, target.model, pk, "probes_off", by)
    logger.info(
        "celery_deactivate: %s was deactivated already; deactivated by hand, its cool-down "
        "probes are off",
        target.identity(pk),
    )
    return read_changed(target, pk, using)


def reactivate(
    model: type[Model],
    pk: Any,
    *,
    fields: Mapping[str, str | None] | None = None,
    using: str | None = None,
    by: Any = None,
) -> Model | None:
    """Make one inactive object active again and clear its error; ``None`` if it was active.

    ``by`` is who did it, as for :func:`deactivate`."""
    target = target_for(model, fields)
    using = using or db_for(target)
    who = _history.By.of(by)
    with transaction.atomic(using=using):
        instance = _change(target, pk, _reactivation(target), False, using)
        if instance is not None:
            _history.record(using, model, pk, "reactivated", who)
            send(signals.object_reactivated, target, model, instance)
    _metrics.changed("celery_deactivate.reactivations", target.label, who.source, instance)
    return instance


def end_probe(
    target: Target, pk: Any, *, using: str | None = None, by: _history.By | None = None
) -> Model | None:
    """A cool-down probe succeeded: re-activate the object (as :func:`reactivate` does, sending
    :data:`~celery_deactivate.signals.object_reactivated`); ``None`` if no probe was out.
    ``by``: the probe's task and task id."""
    using = using or db_for(target)
    assert target.probing_since is not None
    with transaction.atomic(using=using):
        where = {f"{target.probing_since}__isnull": False, target.active: False}
        if not object_row(target, pk, using, **where).update(**_reactivation(target)):
            return None
        instance = read_changed(target, pk, using)
        _history.record(using, target.model, pk, "reactivated", by or _history.By("probe"))
        send(signals.object_reactivated, target, target.model, instance)
    return instance


def _probe_failed(
    target: Target, pk: Any, exc: BaseException, cooldown_max: float, using: str
) -> Model | None:
    """The probe out for this deactivated object failed: double its cool-down (up to
    ``cooldown_max``), schedule the next probe, count the failure, keep the new error."""
    if not target.probes:
        return None
    rows = object_row(
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
    if not _charset.update(rows, values):
        return None
    return read_changed(target, pk, using)


def record_probe_failure(
    target: Target,
    pk: Any,
    exc: BaseException,
    *,
    cooldown: tuple[float, float] | None,
    using: str | None = None,
    timeout: float | None = None,
    sender: Any = None,
    task_id: str | None = None,
) -> FailureOutcome | None:
    """Record the failure of the cool-down probe out for this deactivated object (as
    :func:`record_failure` does for one), and nothing else: ``None`` if no probe was out or
    probes are off.  For a failure during the task's outage, which changes no active object."""
    if cooldown is None:
        return None
    using = using or db_for(target)
    with transaction.atomic(using=using), bounded(using, timeout):
        probed = _probe_failed(target, pk, exc, cooldown[1], using)
        if probed is not None:
            by = _history.By.run("probe", sender, task_id)
            _history.record(using, target.model, pk, "probe_failed", by, exc)
    if probed is None:
        return None
    return FailureOutcome(probed, False, target.count_of(probed), probed=True)


def target_for(model: type[Model], fields: Mapping[str, str | None] | None = None) -> Target:
    """The :class:`Target` of a model outside any task (admin, command)."""
    return resolve_target(model, tuple(sorted((fields or {}).items())), model._meta.label)


def _change(
    target: Target, pk: Any, values: Mapping[str, Any], active: bool, using: str
) -> Model | None:
    """``UPDATE`` the row if its active flag is ``active``; return it as it is after the change
    (:func:`~celery_deactivate._reads.read_changed`).  In a transaction, the row stays locked
    between the two."""
    if not _charset.update(object_row(target, pk, using, **{target.active: active}), values):
        return None
    return read_changed(target, pk, using)


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
        values[target.error_message] = fit(text, target.error_message_max_length)
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
    fields = target.fields().items()
    return {name: ROLES[role].reactivated for role, name in fields if name}


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
                When(reached, then=Value(value, output_field=field_of(model, name))),
                default=F(name),
            )
            for name, value in values.items()
        }
    values[counter] = F(counter) + 1
    return values
