"""Odd bodies, odd exceptions, odd models (issue #11), on the real in-thread worker."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from celery import states
from celery.result import AsyncResult
from django.core import mail
from django.db import connection
from django.db.models.signals import post_save

from celery_deactivate.signals import object_deactivated
from tests.conftest import wait_for
from tests.testapp import tasks
from tests.testapp.models import Entry, Feed

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("worker")]


def finished(result: AsyncResult, timeout: float = 20.0) -> AsyncResult:
    wait_for(result.ready, timeout=timeout)
    return result


@pytest.fixture
def deactivations() -> Iterator[list[dict[str, Any]]]:
    sent: list[dict[str, Any]] = []
    object_deactivated.connect(lambda **kw: sent.append(kw), weak=False, dispatch_uid="hard")
    yield sent
    object_deactivated.disconnect(dispatch_uid="hard")


# -- 2. a body that swallows a database error and returns ----------------------------------------


@pytest.mark.parametrize("behaviour", ["swallow", "set_rollback"])
def test_a_body_that_breaks_its_transaction_and_returns_still_succeeds(behaviour: str) -> None:
    # Given an object with failures counted already (the success would reset them)
    feed = Feed.objects.create(title="careless", behaviour=behaviour, failure_count=2)

    result = finished(tasks.poll_after3.delay(feed.pk))

    # Then the body's normal return is the task's: a success, nothing counted, count reset
    assert result.state == states.SUCCESS, result.traceback
    feed.refresh_from_db()
    assert (feed.active, feed.failure_count, feed.error) == (True, 0, False)
    assert feed.polls == 0  # the broken transaction was rolled back, as Django does
    assert mail.outbox == []


# -- 3. exceptions that do not render ------------------------------------------------------------


def test_an_exception_whose_str_raises_still_deactivates(deactivations: list[Any]) -> None:
    feed = Feed.objects.create(title="odd", behaviour="unprintable")

    result = finished(tasks.poll.delay(feed.pk))

    assert result.state == states.FAILURE
    wait_for(lambda: not Feed.objects.get(pk=feed.pk).active)
    assert type(result.result).__name__ == "Unprintable"  # the body's exception reached Celery
    feed.refresh_from_db()
    assert (feed.active, feed.error) == (False, True)
    assert feed.error_message.endswith("Unprintable: <str() raised RuntimeError>")
    assert len(deactivations) == 1
    wait_for(lambda: mail.outbox)
    assert "Unprintable" in mail.outbox[0].body


def test_a_nul_byte_in_the_message_is_stored_cleaned() -> None:
    feed = Feed.objects.create(title="nul", behaviour="nul")

    result = finished(tasks.poll.delay(feed.pk))

    assert result.state == states.FAILURE
    assert "\x00" in str(result.result)  # Celery got the exception as it was
    wait_for(lambda: not Feed.objects.get(pk=feed.pk).active)
    feed.refresh_from_db()
    assert (feed.active, feed.error) == (False, True)
    assert feed.error_message == "Boom: upstream sent a NUL \ufffd byte"


# -- 10.5: the body outside the transaction ------------------------------------------------------


def test_a_body_outside_the_transaction_keeps_its_writes_and_still_deactivates() -> None:
    feed = Feed.objects.create(title="long poll", behaviour="fail")

    result = finished(tasks.poll_outside.delay(feed.pk))

    assert result.state == states.FAILURE
    wait_for(lambda: not Feed.objects.get(pk=feed.pk).active)  # on_failure runs after the store
    feed.refresh_from_db()
    assert (feed.active, feed.error, feed.polls) == (False, True, 1)  # its write stayed
    assert Entry.objects.filter(feed=feed).count() == 1


def test_a_body_outside_the_transaction_holds_no_transaction() -> None:
    seen: list[bool] = []
    feed = Feed.objects.create(title="probe")

    def body_sees(**kwargs: Any) -> None:
        seen.append(connection.in_atomic_block)

    # The body's own write sends post_save in the worker's thread: is it in a transaction there?
    post_save.connect(body_sees, sender=Entry, weak=False, dispatch_uid="probe")
    try:
        finished(tasks.poll_outside.delay(feed.pk))
        finished(tasks.poll.delay(feed.pk))
    finally:
        post_save.disconnect(dispatch_uid="probe")
    assert seen == [False, True]
