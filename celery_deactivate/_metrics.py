"""OpenTelemetry counters of what the library does (``pip install celery-deactivate[otel]``).

Each hook is one call where the thing happens, after the change's own transaction: a failure
counted or a deactivation (``_failure``), a change by hand or by the outage guard
(``services``), a probe sent (``probes``) or that succeeded (``_run``), an outage started or
ended (``_outage``), a notice delivered or not (``notify``).  Through the ``opentelemetry-api``
package only: without it every hook returns at once; with it and no SDK configured, the API's
no-op instruments take the calls.  The instruments are created on first use, from the global
meter provider (``metrics.get_meter``), which resolves to the provider the application sets,
whenever it sets it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from .states import Cause

_otel: Any
try:
    from opentelemetry import metrics as _otel
except ImportError:  # the [otel] extra is not installed
    _otel = None

#: The meter's (instrumentation scope's) name.
METER = "celery_deactivate"

#: The attributes' prefix: ``celery_deactivate.task`` (the task's name), ``.model`` (the
#: model's label), ``.cause`` (a :class:`~celery_deactivate.states.Cause`), ``.notice.kind``.
PREFIX = "celery_deactivate."

#: Every counter, declared once: its name, unit, description and the attributes it carries (the
#: docs' table is generated from this).
COUNTERS: Mapping[str, tuple[str, str, str]] = {
    "celery_deactivate.failures": (
        "{failure}",
        "Final failures of a task counted against an active object (the deactivating one too; "
        "not a probe's, nor one during an outage)",
        "task, model",
    ),
    "celery_deactivate.deactivations": (
        "{object}",
        "Objects deactivated, by cause: failure, admin, code",
        "cause, model; task for a failure",
    ),
    "celery_deactivate.reactivations": (
        "{object}",
        "Objects re-activated, by cause: probe, outage, admin, command, code",
        "cause, model; task for a probe",
    ),
    "celery_deactivate.probes.sent": ("{probe}", "Cool-down probes sent", "task, model"),
    "celery_deactivate.probes.succeeded": (
        "{probe}",
        "Cool-down probes that succeeded (the object re-activated)",
        "task, model",
    ),
    "celery_deactivate.probes.failed": (
        "{probe}",
        "Cool-down probes that failed (the cool-down doubled)",
        "task, model",
    ),
    "celery_deactivate.outages.started": ("{outage}", "Outages of a task started", "task, model"),
    "celery_deactivate.outages.ended": ("{outage}", "Outages of a task ended", "task, model"),
    "celery_deactivate.notices.sent": (
        "{notice}",
        "Notices the notifier took: deactivated, digest, outage_started, outage_ended",
        "task, notice.kind",
    ),
    "celery_deactivate.notices.failed": (
        "{notice}",
        "Notices the notifier raised on (a digest's are tried again)",
        "task, notice.kind",
    ),
}

_counters: dict[str, Any] = {}


class _Outcome(Protocol):
    """What ``services.record_failure`` did (its ``FailureOutcome``)."""

    @property
    def instance(self) -> Any: ...
    @property
    def deactivated(self) -> bool: ...
    @property
    def probed(self) -> bool: ...


def add(name: str, *, task: str | None = None, model: str | None = None, **extra: str) -> None:
    """Count one on the counter ``name``, with the task's name, the model's label and ``extra``
    attributes (``cause=``, ``kind=``) that are given."""
    if _otel is None:
        return
    counter = _counters.get(name)
    if counter is None:
        unit, description, _ = COUNTERS[name]
        meter = _otel.get_meter(METER)
        counter = _counters.setdefault(name, meter.create_counter(name, unit, description))
    given = {"task": task, "model": model, **extra}
    counter.add(1, {PREFIX + key: str(value) for key, value in given.items() if value is not None})


def failure(task: str, model: str, outcome: _Outcome) -> None:
    """A final failure recorded on its object: counted (and a deactivation, at the threshold),
    or the failure of the object's probe."""
    if outcome.instance is None:
        return
    if outcome.probed:
        add("celery_deactivate.probes.failed", task=task, model=model)
        return
    add("celery_deactivate.failures", task=task, model=model)
    if outcome.deactivated:
        add("celery_deactivate.deactivations", task=task, model=model, cause=Cause.FAILURE)


def changed(name: str, model: str, cause: str, instance: Any) -> None:
    """A deactivation or re-activation by ``cause`` (services), if it changed ``instance``."""
    if instance is not None:
        add(name, model=model, cause=cause)


def probe_succeeded(task: str, model: str) -> None:
    """A cool-down probe succeeded: the object is re-activated."""
    add("celery_deactivate.probes.succeeded", task=task, model=model)
    add("celery_deactivate.reactivations", task=task, model=model, cause=Cause.PROBE)


def notice(task: str, kind: str, delivered: bool) -> None:
    """A notice the notifier took (``delivered``) or failed on."""
    name = "celery_deactivate.notices.sent" if delivered else "celery_deactivate.notices.failed"
    add(name, task=task, **{"notice.kind": kind})
