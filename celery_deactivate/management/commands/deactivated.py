"""``manage.py deactivated``: list the deactivated objects, re-activate them.

    manage.py deactivated                                    # every model: a table
    manage.py deactivated app_label.Model --json             # one model: one JSON document
    manage.py deactivated app_label.Model --reactivate PK [PK ...] [--dry-run]
    manage.py deactivated app_label.Model --reactivate-all [--filter FIELD=VALUE ...] [--dry-run]

The models are those that subclass :class:`~celery_deactivate.DeactivatableModel` and those a
deactivating task of the current Celery app works on (the command imports the task modules as a
worker does, ``app.loader.import_default_modules()``); any other model is refused.  A model's
fields by role are those of its task (``deactivate_fields``), else the defaults;
``--active-field`` chooses among the active flags its tasks name, and names no other field.
Every re-activation goes through :func:`celery_deactivate.services.reactivate`, so it writes the
same fields and sends the same ``object_reactivated`` signal as the admin's action.  Every user
mistake (a ``--filter`` the database refuses too) is a
:exc:`~django.core.management.base.CommandError` raised before anything changes.

An object's state is ``error`` (deactivated by a failure: its error flag is set), ``by hand``
(its error flag is clear) or ``deactivated`` (the model records no error flag).  ``--json``
writes ``{"count": N, "objects": [{"model", "pk", "object", "state", "deactivated_at", "error",
"error_message", "failure_count"}, ...]}`` (``null`` for a role the model does not record), and
for a re-activation ``{"model", "dry_run", "reactivated": [pk, ...], "unchanged": [pk, ...]}``
(with ``--dry-run``, what would be re-activated, and its ``"objects"``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from django.apps import apps
from django.conf import settings
from django.core.exceptions import FieldDoesNotExist, FieldError, ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser, OutputWrapper
from django.core.serializers.json import DjangoJSONEncoder
from django.db import DatabaseError, router
from django.db.models import BooleanField, DateTimeField, Model, QuerySet
from django.utils import timezone

from ... import services
from ...checks import deactivating_tasks
from ...exceptions import DeactivateError
from ...models import DeactivatableModel
from ...notify import one_line
from ...target import Target

#: Columns of the table, and how many characters of a cell they show.
COLUMNS = (("MODEL", None), ("PK", 36), ("OBJECT", 40), ("STATE", None), ("WHEN", None))
ERROR_WIDTH = 60

COMPARISONS = frozenset({"exact", "lt", "lte", "gt", "gte"})
TRUE = frozenset({"1", "t", "true", "y", "yes", "on"})
FALSE = frozenset({"0", "f", "false", "n", "no", "off"})


@dataclass(frozen=True)
class Row:
    """One deactivated object, as listed."""

    model: str
    pk: Any
    object: str
    state: str
    deactivated_at: datetime | None
    error: bool | None
    error_message: str | None
    failure_count: int | None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


class Command(BaseCommand):
    help = (
        "List the deactivated objects of a model (app_label.Model), or of every model with "
        "deactivation fields, and re-activate them by pk, by filter or all at once."
    )

    #: Re-activation runs of at least this many objects show a progress bar on a terminal.
    progress_threshold = 100

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "model",
            nargs="?",
            help="app_label.ModelName; without it, list every model with deactivation fields",
        )
        action = parser.add_mutually_exclusive_group()
        action.add_argument(
            "--reactivate", nargs="+", metavar="PK", help="re-activate these objects of MODEL"
        )
        action.add_argument(
            "--reactivate-all",
            action="store_true",
            help="re-activate every deactivated object of MODEL (those matching --filter, if any)",
        )
        parser.add_argument(
            "--filter",
            action="append",
            default=[],
            dest="filters",
            metavar="FIELD=VALUE",
            help=(
                "only the deactivated objects whose FIELD is VALUE, for the list and for "
                "--reactivate-all; FIELD__LOOKUP=VALUE for Django's lookups "
                "(error_message__contains=Timeout, deactivated_at__lt=2025-01-31, "
                "pk__in=1,2,3, deactivated_at__isnull=true); repeat it to combine"
            ),
        )
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="with --reactivate or --reactivate-all: say what would change, change nothing",
        )
        parser.add_argument(
            "--json",
            action="store_true",
            help="write one JSON document (full error messages, ISO 8601 dates) for scripts",
        )
        parser.add_argument(
            "--active-field",
            metavar="NAME",
            help="which of MODEL's active flags, when its deactivating tasks name several",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        label: str | None = options["model"]
        reactivating = bool(options["reactivate"] or options["reactivate_all"])
        if label is None:
            for flag, given in (
                ("--reactivate", options["reactivate"]),
                ("--reactivate-all", options["reactivate_all"]),
                ("--filter", options["filters"]),
                ("--active-field", options["active_field"]),
            ):
                if given:
                    raise CommandError(f"{flag} needs a model: deactivated app_label.Model {flag}")
        if options["dry_run"] and not reactivating:
            raise CommandError("--dry-run goes with --reactivate or --reactivate-all")
        if options["filters"] and options["reactivate"]:
            raise CommandError(
                "--filter selects objects for the list and for --reactivate-all; "
                "--reactivate names its objects by pk"
            )
        targets = self.task_targets()
        if label is None:
            groups = [target_rows(target) for target in every_target(targets)]
            self.write_rows(groups, None, options)
            return
        target = model_target(label, targets, options["active_field"])
        deactivated = filtered(target, options["filters"])
        if not reactivating:
            self.write_rows([target_rows(target, deactivated)], target, options)
            return
        pks = None
        if options["reactivate"]:
            pks = existing_pks(target, options["reactivate"])
            deactivated = deactivated.filter(pk__in=pks)
        self.reactivate(target, deactivated, pks, options)

    def task_targets(self) -> list[Target]:
        """The targets of the current Celery app's deactivating tasks, loaded as a worker loads
        them.  A misconfigured task (a worker would not start) is left out with a warning."""
        problems: list[str] = []
        try:
            tasks = deactivating_tasks(load=True)
        except DeactivateError as exc:  # the finalization stopped at this task's declaration
            problems.append(str(exc))
            tasks = deactivating_tasks()
        targets = []
        for task in tasks:
            try:
                targets.append(task.target)
            except DeactivateError as exc:
                problems.append(str(exc))
        for problem in dict.fromkeys(problems):  # the task that stopped it is registered
            self.stderr.write(f"A deactivating task is misconfigured, left out: {problem}")
        return targets

    # -- listing ----------------------------------------------------------------------------

    def write_rows(
        self, groups: list[Iterator[Row]], target: Target | None, options: Mapping[str, Any]
    ) -> None:
        rows = [row for group in groups for row in group]
        if options["json"]:
            self.write_json({"count": len(rows), "objects": [row.as_json() for row in rows]})
            return
        if rows:
            self.write_table(rows)
        model = f" {target.label}" if target else ""
        self.stdout.write(f"{len(rows)} deactivated{model} {plural(len(rows), 'object')}.")

    def write_table(self, rows: list[Row]) -> None:
        cells = [
            [
                row.model,
                shorten(shown(row.pk), COLUMNS[1][1]),
                shorten(one_line(row.object), COLUMNS[2][1]),
                row.state,
                when(row.deactivated_at),
                shorten(first_line(row.error_message or ""), ERROR_WIDTH),
            ]
            for row in rows
        ]
        header = [name for name, _ in COLUMNS] + ["ERROR"]
        widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header) - 1)]
        for line in [header, *cells]:
            padded = [cell.ljust(width) for cell, width in zip(line, widths, strict=False)]
            self.stdout.write("  ".join([*padded, line[-1]]).rstrip())

    def write_json(self, document: Mapping[str, Any]) -> None:
        self.stdout.write(json.dumps(document, cls=DjangoJSONEncoder, indent=2))

    # -- re-activating ----------------------------------------------------------------------

    def reactivate(
        self,
        target: Target,
        selected: QuerySet[Any],
        pks: list[Any] | None,
        options: Mapping[str, Any],
    ) -> None:
        """Re-activate ``selected`` (the deactivated objects among ``pks``, when given)."""
        label = target.label
        if options["dry_run"]:
            rows = list(target_rows(target, selected))
            would = [row.pk for row in rows]
            listed = set(would)
            unchanged = [pk for pk in pks or () if pk not in listed]
            if options["json"]:
                self.write_json(
                    {
                        "model": label,
                        "dry_run": True,
                        "reactivated": would,
                        "unchanged": unchanged,
                        "objects": [row.as_json() for row in rows],
                    }
                )
                return
            if rows:
                self.write_table(rows)
            self.stdout.write(
                f"Dry run: would reactivate {count_of(label, len(would))}"
                f"{pk_list(would, pks)}{unchanged_note(unchanged, pks)}; nothing was changed."
            )
            return
        todo = pks if pks is not None else list(selected.values_list("pk", flat=True))
        fields = target.fields()
        using = selected.db
        done: list[Any] = []
        unchanged = []
        with self.progress(len(todo), enabled=not options["json"]) as advance:
            for pk in todo:
                if services.reactivate(target.model, pk, fields=fields, using=using) is None:
                    unchanged.append(pk)
                else:
                    done.append(pk)
                advance()
        if options["json"]:
            self.write_json(
                {"model": label, "dry_run": False, "reactivated": done, "unchanged": unchanged}
            )
            return
        self.stdout.write(
            f"Reactivated {count_of(label, len(done))}{pk_list(done, pks)}"
            f"{unchanged_note(unchanged, pks)}."
        )

    def progress(self, total: int, *, enabled: bool) -> ProgressBar:
        """A progress bar on a terminal for a long run, else nothing shown."""
        shown = enabled and total >= self.progress_threshold and self.stdout.isatty()
        return ProgressBar(self.stdout if shown else None, total)


class ProgressBar:
    """``[##########----------]  500/1000`` redrawn in place, at most once per percent."""

    width = 30

    def __init__(self, out: OutputWrapper | None, total: int) -> None:
        self.out = out
        self.total = total
        self.done = 0
        self.drawn = -1

    def __enter__(self) -> ProgressBar:
        self.draw()
        return self

    def __call__(self) -> None:
        self.done += 1
        self.draw()

    def draw(self) -> None:
        percent = self.done * 100 // self.total if self.total else 100
        if self.out is None or (percent == self.drawn and self.done != self.total):
            return
        self.drawn = percent
        filled = self.width * percent // 100
        bar = "#" * filled + "-" * (self.width - filled)
        self.out.write(f"\r[{bar}] {self.done:>{len(str(self.total))}}/{self.total}", ending="")
        self.out.flush()

    def __exit__(self, *exc_info: object) -> None:
        if self.out is not None:
            self.out.write("")  # end the bar's line


# -- models and their fields -------------------------------------------------------------------


def model_target(label: str, task_targets: list[Target], active_field: str | None) -> Target:
    """The target of the model named ``label``, a ``DeactivatableModel`` or the model of a
    deactivating task: its task's fields, else the defaults.  ``active_field`` chooses among
    the active flags its tasks name."""
    try:
        model = apps.get_model(label)
    except ValueError as exc:
        raise CommandError(f"unknown model {label!r}: expected app_label.ModelName") from exc
    except LookupError as exc:
        raise CommandError(f"unknown model {label!r}: {exc}") from exc
    label = model._meta.label
    candidates = [target for target in task_targets if target.model is model]
    if issubclass(model, DeactivatableModel):
        candidates.append(services.target_for(model))
    if not candidates:
        raise CommandError(
            f"{label} is neither a DeactivatableModel nor the model of a deactivating task: "
            "the command only changes what celery-deactivate manages"
        )
    if active_field is not None:
        flags = sorted({target.active for target in candidates})
        candidates = [target for target in candidates if target.active == active_field]
        if not candidates:
            raise CommandError(
                f"--active-field {active_field!r} is not an active flag of {label}; its active "
                f"{plural(len(flags), 'flag')}: {', '.join(map(repr, flags))}"
            )
    return max(candidates, key=lambda target: len(target.recorded()))


def every_target(task_targets: list[Target]) -> list[Target]:
    """One target per table of deactivated objects: the models subclassing
    ``DeactivatableModel`` and the tasks' models.  A proxy or a multi-table child is listed as
    the model whose table holds its active flag, once."""
    targets = [
        services.target_for(model)
        for model in apps.get_models()
        if issubclass(model, DeactivatableModel)
    ]
    groups: dict[tuple[type[Model], str], list[Target]] = {}
    for target in [*targets, *task_targets]:
        owner = target.model._meta.get_field(target.active).model
        assert owner is not None
        groups.setdefault((owner._meta.concrete_model or owner, target.active), []).append(target)
    chosen = [
        max(group, key=lambda target: (target.model is owner, len(target.recorded())))
        for (owner, _), group in groups.items()
    ]
    return sorted(chosen, key=lambda target: (target.label, target.active))


def deactivated_of(target: Target) -> QuerySet[Any]:
    """The target's deactivated objects, through its base manager, from the database the
    services write to (as they do)."""
    manager = target.model._base_manager.db_manager(router.db_for_write(target.model))
    deactivated: QuerySet[Any] = manager.filter(**{target.active: False}).order_by("pk")
    return deactivated


def target_rows(target: Target, queryset: QuerySet[Any] | None = None) -> Iterator[Row]:
    if queryset is None:
        queryset = deactivated_of(target)
    for obj in queryset.iterator(chunk_size=1000):
        error = getattr(obj, target.error) if target.error else None
        yield Row(
            model=target.label,
            pk=obj.pk,
            object=str(obj),
            state="deactivated" if error is None else ("error" if error else "by hand"),
            deactivated_at=getattr(obj, target.deactivated_at) if target.deactivated_at else None,
            error=error,
            error_message=getattr(obj, target.error_message) if target.error_message else None,
            failure_count=getattr(obj, target.failure_count) if target.failure_count else None,
        )


# -- what the user typed -----------------------------------------------------------------------


def lookups(model: type[Model], filters: Iterable[str]) -> dict[str, Any]:
    """``--filter`` arguments as ``filter()`` keywords; a :exc:`CommandError` for a field the
    model does not have, a lookup Django does not know or a value the field cannot take."""
    label = model._meta.label
    result: dict[str, Any] = {}
    for text in filters:
        key, equals, value = text.partition("=")
        key = key.strip()
        if not equals or not key:
            raise CommandError(f"--filter {text!r}: expected FIELD=VALUE")
        name, _, lookup = key.partition("__")
        try:
            field = model._meta.get_field(name) if name != "pk" else model._meta.pk
        except FieldDoesNotExist:
            names = sorted({field.name for field in model._meta.get_fields()})
            raise CommandError(
                f"--filter {text!r}: {label} has no field {name!r}; its fields are "
                f"{', '.join(names)}"
            ) from None
        last = key.rpartition("__")[2] if lookup else "exact"
        converted: Any = value
        if last == "in":
            converted = value.split(",")
        elif last == "isnull" or (last == "exact" and isinstance(field, BooleanField)):
            converted = boolean(text, value)
        elif last in COMPARISONS and isinstance(field, DateTimeField):
            converted = moment(text, field, value)
        try:
            model._base_manager.filter(**{key: converted})  # Django checks lookup and value
        except ValidationError as exc:
            raise CommandError(f"--filter {text!r}: {' '.join(exc.messages)}") from exc
        except (FieldError, ValueError, TypeError) as exc:
            raise CommandError(f"--filter {text!r}: {exc}") from exc
        result[key] = converted
    return result


def filtered(target: Target, filters: list[str]) -> QuerySet[Any]:
    """The target's deactivated objects that match ``filters``; a :exc:`CommandError` with the
    database's message, before anything changes, if the database refuses them (an invalid
    regular expression)."""
    deactivated: QuerySet[Any] = deactivated_of(target).filter(**lookups(target.model, filters))
    if filters:
        try:
            deactivated.exists()
        except DatabaseError as exc:
            given = ", ".join(map(repr, filters))
            raise CommandError(f"--filter {given}: the database refused it: {exc}") from exc
    return deactivated


def boolean(text: str, value: str) -> bool:
    if value.lower() in TRUE:
        return True
    if value.lower() in FALSE:
        return False
    raise CommandError(f"--filter {text!r}: expected true or false, got {value!r}")


def moment(text: str, field: DateTimeField[Any, Any], value: str) -> datetime | None:
    """A date or date and time typed without a zone is in the current time zone."""
    try:
        parsed: datetime | None = field.to_python(value)
    except ValidationError as exc:
        raise CommandError(f"--filter {text!r}: {' '.join(exc.messages)}") from exc
    if parsed is not None and settings.USE_TZ and timezone.is_naive(parsed):
        parsed = timezone.make_aware(parsed)
    return parsed


def existing_pks(target: Target, given: list[str]) -> list[Any]:
    """The primary keys ``given`` on the command line, converted; a :exc:`CommandError` naming
    every malformed key, or every key that names no object, before anything changes.

    Any key type: the pk field converts and validates (``to_python``, ``run_validators``), one
    query checks that the objects exist (through the base manager, as the services do).
    """
    model, label = target.model, target.label
    field = model._meta.pk
    assert field is not None
    values: list[Any] = []
    malformed: list[str] = []
    for text in given:
        try:
            value = field.to_python(text)
            field.run_validators(value)
        except ValidationError as exc:
            malformed.append(f"{text!r} ({' '.join(exc.messages)})")
            continue
        if value not in values:
            values.append(value)
    if malformed:
        raise CommandError(
            f"not a {label} primary key: {', '.join(malformed)}; nothing was reactivated."
        )
    manager = model._base_manager.db_manager(router.db_for_write(model))
    found = set(manager.filter(pk__in=values).values_list("pk", flat=True))
    missing = [value for value in values if value not in found]
    if missing:
        raise CommandError(
            f"no {label} with pk {', '.join(shown(value) for value in missing)}; "
            "nothing was reactivated."
        )
    return values


# -- words -------------------------------------------------------------------------------------


def shown(pk: Any) -> str:
    """A pk as people type it: ``42``, ``'feed/1'``, ``0f8e...`` (quotes for strings only)."""
    return repr(pk) if isinstance(pk, str) else str(pk)


def when(moment: datetime | None) -> str:
    """In the current time zone (``TIME_ZONE``), to the second."""
    if moment is None:
        return ""
    if timezone.is_aware(moment):
        moment = timezone.localtime(moment)
    return moment.isoformat(" ", "seconds")


def shorten(text: str, width: int | None) -> str:
    if width is None or len(text) <= width:
        return text
    return text[: width - 1] + "…"


def first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0] + (" …" if len(lines) > 1 else "") if lines else ""


def plural(count: int, word: str) -> str:
    return word if count == 1 else word + "s"


def count_of(label: str, count: int) -> str:
    """``1 app.Model object``, ``2 app.Model objects``."""
    return f"{count} {label} {plural(count, 'object')}"


def pk_list(pks: list[Any], given: list[Any] | None) -> str:
    """`` (pk 1, 3)`` when the user named the objects by pk."""
    if given is None or not pks:
        return ""
    return f" (pk {', '.join(shown(pk) for pk in pks)})"


def unchanged_note(unchanged: list[Any], given: list[Any] | None) -> str:
    if not unchanged:
        return ""
    verb = "is" if len(unchanged) == 1 else "are"
    return f"; {len(unchanged)} {verb} active already{pk_list(unchanged, given)}"
