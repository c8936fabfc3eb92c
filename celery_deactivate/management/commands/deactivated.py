"""``manage.py deactivated app_label.Model``: list deactivated objects, or reactivate them."""

from __future__ import annotations

from typing import Any

from django.apps import apps
from django.core.management.base import BaseCommand, CommandError, CommandParser

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
            pks = options["reactivate"]
        else:
            self._list(target, deactivated)
            return
        done = [pk for pk in pks if services.reactivate(model, pk, fields=fields) is not None]
        self.stdout.write(f"{len(done)} reactivated, {len(pks) - len(done)} left unchanged.")

    def _list(self, target: Target, queryset: Any) -> None:
        count = 0
        for obj in queryset.iterator():
            message = getattr(obj, target.error_message) if target.error_message else ""
            when = getattr(obj, target.deactivated_at) if target.deactivated_at else ""
            self.stdout.write(f"{obj.pk}\t{obj}\t{when or ''}\t{message}")
            count += 1
        self.stdout.write(f"{count} deactivated {target.label} object(s).")
