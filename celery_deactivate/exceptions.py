"""The package's exceptions: one base class, subclasses that carry their context."""

from __future__ import annotations

from django.core.exceptions import ImproperlyConfigured

__all__ = ["DeactivateConfigError", "DeactivateError"]


class DeactivateError(Exception):
    """Base class of every exception raised by celery-deactivate."""


class DeactivateConfigError(DeactivateError, ImproperlyConfigured):
    """A task or the app is misconfigured.

    It is an :exc:`~django.core.exceptions.ImproperlyConfigured`, so it is caught where Django's
    own configuration errors are.  ``task``, ``model`` and ``field`` name what is wrong,
    where known.
    """

    def __init__(
        self,
        message: str,
        *,
        task: str | None = None,
        model: str | None = None,
        field: str | None = None,
    ) -> None:
        prefix = f"{task}: " if task else ""
        super().__init__(prefix + message)
        self.task = task
        self.model = model
        self.field = field
