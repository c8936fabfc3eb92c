"""Fan-out: every active object exactly once, as ordinary messages a real worker executes."""

from __future__ import annotations

import copy
import json
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery, signals
from celery.backends.rpc import RPCBackend
from django.conf import settings
from django.db import connection
from django.db.models import Model
from django.test.utils import CaptureQueriesContext
from kombu import serialization

from celery_deactivate import DeactivatingTask, dispatch
from tests.conftest import wait_for
from tests.testapp import tasks
from tests.testapp.models import Feed, KeyedFeed, UuidFeed

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


#: The test models by key type, each with its task (``poll_uuid``'s and ``poll_keyed``'s bodies
#: write nothing: the worker's runs are counted through Celery's ``task_postrun`` signal).
KEY_TYPES = {
    "integer": (Feed, tasks.poll),
    "uuid": (UuidFeed, tasks.poll_uuid),
    "string": (KeyedFeed, tasks.poll_keyed),
}


def make_objects(model: type[Model], active: int, inactive: int) -> tuple[list[Any], list[Any]]:
    def create(i: int, is_active: bool) -> Any:
        extra = {"key": f"key-{i:03d}-{'on' if is_active else 'off'}"} if model is KeyedFeed else {}
        return model.objects.create(title=f"object {i}", active=is_active, **extra).pk

    on = [create(i, True) for i in range(active)]
    off = [create(active + i, False) for i in range(inactive)]
    return on, off


@pytest.fixture
def runs() -> Iterator[Counter[tuple[str, Any]]]:
    """``(task name, pk) -> how many times it ran to success`` on the in-thread worker."""
    counted: Counter[tuple[str, Any]] = Counter()
    lock = threading.Lock()

    def count(sender: Any = None, args: Any = (), state: Any = None, **kwargs: Any) -> None:
        if state == "SUCCESS" and args:
            with lock:
                counted[(sender.name, args[0])] += 1

    signals.task_postrun.connect(count, weak=False)
    yield counted
    signals.task_postrun.disconnect(count)


@pytest.fixture
def published() -> Iterator[list[dict[str, Any]]]:
    """What ``before_task_publish`` receivers see of each message, copied as it was sent."""
    seen: list[dict[str, Any]] = []

    def record(sender: Any = None, declare: Any = None, **kwargs: Any) -> None:
        fields = ("body", "exchange", "routing_key", "headers", "properties", "retry_policy")
        seen.append(
            {
                "sender": sender,
                "declare": [getattr(entity, "name", entity) for entity in declare or ()],
                **copy.deepcopy({field: kwargs[field] for field in fields}),
            }
        )

    signals.before_task_publish.connect(record, weak=False)
    yield seen
    signals.before_task_publish.disconnect(record)


def purge(celery_app: Celery, *queues: str) -> None:
    with celery_app.connection_for_write() as conn:
        for queue in queues:
            conn.default_channel.queue_purge(queue)


# -- which objects, in which order --------------------------------------------------------------


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


def test_keys_are_read_a_page_at_a_time_by_key_never_as_objects(
    celery_app: Celery, published: list[dict[str, Any]]
) -> None:
    # Flat memory: each page is one bounded query on the key column alone, the next page starts
    # after the last key seen (no OFFSET, no server cursor), and a page is published before the
    # next one is read.
    on, _ = make_feeds(10, 1)
    pk_column = connection.ops.quote_name(Feed._meta.pk.column)
    reads: list[tuple[str, int]] = []

    def pages() -> Iterator[list[Any]]:
        for batch in dispatch.iter_pk_batches(dispatch.active_queryset(tasks.poll), 4):
            reads.append(("read", len(published)))
            yield batch

    with CaptureQueriesContext(connection) as queries:
        sent = dispatch.publish_pks(tasks.poll, pages(), batch_size=4, queue="cd_pages")

    purge(celery_app, "cd_pages")
    assert sent == 10
    selects = [q["sql"] for q in queries.captured_queries]
    assert len(selects) == 3
    for sql in selects:
        columns = sql.split(" FROM ")[0]
        assert pk_column in columns and "," not in columns  # the key alone
        assert "LIMIT 4" in sql and "OFFSET" not in sql
    assert f"> {on[3]}" in selects[1] and f"> {on[7]}" in selects[2]
    assert [sent_before for _, sent_before in reads] == [0, 4, 8]
    assert [tuple(m["body"][0]) for m in published] == [(pk,) for pk in on]


