"""Deactivate a Django model object when the Celery task that works on it fails for good.

    @app.task(base=DeactivatingTask, model=Feed)
    def poll(pk): ...

The public names are imported lazily so that ``import celery_deactivate`` works before
Django's app registry is ready (a project's ``celery.py`` is imported from its settings).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.4.0"

__all__ = ["DeactivatableModel", "DeactivatingTask", "__version__", "maintain_entry"]

if TYPE_CHECKING:
    from .models import DeactivatableModel
    from .task import DeactivatingTask
    from .tasks import maintain_entry


def __getattr__(name: str) -> Any:
    if name == "DeactivatingTask":
        from .task import DeactivatingTask

        return DeactivatingTask
    if name == "DeactivatableModel":
        from .models import DeactivatableModel

        return DeactivatableModel
    if name == "maintain_entry":
        from .tasks import maintain_entry

        return maintain_entry
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
