"""The helpers of ``manage.py deactivated`` (the command: ``deactivated.py``): the rows listed,
the progress bar, the models a user may name and their fields, the ``--filter`` and primary keys
parsed, and the words of the output."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from django.apps import apps
from django.conf import settings
from django.core.exceptions import FieldDoesNotExist, FieldError, ValidationError
from django.core.management.base import CommandError, OutputWrapper
from django.db import DatabaseError, router
from django.db.models import BooleanField, DateTimeField, Model, QuerySet
from django.utils import timezone

from ... import _history, services
from ...models import DeactivatableModel
from ...states import describe, state_of
from ...target import Target

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
    #: The state's key (``error``, ``hand``, ``probing``, ``deactivated``).
    state: str
    #: Its name and detail, as the admin shows it: ``deactivated by error (probe at 14:05)``.
    state_label: str
    deactivated_at: datetime | None
    error: bool | None
    error_message: str | None
    failure_count: int | None
    next_probe_at: datetime | None
    probing_since: datetime | None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


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
    now = timezone.now()
    names = target.fields().items()
    for obj in queryset.iterator(chunk_size=1000):
        fields = {role: getattr(obj, name) if name else None for role, name in names}
        yield Row(
            model=target.label,
            pk=obj.pk,
            object=str(obj),
            state=state_of(target, obj).value,
            state_label=describe(target, obj, now=now),
            deactivated_at=fields["deactivated_at"],
            error=fields["error"],
            error_message=fields["error_message"],
            failure_count=fields["failure_count"],
            next_probe_at=fields["next_probe_at"],
            probing_since=fields["probing_since"],
        )


def event_row(event: Any) -> dict[str, Any]:
    """One history event as listed (``--history``); ``what`` and ``by`` in words for the table."""
    return {
        "at": event.at,
        "kind": event.kind,
        "cause": event.cause,
        "task": event.task,
        "task_id": event.task_id,
        "actor": event.actor,
        "error": event.error,
        "what": _history.what(event),
        "by": _history.who(event),
    }


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


def one_pk(target: Target, text: str) -> Any:
    """The primary key typed, converted by the pk field; a :exc:`CommandError` if malformed.  The
    object need not exist any more: its history outlives it."""
    field = target.model._meta.pk
    assert field is not None
    try:
        value = field.to_python(text)
        field.run_validators(value)
    except ValidationError as exc:
        raise CommandError(
            f"not a {target.label} primary key: {text!r} ({' '.join(exc.messages)})"
        ) from exc
    return value


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
