"""django-celery-beat (extra ``[beat]``): an object's periodic tasks follow its state, as the real
``DatabaseScheduler`` sees it."""

from __future__ import annotations

import json
from typing import Any

import pytest
from celery import Celery
from django.db import connection
from django.test.utils import CaptureQueriesContext

from tests.testapp import tasks
from tests.testapp.models import Feed

beat_models = pytest.importorskip("django_celery_beat.models", reason="the [beat] extra")
schedulers = pytest.importorskip("django_celery_beat.schedulers")

pytestmark = pytest.mark.django_db(transaction=True)


def periodic(name: str, task: str, args: list[Any], enabled: bool = True) -> Any:
    every, _ = beat_models.IntervalSchedule.objects.get_or_create(
        every=10, period=beat_models.IntervalSchedule.SECONDS
    )
    return beat_models.PeriodicTask.objects.create(
        name=name, task=task, args=json.dumps(args), interval=every, enabled=enabled
    )


def writes_to_the_change_marker(run: Any) -> int:
    """How many statements ``run`` sends that write ``PeriodicTasks`` (the scheduler's marker)."""
    table = beat_models.PeriodicTasks._meta.db_table
    with CaptureQueriesContext(connection) as captured:
        run()
    return sum(
        1
        for query in captured.captured_queries
        if table in query["sql"] and query["sql"].startswith(("UPDATE", "INSERT"))
    )


def test_an_object_s_schedules_follow_its_state(eager: Celery) -> None:
    # Given a feed scheduled by two deactivating tasks (its pk as a number and as text), another
    # feed, a row disabled by hand, and a task of another kind for the same pk
    feed = Feed.objects.create(title="mine", behaviour="fail")
    other = Feed.objects.create(title="other")
    periodic("poll mine", tasks.poll.name, [feed.pk])
    periodic("poll mine as text", tasks.poll_after3.name, [str(feed.pk), "extra"])
    periodic("poll mine, off by hand", tasks.poll.name, [feed.pk], enabled=False)
    periodic("poll other", tasks.poll.name, [other.pk])
    periodic("plain task on mine", tasks.bump_plain.name, [feed.pk])
    periodic("poll a longer pk", tasks.poll.name, [int(f"{feed.pk}0")])
    scheduler = schedulers.DatabaseScheduler(app=eager)
    everything = {
        "poll mine",
        "poll mine as text",
        "poll other",
        "plain task on mine",
        "poll a longer pk",
    }
    assert everything <= set(scheduler.schedule)

    # When a failure deactivates the feed
    changes = writes_to_the_change_marker(lambda: tasks.poll.delay(feed.pk))

    # Then the scheduler no longer has the feed's rows of deactivating tasks, told once
    assert changes == 1
    assert set(scheduler.schedule) & everything == everything - {"poll mine", "poll mine as text"}

    # When it is re-activated, exactly the rows it disabled come back
    feed.refresh_from_db()
    changes = writes_to_the_change_marker(feed.reactivate)
    assert changes == 1
    assert everything <= set(scheduler.schedule)
    off = beat_models.PeriodicTask.objects.get(name="poll mine, off by hand")
    assert off.enabled is False
    assert "poll mine, off by hand" not in scheduler.schedule


def test_nothing_to_pause_writes_nothing(eager: Celery) -> None:
    feed = Feed.objects.create(title="unscheduled", behaviour="fail")
    assert writes_to_the_change_marker(lambda: tasks.poll.delay(feed.pk)) == 0
    assert Feed.objects.get(pk=feed.pk).active is False
