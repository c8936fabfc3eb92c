"""Behaviour on a real worker (in-thread, classic celery.contrib fixtures), checked in the
database and in what Celery recorded (``AsyncResult``)."""

from __future__ import annotations

from typing import Any

import pytest
from celery.result import AsyncResult
from django.core import mail

from celery_deactivate.signals import object_deactivated
from tests.conftest import run_to_end
from tests.testapp import tasks
from tests.testapp.models import Entry, Feed, RecipeObject

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("worker")]


def run(task: Any, *args: Any) -> AsyncResult:
    """Send the task; return its result once the worker is done with it (``run_to_end``)."""
    result: AsyncResult = run_to_end(task, [args])[0]
    return result


def test_success_commits_and_keeps_the_object_active() -> None:
    feed = Feed.objects.create(title="good", failure_count=2)

    result = run(tasks.poll, feed.pk)

    assert result.state == "SUCCESS"
    assert result.result == feed.pk
    feed.refresh_from_db()
    assert (feed.active, feed.error, feed.failure_count, feed.polls) == (True, False, 0, 1)
    assert Entry.objects.filter(feed=feed).count() == 1
    assert mail.outbox == []


def test_final_failure_rolls_back_deactivates_notifies_and_reaches_celery() -> None:
    feed = Feed.objects.create(title="broken feed", behaviour="fail")
    received: list[dict[str, Any]] = []

    def receiver(**kwargs: Any) -> None:
        received.append(kwargs)

    object_deactivated.connect(receiver)
    try:
        result = run(tasks.poll, feed.pk)
    finally:
        object_deactivated.disconnect(receiver)

    # Celery recorded the task's own failure, as without us.
    assert result.state == "FAILURE"
    assert isinstance(result.result, tasks.Boom)
    assert str(result.result) == "broken feed is broken"
    assert "in work" in result.traceback and "raise Boom" in result.traceback
    # Every write of the body was rolled back; the object is out of scheduling.
    feed.refresh_from_db()
    assert Entry.objects.filter(feed=feed).count() == 0
    assert feed.polls == 0
    assert (feed.active, feed.error, feed.failure_count) == (False, True, 1)
    assert feed.error_message == "Boom: broken feed is broken"
    assert feed.deactivated_at is not None
    # One signal, one mail.
    assert len(received) == 1
    assert received[0]["sender"] is tasks.poll._get_current_object()
    assert received[0]["instance"].pk == feed.pk and received[0]["instance"].active is False
    assert isinstance(received[0]["exception"], tasks.Boom)
    assert received[0]["task_id"] == result.id
    assert len(mail.outbox) == 1
    assert "broken feed" in mail.outbox[0].subject
    assert "Boom: broken feed is broken" in mail.outbox[0].body


def test_recipe_shaped_model_without_mixin() -> None:
    obj = RecipeObject.objects.create(title="bad object", active=True)
    result = run(tasks.manage_object, obj.pk)
    assert result.state == "FAILURE"
    obj.refresh_from_db()
    assert (obj.active, obj.error) == (False, True)


@pytest.mark.parametrize(
    "task_name",
    # The second receives the object: its retry message is built from the request, which keeps
    # the pk (a model instance would not serialize), so the retry runs.
    ["poll_autoretry", "poll_object_autoretry"],
)
def test_retries_do_not_count_only_the_final_failure_does(task_name: str) -> None:
    feed = Feed.objects.create(title="flaky", behaviour="transient")

    result = run(getattr(tasks, task_name), feed.pk)

    assert result.state == "FAILURE"
    assert isinstance(result.result, tasks.Transient)
    feed.refresh_from_db()
    assert (feed.active, feed.failure_count) == (False, 1)
    assert len(mail.outbox) == 1


def test_retry_that_succeeds_never_counts() -> None:
    feed = Feed.objects.create(title="flaky once", behaviour="flaky_once")

    result = run(tasks.poll_retry, feed.pk)

    assert result.state == "SUCCESS"
    feed.refresh_from_db()
    assert (feed.active, feed.failure_count, feed.polls) == (True, 0, 1)
    assert mail.outbox == []


def test_self_retry_exhausted_is_one_final_failure() -> None:
    feed = Feed.objects.create(title="always flaky", behaviour="transient")

    result = run(tasks.poll_retry, feed.pk)

    assert result.state == "FAILURE"
    assert isinstance(result.result, tasks.Transient)
    feed.refresh_from_db()
    assert (feed.active, feed.failure_count, feed.polls) == (False, 1, 0)


def test_inactive_object_skips_the_body_without_failing(caplog: pytest.LogCaptureFixture) -> None:
    feed = Feed.objects.create(title="paused", behaviour="fail", active=False)

    with caplog.at_level("INFO", logger="celery_deactivate"):
        result = run(tasks.poll, feed.pk)

    assert result.state == "SUCCESS"
    assert result.result is None
    feed.refresh_from_db()
    assert (feed.polls, feed.error, feed.failure_count) == (0, False, 0)
    assert f"testapp.Feed pk={feed.pk} is inactive" in caplog.text


def test_missing_object_fails_with_does_not_exist() -> None:
    result = run(tasks.poll, 987654)
    assert result.state == "FAILURE"
    assert isinstance(result.result, Feed.DoesNotExist)
    assert mail.outbox == []


def test_deactivate_after_counts_consecutive_failures_and_success_resets() -> None:
    feed = Feed.objects.create(title="wobbly", behaviour="fail")

    for _ in range(2):
        assert run(tasks.poll_after3, feed.pk).state == "FAILURE"
    feed.refresh_from_db()
    assert (feed.active, feed.failure_count) == (True, 2)

    Feed.objects.filter(pk=feed.pk).update(behaviour="ok")
    assert run(tasks.poll_after3, feed.pk).state == "SUCCESS"
    feed.refresh_from_db()
    assert (feed.active, feed.failure_count) == (True, 0)

    Feed.objects.filter(pk=feed.pk).update(behaviour="fail")
    for _ in range(3):
        run(tasks.poll_after3, feed.pk)
    feed.refresh_from_db()
    assert (feed.active, feed.error, feed.failure_count) == (False, True, 3)
    assert len(mail.outbox) == 1


def test_body_receives_the_loaded_object() -> None:
    feed = Feed.objects.create(title="object", behaviour="ok")
    result = run(tasks.poll_object, feed.pk, "x")
    assert (result.state, result.result) == ("SUCCESS", feed.pk)
    bad = Feed.objects.create(title="bad object", behaviour="fail")
    result = run(tasks.poll_object, bad.pk)
    assert result.state == "FAILURE"
    bad.refresh_from_db()
    assert bad.active is False


def test_an_overridden_get_queryset_loads_the_object() -> None:
    feed = Feed.objects.create(title="annotated", behaviour="ok")
    Entry.objects.create(feed=feed, text="before")
    result = run(tasks.poll_annotated, feed.pk)
    assert (result.state, result.result) == ("SUCCESS", feed.pk)
    feed.refresh_from_db()
    assert (feed.note, feed.polls) == ("1 entries", 1)
