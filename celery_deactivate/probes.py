"""Cool-down probes: the way back for an object a failure deactivated (half-open).

With ``deactivate_cooldown`` set on a task, a deactivation by a failure schedules a probe
(``next_probe_at``).  The periodic task ``celery_deactivate.maintain`` calls :func:`maintain`,
which claims each due object with one conditioned ``UPDATE`` (``probing_since``: however many
``maintain`` runs, beat instances or workers try at once, one wins) and sends the probe: the task
itself, with the pk as its only argument, through the task's own ``apply_async`` (routing,
``task_always_eager`` in tests). The task runs its body on a deactivated object whose probe is
out: a success re-activates it (``object_reactivated``), a failure doubles its cool-down up to
``deactivate_cooldown_max`` and schedules the next probe.  A probe that has not reported after
``deactivate_cooldown_max`` (a lost message) is sent again.  Objects deactivated by hand are never
probed, and no probe is sent while the task's outage is open.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any, cast

from celery.utils import uuid
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from . import _errors, _history, _metrics, _reads, services
from ._options import Options
from .target import Target
from .task import DeactivatingTask

__all__ = ["BATCH_SIZE", "maintain", "send_due_probes"]

logger = logging.getLogger("celery_deactivate")

#: Due objects considered per task and ``maintain`` run.
BATCH_SIZE = 1000


def maintain(app: Any, *, now: Any = None, batch_size: int = BATCH_SIZE) -> int:
    """Send the due probes of every deactivating task of ``app`` with cool-down probes on;
    return how many were sent.  A task whose probes cannot be sent is logged and does not stop
    the others."""
    now = now or timezone.now()
    sent = 0
    for task in list(app.tasks.values()):
        if not isinstance(task, DeactivatingTask):
            continue
        try:
            sent += send_due_probes(task, now=now, batch_size=batch_size)
        except Exception:
            logger.exception("celery_deactivate: %s: the probes could not be sent", task.name)
    return sent


def send_due_probes(
    task: DeactivatingTask, *, now: Any = None, batch_size: int = BATCH_SIZE
) -> int:
    """Claim and send the probes of ``task`` that are due; return how many were sent."""
    policy = Options(task).probes
    if policy is None:
        return 0
    if task.outage_open():
        logger.info("celery_deactivate: %s: outage open, no probe sent", task.name)
        return 0
    now = now or timezone.now()
    target = task.target
    stale_before = now - timedelta(seconds=policy[1])
    using = services.db_for(target)
    candidates = (
        target.model._base_manager.db_manager(using)
        .filter(probe_due(target, now, stale_before))
        .order_by(cast(str, target.next_probe_at))
        .values_list("pk", flat=True)[:batch_size]
    )
    sent = 0
    for pk in list(candidates):
        task_id = uuid()
        if not claim_probe(target, pk, now, stale_before, using=using, task=task, task_id=task_id):
            continue  # someone else claimed it meanwhile
        try:
            task.apply_async((pk,), task_id=task_id)
        except Exception as exc:
            # Not sent (the broker is down; an eager probe that propagates its failure): give the
            # claim back, so that the next maintain run tries again.
            release_probe(target, pk, now, using=using, task=task, task_id=task_id, error=exc)
            logger.exception(
                "celery_deactivate: %s: the probe of %s could not be sent",
                task.name,
                target.identity(pk),
            )
            continue
        logger.info("celery_deactivate: %s: probe sent for %s", task.name, target.identity(pk))
        _metrics.add("celery_deactivate.probes.sent", task=task.name, model=target.label)
        sent += 1
    return sent


def claim_probe(
    target: Target,
    pk: Any,
    now: Any,
    stale_before: Any,
    *,
    using: str,
    task: Any = None,
    task_id: str | None = None,
) -> bool:
    """Mark a probe of this deactivated object as out, if one is due and none is out (or the
    one out is older than ``stale_before``: lost).  One conditioned ``UPDATE``: however many
    callers try at once, one wins; the winner records "probe sent" (the probe ``task_id`` of
    ``task``) in its transaction."""
    rows = _reads.object_row(target, pk, using).filter(probe_due(target, now, stale_before))
    by = _history.By.run("probe", task, task_id)
    return _probe_change(target, pk, rows, now, using, "probe_sent", by, None)


def release_probe(
    target: Target,
    pk: Any,
    claimed_at: Any,
    *,
    using: str,
    task: Any = None,
    task_id: str | None = None,
    error: BaseException | None = None,
) -> bool:
    """Give back the claim :func:`claim_probe` made at ``claimed_at``: its probe was not sent
    (``error``), which the object's history says as "probe failed"."""
    probing = cast(str, target.probing_since)
    rows = _reads.object_row(target, pk, using).filter(**{probing: claimed_at})
    by = _history.By.run("probe", task, task_id)
    text = f"not sent: {_errors.describe(error)}"
    return _probe_change(target, pk, rows, None, using, "probe_failed", by, text)


def _probe_change(
    target: Target,
    pk: Any,
    rows: Any,
    probing_since: Any,
    using: str,
    kind: _history.Kind,
    by: _history.By,
    error: str | None,
) -> bool:
    """Set ``probing_since`` on ``rows`` and, if that changed the row, record the event, in one
    transaction."""
    with transaction.atomic(using=using):
        if not rows.update(**{cast(str, target.probing_since): probing_since}):
            return False
        _history.record(using, target.model, pk, kind, by, error)
    return True


def probe_due(target: Target, now: Any, stale_before: Any) -> Q:
    """Deactivated objects whose probe is due and not out, or out since before
    ``stale_before`` (lost)."""
    assert target.next_probe_at
    assert target.probing_since
    due = Q(**{f"{target.next_probe_at}__lte": now, f"{target.probing_since}__isnull": True})
    lost = Q(**{f"{target.probing_since}__lt": stale_before})
    return (due | lost) & Q(**{target.active: False})
