"""Eager mode (``task_always_eager``) and direct calls behave as on a worker.

With ``task_eager_propagates`` Celery calls no failure hook, and a direct call ``poll(pk)`` is not
traced at all: the task records the failure itself there, once.
"""

from __future__ import annotations

import gc
import weakref
from typing import Any

import pytest
from celery import Celery, current_task
from django.core import mail
from django.test import override_settings

from celery_deactivate.signals import failure_counted, object_deactivated
from tests.testapp import tasks
from tests.testapp.models import Entry, Feed, Renamed

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def deactivations() -> Any:
    received: list[dict[str, Any]] = []

    def receiver(**kwargs: Any) -> None:
        received.append(kwargs)

    object_deactivated.connect(receiver)
    yield received
    object_deactivated.disconnect(receiver)


@pytest.mark.parametrize("propagates", [False, True], ids=["stored", "propagates"])
def test_eager_failure_deactivates_once(
    eager: Celery, propagates: bool, deactivations: list[dict[str, Any]]
) -> None:
    eager.conf.task_eager_propagates = propagates
    feed = Feed.objects.create(title="bad", behaviour="fail")

    if propagates:
        with pytest.raises(tasks.Boom, match="bad is broken") as info:
            tasks.poll.delay(feed.pk)
        assert any(entry.name == "work" for entry in info.traceback)
    else:
        result = tasks.poll.delay(feed.pk)
        assert result.state == "FAILURE"
        assert isinstance(result.result, tasks.Boom)

    feed.refresh_from_db()
    assert (feed.active, feed.error, feed.failure_count) == (False, True, 1)
    assert Entry.objects.count() == 0
    assert len(deactivations) == 1 and len(mail.outbox) == 1


@pytest.mark.parametrize("propagates", [False, True], ids=["stored", "propagates"])
def test_eager_success(eager: Celery, propagates: bool) -> None:
    eager.conf.task_eager_propagates = propagates
    feed = Feed.objects.create(title="good", failure_count=1)
    assert tasks.poll.delay(feed.pk).get() == feed.pk
    feed.refresh_from_db()
    assert (feed.active, feed.failure_count, feed.polls) == (True, 0, 1)


def test_apply_with_throw_overrides_the_setting(eager: Celery) -> None:
    feed = Feed.objects.create(title="bad", behaviour="fail")
    with pytest.raises(tasks.Boom):
        tasks.poll.apply((feed.pk,), throw=True)
    feed.refresh_from_db()
    assert (feed.active, feed.failure_count) == (False, 1)


def test_eager_autoretry_counts_only_the_final_failure(eager: Celery) -> None:
    feed = Feed.objects.create(title="flaky", behaviour="transient")
    result = tasks.poll_autoretry.delay(feed.pk)
    assert result.state == "FAILURE"
    feed.refresh_from_db()
    assert (feed.active, feed.failure_count) == (False, 1)
    assert len(mail.outbox) == 1


def test_direct_call_records_the_failure_and_raises_the_same_exception(
    deactivations: list[dict[str, Any]],
) -> None:
    feed = Feed.objects.create(title="bad", behaviour="fail")
    with pytest.raises(tasks.Boom) as info:
        tasks.poll(feed.pk)
    assert deactivations[0]["exception"] is info.value
    feed.refresh_from_db()
    assert (feed.active, feed.failure_count) == (False, 1)
    assert len(deactivations) == 1


@pytest.mark.parametrize("call", ["direct", "eager"])
def test_the_body_sees_its_task_as_celery_s_current_task(call: str, eager: Celery) -> None:
    # As Celery's own Task.__call__ does for a direct call, and its tracer for the others
    feed = Feed.objects.create(title="f")

    if call == "direct":
        seen = tasks.current(feed.pk)
    else:
        seen = tasks.current.apply((feed.pk,), throw=True).get()

    assert seen == (tasks.current.name, [feed.pk])
    assert not current_task  # and nothing is left on Celery's stack


@pytest.mark.parametrize("call", ["direct", "eager"])
def test_the_error_of_the_library_s_own_read_is_not_kept(call: str, eager: Celery) -> None:
    # Given a run whose read before the body fails (no such object): not the object's failure
    eager.conf.task_eager_propagates = True
    try:
        if call == "direct":
            tasks.poll(10**9)
        else:
            tasks.poll.delay(10**9)
    except Feed.DoesNotExist as exc:
        error = weakref.ref(exc)
    else:  # pragma: no cover - reported below
        raise AssertionError("the read did not fail")
    finally:
        eager.conf.task_eager_propagates = False

    # Then once the run is over nothing keeps the exception (nor its frames) alive
    gc.collect()
    assert error() is None


