"""Option names checked: a task's attribute or a setting that looks like an option but is none
(``deactive_after``, ``deactivate_afer``) is an error, never ignored (the options:
``celery_deactivate.conf.OPTIONS``)."""

from __future__ import annotations

import difflib
from typing import Any

from .conf import KNOWN_OPTIONS, OPTIONS
from .exceptions import DeactivateConfigError

#: How close a name must be to an option's (``difflib``'s ratio) to be taken for a misspelling
#: of it: ``deactive_after`` (0.93) and ``deactivation_after`` (0.88) are; none of Celery's own
#: task attributes (``acks_late``: 0.45) is.
MISSPELLING_CUTOFF = 0.85


def closest_option(name: str) -> str | None:
    """The option ``name`` is most probably a misspelling of, if any."""
    matches = difflib.get_close_matches(name, OPTIONS, n=1, cutoff=MISSPELLING_CUTOFF)
    return matches[0] if matches else None


def is_misspelt_option(name: str) -> bool:
    """Whether ``name`` looks like an option but is none: a ``deactivate_*`` or
    ``dont_deactivate_*`` name, or one close to an option's.  A typo is an error, not ignored."""
    if name in KNOWN_OPTIONS:
        return False
    return name.startswith(("deactivate_", "dont_deactivate_")) or closest_option(name) is not None


def check_option_names(task_class: type[Any]) -> None:
    """Raise :exc:`DeactivateConfigError` for an attribute of ``task_class`` (an ``@app.task``
    keyword or a class attribute) that looks like an option but is none.

    Private names and the methods, properties and nested classes written in the class's body
    are never options, whatever their name.
    """
    task_name = str(getattr(task_class, "name", None) or task_class.__name__)
    for name, value in vars(task_class).items():
        if name.startswith("_") or _written_in_body(task_class, value):
            continue
        if not is_misspelt_option(name):
            continue
        if name in OPTIONS:
            raise DeactivateConfigError(
                f"{name} is a worker-wide setting (app.conf.{name}), not a task option",
                task=task_name,
            )
        closest = closest_option(name)
        guess = "" if closest is None else f" (did you mean {closest!r}?)"
        raise DeactivateConfigError(
            f"unknown option {name!r}{guess}; the options are {sorted(KNOWN_OPTIONS)}",
            task=task_name,
        )


def _written_in_body(task_class: type[Any], value: Any) -> bool:
    """Whether ``value`` is a function, method, property or class written in ``task_class``'s
    body (its qualified name says so), not a value given to an option (``notifier=notify``)."""
    # property; functools' and Django's cached_property; classmethod, staticmethod
    for function in ("fget", "func", "__func__"):
        value = getattr(value, function, value)
    qualname = getattr(value, "__qualname__", None)
    return isinstance(qualname, str) and qualname.startswith(f"{task_class.__qualname__}.")
