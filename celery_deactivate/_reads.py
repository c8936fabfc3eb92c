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
database (:class:`_Compiled`), with a marker where the key goes, and run with the key in its
place.  A base manager of the project's own is read by the ORM each time (:func:`_plain`).
That buys more than 5 % where issue #18 asks it to show it (``make bench``, PostgreSQL + Redis,
5 rounds, 2026-12-07, docs/benchmarks.md): the defaults' mix 0.801x -> 0.860x the recipe with the
drop-in, 0.932x -> 1.038x with pass-object; the 5 ms body 0.899x -> 0.946x and 0.987x -> 1.027x.
The compiler's parts it uses are listed in docs/private-apis.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import django
from django.db import connections
from django.db.models import Expression, Field, IntegerField, Manager, Model, QuerySet

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
    model, fields = target.model, target.state_fields()
    rows = _read(
        ("state", model, fields, using),
        lambda: base_queryset(model, using).values_list(*fields),
        manager_of=model,
    )
    return rows.row(pk)


def read_instance(model: type[Model], pk: Any, using: str) -> Model:
    """The object, as the base manager's ``get(pk=pk)`` returns it: the pass-object form's
    instance, unless the task's ``get_queryset()`` says otherwise."""
    rows = _read(("instance", model, using), lambda: base_queryset(model, using), manager_of=model)
    return rows.instance(pk)


def read_changed(target: Target, pk: Any, using: str) -> Model:
    """The row an ``UPDATE`` just changed, by primary key alone: the change may hide it from a
    base manager that filters on the library's columns (one that hides inactive rows)."""
    model = target.model
    rows = _read(("changed", model, using), lambda: QuerySet(model=model, using=using))
    return rows.instance(pk)


def field_of(model: type[Model], name: str) -> Field[Any, Any]:
    return cast("Field[Any, Any]", model._meta.get_field(name))


def base_queryset(model: type[Model], using: str) -> QuerySet[Any]:
    """The model's base manager's queryset on ``using``: what the library reads an object from
    (and the pass-object form's default ``get_queryset()``)."""
    rows: QuerySet[Any] = model._base_manager.db_manager(using).all()
    return rows


# -- one read, compiled once -----------------------------------------------------------------


class _Key(Expression):
    """Where the key goes in a compiled read: a parameter of its own, found by identity."""

    def as_sql(self, compiler: Any, connection: Any) -> tuple[str, tuple[Any, ...]]:
        return "%s", (self,)


@dataclass(frozen=True)
class _Compiled:
    """A queryset filtered on the key, as the ORM compiled it once for one database: its SQL,
    its parameters (``slot``: the key's), how a row becomes values (the columns' converters) and
    an instance (``names``: the attributes of the columns; ``None`` for ``values_list()``)."""

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
        if _in_range(value, key, connection):
            params = list(self.params)
            params[self.slot] = value
            with connection.cursor() as cursor:
                cursor.execute(self.sql, params)
                found = cursor.fetchone()
        if found is None:
            raise model.DoesNotExist(f"{model._meta.object_name} matching query does not exist.")
        return self.converters(list(found), connection)

    def instance(self, pk: Any) -> Model:
        assert self.names is not None  # a queryset of instances
        model = self.queryset.model
        instance: Model = model.from_db(self.queryset.db, list(self.names), self.row(pk))
        return instance


@dataclass(frozen=True)
class _Built:
    """A queryset the ORM builds and compiles on every read, as its ``get()``: that of a base
    manager or a queryset class of the project's own, which may change from call to call."""

    build: Callable[[], QuerySet[Any]]

    def row(self, pk: Any) -> tuple[Any, ...]:
        return tuple(self.build().get(pk=pk))

    def instance(self, pk: Any) -> Model:
        found: Model = self.build().get(pk=pk)
        return found


_reads: dict[tuple[Any, ...], _Compiled | _Built] = {}


def _read(
    key: tuple[Any, ...],
    build: Callable[[], QuerySet[Any]],
    *,
    manager_of: type[Model] | None = None,
) -> _Compiled | _Built:
    """The read of ``key`` (what is read, of which model, on which database), decided on first
    use and kept: compiled once, or built by the ORM each time where ``build`` is the base
    manager of ``manager_of`` and that manager is the project's own (:func:`_plain`)."""
    read = _reads.get(key)
    if read is None:
        own = manager_of is not None and not _plain(manager_of)
        read = _reads[key] = _Built(build) if own else _compile(build())
    return read


def _plain(model: type[Model]) -> bool:
    """Whether the model's base manager is Django's own, with Django's ``QuerySet``: the same
    queryset at every call, which a project's own ``get_queryset()`` (a tenant, a date, a
    ``prefetch_related()``) or queryset class need not be."""
    manager = model._base_manager
    return (
        type(manager).get_queryset is Manager.get_queryset
        and type(manager.get_queryset()) is QuerySet
    )


def _in_range(value: Any, key: Field[Any, Any], connection: Any) -> bool:
    """Whether an integer key fits its column.  Django 5.0+ matches no row for one that does
    not (``IntegerFieldExact``; SQLite would raise ``OverflowError``); a key that is a parent
    link, and every key on Django 4.2, is sent as it is, as the ORM does."""
    if not isinstance(value, int) or key.is_relation or not isinstance(key, IntegerField):
        return True
    if django.VERSION < (5, 0):
        return True
    low, high = connection.ops.integer_field_range(key.get_internal_type())
    return (low is None or value >= low) and (high is None or value <= high)


def _compile(queryset: QuerySet[Any]) -> _Compiled:
    """Compile ``queryset.filter(pk=<key>)``, without the model's ordering as ``get()`` has it,
    with Django's own compiler (its private parts: docs/private-apis.md).  The converters are
    the compiling connection's; they read the database's settings only (its time zone)."""
    model = queryset.model
    keyed = queryset.order_by().filter(pk=_Key(output_field=model._meta.pk))
    compiler = keyed.query.get_compiler(queryset.db)
    sql, params = compiler.as_sql()
    slot = next(i for i, param in enumerate(params) if isinstance(param, _Key))
    columns = [column for column, _, _ in compiler.select]
    converters = compiler.get_converters(columns)

    def convert(row: list[Any], connection: Any) -> tuple[Any, ...]:
        for position, (functions, column) in converters.items():
            for function in functions:
                row[position] = function(row[position], column, connection)
        return tuple(row)

    names = tuple(column.target.attname for column in columns) if compiler.klass_info else None
    return _Compiled(queryset, sql, tuple(params), slot, convert, names)