@pytest.mark.parametrize("where", ["app", "django"])
def test_a_setting_changed_in_place_is_seen_by_the_next_run(
    where: str, eager: Celery, conf: Any
) -> None:
    def count_after_a_success() -> int:
        feed = Feed.objects.create(title="counted", failure_count=2)
        tasks.poll.delay(feed.pk)
        return Feed.objects.get(pk=feed.pk).failure_count

    # Given the fields by role, set worker-wide (the default roles: a success resets the count)
    # on the app or in Django's settings (not both: Celery 5.3.6 looks a Django CELERY_* setting
    # up before the app's run-time value, 5.7 the latter first),
    fields: dict[str, str | None] = {}
    django_settings = {"CELERY_DEACTIVATE_FIELDS": fields} if where == "django" else {}
    with override_settings(**django_settings):
        if where == "app":
            conf(deactivate_fields=fields)
        assert count_after_a_success() == 0

        # When the mapping is changed in place: the count is no role any more
        fields["failure_count"] = None

        # Then the next run reads no count, and leaves it as it is
        assert count_after_a_success() == 2
        # and a mapping set anew is seen as well
        if where == "app":
            conf(deactivate_fields={})
            assert count_after_a_success() == 0


def test_a_failure_option_changed_in_place_or_anew_is_seen_by_the_next_failure(
    eager: Celery, conf: Any
) -> None:
    def deactivated_by_a_lookup_error() -> bool:
        feed = Feed.objects.create(title="missing upstream", behaviour="lookup")
        tasks.poll.delay(feed.pk)
        return not Feed.objects.get(pk=feed.pk).active

    # Given the failures that count, set worker-wide as a list, and read by a first failure
    ignored: list[str] = []
    conf(dont_deactivate_on=ignored)
    assert deactivated_by_a_lookup_error()

    # When the list is changed in place, the next failure no longer counts
    ignored.append("builtins.LookupError")
    assert not deactivated_by_a_lookup_error()

    # and a value set anew is seen as well.
    conf(dont_deactivate_on=[])
    assert deactivated_by_a_lookup_error()


def test_direct_call_of_an_inactive_object_does_nothing() -> None:
    feed = Feed.objects.create(title="paused", active=False)
    assert tasks.poll(feed.pk) is None
    assert Feed.objects.get(pk=feed.pk).polls == 0


def test_dont_deactivate_on_neither_counts_nor_deactivates(eager: Celery) -> None:
    feed = Feed.objects.create(title="gone upstream", behaviour="lookup")
    result = tasks.poll_selective.delay(feed.pk)
    assert isinstance(result.result, LookupError)
    feed.refresh_from_db()
    assert (feed.active, feed.failure_count, feed.error) == (True, 0, False)
    assert mail.outbox == []


def test_deactivate_on_restricts_what_counts(eager: Celery, conf: Any) -> None:
    conf(deactivate_on=["builtins.LookupError"])
    boom = Feed.objects.create(title="boom", behaviour="fail")
    lookup = Feed.objects.create(title="lookup", behaviour="lookup")
    tasks.poll.delay(boom.pk)
    tasks.poll.delay(lookup.pk)
    assert Feed.objects.get(pk=boom.pk).active is True
    assert Feed.objects.get(pk=lookup.pk).active is False


def test_notify_off_sends_no_mail_but_still_signals(
    eager: Celery, deactivations: list[dict[str, Any]]
) -> None:
    feed = Feed.objects.create(title="bad", behaviour="fail")
    tasks.poll_quiet.delay(feed.pk)
    assert Feed.objects.get(pk=feed.pk).active is False
    assert mail.outbox == [] and len(deactivations) == 1


def test_failure_counted_signal_below_the_threshold(eager: Celery) -> None:
    counted: list[dict[str, Any]] = []
    failure_counted.connect(lambda **kw: counted.append(kw), weak=False, dispatch_uid="t")
    try:
        feed = Feed.objects.create(title="bad", behaviour="fail")
        tasks.poll_after3.delay(feed.pk)
    finally:
        failure_counted.disconnect(dispatch_uid="t")
    assert [kw["failure_count"] for kw in counted] == [1]
    assert counted[0]["instance"].active is True


def test_custom_field_names_and_message_cut_to_its_column(eager: Celery) -> None:
    obj = Renamed.objects.create(title="bad renamed object with a long title")
    tasks.sync_renamed.delay(obj.pk)
    obj.refresh_from_db()
    assert (obj.enabled, obj.broken, obj.failures) == (False, True, 1)
    assert len(obj.last_error) == 24
    assert obj.last_error == "Boom: bad renamed objec…"


def test_notifier_and_receiver_failures_are_logged_not_raised(
    eager: Celery, conf: Any, caplog: pytest.LogCaptureFixture
) -> None:
    def broken_notifier(**kwargs: Any) -> None:
        raise ConnectionRefusedError("mail server down")

    def broken_receiver(**kwargs: Any) -> None:
        raise RuntimeError("receiver bug")

    conf(deactivate_notifier=broken_notifier)
    object_deactivated.connect(broken_receiver)
    try:
        feed = Feed.objects.create(title="bad", behaviour="fail")
        with caplog.at_level("ERROR", logger="celery_deactivate"):
            result = tasks.poll.delay(feed.pk)
    finally:
        object_deactivated.disconnect(broken_receiver)
    assert isinstance(result.result, tasks.Boom)
    assert Feed.objects.get(pk=feed.pk).active is False
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert any(
        "notifier" in r.getMessage() and f"testapp.Feed pk={feed.pk}" in r.getMessage()
        for r in errors
    )
    assert any(
        "receiver" in r.getMessage() and f"testapp.Feed pk={feed.pk}" in r.getMessage()
        for r in errors
    )
