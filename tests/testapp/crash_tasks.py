"""Task bodies for the crash tests (``tests/crash``): each does what its feed's ``behaviour`` says.

They run in a real prefork worker started by the tests.  State that must survive the body's
rollback (how often a message ran, that a body started) lives in files under ``CRASH_STATE_DIR``,
keyed by the task id, which stays the same across redeliveries and retries.

In a crash-test worker (``CRASH_SIGNAL_LOG=1``) every ``object_deactivated`` and
``failure_counted`` is recorded as a :class:`~tests.testapp.models.SignalLog` row, so the tests
can count them across processes; a feed titled ``raise-in-receiver...`` makes a receiver raise.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

from celery.exceptions import Ignore, Reject
from django.db.models import F

from celery_deactivate import DeactivatingTask
from celery_deactivate.signals import failure_counted, object_deactivated
from tests.celery_app import app

from .models import Feed, SignalLog
from .tasks import Boom

#: Seconds a body waits for the test's go-ahead before giving up.
GO_TIMEOUT = 60.0


def state_dir() -> Path:
    path = Path(os.environ.get("CRASH_STATE_DIR") or tempfile.gettempdir())
    path.mkdir(parents=True, exist_ok=True)
    return path


def count_run(task_id: str) -> int:
    """Record one run of the message ``task_id``; return how many runs it had, this one included."""
    path = state_dir() / f"runs-{task_id}"
    with path.open("a") as file:
        file.write(f"{os.getpid()}\n")
    return len(path.read_text().splitlines())


def runs(task_id: str) -> int:
    path = state_dir() / f"runs-{task_id}"
    return len(path.read_text().splitlines()) if path.exists() else 0


def started(task_id: str) -> bool:
    return (state_dir() / f"started-{task_id}").exists()


def go(task_id: str) -> None:
    """Let the body of ``task_id`` that waits in ``wait_for_go`` carry on."""
    (state_dir() / f"go-{task_id}").touch()


def wait_for_go(task_id: str) -> None:
    (state_dir() / f"started-{task_id}").touch()
    deadline = time.monotonic() + GO_TIMEOUT
    while not (state_dir() / f"go-{task_id}").exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no go-ahead for {task_id} within {GO_TIMEOUT}s")
        time.sleep(0.02)


def kill_me() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(10)  # the signal is delivered at once; never reached


def act(task: DeactivatingTask, pk: int) -> Any:
    """Run one body: ``behaviour`` says what it does."""
    task_id = task.request.id
    count_run(task_id)
    feed = Feed.objects.get(pk=pk)
    behaviour = feed.behaviour
    if not behaviour.startswith("wait_"):  # (a waiting body must not lock the row)
        Feed.objects.filter(pk=pk).update(polls=F("polls") + 1)  # rolled back on failure
    if behaviour == "ok":
        return pk
    if behaviour == "fail":
        raise Boom(f"{feed.title} is broken")
    if behaviour == "kill":
        kill_me()
    if behaviour == "sleep":  # outruns any time limit; revoked or shut down in tests
        started_path = state_dir() / f"started-{task_id}"
        started_path.touch()
        time.sleep(30)
        return pk
    if behaviour == "sleep_short":  # long enough to shut a worker down in the middle
        (state_dir() / f"started-{task_id}").touch()
        time.sleep(2)
        return pk
    if behaviour == "hold_lock":  # the row stays locked until the child dies
        Feed.objects.select_for_update().filter(pk=pk).update(title=f"locked {feed.title}"[:100])
        (state_dir() / f"started-{task_id}").touch()
        time.sleep(30)
        return pk
    if behaviour == "ignore":
        raise Ignore("ignored on purpose")
    if behaviour == "reject_once":
        if runs(task_id) == 1:
            raise Reject("requeue me once", requeue=True)
        return pk
    if behaviour == "wait_fail":
        wait_for_go(task_id)
        raise Boom(f"{feed.title} is broken")
    if behaviour == "wait_kill":
        wait_for_go(task_id)
        kill_me()
    raise ValueError(f"unknown behaviour {behaviour!r}")


@app.task(base=DeactivatingTask, model=Feed, bind=True)
def crash(self: DeactivatingTask, pk: int) -> Any:
    return act(self, pk)


@app.task(base=DeactivatingTask, model=Feed, bind=True, deactivate_pass_object=True)
def crash_object(self: DeactivatingTask, feed: Feed) -> Any:
    return act(self, feed.pk)


@app.task(base=DeactivatingTask, model=Feed, bind=True, deactivate_after=2)
def crash_after2(self: DeactivatingTask, pk: int) -> Any:
    return act(self, pk)


@app.task(base=DeactivatingTask, model=Feed, bind=True, time_limit=1.5)
def timed(self: DeactivatingTask, pk: int) -> Any:
    return act(self, pk)


@app.task(base=DeactivatingTask, model=Feed, bind=True, time_limit=1.5, deactivate_after=2)
def timed_after2(self: DeactivatingTask, pk: int) -> Any:
    return act(self, pk)


@app.task(base=DeactivatingTask, model=Feed, bind=True, soft_time_limit=0.5, time_limit=20)
def crash_soft(self: DeactivatingTask, pk: int) -> Any:
    return act(self, pk)


@app.task(base=DeactivatingTask, model=Feed, bind=True, acks_late=True)
def crash_requeue(self: DeactivatingTask, pk: int) -> Any:
    """``acks_late``: ``Reject(requeue=True)`` really requeues."""
    return act(self, pk)


@app.task(
    base=DeactivatingTask,
    model=Feed,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    deactivate_after=2,
)
def crash_loop(self: DeactivatingTask, pk: int) -> Any:
    """A message requeued whenever its body kills the worker child."""
    return act(self, pk)


@app.task(
    base=DeactivatingTask,
    model=Feed,
    bind=True,
    retry_on_worker_lost=True,  # Celery >= 5.7; an unknown attribute (ignored) before
    max_retries=2,
    default_retry_delay=0,
)
def crash_retry(self: DeactivatingTask, pk: int) -> Any:
    return act(self, pk)


@app.task(
    base=DeactivatingTask,
    model=Feed,
    deactivate_after=3,
    deactivate_outage_objects=0,
    deactivate_notify_window=0,
)
def mixed(pk: int, first_failure: int) -> Any:
    """Succeed until the feed has ``first_failure`` successful polls, then fail for good.

    The row lock serializes the runs of one feed, so the outcome of every run is a function of
    the runs before it: the tests compare with a sequential model of one object (no outage
    guard, which looks at the whole task; one notice per deactivation).
    """
    feed = Feed.objects.select_for_update().get(pk=pk)
    if feed.polls >= first_failure:
        raise Boom(f"{feed.title} is broken")
    Feed.objects.filter(pk=pk).update(polls=feed.polls + 1)
    return pk


@app.task(base=DeactivatingTask, model=Feed, bind=True, deactivate_crash_timeout=1)
def crash_bounded(self: DeactivatingTask, pk: int) -> Any:
    """The main process may wait at most 1 s for the row when it records a crash."""
    return act(self, pk)


# -- signals across processes ---------------------------------------------------------------


def _log_signal(name: str, instance: Any, **kwargs: Any) -> None:
    exception = kwargs.get("exception")
    SignalLog.objects.create(
        signal=name,
        feed_id=str(instance.pk),
        task_id=kwargs.get("task_id") or "",
        failure_count=kwargs.get("failure_count"),
        exception=f"{type(exception).__qualname__}: {exception}" if exception else "",
        process=multiprocessing.current_process().name[:40],
    )
    if instance.title.startswith("raise-in-receiver"):
        raise RuntimeError(f"receiver fails for {instance.title}")


def log_deactivated(sender: Any, instance: Any, **kwargs: Any) -> None:
    _log_signal("object_deactivated", instance, **kwargs)


def log_counted(sender: Any, instance: Any, **kwargs: Any) -> None:
    _log_signal("failure_counted", instance, **kwargs)


if os.environ.get("CRASH_SIGNAL_LOG"):
    object_deactivated.connect(log_deactivated, dispatch_uid="crash-log-deactivated")
    failure_counted.connect(log_counted, dispatch_uid="crash-log-counted")
