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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from celery import Task
from celery._state import _task_stack  # type: ignore[attr-defined]
from celery.exceptions import Ignore, Reject, Retry
from celery.utils.serialization import UnpickleableExceptionWrapper
from django.apps import apps
from django.db import DatabaseError, router, transaction
from django.db.models import Model

from . import dispatch, services
from .begin import begin_with_next_query
from .conf import ExceptionTypes, Notifier, check_option_names, option_inputs, resolve
from .exceptions import DeactivateConfigError
from .target import ModelRef, Target, resolve_target

logger = logging.getLogger("celery_deactivate")

#: Set while ``Task.apply()`` runs with exceptions propagating: Celery then calls no failure hook,
#: so ``__call__`` records the failure itself.
_eager_propagates: ContextVar[bool] = ContextVar(
    "celery_deactivate_eager_propagates", default=False
)

#: Set while a worker's main-process hook runs (Celery 5.7 calls ``Task.on_failure`` from
#: ``Request.on_timeout``): the request has recorded that failure already.
in_main_process_hook: ContextVar[bool] = ContextVar("celery_deactivate_main_hook", default=False)

#: Task classes declared before Django's app registry was ready; checked by ``AppConfig.ready()``.
pending_checks: weakref.WeakSet[type[DeactivatingTask]] = weakref.WeakSet()

#: Exceptions that are Celery's control flow, never failures.
CONTROL_FLOW = (Retry, Ignore, Reject)


@dataclass(frozen=True)
class FailurePolicy:
    """The failure options of one task, resolved."""

    after: int
    on: ExceptionTypes
    dont_on: ExceptionTypes
    notify: bool
    notifier: Notifier

    def counts(self, exc: BaseException) -> bool:
        return isinstance(exc, self.on) and not isinstance(exc, self.dont_on)


@dataclass(frozen=True)
class RunOptions:
    """The options of one task that every run reads, resolved."""

    target: Target
    pass_object: bool
    fold_begin: bool


