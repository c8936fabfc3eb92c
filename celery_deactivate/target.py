"""Which model a task works on, and which of its fields record the deactivation."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

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
}

ModelRef = type[models.Model] | str


@dataclass(frozen=True, eq=False)
class Target:
    """A model and the names of its fields by role (``None``: the role is not recorded).

    One instance per configuration (:func:`resolve_target` caches them), compared and hashed by
    identity: the hot paths key their caches on it once per task.
    """

    model: type[models.Model]
    active: str
    error: str | None
    error_message: str | None
    error_message_max_length: int | None
    deactivated_at: str | None
    failure_count: str | None
    #: Every concrete field lives in the model's own table (no multi-table inheritance): the hot
    #: paths may use hand-written SQL on it.
    single_table: bool = True

    @property
    def label(self) -> str:
        return self.model._meta.label

    def identity(self, pk: Any) -> str:
        """How logs name one object: ``app_label.Model pk=42``."""
        return f"{self.label} pk={pk!r}"

    def count_of(self, instance: models.Model) -> int | None:
        """The instance's failure count, ``None`` without a counter field."""
        return getattr(instance, self.failure_count) if self.failure_count else None

    def state_fields(self) -> tuple[str, ...]:
        """The fields read before the body runs: is it active, and its failure count."""
        return (self.active,) + ((self.failure_count,) if self.failure_count else ())


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
    single_table = all(
        field.model._meta.concrete_model is concrete._meta.concrete_model
        for field in concrete._meta.concrete_fields
    )
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
        single_table=single_table,
    )
