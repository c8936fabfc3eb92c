"""Which model a task works on, and which of its fields record the deactivation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, NamedTuple, cast

from django.apps import apps
from django.core.exceptions import FieldDoesNotExist
from django.db import models

from .conf import FIELD_DEFAULTS
from .exceptions import DeactivateConfigError

#: The field classes accepted for each role.
FIELD_TYPES: Mapping[str, tuple[type[models.Field[Any, Any]], ...]] = {
    "active": (models.BooleanField,),
    "error": (models.BooleanField,),
    "error_message": (models.CharField, models.TextField),
    "deactivated_at": (models.DateTimeField,),
    "failure_count": (models.IntegerField,),
    "next_probe_at": (models.DateTimeField,),
    "cooldown": (models.IntegerField, models.FloatField),
    "probing_since": (models.DateTimeField,),
}

ModelRef = type[models.Model] | str


@dataclass(frozen=True, eq=False)
class Target:
    """A model and the names of its fields by role (``None``: the role is not recorded).

    One instance per configuration (:func:`resolve_target` caches them), compared and hashed by
    identity.
    """

    model: type[models.Model]
    active: str
    error: str | None
    error_message: str | None
    error_message_max_length: int | None
    deactivated_at: str | None
    failure_count: str | None
    #: Cool-down probes: when the next probe is due, the current cool-down (seconds), since when
    #: a probe is out.  ``None`` each when the model has no such field.
    next_probe_at: str | None = None
    cooldown: str | None = None
    probing_since: str | None = None
    #: The concrete model whose table holds the fields: ``model`` itself (or its concrete model,
    #: for a proxy), or the ancestor that declares them (multi-table inheritance).
    owner: type[models.Model] | None = None
    #: Rows are exactly the table's rows: no multi-table inheritance, and the base manager is
    #: Django's own (no ``Meta.base_manager_name`` naming a manager that may filter), so a plain
    #: ``SELECT ... WHERE pk = %s`` reads what the ORM would.  Otherwise reads go through the
    #: model's base manager.
    plain_rows: bool = True

    @property
    def label(self) -> str:
        return self.model._meta.label

    @property
    def probes(self) -> bool:
        """The model has every field cool-down probes need."""
        return bool(self.next_probe_at and self.cooldown and self.probing_since)

    @property
    def inherited(self) -> bool:
        """The fields live in an ancestor's table (multi-table inheritance)."""
        return self.owner is not None and self.owner is not self.model._meta.concrete_model

    def identity(self, pk: Any) -> str:
        """How logs name one object: ``app_label.Model pk=42``."""
        return f"{self.label} pk={pk!r}"

    def count_of(self, instance: models.Model) -> int | None:
        """The instance's failure count, ``None`` without a counter field."""
        return getattr(instance, self.failure_count) if self.failure_count else None

    def state_fields(self) -> tuple[str, ...]:
        """The fields read before the body runs: is it active, its failure count, is a probe
        out (those the model has)."""
        names: tuple[str, ...] = (self.active,)
        if self.failure_count:
            names += (self.failure_count,)
        if self.probes:
            names += (cast(str, self.probing_since),)
        return names

    def state_of(self, values: Sequence[Any]) -> State:
        """The :class:`State` of the values of :meth:`state_fields`, in that order."""
        found = iter(values)
        active = bool(next(found))
        failures = int(next(found) or 0) if self.failure_count else 0
        probing = next(found) is not None if self.probes else False
        return State(active, failures, probing)


class State(NamedTuple):
    """What the read before the body found."""

    active: bool
    #: The consecutive failure count (0 without a counter field).
    failures: int
    #: A cool-down probe is out for this (deactivated) object.
    probing: bool


def get_model(model: ModelRef | None, task_name: str) -> type[models.Model]:
    if model is None:
        raise DeactivateConfigError(
            "a deactivating task needs model= (a model class or 'app_label.ModelName')",
            task=task_name,
        )
    if isinstance(model, str):
        try:
            return apps.get_model(model)
        except (LookupError, ValueError) as exc:
            raise DeactivateConfigError(
                f"model={model!r} is not an installed model ({exc})", task=task_name, model=model
            ) from exc
    if not (isinstance(model, type) and issubclass(model, models.Model)):
        raise DeactivateConfigError(
            f"model={model!r} is not a Django model class", task=task_name, model=repr(model)
        )
    if model._meta.abstract:
        raise DeactivateConfigError(
            f"model={model.__name__} is abstract", task=task_name, model=model.__name__
        )
    return model