#: The options :class:`RunOptions` is resolved from (with the task's ``model``).
RUN_OPTIONS = ("deactivate_fields", "deactivate_pass_object", "deactivate_fold_begin")


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
    #: Notify once per deactivation (default ``True``).
    deactivate_notify: ClassVar[bool | None] = None
    #: The notifier, a callable or dotted path (default: mail the site admins).
    deactivate_notifier: ClassVar[Notifier | str | None] = None
    #: Field names by role (active, error, error_message, deactivated_at, failure_count).
    deactivate_fields: ClassVar[dict[str, str | None] | None] = None
    #: Call the body with the loaded instance instead of the primary key (default ``False``).
    deactivate_pass_object: ClassVar[bool | None] = None
    #: Seconds the worker's main process may spend recording a crash (default 10).
    deactivate_crash_timeout: ClassVar[float | None] = None
    #: Send BEGIN with the read before the body, on PostgreSQL + psycopg 3 (default ``True``).
    deactivate_fold_begin: ClassVar[bool | None] = None

    #: The worker-side request class: records crashes (hard time limit, killed child).
    Request = "celery_deactivate.request:DeactivatingRequest"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        check_option_names(str(getattr(cls, "name", None) or cls.__name__), vars(cls))

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
        cls._failure_policy(cls._target())
        resolve(cls, "deactivate_pass_object")
        resolve(cls, "deactivate_crash_timeout")
        resolve(cls, "deactivate_fold_begin")

    # -- resolution -------------------------------------------------------------------------

    @property
    def target(self) -> Target:
        """The model this task works on and its fields by role (resolved, checked).

        Public: the fan-out (:mod:`celery_deactivate.dispatch`), the operators' tools and
        receivers read ``task.target.model``, ``task.target.active``...
        """
        return self._target()

    @classmethod
    def _target(cls) -> Target:
        fields = resolve(cls, "deactivate_fields")
        return resolve_target(cls.model, tuple(sorted(fields.items())), cls.name)

    def _run_options(self) -> RunOptions:
        """:class:`RunOptions`, resolved again only when what they are resolved from changed."""
        inputs = (self.model, option_inputs(self, RUN_OPTIONS))
        memo = self.__dict__.get("_run_memo")
        if memo is not None and memo[0] == inputs:
            options: RunOptions = memo[1]
            return options
        options = RunOptions(
            target=self._target(),
            pass_object=resolve(self, "deactivate_pass_object"),
            fold_begin=resolve(self, "deactivate_fold_begin"),
        )
        self._run_memo = (inputs, options)
        return options

    @classmethod
    def _failure_policy(cls, target: Target) -> FailurePolicy:
        after = resolve(cls, "deactivate_after")
        if after > 1 and not target.failure_count:
            raise DeactivateConfigError(
                f"deactivate_after={after} needs a failure counter, and {target.label} has no "
                "'failure_count' field (add one, or map the role with deactivate_fields)",
                task=cls.name,
                model=target.label,
                field="failure_count",
            )
        return FailurePolicy(
            after=after,
            on=resolve(cls, "deactivate_on"),
            dont_on=resolve(cls, "dont_deactivate_on"),
            notify=resolve(cls, "deactivate_notify"),
            notifier=resolve(cls, "deactivate_notifier"),
        )

    # -- running ----------------------------------------------------------------------------

    def get_queryset(self, using: str) -> Any:
        """Where the instance is read from with ``deactivate_pass_object``: override it to add
        ``select_related()``, annotations...  Not overridden, the instance is read with one
        hand-written ``SELECT`` of every concrete column instead (the same instance, no query
        compilation).  The drop-in form reads only the active flag and the count."""
        return self._target().model._base_manager.db_manager(using).all()

    def _load(self, target: Target, pk: Any, using: str, fold: bool) -> Model:
        """The instance for ``deactivate_pass_object``: one hand-written SELECT, unless
        ``get_queryset`` is overridden."""
        if type(self).get_queryset is DeactivatingTask.get_queryset:
            return services.read_object(target, pk, using, fold)
        with begin_with_next_query(using, fold):
            instance: Model = self.get_queryset(using).get(pk=pk)
        return instance

    def apply(self, args: Any = None, kwargs: Any = None, *more: Any, **options: Any) -> Any:
        throw = options.get("throw")
        if throw is None:
            throw = options["throw"] = bool(self.app.conf.task_eager_propagates)
        token = _eager_propagates.set(bool(throw))
        try:
            return super().apply(args, kwargs, *more, **options)
        finally:
            _eager_propagates.reset(token)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        options = self._run_options()
        if not args:
            raise TypeError(
                f"{self.name} takes the {options.target.label} primary key as first positional "
                "argument"
            )
        request = self.request
        record_here = request.called_directly or (request.is_eager and _eager_propagates.get())
        try:
            return self._run_atomic(options, args, kwargs, request.called_directly)
        except CONTROL_FLOW:
            raise
        except Exception as exc:
            if record_here:  # no failure hook will run: Celery is not tracing this call
                self.record_failure(exc, args[0], request.id)
            raise

    def _run_atomic(
        self, options: RunOptions, args: tuple[Any, ...], kwargs: dict[str, Any], direct: bool
    ) -> Any:
        """Run the body in a transaction if the object is active.

        One frame between ``__call__`` and the body: Celery formats every frame of a failure's
        traceback, so each wrapper frame costs on the failure path.
        """
        pk = args[0]
        target, fold = options.target, options.fold_begin
        using = router.db_for_write(target.model)
        failure: BaseException | None = None
        try:
            with transaction.atomic(using=using):
                try:
                    if options.pass_object:
                        first = self._load(target, pk, using, fold)
                        state = tuple(getattr(first, name) for name in target.state_fields())
                    else:
                        first, state = pk, services.read_state(target, pk, using, fold)
                    if not state[0]:
                        logger.info(
                            "%s: %s is inactive, the body did not run",
                            self.name,
                            target.identity(pk),
                        )
                        return None
                    # The instance takes the pk's place when it is passed; the request keeps the
                    # pk (retry() sends the pk).  A traced call (worker, apply) has its request
                    # on the stack already: like Celery's own __protected_call__, push nothing.
                    if direct:
                        result = self._call_directly(first, args, kwargs)
                    else:
                        result = self.run(first, *args[1:], **kwargs)
                    if len(state) > 1 and state[1]:
                        services.reset_failures(target, pk, using=using)
                    return result
                except BaseException as exc:
                    failure = exc
                    raise
        except DatabaseError as exc:
            if failure is None or exc is failure:
                raise
            # The connection died under the body (the database went away): the rollback failed
            # and Django's reconnect at the end of the block raised over the body's exception.
            logger.warning(
                "celery_deactivate: %s on %s: the database failed at the rollback (%s: %s)",
                self.name,
                target.identity(pk),
                type(exc).__qualname__,
                exc,
            )
        assert failure is not None  # only a rollback failure over the body's exception gets here
        raise failure  # the task's own exception, unchanged

    def _call_directly(self, first: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """``Task.__call__`` for a direct call ``poll(pk)``: push a request for the body."""
        _task_stack.push(self)
        self.push_request(args=args, kwargs=kwargs)
        try:
            return self.run(first, *args[1:], **kwargs)
        finally:
            self.pop_request()
            _task_stack.pop()

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
        """Count a final failure and deactivate at the threshold.  Never raises: logs at ERROR."""
        exc = _original(exc)
        identity = f"{self.model} pk={pk!r}"
        try:
            target = self._target()
            identity = target.identity(pk)
            policy = self._failure_policy(target)
            if not policy.counts(exc):
                return None
            outcome = services.record_failure(
                target,
                pk,
                exc,
                threshold=policy.after,
                sender=self,
                task_id=task_id,
                timeout=timeout,
            )
        except Exception:
            logger.exception(
                "celery_deactivate: could not record the failure of %s[%s] on %s (%s: %s)",
                self.name,
                task_id,
                identity,
                type(exc).__qualname__,
                exc,
            )
            return None
        if outcome.deactivated:
            logger.warning(
                "celery_deactivate: %s deactivated after %s failure(s) of %s[%s]: %s: %s",
                identity,
                outcome.failure_count or 1,
                self.name,
                task_id,
                type(exc).__qualname__,
                exc,
            )
            if policy.notify:
                self._notify(policy.notifier, outcome.instance, exc, task_id, identity)
        return outcome

    def _notify(
        self,
        notifier: Notifier,
        instance: Model | None,
        exc: BaseException,
        task_id: str | None,
        identity: str,
    ) -> None:
        try:
            notifier(task=self, instance=instance, exception=exc, task_id=task_id)
        except Exception:
            logger.exception(
                "celery_deactivate: notifier %r failed for %s (deactivated by %s[%s])",
                notifier,
                identity,
                self.name,
                task_id,
            )


def _original(exc: BaseException) -> BaseException:
    """Celery wraps exceptions it cannot pickle; type checks need the original class."""
    if isinstance(exc, UnpickleableExceptionWrapper):
        try:
            restored: BaseException = exc.restore()
            return restored
        except Exception:
            return exc
    return exc
