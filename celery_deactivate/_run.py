"""One run of a deactivating task's body, top to bottom.

``DeactivatingTask.__call__`` calls :func:`run` with the task's options (one
:class:`~celery_deactivate._options.Options` per run),
or :func:`untraced` for a call Celery does not trace.  In order:

1. **Read** the object's state.  The drop-in form reads it before the body's transaction opens
   (a read holding no lock into the body: on SQLite the body's first write would have to upgrade
   it); the pass-object form reads the instance in the transaction, as the body's own ``get()``
   would.  An error of these reads is the library's, not the object's: it is kept in
   :data:`own_error` and the failure hook does not count it.
2. **May it run?**  The body runs on an active object, or as the cool-down probe of a
   deactivated one; otherwise it is skipped and the run returns ``None``.
3. **The body**, in ``transaction.atomic()`` on the model's write database (``deactivate_atomic``).
   A rollback that fails under the body's exception (the database went away) is logged; the
   body's own exception is raised, unchanged.
4. **After a success**, outside the body's transaction: the run is counted for the outage guard;
   a positive failure count is reset, or the object whose probe this was is re-activated.  An
   error here is logged, never raised over the result.

A failure's traceback carries each frame's code positions (billiard's ``ExceptionInfo``), pickled
from the pool child to the worker on every failure: the library's frames under the body are
three (``__call__``, :func:`run`, :func:`_body`).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from contextvars import ContextVar
from typing import Any

from celery.app import pop_current_task, push_current_task
from celery.exceptions import Ignore, Reject, Retry
from django.db import DatabaseError, connections, router, transaction

from . import _errors, _guard, _history, _metrics, _reads, services
from ._options import AnyTask, Options
from .target import State, Target

logger = logging.getLogger("celery_deactivate")

#: Set while ``Task.apply()`` runs with exceptions propagating: Celery then calls no failure hook,
#: so the run records the failure itself (:func:`untraced`).
eager_propagates: ContextVar[bool] = ContextVar("celery_deactivate_eager_propagates", default=False)

#: The exception the library's own read before the body raised in this run: not a failure of
#: the object, so the failure hook does not count it.  The hook takes it (:func:`take_own_error`),
#: so that it and its frames do not outlive the run.
own_error: ContextVar[BaseException | None] = ContextVar(
    "celery_deactivate_own_error", default=None
)

#: Exceptions that are Celery's control flow, never failures.
CONTROL_FLOW = (Retry, Ignore, Reject)


def untraced(task: AnyTask, options: Options, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """A call Celery does not trace (a direct call, ``apply()`` propagating exceptions): no
    failure hook will run, so the failure is recorded here."""
    task_id = task.request.id
    try:
        if task.request.called_directly:
            return _direct(task, options, args, kwargs)
        return run(task, options, args, kwargs)
    except CONTROL_FLOW:
        raise
    except Exception as exc:
        task.record_failure(exc, args[0], task_id)
        raise


def _direct(task: AnyTask, options: Options, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """A direct call: what Celery's own ``Task.__call__`` does around the body (the task on
    Celery's stack, so ``celery.current_task`` is this task; a request with the arguments),
    around :func:`run`.  ``Task.__call__`` itself cannot be used: it calls ``run`` with the
    arguments it is given, and the read before the body and its transaction come first.
    Celery exports the two functions of its stack from ``celery.app`` (its ``__all__``)."""
    push_current_task(task)
    task.push_request(args=args, kwargs=kwargs)
    try:
        return run(task, options, args, kwargs)
    finally:
        task.pop_request()
        pop_current_task()


def run(task: AnyTask, options: Options, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Read the object's state, run the body on an active object, reset a positive count."""
    target, pk = options.target, args[0]
    using = router.db_for_write(target.model)
    state = None
    if not options.pass_object:  # the drop-in form reads before the transaction
        state = target.state_of(_read(task, options, pk, using))
        if not _may_run(task, options, pk, state):
            return None
    result, state, reset = _body(task, options, args, kwargs, using, state)
    if state is not None:  # the body ran and returned
        _after_success(task, target, pk, using, state, reset=not reset)
    return result


def _body(
    task: AnyTask,
    options: Options,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    using: str,
    state: State | None,
) -> tuple[Any, State | None, bool]:
    """The body's result, the state it ran on (``None``: it did not run) and whether its
    transaction reset the failure count; the pass-object form reads the instance in it first."""
    failure: BaseException | None = None
    try:
        with transaction.atomic(using=using) if options.atomic else nullcontext():
            try:
                if not options.pass_object:
                    result = task.run(*args, **kwargs)
                else:
                    instance, state = _read_instance(task, options, args[0], using)
                    if state is None:
                        return None, None, False
                    result = task.run(instance, *args[1:], **kwargs)
            except BaseException as exc:
                failure = exc
                raise
            reset = options.atomic and _reset_count(task, options.target, args[0], using, state)
            return result, state, reset
    except DatabaseError as exc:
        if failure is None or exc is failure:
            raise
        _log_failed_rollback(task, options.target, args[0], exc)
    raise failure  # the task's own exception, unchanged (set: only it gets here)


