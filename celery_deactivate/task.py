"""``DeactivatingTask``: the Celery task base class.

``__call__`` runs the body in one transaction on an active object; ``on_failure`` (Celery's hook
for a final failure, in the process that ran the body) records the failure after the rollback.
Failures that kill the pool child are recorded by the worker's main process through the task's
:class:`~celery_deactivate.request.DeactivatingRequest`.
"""

from __future__ import annotations

import logging
import weakref
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, ClassVar

from celery import Task
from celery.utils.serialization import UnpickleableExceptionWrapper
from django.apps import apps

from . import _errors, _failure, _guard, _options, _reads, _run, dispatch, services
from ._option_names import check_option_names
from .conf import Notifier
from .target import ModelRef, Target, get_model

__all__ = ["DeactivatingTask"]

logger = logging.getLogger("celery_deactivate")

#: Set while a worker's main-process hook runs (Celery 5.7 calls ``Task.on_failure`` from
#: ``Request.on_timeout``): the request has recorded that failure already.
in_main_process_hook: ContextVar[bool] = ContextVar("celery_deactivate_main_hook", default=False)

#: Task classes declared before Django's app registry was ready; checked by ``AppConfig.ready()``.
pending_checks: weakref.WeakSet[type[DeactivatingTask]] = weakref.WeakSet()


if TYPE_CHECKING:
    _TaskBase = Task[..., Any]
else:
    _TaskBase = Task  # Task is subscriptable only from Celery 5.5 on


