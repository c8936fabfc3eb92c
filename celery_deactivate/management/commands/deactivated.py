"""``manage.py deactivated``: list the deactivated objects, re-activate them.

    manage.py deactivated                                    # every model: a table
    manage.py deactivated app_label.Model --json             # one model: one JSON document
    manage.py deactivated app_label.Model --reactivate PK [PK ...] [--dry-run]
    manage.py deactivated app_label.Model --reactivate-all [--filter FIELD=VALUE ...] [--dry-run]
    manage.py deactivated app_label.Model PK --history [--json]   # one object's history

The models are those that subclass :class:`~celery_deactivate.DeactivatableModel` and those a
deactivating task of the current Celery app works on (the command imports the task modules as a
worker does, ``app.loader.import_default_modules()``); any other model is refused.  A model's
fields by role are those of its task (``deactivate_fields``), else the defaults;
``--active-field`` chooses among the active flags its tasks name, and names no other field.
Every re-activation goes through :func:`celery_deactivate.services.reactivate`, so it writes the
same fields and sends the same ``object_reactivated`` signal as the admin's action.  Every user
mistake (a ``--filter`` the database refuses too) is a
:exc:`~django.core.management.base.CommandError` raised before anything changes.

An object's state is named as in the admin (:mod:`celery_deactivate.states`): ``deactivated by
error`` (with ``probe at 14:05`` when a cool-down probe is scheduled), ``deactivated by hand``,
``probing`` (a probe is in flight), or ``deactivated`` (the model records no error flag).
``--json`` writes ``{"count": N, "objects": [{"model", "pk", "object", "state", "state_label",
"deactivated_at", "error", "error_message", "failure_count", "next_probe_at", "probing_since"},
...]}`` (``state``: the state's key, ``error``, ``hand``, ``probing`` or ``deactivated``;
``null`` for a role the model does not record), and
for a re-activation ``{"model", "dry_run", "reactivated": [pk, ...], "unchanged": [pk, ...]}``
(with ``--dry-run``, what would be re-activated, and its ``"objects"``).  ``--history`` lists
one object's events, the newest first (those of the last ``deactivate_history_days``):
``{"model", "pk", "count", "events": [{"at", "kind", "cause", "task", "task_id", "actor",
"error", "what", "by"}, ...]}`` with ``--json`` (``what`` and ``by``: the table's words).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.core.serializers.json import DjangoJSONEncoder
from django.db.models import QuerySet

from ... import _history, services
from ...checks import deactivating_tasks
from ...exceptions import DeactivateError
from ...notify import one_line
from ...target import Target
from ._deactivated import (
    COLUMNS,
    ERROR_WIDTH,
    ProgressBar,
    Row,
    count_of,
    event_row,
    every_target,
    existing_pks,
    filtered,
    first_line,
    model_target,
    one_pk,
    pk_list,
    plural,
    shorten,
    shown,
    target_rows,
    unchanged_note,
    when,
)


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
        parser.add_argument("pk", nargs="?", help="with --history: the object's primary key")
        action = parser.add_mutually_exclusive_group()
        action.add_argument(
            "--reactivate", nargs="+", metavar="PK", help="re-activate these objects of MODEL"
        )
        action.add_argument(
            "--reactivate-all",
            action="store_true",
            help="re-activate every deactivated object of MODEL (those matching --filter, if any)",
        )
        action.add_argument(
            "--history",
            action="store_true",
            help="list the events of the object PK of MODEL, the newest first",
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
        if options["history"] or options["pk"] is not None:
            self.history(label, options)
            return
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

    def history(self, label: str | None, options: Mapping[str, Any]) -> None:
        """``deactivated app_label.Model PK --history``: the object's events, newest first."""
        if not (options["history"] and label and options["pk"] is not None):
            raise CommandError(
                "the history of one object: deactivated app_label.Model PK --history"
            )
        for flag in ("filters", "active_field", "dry_run"):
            if options[flag]:
                raise CommandError(
                    f"--{flag.replace('_', '-').rstrip('s')} does not go with --history"
                )
        target = model_target(label, self.task_targets(), None)
        pk = one_pk(target, options["pk"])
        events = [event_row(event) for event in _history.of_object(target.model, pk)]
        if options["json"]:
            document = {"model": target.label, "pk": pk, "count": len(events), "events": events}
            self.write_json(document)
            return
        header = ["WHEN", "WHAT", "BY", "ERROR"]
        cells = [
            [
                when(row["at"]),
                row["what"],
                row["by"],
                shorten(first_line(row["error"]), ERROR_WIDTH),
            ]
            for row in events
        ]
        widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header) - 1)]
        for line in [header, *cells] if cells else []:
            padded = [cell.ljust(width) for cell, width in zip(line, widths, strict=False)]
            self.stdout.write("  ".join([*padded, line[-1]]).rstrip())
        self.stdout.write(f"{len(events)} {plural(len(events), 'event')} of {target.identity(pk)}.")

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
                row.state_label,
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
                reactivated = services.reactivate(
                    target.model, pk, fields=fields, using=using, by="command"
                )
                if reactivated is None:
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