def test_the_internal_tasks_fan_out_only_over_a_deactivating_task(celery_app: Celery) -> None:
    assert dispatch.task_named(celery_app, tasks.poll.name) is celery_app.tasks[tasks.poll.name]
    with pytest.raises(TypeError, match="not a DeactivatingTask"):
        dispatch.task_named(celery_app, "celery.backend_cleanup")


def test_wrong_model_queryset_is_rejected() -> None:
    from tests.testapp.models import RecipeObject

    with pytest.raises(TypeError, match="testapp.Feed"):
        dispatch.dispatch_active(tasks.poll, RecipeObject.objects.all())


# -- the messages -------------------------------------------------------------------------------

VARYING_HEADERS = {"id", "root_id"}


def comparable(sent: dict[str, Any]) -> dict[str, Any]:
    """A ``before_task_publish`` record without what differs between two sends of one message
    (the ids) and without ``declare``, which is not part of the message (see below)."""
    headers = {k: v for k, v in sent["headers"].items() if k not in VARYING_HEADERS}
    properties = {k: v for k, v in sent["properties"].items() if k != "correlation_id"}
    return {
        "sender": sent["sender"],
        "body": sent["body"],
        "exchange": sent["exchange"],
        "routing_key": sent["routing_key"],
        "headers": headers,
        "properties": properties,
        "retry_policy": sent["retry_policy"],
    }


def batching(celery_app: Celery) -> bool:
    with celery_app.producer_or_acquire() as producer:
        return bool(getattr(producer, "supports_batch_publish", False))


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"priority": 6},
        {"time_limit": 30, "soft_time_limit": 20},
        {"queue": "cd_other"},
        {"retry": False, "headers": {"x-origin": "test"}},
    ],
)
def test_a_dispatched_message_is_what_apply_async_sends(
    celery_app: Celery, published: list[dict[str, Any]], options: dict[str, Any]
) -> None:
    options = {"queue": "cd_compare", **options}
    queue = options["queue"]
    pks = [Feed.objects.create(title=f"feed {i}").pk for i in range(3)]

    for pk in pks:
        tasks.poll.apply_async((pk,), **options)
    assert dispatch.dispatch_active(tasks.poll, batch_size=2, **options) == 3

    purge(celery_app, queue)
    assert len(published) == 6
    ordinary, dispatched = published[:3], published[3:]
    assert [comparable(m) for m in dispatched] == [comparable(m) for m in ordinary]
    for message in dispatched:
        assert message["headers"]["root_id"] == message["headers"]["id"]
        assert message["properties"]["correlation_id"] == message["headers"]["id"]
    assert {m["headers"]["id"] for m in published} == {
        m["properties"]["correlation_id"] for m in published
    }
    assert len({m["headers"]["id"] for m in published}) == 6
    # apply_async declares the queue with every message; inside a batch (pages of 2 here) the
    # page's first message declares it and the others, buffered behind it, pass declare=[].
    assert [m["declare"] for m in ordinary] == [[queue]] * 3
    if batching(celery_app):
        assert [m["declare"] for m in dispatched] == [[queue], [], [queue]]
    else:
        assert [m["declare"] for m in dispatched] == [[queue]] * 3


def test_with_task_routes_every_message_declares_its_queue(
    celery_app: Celery, published: list[dict[str, Any]], conf: Any
) -> None:
    # A router may send each message elsewhere (it sees the arguments): nothing is skipped.
    conf(task_routes={"cd.unused": {"queue": "cd_unused"}})
    for i in range(3):
        Feed.objects.create(title=f"feed {i}")

    assert dispatch.dispatch_active(tasks.poll, batch_size=2, queue="cd_compare") == 3

    purge(celery_app, "cd_compare")
    assert [m["declare"] for m in published] == [["cd_compare"]] * 3


