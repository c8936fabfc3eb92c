"""Each object's history (issue #20): one event per state change, by cause, in the change's
transaction; pruned by ``celery_deactivate.maintain`` in bounded batches."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from io import StringIO
from typing import Any, get_args

import pytest
from celery import Celery
from django.contrib.auth.models import User
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import transaction
from django.test import Client
from django.utils import timezone

from celery_deactivate import DeactivatingTask, _guard, _history, probes, services
from celery_deactivate.exceptions import DeactivateConfigError
from celery_deactivate.models import HistoryEvent
from celery_deactivate.signals import object_deactivated
from celery_deactivate.tasks import maintain, maintain_history
from tests.conftest import staff_client as staff
from tests.conftest import statements
from tests.testapp import outage_tasks, tasks
from tests.testapp.models import Feed, ProxyFeed

pytestmark = pytest.mark.django_db(transaction=True)


def history(feed: Feed) -> list[tuple[str, str, str, str]]:
    """The object's events, oldest first: ``(kind, cause, task, actor)``."""
    rows = HistoryEvent.objects.filter(model="testapp.Feed", object_pk=str(feed.pk))
    return list(rows.order_by("at", "id").values_list("kind", "cause", "task", "actor"))


def later(seconds: float) -> Any:
    return timezone.now() + timedelta(seconds=seconds)


# -- one event per cause ------------------------------------------------------------------------


def test_a_failure_that_deactivates_records_the_task_its_id_and_the_error(eager: Celery) -> None:
    feed = Feed.objects.create(title="b", behaviour="fail")

    result = tasks.poll.delay(feed.pk)

    event = HistoryEvent.objects.get(object_pk=str(feed.pk))
    assert (event.model, event.kind, event.cause) == ("testapp.Feed", "deactivated", "failure")
    assert (event.task, event.task_id) == (tasks.poll.name, result.id)
    assert event.error == "Boom: b is broken" and event.actor == ""
    deactivated_at = Feed.objects.get(pk=feed.pk).deactivated_at
    assert deactivated_at is not None and abs(event.at - deactivated_at) < timedelta(seconds=5)


def test_a_failure_below_the_threshold_and_a_success_record_nothing(eager: Celery) -> None:
    feed = Feed.objects.create(title="b", behaviour="fail")
    tasks.poll_after3.delay(feed.pk)  # counted, not deactivated
    Feed.objects.filter(pk=feed.pk).update(behaviour="ok")
    tasks.poll_after3.delay(feed.pk)  # a success: the count reset
    assert history(feed) == []


def test_the_error_is_cut_to_its_documented_length() -> None:
    feed = Feed.objects.create(title="f")
    services.deactivate(Feed, feed.pk, exception=ValueError("x" * 5000))
    error = HistoryEvent.objects.get(object_pk=str(feed.pk)).error
    assert len(error) == _history.ERROR_LENGTH and error.endswith("…")
    assert error.startswith("ValueError: xxx")
    assert len(Feed.objects.get(pk=feed.pk).error_message) > 5000  # the object keeps it all


def test_by_hand_in_code_by_a_user_and_by_the_command() -> None:
    feed = Feed.objects.create(title="f")
    ops = User.objects.create_user("ops")

    services.deactivate(Feed, feed.pk, by=ops, exception="maintenance window")
    services.reactivate(Feed, feed.pk)  # code that does not say who
    feed.deactivate()
    call_command("deactivated", "testapp.Feed", "--reactivate", str(feed.pk), stdout=None)

    assert history(feed) == [
        ("deactivated", "hand", "", "ops"),
        ("reactivated", "hand", "", ""),
        ("deactivated", "hand", "", ""),
        ("reactivated", "hand", "", "command"),
    ]
    first = HistoryEvent.objects.filter(object_pk=str(feed.pk)).order_by("at", "id")[0]
    assert (first.actor_id, first.error) == (str(ops.pk), "maintenance window")


def test_the_admin_actions_name_the_user() -> None:
    feed = Feed.objects.create(title="f")
    user = User.objects.create_superuser("alice", "alice@example.com", "secret")
    client = Client()
    client.force_login(user)

    for action in ("deactivate_selected", "reactivate_selected"):
        client.post("/admin/testapp/feed/", {"action": action, "_selected_action": [feed.pk]})

    assert history(feed) == [
        ("deactivated", "hand", "", "alice"),
        ("reactivated", "hand", "", "alice"),
    ]
    assert set(HistoryEvent.objects.values_list("actor_id", flat=True)) == {str(user.pk)}


