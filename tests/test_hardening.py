"""Odd bodies, odd exceptions, odd models (issue #11), on the real in-thread worker."""

from __future__ import annotations

import email
import email.policy
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from celery import states
from celery.result import AsyncResult
from django.core import mail
from django.db import connection
from django.db.models.signals import post_save

from celery_deactivate import notify, services
from celery_deactivate.models import TaskFailure
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


# -- #17.5, 6, 8: odd names and odd error texts still reach the admins, short -------------------


@pytest.mark.parametrize("title", ["Breaking\nnews", "Breaking\r\nnews", "Breaking\u2028news"])
def test_a_name_with_a_line_break_is_mailed_on_a_one_line_subject(title: str) -> None:
    feed = Feed.objects.create(title=title, behaviour="fail")

    finished(tasks.poll.delay(feed.pk))

    # Then the mail went out (a header with a line break raises BadHeaderError), on one line
    sent = wait_for(lambda: mail.outbox)
    assert "Breaking news deactivated" in sent[0].subject
    assert sent[0].subject.splitlines() == [sent[0].subject]


def test_a_lone_surrogate_in_the_error_is_stored_and_mailed_replaced() -> None:
    # Given a body that fails on a file whose name is not UTF-8 (os.fsdecode: a lone surrogate)
    feed = Feed.objects.create(title="undecodable", behaviour="surrogate")

    result = finished(tasks.poll.delay(feed.pk))

    assert result.state == states.FAILURE
    assert tasks.UNDECODABLE_NAME in str(result.result)  # Celery got the exception as it was
    # Then the mail went out (the raw text raised UnicodeEncodeError), the surrogate replaced
    sent = wait_for(lambda: mail.outbox)
    assert "Boom: cannot parse caf\ufffd.xml" in sent[0].body
    wire = sent[0].message().as_bytes()  # encodes (Django 6.1 sends it quoted-printable)
    assert (
        "caf\ufffd.xml" in email.message_from_bytes(wire, policy=email.policy.default).get_content()
    )
    # And the object holds the same text
    feed.refresh_from_db()
    assert (feed.active, feed.error_message) == (False, "Boom: cannot parse caf\ufffd.xml")


def test_megabytes_of_error_text_are_recorded_cut_and_mailed_short(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Celery's own ERROR line of the failure holds the whole text: kept out of the test's output
    # (the worker thread's log handler can write past pytest's capture: 10 MB of CI log)
    caplog.set_level(logging.CRITICAL, logger="celery.app.trace")
    # Given a body whose exception carries 5 MB of text, on 350,000 lines
    feed = Feed.objects.create(title="verbose", behaviour="huge")

    result = finished(tasks.poll.delay(feed.pk), timeout=60)

    assert len(str(result.result)) > 5_000_000  # Celery got the exception as it was
    wait_for(lambda: not Feed.objects.get(pk=feed.pk).active)
    # Then the object and the failure table hold the head of it, at most the documented cap
    feed.refresh_from_db()
    assert feed.error_message.startswith("Boom: the upstream answered:\n<p>garbage</p>\n")
    assert len(feed.error_message) == services.ERROR_LENGTH
    assert feed.error_message.endswith("…")
    # (the failure row is written after the object's change commits: waited for, not assumed)
    rows = TaskFailure.objects.filter(task=tasks.poll.name, object_pk=str(feed.pk))
    failure = wait_for(rows.first)
    assert failure.error == feed.error_message
    # And the mail holds the head of the error: 5.1 KB in all, measured (5.3 MB before)
    sent = wait_for(lambda: mail.outbox)
    assert "Boom: the upstream answered:\n<p>garbage</p>\n" in sent[0].body
    size = len(sent[0].message().as_bytes())
    assert size < notify.NOTICE_ERROR_LENGTH + 3_000, size


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
