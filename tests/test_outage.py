"""The outage guard (issue #12): broken objects are deactivated one by one, a shared failure trips
the guard instead.  A real in-thread worker on the test database; two prefork worker processes
sharing the state are in tests/crash/test_outage.py."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import Celery
from celery.result import AsyncResult, ResultSet
from django.conf import settings
from django.core import mail
from django.db.models import Sum
from django.test import override_settings

from celery_deactivate import DeactivatingTask, _guard, _options, _store
from celery_deactivate.exceptions import DeactivateConfigError
from celery_deactivate.models import TaskFailure, TaskRuns, TaskState
from celery_deactivate.signals import object_reactivated, outage_ended, outage_started
from celery_deactivate.tasks import maintain, maintain_entry, maintain_guard
from tests.conftest import mail_kinds, quoted, run_to_end, statements, wait_for
from tests.testapp import outage_tasks, tasks
from tests.testapp.models import Feed

pytestmark = pytest.mark.django_db(transaction=True)


def feeds(count: int, behaviour: str = "ok", prefix: str = "feed") -> list[Feed]:
    return [Feed.objects.create(title=f"{prefix} {n}", behaviour=behaviour) for n in range(count)]


def run_all(task: Any, objects: list[Feed], timeout: float = 60.0) -> ResultSet:
    """Run ``task`` on every object; return once the worker is done with each (its failure
    recorded: ``run_to_end``)."""
    return ResultSet(run_to_end(task, [(feed.pk,) for feed in objects], timeout=timeout))


class Received:
    """Every signal ``signal`` sent for ``sender`` (any sender when ``None``), in order."""

    def __init__(self, signal: Any) -> None:
        self.signal = signal
        self.calls: list[dict[str, Any]] = []

    def __call__(self, sender: Any, **kwargs: Any) -> None:
        self.calls.append({"sender": sender, **kwargs})


@pytest.fixture
def received() -> Iterator[Callable[[Any], Received]]:
    connected: list[Received] = []

    def connect(signal: Any) -> Received:
        receiver = Received(signal)
        signal.connect(receiver, weak=False)
        connected.append(receiver)
        return receiver

    yield connect
    for receiver in connected:
        receiver.signal.disconnect(receiver)


# -- options ------------------------------------------------------------------------------------


def test_the_guard_is_on_by_default() -> None:
    options = _options.Options(tasks.poll)
    assert (options.objects, options.rate, options.window) == (10, 0.5, 300.0)
    assert options.guard_on and options.notify_window == 300.0


def test_zero_turns_it_off_for_a_task_and_zero_or_none_worker_wide(
    conf: Callable[..., None],
) -> None:
    assert not _options.Options(outage_tasks.unguarded).guard_on
    conf(deactivate_outage_objects=None)
    assert not _options.Options(tasks.poll).guard_on
    conf(deactivate_outage_objects=0)
    assert not _options.Options(tasks.poll).guard_on
    assert _options.Options(outage_tasks.guarded).objects == 5  # its own setting wins
    conf(deactivate_outage_objects=3)
    assert _options.Options(tasks.poll).objects == 3


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"deactivate_outage_objects": -1}, "deactivate_outage_objects must be an integer >= 0"),
        ({"deactivate_outage_rate": 0}, r"deactivate_outage_rate must be a number in \(0, 1\]"),
        ({"deactivate_outage_rate": 1.5}, r"deactivate_outage_rate must be a number in \(0, 1\]"),
        ({"deactivate_outage_window": 0}, "deactivate_outage_window must be a number of seconds"),
        ({"deactivate_notify_window": -1}, "deactivate_notify_window must be a number"),
        ({"deactivate_site_url": "ops.example.com"}, "deactivate_site_url must be an http"),
        ({"deactivate_outage_ratio": 0.5}, "unknown option 'deactivate_outage_ratio'"),
    ],
)
def test_bad_values_fail_when_the_task_is_declared(options: dict[str, Any], message: str) -> None:
    app = Celery("outage-config", set_as_current=False)
    app.finalize()

    def body(pk: int) -> None: ...

    with pytest.raises(DeactivateConfigError, match=message):
        app.task(base=DeactivatingTask, lazy=False, shared=False, model=Feed, **options)(body)


def test_the_guard_needs_the_library_s_tables() -> None:
    app = Celery("outage-apps", set_as_current=False)
    app.finalize()

    def body(pk: int) -> None: ...

    without = [name for name in settings.INSTALLED_APPS if name != "celery_deactivate"]
    with override_settings(INSTALLED_APPS=without):
        with pytest.raises(DeactivateConfigError, match="add it to INSTALLED_APPS and migrate"):
            app.task(base=DeactivatingTask, lazy=False, shared=False, model=Feed)(body)
        # Both off: nothing to keep, nothing needed.
        app.task(
            base=DeactivatingTask,
            lazy=False,
            shared=False,
            model=Feed,
            deactivate_outage_objects=0,
            deactivate_notify_window=0,
            name="without-the-tables",
        )(body)


def test_maintain_is_registered_with_a_ready_beat_entry(celery_app: Celery) -> None:
    assert celery_app.tasks["celery_deactivate.maintain"].name == maintain.name
    entry = maintain_entry(every=30)
    assert entry == {
        "task": "celery_deactivate.maintain",
        "schedule": 30,
        "options": {"expires": 30},
    }


# -- on a worker --------------------------------------------------------------------------------


@pytest.mark.usefixtures("worker")
def test_a_burst_trips_the_guard_and_leaves_every_object_active(
    received: Callable[[Any], Received],
) -> None:
    started = received(outage_started)
    reactivated = received(object_reactivated)
    # Given a table whose every object now fails (the upstream is down),
    down = feeds(20, "fail")

    # when the task runs on each,
    results = run_all(outage_tasks.guarded, down)

    # Celery saw every failure, unchanged,
    assert all(isinstance(result.result, tasks.Boom) for result in results.results)
    # the guard tripped once, and no object is left deactivated nor counted:
    assert len(started.calls) == 1
    call = started.calls[0]
    assert call["sender"] is outage_tasks.guarded
    assert call["counts"]["objects"] >= 5 and call["counts"]["failures"] >= 5
    assert Feed.objects.filter(active=False).count() == 0
    assert set(Feed.objects.values_list("failure_count", "error")) == {(0, False)}
    # the victims (deactivated before the guard tripped) were re-activated, signal and all,
    victims = {c["instance"].pk for c in reactivated.calls}
    assert 1 <= len(victims) <= 5 + 1  # at most the threshold, and one racing worker thread
    assert {instance.pk for instance in call["reactivated"]} <= victims
    # and the admins got one outage notice, not a mail per object.
    wait_for(lambda: "outage_started" in mail_kinds(mail.outbox))
    # Exactly the outage notice, and the notice of the first deactivation of the quiet period
    # unless the outage re-activated that object before its failure was through.
    assert sorted(mail_kinds(mail.outbox)) in (
        ["deactivated", "outage_started"],
        ["outage_started"],
    )
    assert _guard.outage_of(outage_tasks.guarded) is not None


@pytest.mark.usefixtures("worker")
def test_during_an_outage_failures_neither_deactivate_nor_count(
    received: Callable[[Any], Received], caplog: pytest.LogCaptureFixture
) -> None:
    run_all(outage_tasks.guarded_after3, feeds(10, "fail"))
    assert _guard.outage_of(outage_tasks.guarded_after3) is not None
    broken = Feed.objects.create(title="broken meanwhile", behaviour="fail", failure_count=1)

    with caplog.at_level(logging.INFO, logger="celery_deactivate"):
        result = outage_tasks.guarded_after3.delay(broken.pk)
        wait_for(result.ready)
        wait_for(lambda: "has an outage since" in caplog.text)

    assert isinstance(result.result, tasks.Boom)
    broken.refresh_from_db()
    assert (broken.active, broken.failure_count) == (True, 1)  # not counted
    assert f"on testapp.Feed pk={broken.pk}: not deactivated nor counted" in caplog.text


@pytest.mark.usefixtures("worker")
def test_one_broken_object_among_healthy_ones_is_deactivated(
    received: Callable[[Any], Received],
) -> None:
    started = received(outage_started)
    healthy = feeds(20)
    run_all(outage_tasks.guarded_by_rate, healthy)
    broken = Feed.objects.create(title="broken", behaviour="fail")

    result = outage_tasks.guarded_by_rate.delay(broken.pk)
    wait_for(result.ready)

    wait_for(lambda: not Feed.objects.get(pk=broken.pk).active)
    assert started.calls == []
    counts = _guard.counts_now(outage_tasks.guarded_by_rate)
    assert counts == {"runs": 21, "failures": 1, "objects": 1}  # the successes were written too
    assert Feed.objects.filter(active=True).count() == 20


@pytest.mark.usefixtures("worker")
def test_a_broken_tenth_of_a_healthy_table_is_deactivated_one_by_one(
    received: Callable[[Any], Received],
) -> None:
    started = received(outage_started)
    table = [
        Feed.objects.create(title=f"feed {n}", behaviour="fail" if n % 10 == 3 else "ok")
        for n in range(100)
    ]

    # Celery 5.3's in-thread worker takes about one message a second from Redis (docs/versions.md)
    run_all(outage_tasks.guarded, table, timeout=300)

    broken = {feed.pk for feed in table if feed.behaviour == "fail"}
    wait_for(lambda: set(Feed.objects.filter(active=False).values_list("pk", flat=True)) == broken)
    assert started.calls == []
    assert _guard.outage_of(outage_tasks.guarded) is None


@pytest.mark.usefixtures("worker")
def test_recovery_noticed_by_maintain_sends_one_outage_ended(
    received: Callable[[Any], Received], celery_app: Celery
) -> None:
    ended = received(outage_ended)
    table = feeds(10, "fail")
    run_all(outage_tasks.guarded_briefly, table)
    assert _guard.outage_of(outage_tasks.guarded_briefly) is not None
    assert maintain_guard(celery_app)["outages_ended"] == 0  # still failing: it stays open

    # The upstream is back; the task is idle: its failures leave the 3 s window.
    Feed.objects.update(behaviour="ok")
    wait_for(lambda: maintain.apply().successful() and ended.calls, timeout=30)

    assert len(ended.calls) == 1
    assert _guard.outage_of(outage_tasks.guarded_briefly) is None
    assert maintain_guard(celery_app)["outages_ended"] == 0
    assert len(ended.calls) == 1
    wait_for(lambda: "outage_ended" in mail_kinds(mail.outbox))
    assert mail_kinds(mail.outbox).count("outage_ended") == 1
    # Failures deactivate objects again (the first one: a quiet period, notified at once).
    Feed.objects.filter(pk=table[0].pk).update(behaviour="fail")
    result = outage_tasks.guarded_briefly.delay(table[0].pk)
    wait_for(result.ready)
    wait_for(lambda: not Feed.objects.get(pk=table[0].pk).active)


@pytest.mark.usefixtures("worker")
def test_recovery_noticed_by_the_tasks_own_runs(received: Callable[[Any], Received]) -> None:
    ended = received(outage_ended)
    table = feeds(10, "fail")
    run_all(outage_tasks.guarded, table)
    assert _guard.outage_of(outage_tasks.guarded) is not None

    # The upstream is back: successes dilute the failures of the window (10 of 10 runs), and a
    # run at least FLUSH_EVERY seconds after the last write writes them and checks the outage.
    Feed.objects.update(behaviour="ok")

    def poll_round() -> bool:
        run_all(outage_tasks.guarded, table)
        return bool(ended.calls)

    wait_for(poll_round, timeout=60)

    assert len(ended.calls) == 1
    counts = ended.calls[0]["counts"]
    assert counts["failures"] < 0.5 * counts["runs"]
    assert _guard.outage_of(outage_tasks.guarded) is None


@pytest.mark.usefixtures("worker")
def test_after_an_outage_only_new_failures_count(received: Callable[[Any], Received]) -> None:
    started = received(outage_started)
    table = feeds(10, "fail")
    run_all(outage_tasks.guarded_briefly, table)
    Feed.objects.update(behaviour="ok")
    wait_for(lambda: maintain_guard(outage_tasks.guarded_briefly.app)["outages_ended"])

    # One failure after the end: the 10 failures before it are not counted again.
    Feed.objects.filter(pk=table[0].pk).update(behaviour="fail")
    run_all(outage_tasks.guarded_briefly, table[:1])

    assert len(started.calls) == 1
    assert not Feed.objects.get(pk=table[0].pk).active


# -- what it costs ------------------------------------------------------------------------------


def apply(task: Any, pk: int) -> AsyncResult:
    return task.apply((pk,))


def test_the_success_path_runs_no_extra_statement(conf: Callable[..., None]) -> None:
    feed = Feed.objects.create(title="ok")
    conf(deactivate_outage_objects=0)
    without = [statements(lambda: apply(tasks.poll, feed.pk)) for _ in range(5)]
    conf(deactivate_outage_objects=10)
    _store.forget()
    guarded = [statements(lambda: apply(tasks.poll, feed.pk)) for _ in range(5)]

    assert guarded == without
    assert not any("celery_deactivate_" in sql for run in guarded for sql in run)


def test_runs_are_written_every_few_seconds_not_per_run() -> None:
    feed = Feed.objects.create(title="ok")
    written: list[list[str]] = []

    def poll_until_written() -> bool:
        sql = statements(lambda: apply(tasks.poll, feed.pk))
        if any("celery_deactivate_taskruns" in s for s in sql):
            written.append(sql)
        return bool(written)

    wait_for(poll_until_written, timeout=_store.FLUSH_EVERY + 20, interval=0.01)

    # Every run so far, in one write: a row per slot of the window (a tenth of it, 30 s; the
    # runs of these seconds may straddle two slots), each written once.
    rows = TaskRuns.objects.filter(task=tasks.poll.name)
    totals = rows.aggregate(runs=Sum("runs"), failures=Sum("failures"))
    assert totals["runs"] > 1 and totals["failures"] == 0
    slots = rows.count()
    own = [s.split()[0] for s in written[0] if "celery_deactivate_" in s]
    assert slots in (1, 2)
    assert own in (
        ["UPDATE", "INSERT", "DELETE"] * slots + ["SELECT"],
        ["UPDATE"] * slots + ["SELECT"],
    )


def own(sql: list[str]) -> list[str]:
    """The statements on the library's tables: ``VERB table``."""
    table = re.compile(r"""["`](celery_deactivate_\w+)["`]""")
    return [s.split()[0] + " " + found[1] for s in sql if (found := table.search(s))]


