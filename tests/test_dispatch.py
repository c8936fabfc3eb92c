"""Fan-out: every active object exactly once, as ordinary messages a real worker executes."""

from __future__ import annotations

import json
from typing import Any

import pytest
from celery import Celery
from django.conf import settings

from celery_deactivate import dispatch
from tests.conftest import wait_for
from tests.testapp import tasks
from tests.testapp.models import Feed

pytestmark = pytest.mark.django_db(transaction=True)

#: Several messages run at once on the two worker threads.  On SQLite's default (deferred)
#: transactions, two bodies that read then write deadlock into "database is locked", which the
#: task counts as a failure: those tests need PostgreSQL (CI) or transaction_mode=IMMEDIATE.
concurrent_worker = pytest.mark.skipif(
    settings.DATABASES["default"]["ENGINE"].endswith("sqlite3")
    and settings.DATABASES["default"].get("OPTIONS", {}).get("transaction_mode") != "IMMEDIATE",
    reason="concurrent read-then-write transactions on SQLite (deferred mode) raise "
    "'database is locked'; run with DATABASE_URL (PostgreSQL)",
)


def make_feeds(active: int, inactive: int) -> tuple[list[int], list[int]]:
    on = [Feed.objects.create(title=f"on {i}").pk for i in range(active)]
    off = [Feed.objects.create(title=f"off {i}", active=False).pk for i in range(inactive)]
    return on, off


def polls() -> dict[int, int]:
    return dict(Feed.objects.values_list("pk", "polls"))


def all_polled(pks: list[int]) -> bool:
    counts = polls()
    return all(counts[pk] >= 1 for pk in pks)


@concurrent_worker
@pytest.mark.usefixtures("worker")
def test_every_active_object_exactly_once_executed_by_a_worker() -> None:
    on, off = make_feeds(7, 3)

    sent = tasks.poll.dispatch_active(batch_size=3)

    assert sent == 7
    wait_for(lambda: all_polled(on))
    counts = polls()
    assert [counts[pk] for pk in on] == [1] * 7
    assert [counts[pk] for pk in off] == [0] * 3


@concurrent_worker
@pytest.mark.usefixtures("worker")
def test_a_given_queryset_is_honoured_and_restricted_to_active() -> None:
    on, off = make_feeds(4, 2)
    chosen = Feed.objects.filter(pk__in=[on[0], on[2], off[0]])

    sent = dispatch.dispatch_active(tasks.poll, chosen)

    assert sent == 2
    wait_for(lambda: all_polled([on[0], on[2]]))
    counts = polls()
    assert (counts[on[1]], counts[on[3]], counts[off[0]]) == (0, 0, 0)


def test_keyset_batches_cover_every_key_once_in_order() -> None:
    on, _ = make_feeds(10, 2)
    batches = list(dispatch.iter_pk_batches(dispatch.active_queryset(tasks.poll), 4))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert [pk for b in batches for pk in b] == sorted(on)


def test_wrong_model_queryset_is_rejected() -> None:
    from tests.testapp.models import RecipeObject

    with pytest.raises(TypeError, match="testapp.Feed"):
        dispatch.dispatch_active(tasks.poll, RecipeObject.objects.all())


def test_shard_ranges_cover_every_active_pk_exactly_once() -> None:
    on, _ = make_feeds(23, 5)
    Feed.objects.filter(pk__in=on[5:9]).delete()  # gaps in the keys
    active = sorted(set(on) - set(on[5:9]))
    queryset = dispatch.active_queryset(tasks.poll)
    for shards in (1, 2, 3, 7, 50):
        ranges = dispatch.shard_ranges(queryset, shards)
        assert len(ranges) <= shards
        assert ranges[0][0] is None and ranges[-1][1] is None
        seen = [
            pk
            for pk_range in ranges
            for batch in dispatch.iter_pk_batches(queryset, 5, pk_range)
            for pk in batch
        ]
        assert sorted(seen) == active and len(seen) == len(set(seen))


@concurrent_worker
@pytest.mark.usefixtures("worker")
def test_sharded_mode_dispatches_through_range_tasks_on_a_worker() -> None:
    on, off = make_feeds(9, 2)

    assert tasks.poll.dispatch_active(shards=3, batch_size=2) == 3

    wait_for(lambda: all_polled(on))
    counts = polls()
    assert [counts[pk] for pk in on] == [1] * 9
    assert [counts[pk] for pk in off] == [0, 0]


@concurrent_worker
@pytest.mark.usefixtures("worker")
def test_the_beat_entry_runs_the_fan_out(celery_app: Celery) -> None:
    on, off = make_feeds(5, 1)
    entry = dispatch.schedule_entry(tasks.poll, 600.0, shards=2, entry_options={"expires": 600})
    assert entry["task"] == "celery_deactivate.dispatch_active"
    assert entry["schedule"] == 600.0 and entry["options"] == {"expires": 600}

    # What beat does with an entry: send its task with its args, kwargs and options.
    celery_app.send_task(entry["task"], entry["args"], entry["kwargs"], **entry["options"])

    wait_for(lambda: all_polled(on))
    counts = polls()
    assert [counts[pk] for pk in on] == [1] * 5 and counts[off[0]] == 0


def _raw_messages(celery_app: Celery, queue: str) -> list[dict[str, Any]]:
    with celery_app.connection_for_write() as conn:
        client = conn.default_channel.client
        raw = client.lrange(queue, 0, -1)
        client.delete(queue)
    return [json.loads(item) for item in reversed(raw)]


@pytest.mark.parametrize(
    "options",
    [{}, {"priority": 6}, {"time_limit": 30, "soft_time_limit": 20}, {"queue": "cd_other"}],
)
def test_redis_fast_path_message_is_the_message_apply_async_sends(
    celery_app: Celery, options: dict[str, Any]
) -> None:
    if not celery_app.conf.broker_url.startswith("redis://"):
        pytest.skip("the fast path pipelines Redis publishes; the broker here is not Redis")
    queue = options.get("queue", "cd_compare")
    options = {"queue": queue, **options}
    # A queue name with priorities lives in several lists: read them all.
    keys = [queue] + [f"{queue}\x06\x16{p}" for p in (3, 6, 9)]
    for key in keys:
        _raw_messages(celery_app, key)
    feed = Feed.objects.create(title="one")

    tasks.poll.apply_async((feed.pk,), **options)
    assert dispatch.dispatch_active(tasks.poll, Feed.objects.filter(pk=feed.pk), **options) == 1

    found = [m for key in keys for m in _raw_messages(celery_app, key)]
    assert len(found) == 2
    ordinary, fast = found
    varying = {"id", "root_id"}
    assert {k: v for k, v in fast["headers"].items() if k not in varying} == {
        k: v for k, v in ordinary["headers"].items() if k not in varying
    }
    assert fast["headers"]["root_id"] == fast["headers"]["id"]
    assert fast["body"] == ordinary["body"]  # base64 of the same JSON: args, kwargs, embed
    assert fast["content-type"] == ordinary["content-type"]
    assert fast["content-encoding"] == ordinary["content-encoding"]
    props_fast, props_ordinary = fast["properties"], ordinary["properties"]
    for props in (props_fast, props_ordinary):
        assert props.pop("correlation_id")
        assert props.pop("delivery_tag")
    assert props_fast == props_ordinary