class DeactivatingTask(_TaskBase):
    """A task on one model object, given by its primary key as first positional argument.

    The body runs in a transaction on an active object; a final failure rolls it back, counts
    the failure and, at ``deactivate_after`` consecutive ones, deactivates the object, sends
    :data:`~celery_deactivate.signals.object_deactivated` and notifies.  The task's exception
    always reaches Celery unchanged.  Options are documented in :mod:`celery_deactivate.conf`.
    """

    #: The model the task works on: a model class or ``"app_label.ModelName"``.  Required.
    model: ClassVar[ModelRef | None] = None
    #: Consecutive final failures that deactivate the object (int >= 1; default 1).
    deactivate_after: ClassVar[int | None] = None
    #: Exception types that count as failures (default ``(Exception,)``).
    deactivate_on: ClassVar[Any] = None
    #: Exception types that never count nor deactivate (default ``()``).
    dont_deactivate_on: ClassVar[Any] = None
    #: Notify deactivations, digests and outages (default ``True``).
    deactivate_notify: ClassVar[bool | None] = None
    #: The notifier, a callable or dotted path (default: mail the site admins).
    deactivate_notifier: ClassVar[Notifier | str | None] = None
    #: Seconds of a notice window: later deactivations wait for its digest (default 300; 0 off).
    deactivate_notify_window: ClassVar[float | None] = None
    #: The site's base URL, for absolute admin links in notices (default: relative paths).
    deactivate_site_url: ClassVar[str | None] = None
    #: Outage guard: distinct failing objects in the window (default 10; 0 turns it off).
    deactivate_outage_objects: ClassVar[int | None] = None
    #: Outage guard: failure rate of the finished runs in the window, in (0, 1] (default 0.5).
    deactivate_outage_rate: ClassVar[float | None] = None
    #: Outage guard: finished runs in the window below which the rate is not judged (default 100).
    deactivate_outage_min_runs: ClassVar[int | None] = None
    #: Outage guard: seconds over which failures and runs are counted (default 300).
    deactivate_outage_window: ClassVar[float | None] = None
    #: Field names by role (the roles of :data:`celery_deactivate.target.ROLES`: active, error,
    #: error_message, deactivated_at, failure_count, next_probe_at, cooldown, probing_since).
    deactivate_fields: ClassVar[dict[str, str | None] | None] = None
    #: Call the body with the loaded instance instead of the primary key (default ``False``).
    deactivate_pass_object: ClassVar[bool | None] = None
    #: Seconds the worker's main process may spend recording a crash (default 10).
    deactivate_crash_timeout: ClassVar[float | None] = None
    #: Run the body in a transaction, rolled back on failure (default ``True``).
    deactivate_atomic: ClassVar[bool | None] = None
    #: Seconds after a deactivation by a failure before one cool-down probe (default ``None``:
    #: no probes).
    deactivate_cooldown: ClassVar[float | None] = None
    #: The longest cool-down between two probes, in seconds (default a day).
    deactivate_cooldown_max: ClassVar[float | None] = None

    #: The worker-side request class: records crashes (hard time limit, killed child).
    Request = "celery_deactivate.request:DeactivatingRequest"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        check_option_names(cls)

    @classmethod
    def on_bound(cls, app: Any) -> None:
        super().on_bound(app)
        if "run" not in vars(cls):  # this class, or an intermediate base without a body
            return
        if isinstance(cls.model, str) and not apps.ready:
            pending_checks.add(cls)
        else:
            cls.check_configuration()

    @classmethod
    def check_configuration(cls) -> None:
        """Resolve the model, its fields and every option; raise ``ImproperlyConfigured``."""
        _options.Options(cls).check()

    # -- resolution -------------------------------------------------------------------------

    @property
    def target(self) -> Target:
        """The model this task works on and its fields by role (resolved, checked).

        Public: the fan-out (:mod:`celery_deactivate.dispatch`), the operators' tools and
        receivers read ``task.target.model``, ``task.target.active``...
        """
        return _options.Options(self).target

    def outage_open(self) -> bool:
        """Whether an outage of this task is open (no probe is sent meanwhile)."""
        return _guard.outage_of(self) is not None

    # -- running ----------------------------------------------------------------------------

    def get_queryset(self, using: str) -> Any:
        """Where the instance is read from with ``deactivate_pass_object``: override it to add
        ``select_related()``, annotations, ``select_for_update()``...  By default the model's
        base manager.  The drop-in form reads only the active flag and the count."""
        return _reads.base_queryset(get_model(self.model, self.name), using)

    def apply(self, args: Any = None, kwargs: Any = None, *more: Any, **options: Any) -> Any:
        throw = options.get("throw")
        if throw is None:
            throw = options["throw"] = bool(self.app.conf.task_eager_propagates)
        token = _run.eager_propagates.set(bool(throw))
        try:
            return super().apply(args, kwargs, *more, **options)
        finally:
            _run.eager_propagates.reset(token)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """One run of the body: ``celery_deactivate._run`` (the read, the active check, the
        transaction, a success's bookkeeping)."""
        options = _options.Options(self)
        if not args:
            raise TypeError(
                f"{self.name} takes the {options.target.label} primary key as first positional "
                "argument"
            )
        request = self.request
        if request.called_directly or (request.is_eager and _run.eager_propagates.get()):
            return _run.untraced(self, options, args, kwargs)
        return _run.run(self, options, args, kwargs)

    # -- fan-out ----------------------------------------------------------------------------

    def dispatch_active(self, queryset: Any = None, **apply_async_options: Any) -> int:
        """Enqueue one message of this task per active object; return how many.

        See :func:`celery_deactivate.dispatch.dispatch_active`.
        """
        return dispatch.dispatch_active(self, queryset, **apply_async_options)

    # -- failing ----------------------------------------------------------------------------

    def on_failure(self, exc: Exception, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        super().on_failure(exc, task_id, args, kwargs, einfo)
        if args and not in_main_process_hook.get():
            self.record_failure(exc, args[0], task_id)

    def record_failure(
        self,
        exc: BaseException,
        pk: Any,
        task_id: str | None,
        *,
        timeout: float | None = None,
    ) -> services.FailureOutcome | None:
        """Record a final failure of this task on the object ``pk``: what happens to it is
        ``celery_deactivate._failure.record``.  Never raises: logs at ERROR."""
        exc = _original(exc)
        if _run.take_own_error() is exc:  # the target was resolved before that read
            logger.info(
                "celery_deactivate: %s[%s] on %s: the library's own read failed (%s); not "
                "counted against the object",
                self.name,
                task_id,
                self.target.identity(pk),
                _errors.describe(exc),
            )
            return None
        return _failure.record(self, exc, pk, task_id, timeout=timeout)


def _original(exc: BaseException) -> BaseException:
    """Celery wraps exceptions it cannot pickle; type checks need the original class."""
    if isinstance(exc, UnpickleableExceptionWrapper):
        try:
            restored: BaseException = exc.restore()
            return restored
        except Exception:
            return exc
    return exc