def _read_instance(
    task: AnyTask, options: Options, pk: Any, using: str
) -> tuple[Any, State | None]:
    """The pass-object form's instance and its state (``None``: the body must not run), read in
    the body's transaction as the body's own ``get()`` would."""
    instance = _read(task, options, pk, using)
    target = options.target
    state = target.state_of([getattr(instance, n) for n in target.state_fields()])
    return instance, state if _may_run(task, options, pk, state) else None


def _read(task: AnyTask, options: Options, pk: Any, using: str) -> Any:
    """The drop-in form's state, or the pass-object form's instance; an error is kept as the
    library's own (:data:`own_error`)."""
    try:
        if not options.pass_object:
            return _reads.read_state(options.target, pk, using)
        if _reads_base_manager(task):
            return _reads.read_instance(options.target.model, pk, using)
        return task.get_queryset(using).get(pk=pk)
    except Exception as exc:
        own_error.set(exc)
        if isinstance(exc, DatabaseError):
            _close_if_unusable(using)
        raise


def _reads_base_manager(task: AnyTask) -> bool:
    """Whether the task's instance comes from the default ``get_queryset()``, the base manager,
    which :func:`~celery_deactivate._reads.read_instance` reads compiled once; an override is
    read as it is written, through the ORM each time."""
    return bool(type(task).get_queryset.__module__ == f"{__package__}.task")


def _may_run(task: AnyTask, options: Options, pk: Any, state: State) -> bool:
    """Run the body on an active object, or as the cool-down probe of a deactivated one."""
    if state.active:
        return True
    identity = options.target.identity(pk)
    if state.probing and options.probes is not None:
        logger.info("celery_deactivate: %s probes %s (deactivated)", task.name, identity)
        return True
    logger.info("%s: %s is inactive, the body did not run", task.name, identity)
    return False


def _log_failed_rollback(task: AnyTask, target: Target, pk: Any, exc: DatabaseError) -> None:
    """The connection died under the body (the database went away): the rollback failed and
    Django's reconnect at the end of the block raised over the body's exception."""
    logger.warning(
        "celery_deactivate: %s on %s: the database failed at the rollback (%s)",
        task.name,
        target.identity(pk),
        _errors.describe(exc),
    )


def _reset_count(task: AnyTask, target: Target, pk: Any, using: str, state: State | None) -> bool:
    """A success of an active object with failures counted resets the count, in the body's
    transaction: a failure of the same object that runs meanwhile counts after the reset, never
    before it (the reset's ``UPDATE`` holds the row until the body commits).  In a savepoint: an
    error is logged and leaves the body's work to commit.  Not when the body broke its
    transaction (nothing may run in it: the reset follows its rollback).  Whether it was done
    here."""
    if state is None or not state.active or not state.failures:
        return True  # nothing to reset
    if transaction.get_rollback(using=using):
        return False
    try:
        with transaction.atomic(using=using):
            services.reset_failures(target, pk, using=using)
    except Exception as exc:
        logger.error(
            "celery_deactivate: %s succeeded on %s but its failure count could not be reset (%s)",
            task.name,
            target.identity(pk),
            _errors.describe(exc),
            exc_info=exc,
        )
    return True


def _after_success(
    task: AnyTask,
    target: Target,
    pk: Any,
    using: str,
    state: State,
    *,
    reset: bool,
) -> None:
    """After a success, outside the body's transaction: count the run for the guard, reset a
    positive failure count unless the body's transaction did (:func:`_reset_count`), or
    re-activate the object whose probe this was.  A body that broke
    its transaction and returned still succeeds; an error here is logged, never raised over the
    result."""
    if _marked_for_rollback(using):  # in someone else's transaction, which the body broke
        logger.info(
            "celery_deactivate: %s on %s succeeded in a transaction marked for rollback; "
            "its state was not changed",
            task.name,
            target.identity(pk),
        )
        return
    if state.active:
        _guard.ran(task)  # the outage guard: one finished run, counted in memory
        if not (state.failures and reset):
            return
    try:
        if state.active:
            services.reset_failures(target, pk, using=using)
        else:
            probe = _history.By.run("probe", task, task.request.id)
            if services.end_probe(target, pk, using=using, by=probe) is not None:
                logger.warning(
                    "celery_deactivate: %s re-activated: its probe %s succeeded",
                    target.identity(pk),
                    task.name,
                )
                _metrics.probe_succeeded(task.name, target.label)
    except Exception as exc:
        logger.error(
            "celery_deactivate: %s succeeded on %s but its state could not be updated (%s)",
            task.name,
            target.identity(pk),
            _errors.describe(exc),
            exc_info=exc,
        )


def take_own_error() -> BaseException | None:
    """The error of the library's own read in this run, if any, forgotten as it is taken."""
    error = own_error.get()
    if error is not None:
        own_error.set(None)
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
