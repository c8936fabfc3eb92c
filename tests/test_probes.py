"""The way back (issue #13): cool-down probes and the model's own methods."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from celery import Celery
from django.core import mail
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from celery_deactivate import _guard, _options, _outage, _store, probes
from celery_deactivate.signals import object_deactivated, object_reactivated
from tests.conftest import wait_for
from tests.testapp import tasks
from tests.testapp.models import Feed

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def sent() -> Iterator[list[tuple[str, Any]]]:
    log: list[tuple[str, Any]] = []
    object_deactivated.connect(lambda **kw: log.append(("off", kw)), weak=False, dispatch_uid="o")
    object_reactivated.connect(lambda **kw: log.append(("on", kw)), weak=False, dispatch_uid="n")
    yield log
    object_deactivated.disconnect(dispatch_uid="o")
    object_reactivated.disconnect(dispatch_uid="n")


def deactivated_by_a_failure(behaviour: str = "fail") -> Feed:
    feed = Feed.objects.create(title="flaky", behaviour=behaviour)
    tasks.poll_cooldown.delay(feed.pk)
    feed.refresh_from_db()
    assert feed.active is False
    return feed


def later(seconds: float) -> Any:
    return timezone.now() + timedelta(seconds=seconds)


def test_a_deactivation_by_a_failure_schedules_a_probe(eager: Celery) -> None:
    before = timezone.now()
    feed = deactivated_by_a_failure()
    assert feed.cooldown == 60
    assert before + timedelta(seconds=59) < feed.next_probe_at < later(61)
    assert feed.probing_since is None


def test_without_cooldown_nothing_is_scheduled(eager: Celery) -> None:
    feed = Feed.objects.create(title="f", behaviour="fail")
    tasks.poll.delay(feed.pk)
    feed.refresh_from_db()
    assert (feed.active, feed.next_probe_at, feed.cooldown) == (False, None, None)


def test_no_probe_before_the_cooldown_has_passed(eager: Celery) -> None:
    deactivated_by_a_failure()
    assert probes.maintain(eager) == 0
    assert probes.maintain(eager, now=later(59)) == 0


def test_a_probe_that_succeeds_reactivates_the_object(eager: Celery, sent: list[Any]) -> None:
    feed = deactivated_by_a_failure()
    Feed.objects.filter(pk=feed.pk).update(behaviour="ok")  # the upstream is back
    sent.clear()

    # When maintain runs after the cool-down (eager: the probe runs at once, as apply_async does)
    assert probes.maintain(eager, now=later(61)) == 1

    # Then the body ran and the object is active again, failures and probe cleared, signalled once
    feed.refresh_from_db()
    assert (feed.active, feed.error, feed.failure_count, feed.error_message) == (True, False, 0, "")
    assert (feed.next_probe_at, feed.cooldown, feed.probing_since) == (None, None, None)
    assert feed.polls == 1
    assert [(kind, kw["instance"].pk) for kind, kw in sent] == [("on", feed.pk)]
    # and its next run runs the body again; a new failure deactivates it again
    Feed.objects.filter(pk=feed.pk).update(behaviour="fail")
    tasks.poll_cooldown.delay(feed.pk)
    assert Feed.objects.get(pk=feed.pk).active is False


def test_a_probe_that_fails_doubles_the_cooldown(eager: Celery, sent: list[Any]) -> None:
    feed = deactivated_by_a_failure()
    first_mails = len(mail.outbox)
    sent.clear()

    assert probes.maintain(eager, now=later(61)) == 1

    feed.refresh_from_db()
    assert (feed.active, feed.error, feed.failure_count) == (False, True, 2)
    assert feed.cooldown == 120 and feed.probing_since is None
    assert later(119) < feed.next_probe_at < later(121)
    assert sent == [] and len(mail.outbox) == first_mails  # still deactivated: no new notice
    # Failing again and again, the cool-down stops at its maximum
    for seconds in (240, 300, 300):
        assert probes.maintain(eager, now=later(10_000)) == 1
        assert Feed.objects.get(pk=feed.pk).cooldown == seconds


def test_never_two_probes_for_one_object(eager: Celery) -> None:
    feed = deactivated_by_a_failure()
    target = tasks.poll_cooldown.target
    now = later(61)
    stale_before = now - timedelta(seconds=300)
    # One claim wins; the next finds the probe out
    assert probes.claim_probe(target, feed.pk, now, stale_before, using="default") is True
    assert probes.claim_probe(target, feed.pk, now, stale_before, using="default") is False
    assert probes.maintain(eager, now=now) == 0
    # A probe out for longer than the maximum cool-down was lost: it is sent again
    assert probes.maintain(eager, now=now + timedelta(seconds=301)) == 1


def test_objects_deactivated_by_hand_are_never_probed(eager: Celery) -> None:
    feed = Feed.objects.create(title="by hand")
    assert feed.deactivate() is True
    assert probes.maintain(eager, now=later(10_000)) == 0
    feed.refresh_from_db()
    assert (feed.active, feed.error, feed.next_probe_at) == (False, False, None)


def test_a_deactivation_by_hand_turns_a_scheduled_probe_off(
    eager: Celery, sent: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    # Given an object a failure deactivated, its probe scheduled
    feed = deactivated_by_a_failure()
    Feed.objects.filter(pk=feed.pk).update(behaviour="ok")  # a probe would succeed
    sent.clear()

    # When the operator deactivates it by hand
    caplog.set_level("INFO", logger="celery_deactivate")
    assert feed.deactivate() is True

    # Then the probe is off, the failure's record stays, nothing is sent a second time
    assert (feed.next_probe_at, feed.cooldown, feed.probing_since) == (None, None, None)
    fresh = Feed.objects.get(pk=feed.pk)
    assert (fresh.active, fresh.error, fresh.error_message) == (
        False,
        True,
        "Boom: flaky is broken",
    )
    assert fresh.next_probe_at is None and fresh.deactivated_at == feed.deactivated_at
    assert sent == []
    assert "deactivated by hand, its cool-down probes are off" in caplog.text
    # and no probe is ever sent; a second deactivation changes nothing
    assert probes.maintain(eager, now=later(10_000)) == 0
    assert Feed.objects.get(pk=feed.pk).active is False
    assert feed.deactivate() is False


def test_a_probe_out_when_the_operator_deactivates_does_not_reactivate(
    eager: Celery, sent: list[Any]
) -> None:
    # Given an object a failure deactivated, whose probe runs while the operator deactivates it
    feed = deactivated_by_a_failure()
    Feed.objects.filter(pk=feed.pk).update(behaviour="deactivated_by_hand")
    sent.clear()

    # When the probe is sent and its body succeeds
    assert probes.maintain(eager, now=later(61)) == 1

    # Then the operator's word wins: the probe's success does not re-activate it
    fresh = Feed.objects.get(pk=feed.pk)
    assert fresh.polls == 1  # the probe's body ran
    assert (fresh.active, fresh.next_probe_at, fresh.probing_since) == (False, None, None)
    assert sent == []
    assert probes.maintain(eager, now=later(10_000)) == 0


@pytest.mark.usefixtures("worker")
def test_a_probe_goes_through_the_task_s_own_apply_async_to_a_worker(celery_app: Celery) -> None:
    feed = Feed.objects.create(title="f", behaviour="fail")
    with pytest.raises(tasks.Boom):
        tasks.poll_cooldown(feed.pk)  # deactivated by a direct call
    Feed.objects.filter(pk=feed.pk).update(behaviour="ok")

    assert probes.maintain(celery_app, now=later(61)) == 1

    wait_for(lambda: Feed.objects.get(pk=feed.pk).active)
    assert Feed.objects.get(pk=feed.pk).polls == 1


# -- the model's own methods -------------------------------------------------------------


def test_deactivate_and_reactivate_on_the_instance(sent: list[Any]) -> None:
    feed = Feed.objects.create(title="f", failure_count=2)

    assert feed.deactivate(error=ValueError("upstream gone")) is True
    assert (feed.active, feed.error, feed.error_message) == (
        False,
        True,
        "ValueError: upstream gone",
    )
    assert feed.deactivate() is False  # already inactive: nothing changes, nothing is sent
    assert feed.reactivate() is True
    assert (feed.active, feed.error, feed.failure_count, feed.deactivated_at) == (
        True,
        False,
        0,
        None,
    )
    assert feed.reactivate() is False
    assert [kind for kind, _ in sent] == ["off", "on"]
    assert all(kw["sender"] is Feed for _, kw in sent)
    fresh = Feed.objects.get(pk=feed.pk)
    assert (fresh.active, fresh.error, fresh.failure_count) == (True, False, 0)


def test_deactivate_takes_the_recipe_s_exception_class() -> None:
    feed = Feed.objects.create(title="f")
    feed.deactivate(error=KeyError)
    assert (feed.active, feed.error, feed.error_message) == (False, True, "KeyError")


def test_no_probe_while_the_task_s_outage_is_open(eager: Celery) -> None:
    from celery_deactivate.models import TaskState

    deactivated_by_a_failure()
    # Given an outage of the task, open (as the guard records it)
    TaskState.objects.update_or_create(
        task=tasks.poll_cooldown.name, defaults={"outage_started_at": timezone.now()}
    )
    assert tasks.poll_cooldown.outage_open() is True

    assert probes.maintain(eager, now=later(61)) == 0

    TaskState.objects.filter(task=tasks.poll_cooldown.name).update(outage_started_at=None)
    assert probes.maintain(eager, now=later(61)) == 1


def test_the_maintain_task_sends_the_due_probes(eager: Celery) -> None:
    feed = deactivated_by_a_failure()
    Feed.objects.filter(pk=feed.pk).update(
        behaviour="ok", next_probe_at=timezone.now() - timedelta(seconds=1)
    )

    eager.tasks["celery_deactivate.maintain"].delay()

    assert Feed.objects.get(pk=feed.pk).active is True


def test_a_skipped_pass_object_run_changes_nothing(
    eager: Celery, caplog: pytest.LogCaptureFixture, sent: list[Any]
) -> None:
    # Given an inactive object with a probe out, and a pass-object task without probes
    feed = Feed.objects.create(
        title="off", active=False, error=True, probing_since=timezone.now(), failure_count=2
    )

    with CaptureQueriesContext(connection) as captured:
        tasks.poll_object.delay(feed.pk)

    # Then the body did not run, and nothing was written, sent or logged as an error
    fresh = Feed.objects.get(pk=feed.pk)
    assert (fresh.active, fresh.polls, fresh.failure_count) == (False, 0, 2)
    assert sent == []
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    assert [q["sql"].split()[0] for q in captured.captured_queries if "UPDATE" in q["sql"]] == []


def test_a_probe_that_cannot_be_sent_gives_its_claim_back(
    eager: Celery, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a due probe whose eager run propagates its failure (apply_async raises)
    feed = deactivated_by_a_failure()
    eager.conf.task_eager_propagates = True
    try:
        sent_count = probes.maintain(eager, now=later(61))
    finally:
        eager.conf.task_eager_propagates = False

    # Then maintain went on (logged, not raised) and no claim is left behind
    assert sent_count == 0
    fresh = Feed.objects.get(pk=feed.pk)
    assert fresh.probing_since is None and fresh.active is False
    assert "could not be sent" in caplog.text


def test_a_probe_that_fails_during_an_outage_is_recorded_as_the_probes(eager: Celery) -> None:
    # Given a deactivated object whose probe is out when an outage of its task starts,
    feed = deactivated_by_a_failure()
    Feed.objects.filter(pk=feed.pk).update(probing_since=timezone.now())
    task = tasks.poll_cooldown
    now = timezone.now()  # (counted from now: the object is not one of the outage's victims)
    assert _outage.start_outage(task, _options.Options(task), now, now, None, _store.db())
    before = _guard.counts_now(task)

    # When the probe fails during the outage,
    tasks.poll_cooldown.delay(feed.pk)

    # Then it is the probe's failure: no probe out any more, the cool-down doubled, the next
    # probe scheduled that far ahead; and the guard did not count it.
    feed.refresh_from_db()
    assert (feed.active, feed.probing_since, feed.cooldown) == (False, None, 120)
    assert later(119) < feed.next_probe_at < later(121)
    assert feed.failure_count == 2
    assert _guard.counts_now(task) == before
