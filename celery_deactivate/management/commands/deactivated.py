"""``manage.py deactivated app_label.Model``: list deactivated objects, or reactivate them."""

from __future__ import annotations

from typing import Any

from django.apps import apps
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db.models import Model

from ... import services
from ...exceptions import DeactivateError
from ...target import Target


class Command(BaseCommand):
    help = (
        "List the deactivated objects of a model with their errors, or reactivate them "
        "(--reactivate PK [PK ...], or --reactivate-all)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("model", help="app_label.ModelName")
        group = parser.add_mutually_exclusive_group()
        group.add_argument("--reactivate", nargs="+", metavar="PK", help="reactivate these objects")
        group.add_argument(
            "--reactivate-all", action="store_true", help="reactivate every deactivated object"
        )
        parser.add_argument(
            "--active-field", default="active", help="the model's active flag (default: active)"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            model = apps.get_model(options["model"])
        except (LookupError, ValueError) as exc:
            raise CommandError(f"unknown model {options['model']!r}: {exc}") from exc
        fields = {"active": options["active_field"]}
        try:
            target = services.target_for(model, fields)
        except DeactivateError as exc:
            raise CommandError(str(exc)) from exc
        deactivated = model._base_manager.filter(**{target.active: False}).order_by("pk")
        if options["reactivate_all"]:
            pks = list(deactivated.values_list("pk", flat=True))
        elif options["reactivate"]:
            pks = existing_pks(model, options["reactivate"])
        else:
            self._list(target, deactivated)
            return
        done: list[Any] = []
        unchanged: list[Any] = []
        for pk in pks:
            changed = services.reactivate(model, pk, fields=fields) is not None
            (done if changed else unchanged).append(pk)
        summary = f"Reactivated {objects(model, len(done))}"
        if options["reactivate"]:
            summary += pk_list(done)
        if unchanged:
            summary += f"; {len(unchanged)} left unchanged (active already)"
            if options["reactivate"]:
                summary += pk_list(unchanged)
        self.stdout.write(summary + ".")

    def _list(self, target: Target, queryset: Any) -> None:
        count = 0
        for obj in queryset.iterator():
            message = getattr(obj, target.error_message) if target.error_message else ""
            when = getattr(obj, target.deactivated_at) if target.deactivated_at else ""
            self.stdout.write(f"{obj.pk}\t{obj}\t{when or ''}\t{message}")
            count += 1
        self.stdout.write(f"{count} deactivated {target.label} object(s).")


def existing_pks(model: type[Model], given: list[str]) -> list[Any]:
    """The primary keys ``given`` on the command line, converted; raise :exc:`CommandError`
    naming every malformed key, or every key that names no object, before anything changes.

    Any key type: the pk field converts and validates (``to_python``, ``run_validators``), one
    query checks that the objects exist (through the base manager, as the services do).
    """
    label = model._meta.label
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
    found = set(model._base_manager.filter(pk__in=values).values_list("pk", flat=True))
    missing = [value for value in values if value not in found]
    if missing:
        raise CommandError(
            f"no {label} with pk {', '.join(shown(value) for value in missing)}; "
            "nothing was reactivated."
        )
    return values


def shown(pk: Any) -> str:
    """A pk as people type it: ``42``, ``'feed/1'``, ``0f8e...`` (no quotes but for strings)."""
    return repr(pk) if isinstance(pk, str) else str(pk)


def pk_list(pks: list[Any]) -> str:
    return f" (pk {', '.join(shown(pk) for pk in pks)})" if pks else ""


def objects(model: type[Model], count: int) -> str:
    """``1 app.Model object``, ``2 app.Model objects``."""
    return f"{count} {model._meta.label} object{'' if count == 1 else 's'}"