def _check_primary_key(model: type[models.Model], task_name: str) -> None:
    """Refuse a composite primary key (Django 5.2's ``CompositePrimaryKey``): a task's object is
    given by one key value (its first argument), and that is how the library reads, updates,
    lists and names objects."""
    composite = getattr(models, "CompositePrimaryKey", None)  # absent before Django 5.2
    pk = model._meta.pk
    if composite is None or not isinstance(pk, composite):
        return
    label = model._meta.label
    columns = ", ".join(getattr(pk, "field_names", ()))
    raise DeactivateConfigError(
        f"{label} has a composite primary key ({columns}), which deactivating tasks do not "
        "support: give it a single-column primary key (a unique constraint can keep those "
        "columns unique)",
        task=task_name,
        model=label,
    )


def _field(
    model: type[models.Model], role: str, name: str, explicit: bool, task_name: str
) -> models.Field[Any, Any] | None:
    label = model._meta.label
    try:
        field = model._meta.get_field(name)
    except FieldDoesNotExist:
        if explicit or role == "active":
            raise DeactivateConfigError(
                f"{label} has no field {name!r} (the {role!r} field)",
                task=task_name,
                model=label,
                field=name,
            ) from None
        return None
    wanted = FIELD_TYPES[role]
    if not isinstance(field, wanted) or not field.concrete:
        kinds = " or ".join(kind.__name__ for kind in wanted)
        raise DeactivateConfigError(
            f"{label}.{name} must be a {kinds} to be the {role!r} field, "
            f"it is a {type(field).__name__}",
            task=task_name,
            model=label,
            field=name,
        )
    return field


@lru_cache(maxsize=256)
def resolve_target(
    model: ModelRef | None, fields: tuple[tuple[str, str | None], ...], task_name: str
) -> Target:
    """Check the model and its fields once per (model, fields) and describe them.

    Raises :exc:`DeactivateConfigError` (an ``ImproperlyConfigured``) naming model and field.
    """
    concrete = get_model(model, task_name)
    _check_primary_key(concrete, task_name)
    configured = dict(fields)
    found: dict[str, models.Field[Any, Any] | None] = {}
    for role, default in FIELD_DEFAULTS.items():
        name = configured.get(role, default)
        found[role] = (
            None if name is None else _field(concrete, role, name, role in configured, task_name)
        )

    def name_of(role: str) -> str | None:
        field = found[role]
        return None if field is None else field.name

    message_field = found["error_message"]
    owners = {field.model._meta.concrete_model for field in found.values() if field is not None}
    if len(owners) > 1:
        names = ", ".join(
            f"{field.name} ({field.model._meta.label})"
            for field in found.values()
            if field is not None
        )
        raise DeactivateConfigError(
            f"the fields {concrete._meta.label} records a deactivation in must live in one table, "
            f"they are spread over {len(owners)}: {names}",
            task=task_name,
            model=concrete._meta.label,
        )
    (owner,) = owners
    active = name_of("active")
    assert active is not None
    return Target(
        model=concrete,
        active=active,
        error=name_of("error"),
        error_message=name_of("error_message"),
        error_message_max_length=message_field.max_length if message_field else None,
        deactivated_at=name_of("deactivated_at"),
        failure_count=name_of("failure_count"),
        next_probe_at=name_of("next_probe_at"),
        cooldown=name_of("cooldown"),
        probing_since=name_of("probing_since"),
        owner=owner,
        # One table holds every column (no multi-table parent, whichever table has the library's
        # fields), read through Django's own base manager (not a subclass, which may filter).
        plain_rows=(
            owner is not None
            and owner is concrete._meta.concrete_model
            and not owner._meta.parents
            and type(concrete._base_manager) is models.Manager
        ),
    )
