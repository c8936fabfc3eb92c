"""Side effects after commit, signals in the transaction (issue #10.4), and every statement seen by
instrumentation that hooks Django's cursor (issue #10.1)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from django.contrib.auth.models import Permission, User
from django.core import mail
from django.db import connection, transaction
from django.test import Client
from django.test.utils import CaptureQueriesContext

from celery_deactivate.signals import object_deactivated
from tests import sqlhook
from tests.conftest import quoted
from tests.testapp import tasks
from tests.testapp.models import Entry, Feed

pytestmark = pytest.mark.django_db(transaction=True)


class Rollback(Exception):
    """Ends the caller's transaction by rolling it back."""


@pytest.fixture
def receiver_writes() -> Iterator[None]:
    """A receiver of object_deactivated that writes a row, in the change's transaction."""

    def write(instance: Any, **kwargs: Any) -> None:
        Entry.objects.create(feed_id=instance.pk, text="written by the receiver")

    object_deactivated.connect(write, weak=False, dispatch_uid="writes")
    yield
    object_deactivated.disconnect(dispatch_uid="writes")


def test_a_deactivation_rolled_back_by_the_caller_notifies_nobody(receiver_writes: None) -> None:
    feed = Feed.objects.create(title="f", behaviour="fail")

    # Given a direct call inside the caller's transaction, which then rolls back
    def caller() -> None:
        with transaction.atomic():
            with pytest.raises(tasks.Boom):
                tasks.poll(feed.pk)
            assert Feed.objects.get(pk=feed.pk).active is False  # deactivated, in its transaction
            assert Entry.objects.filter(text="written by the receiver").count() == 1
            raise Rollback

    with pytest.raises(Rollback):
        caller()

    # Then nothing of it is left: no change, no receiver's row, no mail
    assert Feed.objects.get(pk=feed.pk).active is True
    assert Entry.objects.filter(text="written by the receiver").count() == 0
    assert mail.outbox == []


def test_a_deactivation_in_the_caller_s_transaction_notifies_after_its_commit(
    receiver_writes: None,
) -> None:
    feed = Feed.objects.create(title="f", behaviour="fail")

    with transaction.atomic():
        with pytest.raises(tasks.Boom):
            tasks.poll(feed.pk)
        assert mail.outbox == []  # not yet: the caller's transaction may still roll back

    assert len(mail.outbox) == 1
    assert Feed.objects.get(pk=feed.pk).active is False
    assert Entry.objects.filter(text="written by the receiver").count() == 1


def test_a_deactivation_by_a_task_notifies_at_once(eager: Celery) -> None:
    feed = Feed.objects.create(title="f", behaviour="fail")
    tasks.poll.delay(feed.pk)
    assert len(mail.outbox) == 1


# -- instrumentation sees every statement ---------------------------------------------------


@pytest.fixture
def hooked() -> Iterator[list[str]]:
    seen: list[str] = []
    uninstall = sqlhook.install(seen.append)
    yield seen
    uninstall()


def logged_and_hooked(run: Any, seen: list[str]) -> tuple[list[str], list[str]]:
    """What Django's query log recorded while ``run`` ran, and what the hook saw."""
    seen.clear()
    with CaptureQueriesContext(connection) as captured:
        run()
    return [query["sql"] for query in captured.captured_queries], list(seen)


@pytest.mark.parametrize("behaviour", ["ok", "fail"])
@pytest.mark.parametrize("task", ["poll", "poll_object", "poll_after3"])
def test_every_statement_of_a_task_goes_through_django_s_cursor(
    eager: Celery, hooked: list[str], task: str, behaviour: str
) -> None:
    feed = Feed.objects.create(title="f", behaviour=behaviour, failure_count=1)

    logged, seen = logged_and_hooked(lambda: getattr(tasks, task).delay(feed.pk), hooked)

    # Django's query log records every statement run through its cursor (with the parameters
    # interpolated); the hook saw each of them, in the same order, and nothing else.  Transaction
    # control is left out of both: Django's SQLite backend sends BEGIN through its cursor, the
    # PostgreSQL one through the driver, and the log also records COMMIT and ROLLBACK.
    control = ("BEGIN", "COMMIT", "ROLLBACK")
    data = [sql for sql in logged if not sql.upper().startswith(control)]
    seen = [sql for sql in seen if not sql.upper().startswith(control)]
    assert len(data) >= 2
    assert [sql.split()[0] for sql in seen] == [sql.split()[0] for sql in data]


def test_the_admin_actions_statements_go_through_django_s_cursor(hooked: list[str]) -> None:
    feed = Feed.objects.create(title="f")
    user = User.objects.create_user("ops", password="pw", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(codename__in=["view_feed", "change_feed"]))
    client = Client()
    client.force_login(user)
    hooked.clear()

    client.post(
        "/admin/testapp/feed/",
        {"action": "deactivate_selected", "_selected_action": [feed.pk]},
    )

    assert Feed.objects.get(pk=feed.pk).active is False
    updates = [sql for sql in hooked if sql.startswith("UPDATE") and "testapp_feed" in sql]
    assert updates and quoted("active") in updates[0]