def test_a_proxy_shares_its_model_s_history() -> None:
    feed = Feed.objects.create(title="f")
    services.deactivate(ProxyFeed, feed.pk, fields={"error": None})
    assert history(feed) == [("deactivated", "hand", "", "")]


def test_probes_sent_failed_and_the_re_activation(eager: Celery) -> None:
    feed = Feed.objects.create(title="flaky", behaviour="fail")
    tasks.poll_cooldown.delay(feed.pk)

    assert probes.maintain(eager, now=later(61)) == 1  # the probe fails
    Feed.objects.filter(pk=feed.pk).update(behaviour="ok")
    assert probes.maintain(eager, now=later(10_000)) == 1  # the next one succeeds

    name = tasks.poll_cooldown.name
    assert history(feed) == [
        ("deactivated", "failure", name, ""),
        ("probe_sent", "probe", name, ""),
        ("probe_failed", "probe", name, ""),
        ("probe_sent", "probe", name, ""),
        ("reactivated", "probe", name, ""),
    ]
    rows = list(HistoryEvent.objects.filter(object_pk=str(feed.pk)).order_by("at", "id"))
    assert rows[1].task_id and rows[1].task_id == rows[2].task_id  # the probe's own id
    assert rows[3].task_id == rows[4].task_id != rows[1].task_id
    assert rows[2].error == "Boom: flaky is broken"


def test_deactivating_by_hand_an_object_waiting_for_its_probe(eager: Celery) -> None:
    feed = Feed.objects.create(title="flaky", behaviour="fail")
    tasks.poll_cooldown.delay(feed.pk)
    services.deactivate(Feed, feed.pk, by="command")
    assert history(feed)[-1] == ("probes_off", "hand", "", "command")


def test_a_probe_that_could_not_be_sent_says_so(eager: Celery) -> None:
    # What send_due_probes does when apply_async raises (the broker is down): the claim given
    # back, and the history says why.
    feed = Feed.objects.create(title="flaky", behaviour="fail")
    tasks.poll_cooldown.delay(feed.pk)
    target, now = tasks.poll_cooldown.target, later(61)
    task, task_id = tasks.poll_cooldown, "probe-1"

    assert probes.claim_probe(
        target, feed.pk, now, now, using="default", task=task, task_id=task_id
    )
    error = ConnectionRefusedError("the broker is down")
    assert probes.release_probe(
        target, feed.pk, now, using="default", task=task, task_id=task_id, error=error
    )

    rows = list(HistoryEvent.objects.filter(object_pk=str(feed.pk)).order_by("at", "id"))
    assert [(e.kind, e.task_id) for e in rows[1:]] == [
        ("probe_sent", task_id),
        ("probe_failed", task_id),
    ]
    assert rows[-1].error == "not sent: ConnectionRefusedError: the broker is down"
    assert Feed.objects.get(pk=feed.pk).probing_since is None


def test_an_outage_its_victims_and_its_end(celery_app: Celery) -> None:
    task = outage_tasks.guarded  # 5 objects at 50 %, from the first run
    table = [Feed.objects.create(title=f"feed {n}", behaviour="fail") for n in range(5)]
    for feed in table:
        task.apply((feed.pk,))
    assert _guard.outage_of(task) is not None

    # Its victims: deactivated by their failure, re-activated by the guard.
    for feed in table[:4]:
        assert history(feed) == [
            ("deactivated", "failure", task.name, ""),
            ("reactivated", "outage", task.name, ""),
        ]
    # The upstream is back: successes dilute the window's failures, maintain ends it.
    Feed.objects.update(behaviour="ok")
    for feed in table * 2:
        task.apply((feed.pk,))
    _guard.write_counts_at_exit()
    maintain.apply()
    assert _guard.outage_of(task) is None

    outage = HistoryEvent.objects.filter(task=task.name, object_pk="").order_by("at", "id")
    assert [(e.kind, e.cause, e.model) for e in outage] == [
        ("outage_started", "outage", "testapp.Feed"),
        ("outage_ended", "outage", "testapp.Feed"),
    ]
    assert outage[0].error == "Boom: feed 4 is broken"


