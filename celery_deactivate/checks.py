"""System checks (``manage.py check``) for deactivating tasks, with Django's check framework.

A misconfigured task raises :exc:`~celery_deactivate.exceptions.DeactivateConfigError` when it
is declared, which for a project's task modules is when its worker starts.  These checks report
the mistakes through Django instead, for every task at once (the first mistake of each), with a
hint.  They are tagged ``celery_deactivate`` (``manage.py check --tag celery_deactivate``).

``celery_deactivate.E001``
    The task's model is missing, not installed, abstract or not a model (the ``model=``
    option).
``celery_deactivate.E002``
    A field the task records is missing on the model or of the wrong type: a name given in
    ``deactivate_fields`` (per task or worker-wide), the ``active`` field, or the failure counter
    that ``deactivate_after`` > 1 needs.
``celery_deactivate.E003``
    An option's value is invalid, on the task or as a worker-wide Celery setting
    (``app.conf.deactivate_after``, ``CELERY_DEACTIVATE_AFTER``): see
    :mod:`celery_deactivate.conf`.
``celery_deactivate.E004``
    A worker-wide setting looks like an option but is none (a typo: it would be ignored), on
    the current Celery app (``app.conf.deactivate_outage_object``) or in Django settings under
    the ``CELERY`` namespace (``CELERY_DEACTIVATE_OUTAGE_OBJECT``, ``CELERY_DEACTIVATION_AFTER``);
    the message names the closest option's setting.
``celery_deactivate.E005``
    A ``ModelAdmin`` with :class:`~celery_deactivate.admin.DeactivatableAdminMixin` names a field
    the library records in ``list_editable`` (reported by the admin's own checks).

``celery_deactivate.W001``
    A database the library writes to is of a backend it does not support (PostgreSQL, MySQL or
    MariaDB, SQLite: docs/versions.md): the write database of a task's model (the router's
    choice), or that of the library's own tables.  Its statements are Django's, but its upsert,
    its bound on lock waits and its text cleaning are tested on those three only.

``celery_deactivate.W002``
    ``celery_deactivate.maintain`` is scheduled nowhere: digests, outages' ends and cool-down
    probes wait for it, so deferred notices would wait for ever.  Where it may be scheduled:
    the current Celery app's ``beat_schedule`` (which django-celery-beat's ``DatabaseScheduler``
    also copies into its table), and, when ``django_celery_beat`` is installed, an enabled
    ``PeriodicTask`` row.  With django-celery-beat the check reads that table, so it is a
    database check (Django's ``database`` tag): ``manage.py migrate`` and ``manage.py check
    --database default`` run it, a plain ``manage.py check`` does not (Django 6.1 gives every
    other check all the databases: only this tag keeps it from reading them unasked); without
    django-celery-beat, no database is used.  A table that cannot be read (the server is down,
    not migrated yet) is said in the message.  Nothing is reported when the current app is
    finalized and has no deactivating task.

The settings are checked by ``manage.py check`` (and so ``check --deploy``), tasks or none.

Which tasks are checked:

- ``manage.py check`` (and every command that runs the checks): the deactivating tasks
  registered on the current Celery app if it is finalized, else none.  This check imports
  nothing and finalizes nothing: a worker runs Django's checks when it starts, before it imports
  its task modules, and finalizing the app then would send ``on_after_finalize`` before the
  receivers those modules connect to it.  In most projects the app is not finalized yet when the
  checks run, so this check finds nothing to check; it serves shells and test suites.
- ``manage.py check --deploy``: first the current app imports the modules its worker imports
  (``app.loader.import_default_modules()``: ``imports``, ``include`` and the packages of
  ``autodiscover_tasks()``) and is finalized, as ``celery report`` does; then its tasks are
  checked.  A declaration that raises stops Celery's finalization: it is reported, and the tasks
  declared after it are reported on the next run.

The current app is Celery's: in a Django project, the app the project package imports (Celery's
"First steps with Django"); these checks never import it themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import suppress
from typing import Any

from celery import current_app
from django.apps import AppConfig, apps
from django.conf import settings
from django.core import checks
from django.db import DatabaseError, connections, router
from django.db.models import Model

from . import beat
from ._option_names import closest_option, is_misspelt_option
from .conf import OPTIONS
from .exceptions import DeactivateConfigError
from .task import DeactivatingTask
from .tasks import MAINTAIN_TASK

__all__: list[str] = []  # Django's system checks, registered by the app config

TAG = "celery_deactivate"

HINTS = {
    "E001": "Set model= on the task to a concrete, installed model class or 'app_label.Model'.",
    "E002": (
        "Add the field to the model, or name the model's own field for that role with "
        "deactivate_fields (on the task, or worker-wide)."
    ),
    "E003": (
        "Correct the option on the task, or the worker-wide Celery setting of the same name; the "
        "options are documented in celery_deactivate.conf."
    ),
    "E004": (
        "Correct or remove it: the settings are CELERY_ + an option's name in capitals in "
        "Django settings, app.conf.<option> on the Celery app; the options are documented in "
        "celery_deactivate.conf."
    ),
}

W002_MESSAGE = (
    f"{MAINTAIN_TASK} is not scheduled: digests, the end of outages and cool-down probes wait "
    "for it"
)
W002_HINT = (
    "Add it to the Celery app's beat schedule: app.conf.beat_schedule = "
    '{"celery-deactivate": maintain_entry(every=60)} (from celery_deactivate import '
    "maintain_entry), or CELERY_BEAT_SCHEDULE in Django settings"
)


#: The database backends the library supports, by ``connection.vendor``: their names.
SUPPORTED_DATABASES = {"postgresql": "PostgreSQL", "mysql": "MySQL or MariaDB", "sqlite": "SQLite"}


def deactivating_tasks(*, load: bool = False) -> list[DeactivatingTask]:
    """The deactivating tasks registered on the current Celery app, by name.

    Without ``load``, those of a finalized app only: nothing is imported, nothing finalized.
    With ``load``, the app first imports the modules its worker imports and is finalized (unless
    it was created with ``autofinalize=False`` and is not finalized yet: then none), as
    ``celery report`` does; a task whose declaration raises propagates its
    :exc:`~celery_deactivate.exceptions.DeactivateConfigError`.
    """
    app = _current_app()
    if load and not app.finalized and app.autofinalize:
        app.loader.import_default_modules()
        app.finalize()
    if not app.finalized:
        return []
    tasks = [
        task
        for task in app.tasks.values()
        # a class without its own body is a base, not a task (as DeactivatingTask.on_bound)
        if isinstance(task, DeactivatingTask) and "run" in vars(type(task))
    ]
    return sorted(tasks, key=lambda task: str(task.name))


def _current_app() -> Any:
    """Celery's current app (typed ``Any``: celery-types declares neither ``finalized`` nor
    ``autofinalize``)."""
    return current_app


def check_tasks(app_configs: Sequence[AppConfig] | None = None, **kwargs: Any) -> list[Any]:
    """E001-E003 for the tasks registered on the current Celery app, if it is finalized."""
    return _problems(deactivating_tasks(), app_configs)


def check_tasks_on_deploy(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[Any]:
    """``--deploy``: load and finalize the current app as its worker does, then check."""
    finalized = bool(_current_app().finalized)
    errors: list[checks.CheckMessage] = []
    try:
        tasks = deactivating_tasks(load=True)
    except DeactivateConfigError as exc:  # a declaration stopped the finalization
        errors.append(error_for(exc))
        tasks = deactivating_tasks()
    if finalized:  # check_tasks has checked the tasks registered before; new ones raised
        return errors
    # The task that stopped the finalization is registered: its message once, with the hint
    # that knows its class.
    found = {(error.id, error.obj, error.msg): error for error in errors}
    for problem in _problems(tasks, app_configs):
        found[problem.id, problem.obj, problem.msg] = problem
    return list(found.values())


def check_databases(app_configs: Sequence[AppConfig] | None = None, **kwargs: Any) -> list[Any]:
    """W001 for each model the library writes (the current app's tasks' models, its own tables)
    whose write database is of a backend it does not support.  Nothing is connected to: the
    backend's ``vendor`` says it."""
    from .models import TaskState

    models: dict[str, type[Model]] = {"the library's tables": TaskState}
    for task in deactivating_tasks():
        declared = type(task).model
        with suppress(LookupError, ValueError):  # E001 reports a model that is not one
            model = apps.get_model(declared) if isinstance(declared, str) else declared
            if isinstance(model, type) and issubclass(model, Model):
                models.setdefault(model._meta.label, model)
    warnings = []
    for label, model in models.items():
        alias = router.db_for_write(model)
        vendor = connections[alias].vendor
        if vendor in SUPPORTED_DATABASES:
            continue
        warnings.append(
            checks.Warning(
                f"{label} {'are' if model is TaskState else 'is'} written on the database "
                f"{alias!r}, whose backend ({vendor}) celery-deactivate does not support",
                hint=(
                    f"Supported: {', '.join(SUPPORTED_DATABASES.values())} (see the supported "
                    "versions in the documentation). Route the model to one of them, or test "
                    "failures, crashes and the outage guard on yours."
                ),
                obj=label,
                id="celery_deactivate.W001",
            )
        )
    return warnings


