"""Fixtures of the crash tests: where the processes meet, and a shared prefork worker."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.db import connection

from tests.testapp.models import Feed, SignalLog

from .worker import NEEDS_REDIS, Meeting, Worker, redis_broker_url


@pytest.fixture(scope="session")
def meeting(django_db_setup: Any) -> Iterator[Meeting]:
    """The test database, broker, result backend and folders the workers share with this run.

    The folder is this session's own (not pytest's tmp_path, which a concurrent pytest run may
    prune); it is removed at the end unless ``CRASH_KEEP`` is set.  Without Redis every crash test
    is skipped, with the reason in pytest's summary (``-rs``).
    """
    if redis_broker_url() is None:
        pytest.skip(NEEDS_REDIS)
    folder = Path(tempfile.mkdtemp(prefix="celery-deactivate-crash-"))
    place = Meeting.create(folder, str(connection.settings_dict["NAME"]))
    saved = os.environ.get("CRASH_STATE_DIR")
    os.environ["CRASH_STATE_DIR"] = place.env()["CRASH_STATE_DIR"]  # crash_tasks.runs() & co.
    try:
        yield place
    finally:
        place.close()
        if not os.environ.get("CRASH_KEEP"):
            shutil.rmtree(folder, ignore_errors=True)
        if saved is None:
            del os.environ["CRASH_STATE_DIR"]
        else:
            os.environ["CRASH_STATE_DIR"] = saved


@pytest.fixture(scope="session")
def shared_worker(meeting: Meeting) -> Iterator[Worker]:
    """One prefork worker (two children) for the tests that do not stop or reconfigure it."""
    with Worker(meeting, "shared", queue="shared", concurrency=2) as worker:
        yield worker


@pytest.fixture(autouse=True)
def _fresh_state(request: pytest.FixtureRequest, meeting: Meeting) -> None:
    """Each test sees only its own mails, state files and shared-worker log lines."""
    meeting.clear()
    if "shared_worker" in request.fixturenames:
        request.getfixturevalue("shared_worker").forget_log()


def state(feed: Feed) -> tuple[bool, bool, int]:
    """``(active, error, failure_count)`` as committed now."""
    feed.refresh_from_db()
    return feed.active, feed.error, feed.failure_count


def signals_of(feed: Feed) -> list[tuple[str, int | None]]:
    """``(signal, failure_count)`` of every signal the workers sent about ``feed``, in order."""
    return [
        (log.signal, log.failure_count)
        for log in SignalLog.objects.filter(feed_id=feed.pk).order_by("pk")
    ]


def processes_of(feed: Feed) -> list[str]:
    """The process that sent each signal about ``feed``: ``MainProcess`` or ``ForkPoolWorker-N``."""
    return list(
        SignalLog.objects.filter(feed_id=feed.pk).order_by("pk").values_list("process", flat=True)
    )
