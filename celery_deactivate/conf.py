"""The options of a deactivating task and the one place where they are resolved.

Every option is set per task as an ``@app.task(...)`` keyword, or worker-wide as a Celery setting
of the same name (``app.conf.deactivate_after = 3``; ``CELERY_DEACTIVATE_AFTER = 3`` in Django
settings under the ``CELERY`` namespace).  The per-task value wins; ``None`` means "not set here".
Values are read when they are needed, never at import time, so per-test configuration works.
A few options concern the library's tables rather than a task (``deactivate_history_days``): they
are worker-wide settings only (read by ``setting()``), and a task keyword of that name is an error.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from kombu.utils.imports import symbol_by_name

from .exceptions import DeactivateConfigError
from .target import PROBE_ROLES, ROLES

__all__ = ["FIELD_DEFAULTS", "OPTIONS", "Option"]

if TYPE_CHECKING:
    from celery import Task

#: The roles a model field can play, and the field name used when none is configured (the
#: roles are declared in :data:`celery_deactivate.target.ROLES`).
FIELD_DEFAULTS: Mapping[str, str] = {role.name: role.default for role in ROLES.values()}

ExceptionTypes = tuple[type[BaseException], ...]
Notifier = Callable[..., None]


@dataclass(frozen=True)
class Option:
    name: str
    default: Any
    coerce: Callable[[Any], Any]
    doc: str
    #: A worker-wide setting only (``app.conf``), not a task keyword.
    worker_wide: bool = False


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"must be an integer >= 1, got {value!r}")
    return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be True or False, got {value!r}")
    return value


def _non_negative_number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"must be a number of seconds >= 0, got {value!r}")
    return float(value)


def _non_negative_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"must be an integer >= 0, got {value!r}")
    return value


def _rate(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ValueError(f"must be a number in (0, 1], got {value!r}")
    return float(value)


def _positive_seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ValueError(f"must be a number of seconds > 0, got {value!r}")
    return float(value)


def _positive_days(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ValueError(f"must be a number of days > 0, got {value!r}")
    return float(value)


def _url(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.startswith(("http://", "https://")):
        raise ValueError(f"must be an http:// or https:// URL, got {value!r}")
    return value.rstrip("/")


def _exception_types(value: Any) -> ExceptionTypes:
    items = (value,) if isinstance(value, str | type) else tuple(value)
    types = tuple(symbol_by_name(item) if isinstance(item, str) else item for item in items)
    for item in types:
        if not (isinstance(item, type) and issubclass(item, BaseException)):
            raise ValueError(f"must be exception classes (or dotted paths to them), got {item!r}")
    return types


def _failure_types(value: Any) -> ExceptionTypes:
    types = _exception_types(value)
    for item in types:
        if not issubclass(item, Exception):
            raise ValueError(
                f"can only name Exception subclasses, got {item.__qualname__}: Celery treats "
                "other BaseExceptions (SystemExit, KeyboardInterrupt, GeneratorExit...) as the "
                "worker's own control flow and calls no failure hook for them, so they could "
                "never be counted"
            )
    return types


def _callable(value: Any) -> Notifier:
    func = symbol_by_name(value) if isinstance(value, str) else value
    if not callable(func):
        raise ValueError(f"must be a callable or a dotted path to one, got {value!r}")
    return func  # type: ignore[no-any-return]


def _fields(value: Any) -> Mapping[str, str | None]:
    if not isinstance(value, Mapping):
        raise ValueError(f"must be a mapping of role to field name, got {value!r}")
    unknown = sorted(set(value) - set(ROLES))
    if unknown:
        raise ValueError(f"unknown role(s) {unknown}; the roles are {sorted(ROLES)}")
    if value.get("active", "active") is None:
        raise ValueError("the 'active' role cannot be switched off")
    return dict(value)


OPTIONS: Mapping[str, Option] = {
    option.name: option
    for option in (
        Option(
            "deactivate_after",
            1,
            _positive_int,
            "Consecutive final failures that deactivate the object; a success resets the count. "
            "Above 1 the model needs a failure counter field.",
        ),
        Option(
            "deactivate_on",
            (Exception,),
            _failure_types,
            "Exception types that count as failures (Exception subclasses or dotted paths).",
        ),
        Option(
            "dont_deactivate_on",
            (),
            _exception_types,
            "Exception types that never count nor deactivate, even if listed in deactivate_on.",
        ),
        Option(
            "deactivate_notify",
            True,
            _bool,
            "Call the notifier (by default: mail the site admins) for the task's deactivations, "
            "digests and outages.  False: no notice of any kind for this task.",
        ),
        Option(
            "deactivate_notifier",
            "celery_deactivate.notify.mail_admins",
            _callable,
            "Callable (or dotted path) called as notifier(task=, instance=, exception=, "
            "task_id=, kind=, notice=), after the change commits; kind is 'deactivated', "
            "'digest', 'outage_started' or 'outage_ended' (see celery_deactivate.notify).",
        ),
        Option(
            "deactivate_notify_window",
            300.0,
            _non_negative_number,
            "Seconds: the first deactivation of a task in a quiet period is notified at once, "
            "later ones within this window are sent together as one digest when it ends "
            "(by celery_deactivate.maintain or the task's next failure).  0: one notice per "
            "deactivation.",
        ),
        Option(
            "deactivate_site_url",
            None,
            _url,
            "The site's base URL (https://ops.example.com): notices link to the admin change "
            "page with absolute URLs.  Unset: site-relative paths.",
        ),
        Option(
            "deactivate_outage_objects",
            10,
            _non_negative_int,
            "Outage guard: distinct objects that must fail for good within the window, "
            "together with deactivate_outage_rate, for an outage of the task to start (no "
            "deactivation while it lasts).  0 turns the guard off for the task; a worker-wide "
            "setting of 0 or None turns it off for every task that does not set it.",
        ),
        Option(
            "deactivate_outage_rate",
            0.5,
            _rate,
            "Outage guard: share of the task's finished runs in the window that failed for "
            "good, in (0, 1], at or above which an outage starts (with deactivate_outage_objects) "
            "and below which it ends.",
        ),
        Option(
            "deactivate_outage_min_runs",
            100,
            _positive_int,
            "Outage guard: finished runs of the task in the window (successes and final "
            "failures, of every process) below which its failure rate is not judged, so that a "
            "few failures first in line (a fresh worker, broken objects first in key order) do "
            "not start an outage.  A task with fewer runs per window never starts one: lower it.",
        ),
        Option(
            "deactivate_outage_window",
            300.0,
            _positive_seconds,
            "Outage guard: seconds over which failures and runs are counted.",
        ),
        Option(
            "deactivate_fields",
            {},
            _fields,
            f"Field names by role: {', '.join(ROLES)}. "
            "A role mapped to None is not written; a default name missing on the model is skipped.",
        ),
        Option(
            "deactivate_pass_object",
            False,
            _bool,
            "Call the body with the already-loaded model instance instead of its primary key.",
        ),
        Option(
            "deactivate_crash_timeout",
            10.0,
            _non_negative_number,
            "Seconds the worker's main process may spend recording a crash (hard time limit, "
            "killed child): the bound on its lock wait and statements.",
        ),
        Option(
            "deactivate_cooldown",
            None,
            _positive_seconds,
            "Seconds after a deactivation by a failure before celery_deactivate.maintain sends "
            "one probe (the task, with the pk): a probe that succeeds re-activates the object, "
            "one that fails doubles the cool-down up to deactivate_cooldown_max.  None: off.  "
            f"Needs the {', '.join(PROBE_ROLES)} fields (DeactivatableModel).",
        ),
        Option(
            "deactivate_cooldown_max",
            86400.0,
            _positive_seconds,
            "The longest cool-down between two probes of one object, in seconds (a day).",
        ),
        Option(
            "deactivate_atomic",
            True,
            _bool,
            "Run the body in a transaction on the model's write database, rolled back when it "
            "fails.  False runs it outside any transaction (for long, I/O-bound bodies that "
            "should not hold a connection 'idle in transaction'): a failure still counts and "
            "deactivates, but what the body wrote before failing stays.",
        ),
        Option(
            "deactivate_history_days",
            90.0,
            _positive_days,
            "Worker-wide only: days each object's history events are kept "
            "(celery_deactivate.maintain deletes the older ones, in bounded batches).",
            worker_wide=True,
        ),
    )
}

#: Every keyword a deactivating task accepts besides Celery's own.
KNOWN_OPTIONS = frozenset(name for name, option in OPTIONS.items() if not option.worker_wide) | {
    "model"
}


def _app_of(task: Any) -> Any:
    """The task's app: ``Task.app``, a class property, so a task class has it too."""
    return task.app


