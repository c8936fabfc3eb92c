"""Reading an object's row: before the body runs (:func:`read_state`), after a change
(:func:`read_changed`), and the row a change updates (:func:`object_row`).

For a plain model a read is one ``SELECT`` built once per model and run through
``connection.cursor()`` (no query compilation per task); other models are read through their base
manager.
"""

from __future__ import annotations

import weakref
from functools import lru_cache
from typing import Any, cast

from django.db import connections
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


def read_changed(target: Target, pk: Any, using: str) -> Model:
    """The row an ``UPDATE`` through the base manager just changed, as :func:`read_object`
    returns it, by primary key alone: the change may hide it from a base manager that filters
    on the library's columns (one that hides inactive rows), and the outcome must not depend on
    whether the row is read after the change or before it (``services._change_alone``)."""
    if target.plain_rows:
        return read_object(target, pk, using)
    found: Model = QuerySet(model=target.model, using=using).get(pk=pk)
    return found


def field_of(model: type[Model], name: str) -> Field[Any, Any]:
    return cast("Field[Any, Any]", model._meta.get_field(name))


def read_state(target: Target, pk: Any, using: str) -> tuple[Any, ...]:
    """``(active, failure_count)`` of the row (``(active,)`` without a counter): one SELECT.

    A plain ``SELECT`` built once per model, run through ``connection.cursor()`` (no query
    compilation per task); through the base manager for models whose rows it filters or joins.
    Raises the model's ``DoesNotExist`` for a missing row.
    """
    names = target.state_fields()
    if not target.plain_rows:
        manager = target.model._base_manager.db_manager(using)
        state: tuple[Any, ...] = manager.values_list(*names).get(pk=pk)
        return state
    connection = connections[using]
    with connection.cursor() as cursor:
        cursor.execute(_select_sql(target.model, using, names), [_pk_value(target, pk, using)])
        row = cursor.fetchone()
    if row is None:
        raise _does_not_exist(target.model)
    return tuple(row)


def read_object(target: Target, pk: Any, using: str) -> Model:
    """The row as a model instance, what ``Model._base_manager.get(pk=pk)`` returns: for a plain
    model one ``SELECT`` of every concrete column built once per model, turned into an instance
    with ``Model.from_db()`` and the fields' converters.  Raises ``DoesNotExist``."""
    model = target.model
    if not target.plain_rows:
        found: Model = model._base_manager.db_manager(using).get(pk=pk)
        return found
    fields = model._meta.concrete_fields
    connection = connections[using]
    with connection.cursor() as cursor:
        names = tuple(field.name for field in fields)
        cursor.execute(_select_sql(model, using, names), [_pk_value(target, pk, using)])
        row = cursor.fetchone()
    if row is None:
        raise _does_not_exist(model)
    values = list(row)
    for index, converters, expression in _converters(connection, model):
        for convert in converters:
            values[index] = convert(values[index], expression, connection)
    instance: Model = model.from_db(using, [field.attname for field in fields], values)
    return instance


@lru_cache(maxsize=512)
def _select_sql(model: type[Model], using: str, names: tuple[str, ...]) -> str:
    """``SELECT <columns> FROM <table> WHERE <pk> = %s``, quoted for the alias's backend."""
    quote = connections[using].ops.quote_name
    meta = model._meta
    columns = ", ".join(quote(cast(str, field_of(model, name).column)) for name in names)
    pk_column = quote(cast(str, cast("Field[Any, Any]", meta.pk).column))
    return f"SELECT {columns} FROM {quote(meta.db_table)} WHERE {pk_column} = %s"


def _pk_value(target: Target, pk: Any, using: str) -> Any:
    """The primary key as the database takes it (the field's ``get_db_prep_value``)."""
    field = cast("Field[Any, Any]", target.model._meta.pk)
    return field.get_db_prep_value(field.to_python(pk), connections[using])


#: Per connection (each thread has its own), per model: the converters the ORM applies to the
#: columns of a row, as ``(index, functions, column expression)``.
_row_converters: weakref.WeakKeyDictionary[Any, dict[type[Model], list[Any]]] = (
    weakref.WeakKeyDictionary()
)


def _converters(connection: Any, model: type[Model]) -> list[Any]:
    known = _row_converters.setdefault(connection, {})
    try:
        return known[model]
    except KeyError:
        pass
    found = []
    for index, field in enumerate(model._meta.concrete_fields):
        column = field.get_col(model._meta.db_table)
        # As the ORM's compiler: the column's converters (a foreign key's include its target's).
        functions = connection.ops.get_db_converters(column) + column.get_db_converters(connection)
        if functions:
            found.append((index, functions, column))
    known[model] = found
    return found


def _does_not_exist(model: type[Model]) -> Exception:
    missing: type[Exception] = cast(Any, model).DoesNotExist
    return missing(f"{model._meta.object_name} matching query does not exist.")
