"""Reading an object's row, through the ORM only: its state before the body runs
(:func:`read_state`), the row after a change (:func:`read_changed`), and the row a change
updates (:func:`object_row`).  (The pass-object form's instance is the task's
``get_queryset().get(pk=pk)``.)

Every read goes through the model's base manager (``values_list()`` for the state), so every
model shape (proxies, multi-table inheritance, a base manager of the
project's own) is read by one path, and every statement is the ORM's: Sentry, OpenTelemetry and
debug-toolbar see it as they see the project's own.
"""

from __future__ import annotations

from typing import Any, cast

from django.db.models import Field, Model, QuerySet

from .target import Target


def object_row(target: Target, pk: Any, using: str, **where: Any) -> QuerySet[Any]:
    """The object's row (if it matches ``where``), as a queryset an ``UPDATE`` of the library's
    columns can run on.

    Through the model's base manager.  With multi-table inheritance the columns live in an
    ancestor's table: the update runs on that table, restricted to the rows the model's base
    manager has (a subquery), so it stays one ``UPDATE`` whose conditions hold under concurrency
    (the ORM's update of a child model selects the keys first and drops the conditions).
    """
    manager = target.model._base_manager.db_manager(using)
    if not target.inherited:
        mine: QuerySet[Any] = manager.filter(pk=pk, **where)
        return mine
    rows: QuerySet[Any] = manager.filter(pk=pk)
    owner = cast("type[Model]", target.owner)
    owned: QuerySet[Any] = owner._base_manager.db_manager(using).filter(
        pk=pk, pk__in=rows.values("pk"), **where
    )
    return owned


def read_state(target: Target, pk: Any, using: str) -> tuple[Any, ...]:
    """``(active, failure_count, probing_since)`` of the row, the roles the model has
    (:meth:`Target.state_fields`), through the base manager.  Raises the model's
    ``DoesNotExist`` for a missing row."""
    manager = target.model._base_manager.db_manager(using)
    state: tuple[Any, ...] = manager.values_list(*target.state_fields()).get(pk=pk)
    return state


def read_changed(target: Target, pk: Any, using: str) -> Model:
    """The row an ``UPDATE`` just changed, by primary key alone: the change may hide it from a
    base manager that filters on the library's columns (one that hides inactive rows)."""
    found: Model = QuerySet(model=target.model, using=using).get(pk=pk)
    return found


def field_of(model: type[Model], name: str) -> Field[Any, Any]:
    return cast("Field[Any, Any]", model._meta.get_field(name))