def resolve(task: Task[Any, Any] | type[Task[Any, Any]], name: str) -> Any:
    """The value of option ``name`` for ``task``: per task, else the app setting, else default.

    Read when it is needed, every time, through ``app.conf`` (Celery's public view of the
    app's settings and of Django's ``CELERY_*`` settings), so that a setting changed at run
    time, by assignment or in place, is seen by the next read.  Only the coercion is cached.
    """
    option = OPTIONS[name]
    value = getattr(task, name, None)
    if value is None:
        value = _app_of(task).conf.get(name)
    if value is None:
        return _coerced(option, option.default)
    try:
        return _coerced(option, value)
    except (ValueError, TypeError, ImportError, AttributeError) as exc:
        raise DeactivateConfigError(f"{name} {exc}", task=task.name) from exc


def setting(app: Any, name: str) -> Any:
    """The value of the worker-wide option ``name`` (``worker_wide``) on ``app``: its setting,
    else the default; read when needed, as :func:`resolve` reads a task's."""
    option = OPTIONS[name]
    value = app.conf.get(name)
    try:
        return _coerced(option, option.default if value is None else value)
    except (ValueError, TypeError) as exc:
        raise DeactivateConfigError(f"{name} {exc}") from exc


#: Coerced option values by ``(option, type, value)``, for values that can be keys (a dotted
#: path is imported once); a mapping or a list is coerced at each read (it may change in place).
#: Read-only values: a coerced mapping is a read-only view.
_coercions: dict[tuple[str, type, Any], Any] = {}


def _coerced(option: Option, value: Any) -> Any:
    if value is None:
        return None
    try:
        key = (option.name, type(value), value)
        return _coercions[key]
    except TypeError:  # unhashable: a mapping, a list
        return _coerce(option, value)
    except KeyError:
        coerced = _coercions[key] = _coerce(option, value)
        return coerced


def _coerce(option: Option, value: Any) -> Any:
    coerced = option.coerce(value)
    return MappingProxyType(coerced) if isinstance(coerced, dict) else coerced