def check_maintain(app_configs: Sequence[AppConfig] | None = None, **kwargs: Any) -> list[Any]:
    """W002 when ``celery_deactivate.maintain`` is not in the current app's ``beat_schedule``
    and django-celery-beat is not installed (with it, :func:`check_maintain_periodic_tasks`
    decides).  No database is used."""
    if beat.installed() or _maintain_needs_no_check(app_configs):
        return []
    return [_w002(W002_MESSAGE, W002_HINT + ".")]


def check_maintain_periodic_tasks(
    app_configs: Sequence[AppConfig] | None = None,
    databases: Sequence[str] | None = None,
    **kwargs: Any,
) -> list[Any]:
    """W002 when ``celery_deactivate.maintain`` is neither in the current app's
    ``beat_schedule`` nor in an enabled django-celery-beat ``PeriodicTask``.  A database check
    (Django's ``database`` tag): ``migrate`` and ``check --database`` run it, a plain ``check``
    does not, and it reads only the databases it is given."""
    if not beat.installed() or _maintain_needs_no_check(app_configs):
        return []
    from django_celery_beat.models import PeriodicTask

    alias = router.db_for_read(PeriodicTask)
    if not databases or alias not in databases:
        return []
    message = W002_MESSAGE
    try:
        if PeriodicTask.objects.using(alias).filter(task=MAINTAIN_TASK, enabled=True).exists():
            return []
    except DatabaseError as exc:  # down, or not migrated yet: say so, do not fail the check
        message += (
            f" (it is not in the app's beat_schedule, and django-celery-beat's periodic "
            f"tasks on the database {alias!r} could not be read: {type(exc).__name__})"
        )
    hint = W002_HINT + ", or a django-celery-beat periodic task of " + MAINTAIN_TASK + "."
    return [_w002(message, hint)]