@pytest.mark.parametrize(
    "options",
    [{}, {"priority": 6}, {"time_limit": 30, "soft_time_limit": 20}, {"queue": "cd_other"}],
)
def test_options_reach_the_messages_on_the_wire(
    celery_app: Celery, options: dict[str, Any]
) -> None:
    if not celery_app.conf.broker_url.startswith("redis://"):
        pytest.skip("reads the Redis lists the messages land in; the broker here is not Redis")
    queue = options.get("queue", "cd_compare")
    options = {"queue": queue, **options}
    # A queue name with priorities lives in several lists: read them all.
    keys = [queue] + [f"{queue}\x06\x16{p}" for p in (3, 6, 9)]

    def raw_messages(key: str) -> list[dict[str, Any]]:
        with celery_app.connection_for_write() as conn:
            client = conn.default_channel.client
            raw = client.lrange(key, 0, -1)
            client.delete(key)
        return [json.loads(item) for item in reversed(raw)]

    for key in keys:
        raw_messages(key)
    feed = Feed.objects.create(title="one")

    tasks.poll.apply_async((feed.pk,), **options)
    assert dispatch.dispatch_active(tasks.poll, Feed.objects.filter(pk=feed.pk), **options) == 1

    found = [m for key in keys for m in raw_messages(key)]
    assert len(found) == 2
    ordinary, dispatched = found
    if "priority" in options:
        assert dispatched["properties"]["priority"] == options["priority"]
    if "time_limit" in options:
        assert dispatched["headers"]["timelimit"] == [30, 20]
    varying = {"id", "root_id"}
    assert {k: v for k, v in dispatched["headers"].items() if k not in varying} == {
        k: v for k, v in ordinary["headers"].items() if k not in varying
    }
    assert dispatched["body"] == ordinary["body"]  # base64 of the same JSON: args, kwargs, embed
    assert dispatched["content-type"] == ordinary["content-type"]
    assert dispatched["content-encoding"] == ordinary["content-encoding"]
    props_dispatched, props_ordinary = dispatched["properties"], ordinary["properties"]
    for props in (props_dispatched, props_ordinary):
        assert props.pop("correlation_id")
        assert props.pop("delivery_tag")
    assert props_dispatched == props_ordinary


class RecordingBackend(RPCBackend):
    """The rpc:// result backend, remembering every ``on_task_call`` it receives."""

    calls: list[str] = []

    def on_task_call(self, producer: Any, task_id: str) -> None:
        type(self).calls.append(task_id)
        super().on_task_call(producer, task_id)


