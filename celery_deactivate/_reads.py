"""Reading an object's row: its state before the body runs (:func:`read_state`), the
pass-object form's instance (:func:`read_instance`), the row after a change
(:func:`read_changed`), and the row a change updates (:func:`object_row`).

Every read is the ORM's: the model's base manager (a bare queryset for the row after a change)
filtered on the key, so every model shape (proxies, multi-table inheritance, a base manager of
the project's own) is read by one path, and every statement goes through Django's cursor, where
Sentry, OpenTelemetry and debug-toolbar see it as they see the project's own.

The three reads run on every task and every failure, and building and compiling the same
queryset again each time was most of their cost: about 0.15 ms of the worker's CPU per read on
the benchmark's machine, measured in-process (``Feed.objects.get()`` 205 us, the same statement
compiled once 48 us).  So each is compiled by the ORM once per worker process, model and
database (:class:`_Read`), with a marker where the key goes, and run with the key in its place
(a base manager of the project's own is compiled on every read: :func:`_static`).
That buys more than 5 % where issue #18 asks it to show it (``make bench``, PostgreSQL + Redis,
5 rounds, 2026-12-07, docs/benchmarks.md): the defaults' mix 0.801x -> 0.860x the recipe with the
drop-in, 0.932x -> 1.038x with pass-object; the 5 ms body 0.899x -> 0.946x and 0.987x -> 1.027x.
The compiler's parts it uses are listed in docs/private-apis.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from django.db import connections
from django.db.models import Expression, Field, Manager, Model, QuerySet
from django.db.models.expressions import Col

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
    fields = target.state_fields()
    state = _read(
        ("state", target.model, fields, using),
        lambda: _base(target.model, using).values_list(*fields),
        static=_static(target.model),
    )
    return state.row(pk)


def read_instance(model: type[Model], pk: Any, using: str) -> Model:
    """The object, as the base manager's ``get(pk=pk)`` returns it: the pass-object form's
    instance, unless the task's ``get_queryset()`` says otherwise."""
    read = _read(("instance", model, using), lambda: _base(model, using), static=_static(model))
    return read.instance(pk)


def read_changed(target: Target, pk: Any, using: str) -> Model:
    """The row an ``UPDATE`` just changed, by primary key alone: the change may hide it from a
    base manager that filters on the library's columns (one that hides inactive rows)."""
    model = target.model
    return _read(("changed", model, using), lambda: QuerySet(model=model, using=using)).instance(pk)


def field_of(model: type[Model], name: str) -> Field[Any, Any]:
    return cast("Field[Any, Any]", model._meta.get_field(name))


def _base(model: type[Model], using: str) -> QuerySet[Any]:
    rows: QuerySet[Any] = model._base_manager.db_manager(using).all()
    return rows


# -- one read, compiled once ----------------------------------------------------------------


class _Key(Expression):
    """Where the key goes in a compiled read: a parameter of its own, found by identity."""

    def as_sql(self, compiler: Any, connection: Any) -> tuple[str, tuple[Any, ...]]:
        return "%s", (self,)


@dataclass(frozen=True)
class _Read:
    """A queryset filtered on the key, as the ORM compiled it for one database: its SQL, its
    parameters (``slot``: the key's), and how a row becomes values (the columns' converters) and
    an instance (``names``: the attributes the columns hold; ``None`` where the queryset selects
    more than the model's own columns, ``select_related()`` or annotations)."""

    queryset: QuerySet[Any]
    sql: str
    params: tuple[Any, ...]
    slot: int
    converters: Callable[[list[Any], Any], tuple[Any, ...]]
    names: tuple[str, ...] | None

    def row(self, pk: Any) -> tuple[Any, ...]:
        """The converted row of the object ``pk``; the model's ``DoesNotExist`` if none."""
        model = self.queryset.model
        key = model._meta.pk
        target = getattr(key, "target_field", key)  # a parent link: its parent's key
        connection = connections[self.queryset.db]
        value = target.get_db_prep_value(key.get_prep_value(pk), connection, True)
        found = None
        if _in_range(value, target, connection):  # else no row has it (the ORM: Django 5.0+)
            params = list(self.params)
            params[self.slot] = value
            with connection.cursor() as cursor:
                cursor.execute(self.sql, params)
                found = cursor.fetchone()
        if found is None:
            raise model.DoesNotExist(f"{model._meta.object_name} matching query does not exist.")
        return self.converters(list(found), connection)

    def instance(self, pk: Any) -> Model:
        if self.names is None:  # a queryset that builds more than the model's own instance
            found: Model = self.queryset.get(pk=pk)
            return found
        model = self.queryset.model
        instance: Model = model.from_db(self.queryset.db, list(self.names), self.row(pk))
        return instance


def _in_range(value: Any, field: Field[Any, Any], connection: Any) -> bool:
    """Whether an integer key fits the column (a larger one fails on SQLite, not in a match)."""
    if not isinstance(value, int):
        return True
    low, high = connection.ops.integer_field_range(field.get_internal_type())
    return (low is None or value >= low) and (high is None or value <= high)


_reads: dict[tuple[Any, ...], _Read] = {}


def _read(
    key: tuple[Any, ...], queryset: Callable[[], QuerySet[Any]], *, static: bool = True
) -> _Read:
    """The compiled read of ``key`` (what is read, of which model, on which database), kept
    from its first use if the queryset is ``static``: the same at every call."""
    read = _reads.get(key)
    if read is None:
        read = _compile(queryset())
        if static:
            _reads[key] = read
    return read


def _static(model: type[Model]) -> bool:
    """Whether the model's base manager builds the same queryset at every call: Django's own
    ``get_queryset()``.  A project's own may depend on the moment (a tenant, a date), so its
    queryset is compiled on every read, as the ORM does."""
    return type(model._base_manager).get_queryset is Manager.get_queryset


def _compile(queryset: QuerySet[Any]) -> _Read:
    """Compile ``queryset.filter(pk=<key>)`` with Django's own compiler (private parts:
    docs/private-apis.md)."""
    model = queryset.model
    compiler = queryset.filter(pk=_Key(output_field=model._meta.pk)).query.get_compiler(queryset.db)
    sql, params = compiler.as_sql()
    slot = next(i for i, param in enumerate(params) if isinstance(param, _Key))
    columns = [column for column, _, _ in compiler.select]
    converters = compiler.get_converters(columns)

    def convert(row: list[Any], connection: Any) -> tuple[Any, ...]:
        for position, (functions, column) in converters.items():
            for function in functions:
                row[position] = function(row[position], column, connection)
        return tuple(row)

    built = compiler.klass_info  # None for values_list(): no instance
    own = bool(built) and not built.get("related_klass_infos")
    own = own and all(isinstance(column, Col) for column in columns)
    names = tuple(column.target.attname for column in columns) if own else None
    return _Read(queryset, sql, tuple(params), slot, convert, names)
