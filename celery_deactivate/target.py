"""Which model a task works on, and which of its fields record the deactivation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, NamedTuple, cast

from django.apps import apps
from django.core.exceptions import FieldDoesNotExist
from django.db import models

from .exceptions import DeactivateConfigError

__all__ = ["ROLES", "Role", "State", "Target"]


@dataclass(frozen=True)
class Role:
    """A field the library writes: its role, the field name used when none is configured, the
    field classes accepted, whether cool-down probes need it, and what a re-activation writes."""

    name: str
    types: tuple[type[models.Field[Any, Any]], ...]
    #: Cool-down probes (``deactivate_cooldown``) need the field.
    probes: bool = False
    #: The value a re-activation writes.
    reactivated: Any = None

    @property
    def default(self) -> str:
        """The field name used when ``deactivate_fields`` names none: the role's own."""
        return self.name


#: Every role, declared once: the options, the checks, the services, the admin and the command
#: look the roles up here.
ROLES: Mapping[str, Role] = {
    role.name: role
    for role in (
        Role("active", (models.BooleanField,), reactivated=True),
        Role("error", (models.BooleanField,), reactivated=False),
        Role("error_message", (models.CharField, models.TextField), reactivated=""),
        Role("deactivated_at", (models.DateTimeField,)),
        Role("failure_count", (models.IntegerField,), reactivated=0),
        # Cool-down probes: when the next probe is due, the current cool-down in seconds, and
        # since when a probe is out.
        Role("next_probe_at", (models.DateTimeField,), probes=True),
        Role("cooldown", (models.IntegerField, models.FloatField), probes=True),
        Role("probing_since", (models.DateTimeField,), probes=True),
    )
}

#: The roles cool-down probes need (``deactivate_cooldown``).
PROBE_ROLES = tuple(role.name for role in ROLES.values() if role.probes)

ModelRef = type[models.Model] | str


@dataclass(frozen=True, eq=False)
class Target:
    """A model and the names of its fields by role (``None``: the role is not recorded).

    One instance per configuration (``resolve_target()`` caches them), compared and hashed by
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

    @property
    def label(self) -> str:
        return self.model._meta.label

    @property
    def probes(self) -> bool:
        """The model has every field cool-down probes need."""
        return all(getattr(self, role) for role in PROBE_ROLES)

    def probe_pending(self) -> models.Q:
        """Rows with a cool-down probe scheduled or out (for a target with :attr:`probes`)."""
        scheduled = models.Q(**{f"{self.next_probe_at}__isnull": False})
        return scheduled | models.Q(**{f"{self.probing_since}__isnull": False})

    def fields(self) -> dict[str, str | None]:
        """The field names by role, every role (``None``: not recorded), as
        ``services.reactivate(fields=...)`` takes them."""
        return {role: getattr(self, role) for role in ROLES}

    def recorded(self) -> list[str]:
        """The names of the fields the library writes, in the order of :data:`ROLES`."""
        return [name for name in self.fields().values() if name]

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
    wanted = ROLES[role].types
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
    for role in ROLES:
        name = configured.get(role, ROLES[role].default)
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
    optional = {role: name_of(role) for role in ROLES if role != "active"}
    return Target(
        model=concrete,
        active=cast(str, name_of("active")),  # never None: a missing active field raised
        error_message_max_length=message_field.max_length if message_field else None,
        **optional,
        owner=owner,
    )
