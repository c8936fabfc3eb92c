"""The worker-side request of a deactivating task: records failures that kill the pool child.

A hard time limit or a killed pool child (SIGKILL, the OOM killer: ``WorkerLostError``) leaves no
code running in the child, so ``Task.on_failure`` never runs there.  Celery reports these in the
worker's main process through ``Request.on_failure`` (with ``return_ok=False``: the child could
not report), and that is where they are counted, exactly once:

* ``Task.on_failure`` calls that Celery 5.7 makes from ``Request.on_timeout`` are skipped;
* ``task_failure`` (sent once or twice, depending on the version) is not used for counting;
* a requeued message (``acks_late`` + ``reject_on_worker_lost``) is counted too, so a message
  that keeps killing its worker stops coming back once the object is deactivated;
* revocations, cold shutdowns, ``retry_on_worker_lost`` with retries left and crashes after a
  stored success are not failures of the object.

The database work runs in a short-lived thread with bounded lock waits, so the consumer is not
blocked (on SQLite, while the pool forks, see below), and the dying child (killed right after
this hook returns) releases its row locks first.
A fork of this process (the pool starting a child in place of the one that died) waits while such
a thread sets up (at most its ``deactivate_crash_timeout``): it opens its connections and loads
what its statements need, which the process's first recording does in modules never loaded in
the main process before (mysqlclient connects through a module it imports on first use).  A
child forked while that thread held a module's import lock would inherit the lock held by a
thread it does not have, and hang at its first task.  Once set up, the thread holds no lock of
the process while it waits on the database, and a fork does not wait for it, except on SQLite:
there the database is a library of this process, whose own locks a statement holds, and a fork
waits for the whole recording (the worker's main process with it, at most the same bound).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from billiard.einfo import ExceptionWithTraceback  # type: ignore[attr-defined]
from billiard.exceptions import Terminated, TimeLimitExceeded, WorkerLostError
from celery.worker import state as worker_state
from celery.worker.request import Request
from django.db import connections, router
from django.db.utils import load_backend

from . import _errors, _store, _transaction
from ._options import Options
from .task import in_main_process_hook

__all__ = ["DeactivatingRequest"]

logger = logging.getLogger("celery_deactivate")

CRASHES = (WorkerLostError, TimeLimitExceeded)


class DeactivatingRequest(Request):
    """``Request`` of :class:`~celery_deactivate.DeactivatingTask` (its ``Request`` attribute).

    A task class that sets its own ``Request`` must subclass this one.
    """

    def on_timeout(self, soft: bool, timeout: float) -> None:
        token = in_main_process_hook.set(True)
        try:
            super().on_timeout(soft, timeout)
        finally:
            in_main_process_hook.reset(token)

    def on_failure(
        self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
    ) -> None:
        crash = self._crash(exc_info, return_ok)
        recorded = False
        if crash is not None and self._requeues(crash):
            # Count it before Celery puts the message back: else its next delivery can run the
            # body again before the count lands.  The child is gone and holds no lock: this is
            # quick, and bounded by deactivate_crash_timeout.
            recorded = True
            thread, timeout = self._record_crash(crash)
            if thread is not None:
                thread.join(timeout + 1.0)
        try:
            super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)
        finally:
            if crash is not None and not recorded:
                self._record_crash(crash)

    def _crash(self, exc_info: Any, return_ok: bool) -> BaseException | None:
        """The exception to count if this failure killed the child, else ``None``."""
        if return_ok:  # the child reported it: Task.on_failure ran there
            return None
        exc = exc_info.exception
        if isinstance(exc, ExceptionWithTraceback):
            exc = exc.exc
        if isinstance(exc, Terminated) or self._stopped_on_purpose():
            self._not_counted(exc, "revoked, terminated or shut down on purpose")
            return None
        if isinstance(exc, SystemExit | KeyboardInterrupt):  # billiard >= 4.3: exit of the child
            exc = WorkerLostError(f"Worker exited prematurely: {exc!r}.")
        if not isinstance(exc, CRASHES):
            return None
        if isinstance(exc, WorkerLostError):
            if self._retried_on_worker_lost():
                self._not_counted(exc, "retried (retry_on_worker_lost)")
                return None
            if self._succeeded_before():
                self._not_counted(exc, "lost after it stored its success")
                return None
        return exc

    def _not_counted(self, exc: BaseException, reason: str) -> None:
        model = getattr(self.task, "model", None)
        logger.info(
            "celery_deactivate: %s[%s] %s, not a failure of %s pk=%r (%s: %s)",
            self.task.name,
            self.id,
            reason,
            getattr(getattr(model, "_meta", None), "label", model),
            self.args[0] if self.args else None,
            type(exc).__qualname__,
            exc,
        )

    def _requeues(self, crash: BaseException) -> bool:
        """Whether Celery will requeue the message (``acks_late`` + ``reject_on_worker_lost``)."""
        task = self.task
        return bool(
            isinstance(crash, WorkerLostError) and task.acks_late and task.reject_on_worker_lost
        )

    def _stopped_on_purpose(self) -> bool:
        """Revoked or terminated by an operator, or a cold shutdown of the worker."""
        return bool(
            getattr(self, "_already_revoked", False)
            or getattr(self, "_already_cancelled", False)
            or self.id in worker_state.revoked
            or worker_state.should_terminate
        )

    def _retried_on_worker_lost(self) -> bool:
        """Celery >= 5.7 retries instead of failing while retries are left."""
        task = self.task
        if not getattr(task, "retry_on_worker_lost", False):
            return False
        retries: int = self._context.retries  # type: ignore[attr-defined]
        return task.max_retries is None or retries < task.max_retries

    def _succeeded_before(self) -> bool:
        """The child stored SUCCESS and died afterwards (Celery >= 5.7 checks the backend)."""
        check = getattr(self, "_success_was_stored", None)
        return bool(check and check())

    def _record_crash(self, exc: BaseException) -> tuple[threading.Thread | None, float]:
        """Record the crash in a new thread; return it and the time it may take."""
        if not self.args:
            return None, 0.0
        return record_in_thread(self.task, exc, self.args[0], self.id)


def record_in_thread(
    task: Any, exc: BaseException, pk: Any, task_id: str
) -> tuple[threading.Thread | None, float]:
    """Start recording a crash of ``task`` on ``pk`` in a new thread; return it and the time it
    may take (``deactivate_crash_timeout``).  A thread that cannot start (the process's limit,
    its memory) is logged at ERROR, and ``(None, 0.0)`` returned: Celery's own failure handling
    goes on."""
    try:
        timeout = Options(task).crash_timeout
    except Exception:
        logger.exception("celery_deactivate: bad deactivate_crash_timeout for %s", task.name)
        timeout = 10.0
    thread = threading.Thread(
        target=_record_in_thread,
        args=(task, exc, pk, task_id, timeout),
        name=f"celery-deactivate-{task_id}",
    )
    _setting_up.started(thread, timeout)
    try:
        thread.start()
    except RuntimeError as error:  # "can't start new thread": no fork waits for it
        _setting_up.done(thread)
        logger.error(
            "celery_deactivate: the crash of %s[%s] on pk=%r was not recorded: %s",
            task.name,
            task_id,
            pk,
            _errors.describe(error),
        )
        return None, 0.0
    return thread, timeout


class _SettingUp:
    """The crash recordings setting up in this process's threads, which a fork waits for."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        #: Thread -> the monotonic time by which its recording has given up.
        self.threads: dict[threading.Thread, float] = {}

    def started(self, thread: threading.Thread, timeout: float) -> None:
        with self.changed:
            self.threads[thread] = time.monotonic() + timeout + 1.0

    def done(self, thread: threading.Thread) -> None:
        with self.changed:
            self.threads.pop(thread, None)
            self.changed.notify_all()

    def wait(self) -> None:
        """Return once no recording sets up, or once the last one's time is up."""
        with self.changed:
            while self.threads:
                left = max(self.threads.values()) - time.monotonic()
                if left <= 0:
                    logger.warning(
                        "celery_deactivate: forking while %d crash recording(s) still set up "
                        "(on SQLite: still run)",
                        len(self.threads),
                    )
                    return
                self.changed.wait(left)

    def forked(self) -> None:
        """In a forked child: none of the parent's threads is here, nor a lock they held."""
        self.__init__()  # type: ignore[misc]


