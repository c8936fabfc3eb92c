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
from celery._state import (  # type: ignore[attr-defined]  # not in celery-types' stubs
    pop_current_task,
    push_current_task,
)
from celery.exceptions import Ignore, Reject, Retry
from celery.utils.serialization import UnpickleableExceptionWrapper
from django.apps import apps
from django.db import DatabaseError, connections, router, transaction
from django.db.models import Model

from . import _failure, _guard, _options, _reads, dispatch, services
from ._option_names import check_option_names
from .conf import (
    ExceptionTypes,
    Notifier,
    option_inputs,
    resolve,
)
from .exceptions import DeactivateConfigError
from .target import PROBE_ROLES, ModelRef, State, Target, resolve_target

logger = logging.getLogger("celery_deactivate")

#: Set while ``Task.apply()`` runs with exceptions propagating: Celery then calls no failure hook,
#: so ``__call__`` records the failure itself.
_eager_propagates: ContextVar[bool] = ContextVar(
    "celery_deactivate_eager_propagates", default=False
)

#: Set while a worker's main-process hook runs (Celery 5.7 calls ``Task.on_failure`` from
#: ``Request.on_timeout``): the request has recorded that failure already.
in_main_process_hook: ContextVar[bool] = ContextVar("celery_deactivate_main_hook", default=False)

#: The exception the library's own statements before the body (the read of the object) raised
#: in this run: not a failure of the object, so the failure hook does not count it.  The hook
#: takes it (:func:`_take_own_error`), so that it and its frames do not outlive the run.
_own_error: ContextVar[BaseException | None] = ContextVar(
    "celery_deactivate_own_error", default=None
)

#: Task classes declared before Django's app registry was ready; checked by ``AppConfig.ready()``.
pending_checks: weakref.WeakSet[type[DeactivatingTask]] = weakref.WeakSet()

#: Exceptions that are Celery's control flow, never failures.
CONTROL_FLOW = (Retry, Ignore, Reject)


class _Ran:
    """The object's state read by the run whose body ran (``None``: the body did not run)."""

    __slots__ = ("state",)

    def __init__(self) -> None:
        self.state: State | None = None


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
    atomic: bool
    #: Cool-down probes are on (``deactivate_cooldown``).
    probes: bool


