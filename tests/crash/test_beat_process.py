"""django-celery-beat (issue #13): a real ``celery beat`` process with the ``DatabaseScheduler``
stops sending an object's periodic task when the object is deactivated, and sends it again once
the object is re-activated."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from tests.conftest import wait_for
from tests.testapp.models import Feed

from .worker import Meeting, Worker

beat_models = pytest.importorskip("django_celery_beat.models", reason="the [beat] extra")

pytestmark = [pytest.mark.crash, pytest.mark.django_db(transaction=True)]

SENT = "Sending due task every second for the feed"


def test_a_beat_process_follows_the_object_s_state(meeting: Meeting) -> None:
    # Given a feed polled every second by beat (DatabaseScheduler), through a prefork worker
    feed = Feed.objects.create(title="scheduled")
    worker = Worker(meeting, "beat-target", queue="beat")
    every, _ = beat_models.IntervalSchedule.objects.get_or_create(
        every=1, period=beat_models.IntervalSchedule.SECONDS
    )
    beat_models.PeriodicTask.objects.create(
        name="every second for the feed",
        task="tests.testapp.tasks.poll",
        args=json.dumps([feed.pk]),
        interval=every,
        queue=worker.queue,
    )
    log_path = meeting.folder / "logs" / "beat.log"
    with worker, log_path.open("wb") as log:
        beat = meeting.celery(
            "beat",
            "-S",
            "django_celery_beat.schedulers:DatabaseScheduler",
            "--max-interval=1",
            "--loglevel=INFO",
            f"--pidfile={meeting.folder / 'beat.pid'}",
            log=log,
        )
        try:

            def sent() -> int:
                return log_path.read_text(errors="replace").count(SENT)

            wait_for(lambda: Feed.objects.get(pk=feed.pk).polls >= 2, timeout=30)

            # When the feed is deactivated (by hand here; a failure goes the same way)
            feed.refresh_from_db()
            assert feed.deactivate() is True
            assert not beat_models.PeriodicTask.objects.get(name__startswith="every").enabled
            # Then beat notices the change and stops sending it: nothing is sent for 3 s after
            # the last send it had scheduled before noticing
            wait_for(lambda: "Schedule changed" in log_path.read_text(errors="replace"))
            settled = sent()
            time.sleep(3)  # an observation window: proving an absence needs one
            assert sent() - settled <= 1  # at most one send already due when it noticed

            # When it is re-activated, beat sends it again and the feed is polled again
            feed.reactivate()
            polls = Feed.objects.get(pk=feed.pk).polls
            wait_for(lambda: sent() > settled + 1, timeout=30)
            wait_for(lambda: Feed.objects.get(pk=feed.pk).polls > polls, timeout=30)
        finally:
            beat.terminate()
            try:
                beat.wait(10)
            except subprocess.TimeoutExpired:
                beat.kill()
