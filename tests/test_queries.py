"""Query counts are deterministic: the extension's cost on each path, asserted exactly.

The success path adds to the body's own queries only the transaction and one read of the
object's state; the failure path adds that read, one conditioned ``UPDATE`` of the library's own
columns and one read of the changed row, beyond the rollback, and, when the failure changes the
object's state (a deactivation), one ``INSERT`` of its history event in that transaction.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import pytest
from celery import Celery
from django.db import connection

from tests.conftest import quoted, statements
from tests.testapp import tasks
from tests.testapp.models import Feed

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def no_guard(conf: Callable[..., None]) -> None:
    """The failure path as before the outage guard and the notice windows (their own statements
    are counted in tests/test_outage.py)."""
    conf(deactivate_outage_objects=0, deactivate_notify_window=0)


def task_statements(run: Callable[[], Any]) -> list[str]:
    """The data statements ``run`` sends, whether it raises or not (the django-celery-beat
    integration's look-up of the object's schedules left out: tests/test_beat.py)."""

    def capture() -> None:
        with contextlib.suppress(Exception):
            run()

    sql = statements(capture)
    return [s for s in sql if "django_celery_beat" not in s]


def body_alone(pk: int) -> Callable[[], Any]:
    return lambda: tasks.work(Feed.objects.get(pk=pk))


def verbs(sql: list[str]) -> list[str]:
    """The verb of each statement (``SELECT``, ``UPDATE``...)."""
    return [s.split()[0].upper() for s in sql]


def test_success_path_adds_one_read(eager: Celery) -> None:
    body = task_statements(body_alone(Feed.objects.create(title="a").pk))
    feed = Feed.objects.create(title="b")

    task = task_statements(lambda: tasks.poll.delay(feed.pk))

    assert len(task) == len(body) + 1
    extra = task[0]
    assert extra.upper().startswith("SELECT") and "active" in extra and "failure_count" in extra
    assert verbs(task[1:]) == verbs(body)


def test_success_path_with_the_loaded_object_adds_nothing(eager: Celery) -> None:
    body = task_statements(body_alone(Feed.objects.create(title="a").pk))
    feed = Feed.objects.create(title="b")

    task = task_statements(lambda: tasks.poll_object.delay(feed.pk))

    # The body's own get() is the task's read: one query fewer than the drop-in form.
    assert len(task) == len(body)


def test_failure_path_adds_a_read_a_write_a_read_of_the_change_and_its_event(
    eager: Celery, no_guard: None
) -> None:
    body = task_statements(body_alone(Feed.objects.create(title="a", behaviour="fail").pk))
    feed = Feed.objects.create(title="b", behaviour="fail")

    task = task_statements(lambda: tasks.poll.delay(feed.pk))

    assert len(task) == len(body) + 4
    assert verbs(task[:1]) == ["SELECT"]
    assert verbs(task[1:-3]) == verbs(body)
    assert verbs(task[-3:]) == ["UPDATE", "SELECT", "INSERT"]
    assert quoted("active") in task[-3][task[-3].upper().index(" WHERE ") :]  # conditioned on it
    assert quoted("celery_deactivate_historyevent") in task[-1]  # the deactivation's event
    assert Feed.objects.get(pk=feed.pk).active is False


def test_success_after_failures_resets_the_count_with_one_targeted_update(eager: Celery) -> None:
    feed = Feed.objects.create(title="b", failure_count=2)
    body = task_statements(body_alone(Feed.objects.create(title="a").pk))

    task = task_statements(lambda: tasks.poll_after3.delay(feed.pk))

    assert len(task) == len(body) + 2
    reset = task[-1]
    assert reset.upper().startswith("UPDATE") and "failure_count" in reset
    assert "title" not in reset  # only its own column
    assert Feed.objects.get(pk=feed.pk).failure_count == 0


def test_failure_write_touches_only_its_own_columns(eager: Celery, no_guard: None) -> None:
    feed = Feed.objects.create(title="b", behaviour="fail")
    task = task_statements(lambda: tasks.poll.delay(feed.pk))
    update = task[-3]  # (then the read of the row, the history's INSERT)
    set_clause = update[update.upper().index(" SET ") : update.upper().index(" WHERE ")]
    for column in ("title", "behaviour", "polls", "note"):
        assert quoted(column) not in set_clause


def in_transaction(run: Callable[[], Any]) -> list[tuple[str, bool]]:
    """The first word of each statement ``run`` sends, with whether it ran in a transaction
    (``connection.in_atomic_block``, seen by an execute wrapper); django-celery-beat's look-up
    of the object's schedules left out, as in :func:`task_statements`."""
    seen: list[tuple[str, bool]] = []

    def wrapper(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        if "django_celery_beat" not in sql:
            seen.append((sql.split()[0].upper(), context["connection"].in_atomic_block))
        return execute(sql, params, many, context)

    with connection.execute_wrapper(wrapper), contextlib.suppress(Exception):
        run()
    return seen


@pytest.mark.parametrize("receiver", [False, True], ids=["no-receiver", "a-receiver"])
def test_failure_is_recorded_in_one_transaction_whoever_listens(
    receiver: bool, eager: Celery, no_guard: None
) -> None:
    from celery_deactivate.signals import object_deactivated

    calls: list[bool] = []
    if receiver:
        object_deactivated.connect(
            lambda **kw: calls.append(connection.in_atomic_block), weak=False, dispatch_uid="q"
        )
    try:
        feed = Feed.objects.create(title="b", behaviour="fail")
        body = in_transaction(body_alone(Feed.objects.create(title="a", behaviour="fail").pk))
        recorded = [
            (word, atomic)
            for word, atomic in in_transaction(lambda: tasks.poll.delay(feed.pk))
            if word not in ("BEGIN", "COMMIT", "ROLLBACK")  # sent as statements on SQLite
        ]
    finally:
        object_deactivated.disconnect(dispatch_uid="q")

    # The state read, the body in its transaction, then the row updated and read and the event
    # inserted in one transaction, the same statements whether a receiver listens or not (its
    # savepoint aside).
    assert recorded[0] == ("SELECT", False)
    assert recorded[1 : 1 + len(body)] == [(word, True) for word, _ in body]
    recording = [entry for entry in recorded[1 + len(body) :] if entry[0] != "RELEASE"]
    expected = [("UPDATE", True), ("SELECT", True), ("INSERT", True)]
    expected += [("SAVEPOINT", True)] * receiver
    assert recording == expected
    assert calls == [True] * receiver
    feed.refresh_from_db()
    assert (feed.active, feed.error, feed.failure_count) == (False, True, 1)


@pytest.mark.parametrize("task", ["poll_after3", "poll_cooldown"])
def test_failure_with_a_threshold_or_probes_is_recorded_in_a_transaction(
    task: str, eager: Celery, no_guard: None
) -> None:
    # Below a threshold the read says whether the failure reached it; with probes the update
    # takes the row's lock before a probe's failure would be read (SQLite: no lock upgrade).
    feed = Feed.objects.create(title="p", behaviour="fail")
    recorded = in_transaction(lambda: getattr(tasks, task).delay(feed.pk))
    probes = task == "poll_cooldown"  # deactivated at once: its event inserted too
    change = [("UPDATE", True), ("SELECT", True)] + [("INSERT", True)] * probes
    assert recorded[-len(change) :] == change
    feed.refresh_from_db()
    assert (feed.active, feed.failure_count, feed.cooldown) == (
        not probes,
        1,
        60.0 if probes else None,
    )
