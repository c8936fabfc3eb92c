"""Fixtures: the project's Celery app and a real in-thread worker (classic contrib fixtures)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import Celery
from celery.contrib.testing.worker import TestWorkController, start_worker
from django.core import mail

from tests.celery_app import app as project_app


@pytest.fixture(scope="session")
def celery_app() -> Celery:
    """The test project's app (configured from Django settings), finalized with its tasks."""
    project_app.loader.import_default_modules()
    project_app.finalize()
    return project_app


@pytest.fixture(scope="session")
def worker(
    celery_app: Celery, django_db_setup: Any, django_db_blocker: Any
) -> Iterator[TestWorkController]:
    """A real worker consuming the broker in a thread of this process (threads pool)."""
    with django_db_blocker.unblock(), start_worker(
        celery_app,
        pool="threads",
        concurrency=2,
        perform_ping_check=False,
        shutdown_timeout=30.0,
        loglevel="WARNING",
    ) as controller:
        yield controller


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
    """Set app settings for one test: ``conf(deactivate_after=2)``."""
    saved: dict[str, Any] = {}

    def set_conf(**values: Any) -> None:
        for key, value in values.items():
            saved.setdefault(key, celery_app.conf.get(key))
            celery_app.conf[key] = value

    yield set_conf
    for key, value in saved.items():
        celery_app.conf[key] = value


@pytest.fixture(autouse=True)
def _empty_outbox() -> None:
    mail.outbox = []


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