def test_what_a_failure_costs_with_the_guard() -> None:
    first, second = feeds(2, "fail")

    sql = [
        statements(lambda feed=feed: apply(outage_tasks.guarded, feed.pk))
        for feed in (first, second)
    ]

    # The failure is counted in memory, as successes are, and written with them every
    # FLUSH_EVERY seconds (test_runs_are_written_every_few_seconds_not_per_run).
    assert own(sql[0]) == [
        "SELECT celery_deactivate_taskstate",  # is an outage open, a digest due?
        "INSERT celery_deactivate_taskstate",  # (the task's first failure: its row)
        "INSERT celery_deactivate_historyevent",  # the deactivation's event (not the guard's)
        "UPDATE celery_deactivate_taskstate",  # a quiet period: the notice window opens
        "INSERT celery_deactivate_taskfailure",  # the object (an upsert)
        # committed: did an outage start meanwhile, how many objects failed (up to the
        # threshold), the sums of the window: one read
        "SELECT celery_deactivate_taskstate",
    ]
    assert own(sql[1]) == [
        "SELECT celery_deactivate_taskstate",
        "INSERT celery_deactivate_historyevent",
        "INSERT celery_deactivate_taskfailure",  # its notice waits for the digest
        "SELECT celery_deactivate_taskstate",
    ]
    judged = next(s for s in sql[1][::-1] if "celery_deactivate_taskstate" in s)
    assert "celery_deactivate_taskfailure" in judged and "celery_deactivate_taskruns" in judged
    assert len(mail.outbox) == 1  # the first, at once
    assert TaskFailure.objects.get(object_pk=str(second.pk)).notice_pending