#: The options :class:`RunOptions` is resolved from (with the task's ``model``).
RUN_OPTIONS = (
    "deactivate_fields",
    "deactivate_pass_object",
    "deactivate_atomic",
    "deactivate_cooldown",
)


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
        cls._failure_policy(cls._target())
        resolve(cls, "deactivate_pass_object")
        resolve(cls, "deactivate_crash_timeout")
        resolve(cls, "deactivate_atomic")
        cls._probe_policy(cls._target())
        _options.check(cls)

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
            atomic=resolve(self, "deactivate_atomic"),
            probes=resolve(self, "deactivate_cooldown") is not None,
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

    def probe_policy(self) -> tuple[float, float] | None:
        """``(cooldown, cooldown_max)`` in seconds when cool-down probes are on, else ``None``."""
        return self._probe_policy(self.target)

    def outage_open(self) -> bool:
        """Whether an outage of this task is open (no probe is sent meanwhile)."""
        return _guard.outage_of(self) is not None

    @classmethod
    def _probe_policy(cls, target: Target) -> tuple[float, float] | None:
        """``(cooldown, cooldown_max)`` in seconds when cool-down probes are on, else ``None``."""
        cooldown = resolve(cls, "deactivate_cooldown")
        if cooldown is None:
            return None
        if not target.probes:
            missing = [role for role in PROBE_ROLES if getattr(target, role) is None]
            raise DeactivateConfigError(
                f"deactivate_cooldown needs the fields {', '.join(PROBE_ROLES)} on "
                f"{target.label}, which has no {', '.join(repr(m) for m in missing)} field "
                "(subclass DeactivatableModel, add them, or map the roles with "
                "deactivate_fields)",
                task=cls.name,
                model=target.label,
                field=missing[0],
            )
        return cooldown, max(cooldown, resolve(cls, "deactivate_cooldown_max"))

    # -- running ----------------------------------------------------------------------------

    def get_queryset(self, using: str) -> Any:
        """Where the instance is read from with ``deactivate_pass_object``: override it to add
        ``select_related()``, annotations, ``select_for_update()``...  Not overridden, the
        instance is read with one plain ``SELECT`` of every concrete column built once per model
        (the same instance as ``Model._base_manager.get(pk=pk)``, without compiling a query).
        The drop-in form reads only the active flag and the count."""
        return self.target.model._base_manager.db_manager(using).all()

    def _load(self, target: Target, pk: Any, using: str) -> Model:
        """The instance for ``deactivate_pass_object``."""
        if type(self).get_queryset is DeactivatingTask.get_queryset:
            return _reads.read_object(target, pk, using)
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

    # The functions below that are on the stack while the body runs (``__call__``, ``_run``,
    # ``_run_atomic``) are kept small: a failure's traceback carries each frame's code positions
    # (billiard's ``ExceptionInfo``), pickled from the pool child to the worker on every failure.

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        options = self._run_options()
        if not args:
            raise self._no_key(options)
        request = self.request
        if request.called_directly or (request.is_eager and _eager_propagates.get()):
            return self._call_untraced(options, args, kwargs)
        return self._run(options, args, kwargs)

    def _no_key(self, options: RunOptions) -> TypeError:
        return TypeError(
            f"{self.name} takes the {options.target.label} primary key as first positional argument"
        )

    def _call_untraced(
        self, options: RunOptions, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """A call Celery does not trace (a direct call, ``apply()`` propagating exceptions): no
        failure hook will run, so the failure is recorded here."""
        request = self.request
        try:
            if request.called_directly:
                return self._run_direct(options, args, kwargs)
            return self._run(options, args, kwargs)
        except CONTROL_FLOW:
            raise
        except Exception as exc:
            self.record_failure(exc, args[0], request.id)
            raise

    def _run_direct(
        self, options: RunOptions, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """A direct call: what Celery's own ``Task.__call__`` does around the body (the task on
        Celery's stack, so ``celery.current_task`` is this task; a request with the arguments),
        around :meth:`_run`.  ``Task.__call__`` itself cannot be used: it calls ``run`` with the
        arguments it is given, and the read before the body and its transaction come first.
        Celery's stack is private (``celery._state``, docs/private-apis.md)."""
        push_current_task(self)
        self.push_request(args=args, kwargs=kwargs)
        try:
            return self._run(options, args, kwargs)
        finally:
            self.pop_request()
            pop_current_task()

    def _run(self, options: RunOptions, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Read the object's state, run the body on an active object, reset a positive count."""
        using = router.db_for_write(options.target.model)
        ran = _Ran()
        run = self._runner(options, args[0], using, ran)
        if run is None:
            return None
        if options.atomic:
            result = self._run_atomic(run, args, kwargs, using, options.target)
        else:
            result = run(*args, **kwargs)
        if ran.state is not None:  # the body ran and returned
            self._after_success(options.target, args[0], using, ran.state)
        return result

    def _runner(self, options: RunOptions, pk: Any, using: str, ran: _Ran) -> Any:
        """What runs the body, ``None`` if it must not run.  ``ran.state`` is set when it runs.

        The drop-in form reads the state here, before the body's transaction opens (a read
        holding no lock into the body: on SQLite the body's first write would have to upgrade
        it); the pass-object form reads the instance in the transaction, as the body's own
        ``get()`` would.  Errors of these reads are the library's, not the object's (never
        counted).
        """
        target = options.target
        if not options.pass_object:
            state = target.state_of(self._read(_reads.read_state, target, pk, using))
            if not self._may_run(state, options, pk):
                return None
            ran.state = state
            return self.run

        def run(first: Any, *rest: Any, **named: Any) -> Any:
            instance = self._read(self._load, target, first, using)
            found = target.state_of([getattr(instance, n) for n in target.state_fields()])
            if not self._may_run(found, options, pk):
                return None  # ran.state stays None: the body did not run
            ran.state = found
            return self.run(instance, *rest, **named)

        return run

    def _read(self, read: Any, target: Target, pk: Any, using: str) -> Any:
        try:
            return read(target, pk, using)
        except Exception as exc:
            _own_error.set(exc)
            if isinstance(exc, DatabaseError):
                _close_if_unusable(using)
            raise

    def _may_run(self, state: State, options: RunOptions, pk: Any) -> bool:
        """Run the body on an active object, or as the cool-down probe of a deactivated one."""
        if state.active:
            return True
        identity = options.target.identity(pk)
        if state.probing and options.probes:
            logger.info("celery_deactivate: %s probes %s (deactivated)", self.name, identity)
            return True
        logger.info("%s: %s is inactive, the body did not run", self.name, identity)
        return False

    def _run_atomic(
        self, run: Any, args: tuple[Any, ...], kwargs: dict[str, Any], using: str, target: Target
    ) -> Any:
        """Run the body in ``transaction.atomic()`` on the model's write database."""
        failure: BaseException | None = None
        try:
            with transaction.atomic(using=using):
                try:
                    return run(*args, **kwargs)
                except BaseException as exc:
                    failure = exc
                    raise
        except DatabaseError as exc:
            if failure is None or exc is failure:
                raise
            self._rollback_failed(target, args[0], exc)
        raise failure  # the task's own exception, unchanged (set: only it gets here)

    def _rollback_failed(self, target: Target, pk: Any, exc: DatabaseError) -> None:
        """The connection died under the body (the database went away): the rollback failed and
        Django's reconnect at the end of the block raised over the body's exception."""
        logger.warning(
            "celery_deactivate: %s on %s: the database failed at the rollback (%s)",
            self.name,
            target.identity(pk),
            services.describe(exc),
        )

    def _after_success(self, target: Target, pk: Any, using: str, state: State) -> None:
        """After a success, outside the body's transaction: reset a positive failure count, or
        re-activate the object whose probe this was.  A body that broke its transaction and
        returned still succeeds; an error here is logged, never raised over the result."""
        if _marked_for_rollback(using):  # in someone else's transaction, which the body broke
            logger.info(
                "celery_deactivate: %s on %s succeeded in a transaction marked for rollback; "
                "its state was not changed",
                self.name,
                target.identity(pk),
            )
            return
        if state.active:
            _guard.ran(self)  # the outage guard: one finished run, counted in memory
            if not state.failures:
                return
        try:
            if state.active:
                services.reset_failures(target, pk, using=using)
            elif services.end_probe(target, pk, using=using) is not None:
                logger.warning(
                    "celery_deactivate: %s re-activated: its probe %s succeeded",
                    target.identity(pk),
                    self.name,
                )
        except Exception as exc:
            logger.error(
                "celery_deactivate: %s succeeded on %s but its state could not be updated (%s)",
                self.name,
                target.identity(pk),
                services.describe(exc),
                exc_info=exc,
            )

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
        if _take_own_error() is exc:  # the target was resolved before that read
            logger.info(
                "celery_deactivate: %s[%s] on %s: the library's own read failed (%s); not "
                "counted against the object",
                self.name,
                task_id,
                self.target.identity(pk),
                services.describe(exc),
            )
            return None
        return _failure.record(self, exc, pk, task_id, timeout=timeout)


def _take_own_error() -> BaseException | None:
    """The error of the library's own read in this run, if any, forgotten as it is taken."""
    error = _own_error.get()
    if error is not None:
        _own_error.set(None)
    return error


def _close_if_unusable(using: str) -> None:
    """After an error of the library's own statement, outside a transaction: close the connection
    if it is unusable (a server restart, a failover, an idle timeout), so that the next task
    connects again.  Celery's Django fixup does so between tasks only without
    ``CELERY_DB_REUSE_MAX``."""
    connection = connections[using]
    if not connection.in_atomic_block:
        connection.close_if_unusable_or_obsolete()


def _marked_for_rollback(using: str) -> bool:
    """Whether the innermost ``atomic`` block on ``using`` will roll back (False outside one)."""
    if transaction.get_autocommit(using=using):  # no transaction: nothing to roll back
        return False
    try:
        return transaction.get_rollback(using=using)
    except transaction.TransactionManagementError:  # autocommit: nothing to roll back
        return False


def _original(exc: BaseException) -> BaseException:
    """Celery wraps exceptions it cannot pickle; type checks need the original class."""
    if isinstance(exc, UnpickleableExceptionWrapper):
        try:
            restored: BaseException = exc.restore()
            return restored
        except Exception:
            return exc
    return exc
