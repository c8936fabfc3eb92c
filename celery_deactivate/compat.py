"""What differs between the Celery releases this package supports (5.3 to 5.7), in one place."""

from __future__ import annotations

from typing import Any

from celery.app.task import Context


def push_request(task: Any, *args: Any, **kwargs: Any) -> None:
    """``Task.push_request`` as Celery >= 5.5 has it: the new context extends the current one.

    Celery 5.3 pushes a bare context, so a body reached through ``Task.__call__`` (which the
    deactivating task's own ``__call__`` does) saw an empty request on a worker and in ``apply()``:
    ``called_directly`` true, no id, ``retries`` 0, and ``self.retry()`` re-raised the exception
    instead of retrying.
    """
    task.request_stack.push(Context(*args, **{**task.request.__dict__, **kwargs}))