def test_during_an_outage_a_failure_costs_less_than_a_deactivation() -> None:
    table = feeds(6, "fail")
    for feed in table[:5]:
        apply(outage_tasks.guarded, feed.pk)
    assert _guard.outage_of(outage_tasks.guarded) is not None

    sql = statements(lambda: apply(outage_tasks.guarded, table[5].pk))

    assert own(sql) == ["SELECT celery_deactivate_taskstate"]  # counted in memory
    assert not any(quoted("active") in s for s in sql if s.startswith("UPDATE"))  # not the object's


def test_a_failure_is_counted_by_one_upsert_without_an_error_on_every_backend(
    conf: Callable[..., None], caplog: pytest.LogCaptureFixture
) -> None:
    # Issue #19: MySQL and MariaDB refused the upsert's conflict target (NotSupportedError): every
    # failure logged an ERROR, even with the guard off, and no failure row was ever written.
    first, second, third = feeds(3, "fail")
    conf(deactivate_outage_objects=0)  # tasks.poll: the guard off, the notice window on
    with caplog.at_level(logging.ERROR, logger="celery_deactivate"):
        apply(outage_tasks.guarded, first.pk)  # its row written...
        Feed.objects.filter(pk=first.pk).update(active=True, error=False)
        apply(outage_tasks.guarded, first.pk)  # ...then updated in place
        apply(tasks.poll, second.pk)  # notified at once
        apply(tasks.poll, third.pk)  # its notice deferred to the digest: a row for it

    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors and all(r.name == "celery.app.trace" for r in errors)  # Celery's, not ours
    rows = TaskFailure.objects.filter(task=outage_tasks.guarded.name)
    assert [row.object_pk for row in rows] == [str(first.pk)]
    assert rows[0].error == "Boom: feed 0 is broken" and rows[0].deactivated_at is not None
    pending = TaskFailure.objects.filter(task=tasks.poll.name, notice_pending=True)
    assert [row.object_pk for row in pending] == [str(third.pk)]


def test_the_tables_hold_the_shared_state() -> None:
    table = feeds(5, "fail")
    for feed in table:
        apply(outage_tasks.guarded, feed.pk)

    state = TaskState.objects.get(task=outage_tasks.guarded.name)
    assert state.outage_started_at is not None
    failures = TaskFailure.objects.filter(task=outage_tasks.guarded.name)
    assert {row.object_pk for row in failures} == {str(feed.pk) for feed in table}
    assert all(row.deactivated_at is None and not row.notice_pending for row in failures)
    runs = TaskRuns.objects.filter(task=outage_tasks.guarded.name)
    assert not runs.exists()  # counted in memory: written every FLUSH_EVERY s, and at exit
    _guard.write_counts_at_exit()
    assert sum(row.runs for row in runs) == sum(row.failures for row in runs) == 5