# -- in the change's transaction --------------------------------------------------------------


def test_an_event_goes_with_a_change_that_rolls_back() -> None:
    feed = Feed.objects.create(title="f")

    seen = []

    def change_then_fail() -> None:
        with transaction.atomic():
            services.deactivate(Feed, feed.pk)
            seen.extend(history(feed))  # in the transaction
            raise RuntimeError("the caller's transaction fails")

    with pytest.raises(RuntimeError):
        change_then_fail()

    assert seen == [("deactivated", "hand", "", "")]

    assert Feed.objects.get(pk=feed.pk).active is True
    assert history(feed) == []


def test_a_receiver_that_raises_keeps_the_change_and_its_event() -> None:
    feed = Feed.objects.create(title="f")

    def broken(**kwargs: Any) -> None:
        raise ValueError("receiver bug")

    object_deactivated.connect(broken, weak=False, dispatch_uid="history-broken")
    try:
        services.deactivate(Feed, feed.pk)
    finally:
        object_deactivated.disconnect(dispatch_uid="history-broken")

    assert Feed.objects.get(pk=feed.pk).active is False  # the receivers' savepoint only
    assert history(feed) == [("deactivated", "hand", "", "")]


def test_the_success_path_writes_no_event(eager: Celery) -> None:
    feed = Feed.objects.create(title="ok")
    sql = statements(lambda: tasks.poll.delay(feed.pk))
    assert not [s for s in sql if "historyevent" in s]
    assert not HistoryEvent.objects.exists()


# -- pruning -------------------------------------------------------------------------------------


@pytest.fixture
def old_and_new() -> tuple[int, int]:
    """12 events older than 90 days, 3 newer."""
    now = timezone.now()
    rows = [
        HistoryEvent(
            at=now - timedelta(days=100, minutes=n),
            model="testapp.Feed",
            object_pk=str(n),
            kind="deactivated",
            cause="hand",
        )
        for n in range(12)
    ]
    rows += [
        HistoryEvent(
            at=now - timedelta(days=89),
            model="testapp.Feed",
            object_pk="x",
            kind="reactivated",
            cause="hand",
        )
        for _ in range(3)
    ]
    HistoryEvent.objects.bulk_create(rows)
    return 12, 3


def test_pruning_deletes_in_bounded_batches(
    old_and_new: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_history, "PRUNE_BATCH", 5)
    monkeypatch.setattr(_history, "PRUNE_BATCHES", 2)

    sql = statements(lambda: _history.prune("default", 90))

    deletes = [s for s in sql if s.upper().startswith("DELETE")]
    assert len(deletes) == 2  # 2 batches of 5: the run's bound
    assert HistoryEvent.objects.count() == 15 - 10
    assert _history.prune("default", 90) == 2  # the rest, next run
    assert set(HistoryEvent.objects.values_list("object_pk", flat=True)) == {"x"}


def test_maintain_prunes_after_the_configured_days(
    old_and_new: tuple[int, int], celery_app: Celery, conf: Callable[..., None]
) -> None:
    assert maintain_history(celery_app) == 12
    assert HistoryEvent.objects.count() == 3
    conf(deactivate_history_days=30)
    assert maintain_history(celery_app) == 3
    maintain.apply()
    assert not HistoryEvent.objects.exists()


def test_the_days_are_a_worker_wide_setting(celery_app: Celery, conf: Callable[..., None]) -> None:
    conf(deactivate_history_days=0)
    with pytest.raises(DeactivateConfigError, match="days > 0"):
        maintain_history(celery_app)
    app = Celery("history-tests", set_as_current=False)
    app.finalize()

    def body(pk: int) -> None: ...

    with pytest.raises(DeactivateConfigError, match="is a worker-wide setting"):
        app.task(
            base=DeactivatingTask, model=Feed, lazy=False, shared=False, deactivate_history_days=7
        )(body)


def test_every_kind_and_cause_has_its_words() -> None:
    assert set(_history.KINDS) == set(get_args(_history.Kind))
    assert set(_history.CAUSES) == set(get_args(_history.Cause))


# -- shown: the admin's change page and changelist, the command ---------------------------------


