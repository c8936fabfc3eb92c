"""Fan-out: one task message per active object (placeholder, being written)."""

from __future__ import annotations

from typing import Any


def dispatch_active(task: Any, queryset: Any = None, **apply_async_options: Any) -> int:
    raise NotImplementedError