def test_the_result_backend_hears_of_every_message(
    celery_app: Celery, published: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # An app of its own whose result backend is the recording rpc:// backend (the project's app
    # keeps its own backend); the messages go to a queue nobody consumes.  The environment's
    # CELERY_RESULT_BACKEND would take precedence over the app's backend= (Celery's rule).
    monkeypatch.delenv("CELERY_RESULT_BACKEND", raising=False)
    app = Celery(
        "cd-results",
        broker=celery_app.conf.broker_url,
        backend=f"{__name__}:RecordingBackend",
        set_as_current=False,
    )

    @app.task(base=DeactivatingTask, model=Feed, name="cd.poll_recorded", shared=False)
    def poll_recorded(pk: int) -> None:
        """Never run."""

    on, _ = make_feeds(5, 2)
    RecordingBackend.calls = []
    assert isinstance(app.backend, RecordingBackend)
    try:
        assert dispatch.dispatch_active(poll_recorded, batch_size=2, queue="cd_recorded") == 5
        assert (
            dispatch.dispatch_active(
                poll_recorded, batch_size=2, queue="cd_recorded", ignore_result=True
            )
            == 5
        )
    finally:
        with app.connection_for_write() as conn:
            conn.default_channel.queue_purge("cd_recorded")
        app.close()

    sent_ids = [m["headers"]["id"] for m in published]
    assert [m["body"][0][0] for m in published] == on + on
    # Celery calls on_task_call for a message whose result is kept, and only for those.
    assert RecordingBackend.calls == sent_ids[:5]
    assert [m["headers"]["ignore_result"] for m in published] == [False] * 5 + [True] * 5


# -- sharding -----------------------------------------------------------------------------------


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_shard_ranges_cover_every_active_key_exactly_once(key_type: str) -> None:
    model, task = KEY_TYPES[key_type]
    on, _ = make_objects(model, 23, 5)
    model.objects.filter(pk__in=on[5:9]).delete()  # gaps in the keys
    active = set(on) - set(on[5:9])
    queryset = dispatch.active_queryset(task)
    for shards in (1, 2, 3, 7, 50):
        ranges = dispatch.shard_ranges(queryset, shards)
        assert len(ranges) <= shards
        assert ranges[0][0] is None and ranges[-1][1] is None
        per_range = [
            [pk for batch in dispatch.iter_pk_batches(queryset, 5, pk_range) for pk in batch]
            for pk_range in ranges
        ]
        seen = [pk for keys in per_range for pk in keys]
        assert set(seen) == active and len(seen) == len(active)
        if key_type != "integer":  # split at equal counts: no shard is empty
            assert all(per_range)
        if shards in (2, 3):  # equal counts, or an even split of the integer key space
            assert max(map(len, per_range)) - min(map(len, per_range)) <= 3


def test_no_objects_is_one_open_range() -> None:
    for _, task in KEY_TYPES.values():
        assert dispatch.shard_ranges(dispatch.active_queryset(task), 4) == [(None, None)]


def test_a_range_bound_comes_back_from_json_as_the_key_it_was() -> None:
    on, _ = make_objects(UuidFeed, 6, 0)
    queryset = dispatch.active_queryset(tasks.poll_uuid)
    (_, edge), (lo, _) = dispatch.shard_ranges(queryset, 2)
    assert edge == lo and edge in on

    # What the range message carries through the JSON serializer, as the worker decodes it.
    content_type, encoding, data = serialization.dumps([edge], "json")
    (carried,) = serialization.loads(data, content_type, encoding)
    # Key order is the database's: MariaDB's uuid type orders UUIDs otherwise than Python does.
    ordered = list(UuidFeed.objects.order_by("pk").values_list("pk", flat=True))
    assert sorted(ordered) == sorted(on)
    # kombu 5.3+ restores a UUID; older ones, or a schedule stored as JSON, leave the string.
    for bound in (carried, str(edge)):
        keys = [
            pk for batch in dispatch.iter_pk_batches(queryset, 10, (bound, None)) for pk in batch
        ]
        assert keys == ordered[ordered.index(edge) :]


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
@pytest.mark.parametrize("key_type", ["uuid", "string"])
def test_sharded_fan_out_over_every_key_type_on_a_worker(
    key_type: str, runs: Counter[tuple[str, Any]], published: list[dict[str, Any]]
) -> None:
    model, task = KEY_TYPES[key_type]
    on, off = make_objects(model, 9, 2)

    assert task.dispatch_active(shards=3, batch_size=2) == 3

    expected = {(task.name, pk): 1 for pk in on}
    wait_for(lambda: sum(runs[key] for key in expected) >= len(on))
    assert {key: runs[key] for key in expected} == expected
    assert not any(runs[(task.name, pk)] for pk in off)
    ranges = [m["body"][0] for m in published if m["sender"] == dispatch.DISPATCH_RANGE_TASK]
    assert len(ranges) == 3 and ranges[0][1] is None and ranges[-1][2] is None


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


@concurrent_worker
@pytest.mark.usefixtures("worker")
@pytest.mark.parametrize("key_type", ["uuid", "string"])
def test_a_sharded_beat_entry_over_every_key_type(
    celery_app: Celery, key_type: str, runs: Counter[tuple[str, Any]]
) -> None:
    model, task = KEY_TYPES[key_type]
    on, off = make_objects(model, 7, 1)
    entry = dispatch.schedule_entry(task, 600.0, shards=3, batch_size=2)

    # The entry's arguments, and the range tasks' bounds after it, travel as JSON.
    celery_app.send_task(entry["task"], entry["args"], entry["kwargs"], serializer="json")

    expected = {(task.name, pk): 1 for pk in on}
    wait_for(lambda: sum(runs[key] for key in expected) >= len(on))
    assert {key: runs[key] for key in expected} == expected
    assert not runs[(task.name, off[0])]