def _maintain_needs_no_check(app_configs: Sequence[AppConfig] | None) -> bool:
    """The library is not among the checked apps, no deactivating task waits for ``maintain``
    (the app is finalized without one), or the app's ``beat_schedule`` runs it."""
    if app_configs is not None and "celery_deactivate" not in {c.label for c in app_configs}:
        return True
    app = _current_app()
    if app.finalized and not deactivating_tasks():
        return True
    schedule = app.conf.beat_schedule or {}
    return any(entry.get("task") == MAINTAIN_TASK for entry in schedule.values())


def _w002(message: str, hint: str) -> Any:
    return checks.Warning(message, hint=hint, obj=MAINTAIN_TASK, id="celery_deactivate.W002")


def check_settings(app_configs: Sequence[AppConfig] | None = None, **kwargs: Any) -> list[Any]:
    """E004 for the worker-wide settings that look like an option but are none: the current
    Celery app's (``app.conf`` keys) and Django's under the ``CELERY`` namespace."""
    errors = []
    for name in sorted({*_current_app().conf, *dir(settings)}):
        spelling = _setting_spelling(name)
        if spelling is None:
            continue
        option, spelt = spelling
        if not is_misspelt_option(option):
            continue
        message = f"{spelt(option)} is not a setting of celery-deactivate: it is ignored"
        hint = HINTS["E004"]
        closest = closest_option(option)
        if closest is not None:
            message += f" (did you mean {spelt(closest)}?)"
            hint = f"Rename it {spelt(closest)}."
        errors.append(
            checks.Error(message, hint=hint, obj=spelt(option), id="celery_deactivate.E004")
        )
    return errors


def _setting_spelling(name: str) -> tuple[str, Callable[[str], str]] | None:
    """The option a setting's ``name`` would set, and how an option is spelt as such a setting:
    ``CELERY_DEACTIVATE_AFTER`` in Django settings, ``app.conf.deactivate_after`` on the app."""
    if name.startswith("CELERY_"):
        return name.removeprefix("CELERY_").lower(), lambda option: f"CELERY_{option.upper()}"
    if name.islower():
        return name, lambda option: f"app.conf.{option}"
    return None


def _problems(
    tasks: Iterable[DeactivatingTask], app_configs: Sequence[AppConfig] | None
) -> list[checks.CheckMessage]:
    labels = None if app_configs is None else {config.label for config in app_configs}
    errors: list[checks.CheckMessage] = []
    for task in tasks:
        task_class = type(task)
        if labels is not None and _app_label(task_class.model) not in labels:
            continue
        try:
            task_class.check_configuration()
        except DeactivateConfigError as exc:
            errors.append(error_for(exc, task_class))
    return errors


def _app_label(model: Any) -> str | None:
    if isinstance(model, str):
        return model.partition(".")[0]
    meta = getattr(model, "_meta", None)
    return None if meta is None else str(meta.app_label)


def error_for(exc: DeactivateConfigError, task_class: type[Any] | None = None) -> checks.Error:
    """The check message of a configuration error, by what it names: model, field or option."""
    text = str(exc)
    prefix = f"{exc.task}: "
    if exc.task and text.startswith(prefix):  # the task is the message's object
        text = text[len(prefix) :]
    if exc.field is not None:
        code, hint = "E002", HINTS["E002"]
    elif exc.model is not None or (task_class is not None and task_class.model is None):
        code, hint = "E001", HINTS["E001"]
    else:
        code, hint = "E003", _option_hint(text, task_class)
    return checks.Error(text, hint=hint, obj=exc.task, id=f"celery_deactivate.{code}")


def _option_hint(text: str, task_class: type[Any] | None) -> str:
    """Where the invalid value of an option comes from (``conf.resolve`` names the option first)."""
    name = text.partition(" ")[0]
    if name not in OPTIONS:
        return HINTS["E003"]
    setting = f"app.conf.{name} (CELERY_{name.upper()} in Django settings)"
    if task_class is None:
        return f"Correct {name} on the task, or the worker-wide setting {setting}."
    if getattr(task_class, name, None) is None:
        return f"The task does not set {name}: correct the worker-wide setting {setting}."
    return f"Correct {name}= where the task is declared."
