"""Fixtures: the project's Celery app and a real in-thread worker (classic contrib fixtures)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from celery import Celery, states
from celery.contrib.testing.worker import TestWorkController
from celery.signals import task_postrun
from celery.utils import uuid
from django.core import mail
from django.db import connection
from django.test.utils import CaptureQueriesContext

from celery_deactivate import _store
from tests.celery_app import app as project_app


@pytest.fixture(scope="session")
def celery_session_app() -> Celery:
    """The test project's app (configured from Django settings), finalized with its tasks.

    It replaces the test app of ``celery.contrib.pytest``'s classic ``celery_session_worker``
    (pytest-celery 1.x's own ``celery_worker`` needs Docker: ``-p no:celery`` in setup.cfg).
    """
    project_app.loader.import_default_modules()
    project_app.finalize()
    return project_app


@pytest.fixture(scope="session")
def celery_app(celery_session_app: Celery) -> Celery:
    return celery_session_app


@pytest.fixture(scope="session")
def celery_worker_pool() -> str:
    return "threads"


@pytest.fixture(scope="session")
def celery_worker_parameters() -> dict[str, Any]:
    return {
        "concurrency": 2,
        "perform_ping_check": False,
        "shutdown_timeout": 30.0,
        "loglevel": "WARNING",
    }


@pytest.fixture(scope="session")
def _db_for_the_worker(django_db_setup: Any, django_db_blocker: Any) -> Iterator[None]:
    with django_db_blocker.unblock():
        yield


@pytest.fixture
def worker(
    _db_for_the_worker: None, celery_session_worker: TestWorkController
) -> TestWorkController:
    """A real worker consuming the broker in threads of this process (started once)."""
    return celery_session_worker


@pytest.fixture
def eager(celery_app: Celery) -> Iterator[Celery]:
    """Run tasks eagerly (``task_always_eager``), exceptions stored in the result."""
    old = celery_app.conf.task_always_eager, celery_app.conf.task_eager_propagates
    celery_app.conf.task_always_eager = True
    celery_app.conf.task_eager_propagates = False
    yield celery_app
    celery_app.conf.task_always_eager, celery_app.conf.task_eager_propagates = old


@pytest.fixture
def conf(celery_app: Celery) -> Iterator[Callable[..., None]]:
    """Set app settings for one test: ``conf(deactivate_after=2)``.  Afterwards a key that was not
    set on the app is unset again (a ``None`` left behind would hide the Django setting)."""
    saved: dict[str, Any] = {}

    def set_conf(**values: Any) -> None:
        for key, value in values.items():
            # What the app itself had (ConfigurationView.pop: its run-time changes alone).
            saved.setdefault(key, celery_app.conf.pop(key, _UNSET))
            celery_app.conf[key] = value

    yield set_conf
    for key, value in saved.items():
        celery_app.conf.pop(key, None)
        if value is not _UNSET:
            celery_app.conf[key] = value


_UNSET = object()


@pytest.fixture(autouse=True)
def _empty_outbox() -> None:
    mail.outbox = []


@pytest.fixture(autouse=True)
def _no_pending_runs() -> None:
    """Runs the outage guard counted in memory in this process (the in-thread worker's too) and
    did not write yet belong to earlier tests, whose tables were emptied: forget them, and restart
    the clock of their next write."""
    _store.forget()


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {predicate}")
        time.sleep(interval)


def run_to_end(task: Any, calls: Sequence[tuple[Any, ...]], timeout: float = 60.0) -> list[Any]:
    """Send ``task`` once per argument tuple; return the results once the worker is done with
    each.  Celery stores a failure's result before it calls ``on_failure`` (where the library
    records the failure), and sends ``task_postrun`` after both: waiting for the result alone
    races the recording."""
    ids = [uuid() for _ in calls]
    pending = set(ids)
    lock = threading.Lock()

    def finished(task_id: str, state: str | None = None, **kwargs: Any) -> None:
        if task_id in pending and state in states.READY_STATES:  # not a run that retries
            with lock:
                pending.discard(task_id)

    task_postrun.connect(finished, weak=False)
    try:
        results = [
            task.apply_async(args, task_id=id_) for args, id_ in zip(calls, ids, strict=True)
        ]
        wait_for(lambda: not pending, timeout=timeout)
    finally:
        task_postrun.disconnect(finished)
    for result in results:
        wait_for(result.ready)
    return results


#: Transaction control: not a statement of the task's (savepoints included).
TRANSACTION_CONTROL = ("BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE SAVEPOINT")


def statements(run: Callable[[], Any]) -> list[str]:
    """The data statements ``run`` sends on the default database, in order (transaction control
    left out).  An exception of ``run`` propagates."""
    with CaptureQueriesContext(connection) as captured:
        run()
    sql = [query["sql"].strip() for query in captured.captured_queries]
    return [s for s in sql if not s.upper().startswith(TRANSACTION_CONTROL)]


def mail_kinds(mails: list[Any]) -> list[str]:
    """What each mail is (:func:`mail_kind`): Django's messages (``mail.outbox``) or mails as text,
    subject first (``Meeting.mails()`` of the crash tests)."""
    return [
        mail_kind(mail.subject if hasattr(mail, "subject") else mail.splitlines()[0])
        for mail in mails
    ]


def quoted(name: str) -> str:
    """A table or column name as the default database quotes it in SQL (``"active"`` on
    PostgreSQL and SQLite, ```active``` on MySQL and MariaDB)."""
    return str(connection.ops.quote_name(name))


def mail_kind(subject: str) -> str:
    """What a notice mailed by ``mail_admins`` is, from its subject: ``deactivated``, ``digest``,
    ``outage_started`` or ``outage_ended``."""
    if "Outage of" in subject:
        return "outage_ended" if "over after" in subject else "outage_started"
    if "objects deactivated by" in subject:
        return "digest"
    return "deactivated"


def staff_client(username: str, *codenames: str) -> Any:
    """A logged-in staff user of the test client with the given permissions (``view_feed``)."""
    from django.contrib.auth.models import Permission, User
    from django.test import Client

    user = User.objects.create_user(username, is_staff=True)
    user.user_permissions.set(Permission.objects.filter(codename__in=codenames))
    client = Client()
    client.force_login(user)
    return client