def test_the_change_page_shows_the_newest_events_and_links_to_all() -> None:
    feed = Feed.objects.create(title="f")
    other = Feed.objects.create(title="other")
    services.deactivate(Feed, other.pk, exception="not this one")
    for n in range(12):  # 24 events, the last one a deactivation with an error
        services.deactivate(Feed, feed.pk, by="command", exception=f"error {n}")
        if n < 11:
            services.reactivate(Feed, feed.pk, by="command")
    services.reactivate(Feed, feed.pk)
    client = staff("viewer", "view_feed")

    html = client.get(f"/admin/testapp/feed/{feed.pk}/change/").content.decode()

    table = html[html.index('<table class="deactivation-history">') :]
    table = table[: table.index("</table>")]
    kinds = [part.split('"')[0] for part in table.split('data-kind="')[1:]]
    assert len(kinds) == 20  # bounded, the newest first
    assert kinds[:3] == ["reactivated", "deactivated", "reactivated"]
    assert "re-activated by hand" in table and "error 11" in table and "not this one" not in table
    link = f"/admin/celery_deactivate/historyevent/?model=testapp.Feed&amp;object_pk={feed.pk}"
    assert f'<a href="{link}">All events</a>' in html

    # The link lists them all, for a user who may view feeds.
    listing = client.get(link.replace("&amp;", "&"))
    assert listing.status_code == 200
    assert listing.context["cl"].result_count == 24


def test_the_history_list_shows_only_the_models_a_user_may_view() -> None:
    feed = Feed.objects.create(title="f")
    services.deactivate(Feed, feed.pk)
    url = "/admin/celery_deactivate/historyevent/"

    assert staff("nobody").get(url).status_code == 403
    assert staff("viewer", "view_feed").get(url).context["cl"].result_count == 1
    other = staff("other", "view_renamed")
    assert other.get(url).context["cl"].result_count == 0  # nothing of the feeds
    assert staff("auditor", "view_historyevent").get(url).context["cl"].result_count == 1
    index = staff("viewer2", "view_feed").get("/admin/").content.decode()
    assert url in index
    event = HistoryEvent.objects.get()
    assert other.get(f"{url}{event.pk}/change/").status_code in (302, 403)


def test_a_change_page_without_events() -> None:
    feed = Feed.objects.create(title="f")
    html = staff("viewer", "view_feed").get(f"/admin/testapp/feed/{feed.pk}/change/")
    assert "No event recorded." in html.content.decode()


def test_the_command_lists_an_object_s_history(eager: Celery) -> None:
    feed = Feed.objects.create(title="b", behaviour="fail")
    result = tasks.poll.delay(feed.pk)
    call_command("deactivated", "testapp.Feed", "--reactivate", str(feed.pk), stdout=StringIO())

    out = StringIO()
    call_command("deactivated", "testapp.Feed", str(feed.pk), "--history", stdout=out)
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["WHEN", "WHAT", "BY", "ERROR"]
    assert "re-activated by hand" in lines[1] and "command" in lines[1]
    assert "deactivated by a failure" in lines[2]
    assert f"{tasks.poll.name}[{result.id}]" in lines[2] and "Boom: b is broken" in lines[2]
    assert lines[-1] == f"2 events of testapp.Feed pk={feed.pk}."

    out = StringIO()
    call_command("deactivated", "testapp.Feed", str(feed.pk), "--history", "--json", stdout=out)
    document = json.loads(out.getvalue())
    assert (document["model"], document["pk"], document["count"]) == ("testapp.Feed", feed.pk, 2)
    first, second = document["events"]
    assert (first["kind"], first["cause"], first["actor"]) == ("reactivated", "hand", "command")
    assert (second["kind"], second["task_id"], second["error"]) == (
        "deactivated",
        result.id,
        "Boom: b is broken",
    )


def test_the_command_s_history_needs_a_model_and_a_pk() -> None:
    with pytest.raises(CommandError, match="PK --history"):
        call_command("deactivated", "testapp.Feed", "--history")
    with pytest.raises(CommandError, match="PK --history"):
        call_command("deactivated", "testapp.Feed", "1")
    with pytest.raises(CommandError, match="not a testapp.Feed primary key"):
        call_command("deactivated", "testapp.Feed", "x", "--history")