_setting_up = _SettingUp()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_setting_up.wait, after_in_child=_setting_up.forked)


def _record_in_thread(task: Any, exc: BaseException, pk: Any, task_id: str, timeout: float) -> None:
    this = threading.current_thread()
    whole = _in_sqlite(task)  # then a fork waits for the whole recording, not its set-up only
    try:
        try:
            _set_up(task, timeout)
        finally:
            if not whole:
                _setting_up.done(this)
        task.record_failure(exc, pk, task_id, timeout=timeout)
    finally:
        try:
            connections.close_all()  # this thread's connections: it ends here
        finally:
            _setting_up.done(this)


def _aliases(task: Any) -> set[str]:
    """The databases a recording writes: the object's, the library's tables'."""
    return {router.db_for_write(task.target.model), _store.db()}


def _in_sqlite(task: Any) -> bool:
    """Whether the recording writes an SQLite database (as if it did when that cannot be told).

    SQLite runs in this process, and holds process-wide mutexes of its own (those of its file
    locks, by file) during each statement and as a connection opens or closes; a child forked
    meanwhile inherits one held by a thread it does not have, and hangs at its first
    connection.  A fork waits for such a recording until it ends, at most its
    ``deactivate_crash_timeout`` (and the worker's main process with it)."""
    try:
        return any(connections[alias].vendor == "sqlite" for alias in _aliases(task))
    except Exception:  # the recording meets the same error, and logs it
        return True


def _set_up(task: Any, timeout: float) -> None:
    """Open this thread's connections to the databases the recording writes, bound their lock
    waits on SQLite (:func:`~celery_deactivate._transaction.bound_connection`), and load the
    module of their statements' compilers."""
    _connect_outside_pools()
    try:
        for alias in _aliases(task):
            connection = connections[alias]
            connection.ensure_connection()
            _transaction.bound_connection(alias, timeout)
            connection.ops.compiler("SQLUpdateCompiler")
    except Exception:  # the recording meets the same error, and logs it
        return


def _connect_outside_pools() -> None:
    """Give this thread, for each database on Django's connection pool (``"OPTIONS": {"pool":
    True}``, Django 5.1+), a connection outside the pool, closed when the recording ends.

    The pool forks a child in place of the one that died while its crash is being recorded.  A
    pooled connection is not closed when given back: it would stay open in the main process and
    cross the next fork, where Celery's Django fixup closes the inherited pool (Celery 5.5+),
    ending the main process's session on the server, and older Celery lets both processes use it.
    A connection of this thread's own is never in the pool, never used by a child, and closed by
    the thread (docs/private-apis.md: ``connections[alias] = wrapper``)."""
    for alias in connections:
        settings = connections.settings[alias]
        options = settings.get("OPTIONS") or {}
        if options.get("pool"):
            alone = {**settings, "OPTIONS": {k: v for k, v in options.items() if k != "pool"}}
            connections[alias] = load_backend(settings["ENGINE"]).DatabaseWrapper(alone, alias)
