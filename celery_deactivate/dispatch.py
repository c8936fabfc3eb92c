"""Fan-out: enqueue one task message per active object, in constant memory.

    poll.dispatch_active()                      # every active Feed, one message each
    poll.dispatch_active(Feed.objects.filter(kind="rss"), queue="feeds")
    poll.dispatch_active(shards=8)              # 8 range tasks, run by any worker

Primary keys are streamed in key order with keyset pagination (``pk > last``, ``batch_size`` at a
time), never as model instances, so memory stays flat whatever the table size.  Each message is
sent by the task's own ``apply_async((pk,), producer=producer, add_to_parent=False, **options)``
over one producer, so it is exactly the message a ``.delay()`` loop sends: the same routing, the
result backend's ``on_task_call``, the publish retry policy, the ``before_task_publish`` /
``after_task_publish`` signals and sent events.

Where the transport can buffer publishes (kombu's ``Producer.batch()``, kombu 5.7+; on Redis a
non-transactional pipeline), each page of keys is published inside one batch: one round trip per
page instead of one per message.  Elsewhere (older kombu, transports without batching, a Redis
connection configured to retry commands) every message is published as it is sent.  Inside a
batch the publish retry policy covers each ``apply_async`` call, which only buffers the message;
the write of the buffer is kombu's and is not replayed: if it fails, kombu raises
``BatchPublishError`` (delivery of the buffered messages uncertain) and the fan-out stops there.
Also inside a batch, a page's later messages do not ask kombu to declare again the queue its
first message declared (unless ``task_routes`` may route them elsewhere): see
``_route_is_fixed()``.

Sharded mode splits the key space into ``shards`` ranges and sends one
``celery_deactivate.dispatch_range`` message per range: the workers enqueue in parallel.  Integer
keys are split by value, every other key type (UUID, string...) at equal counts in key order.
:func:`schedule_entry` is a ready ``beat_schedule`` entry that runs the fan-out periodically.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from celery import Celery
from django.db.models import F, ForeignKey, IntegerField, Max, Min, Model, QuerySet, Window
from django.db.models.fields import Field
from django.db.models.functions import RowNumber

if TYPE_CHECKING:
    from .target import Target

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DISPATCH_ACTIVE_TASK",
    "DISPATCH_RANGE_TASK",
    "FanOutTask",
    "active_queryset",
    "dispatch_active",
    "dispatch_active_sharded",
    "dispatch_range",
    "iter_pk_batches",
    "publish_pks",
    "schedule_entry",
    "shard_ranges",
]

#: Primary keys read, and messages buffered, per round trip.
DEFAULT_BATCH_SIZE = 1000
#: The internal task that runs a whole fan-out (what :func:`schedule_entry` schedules).
DISPATCH_ACTIVE_TASK = "celery_deactivate.dispatch_active"
#: The internal task that dispatches one key range of a sharded fan-out.
DISPATCH_RANGE_TASK = "celery_deactivate.dispatch_range"

PkRange = tuple[Any, Any]


@runtime_checkable
class FanOutTask(Protocol):
    """What the fan-out needs of a task (a ``DeactivatingTask`` is one)."""

    @property
    def name(self) -> str: ...

    @property
    def app(self) -> Celery: ...

    @property
    def target(self) -> Target:
        """The model the task works on and its fields by role."""
        ...

    def apply_async(
        self,
        args: tuple[Any, ...] | None = ...,
        kwargs: dict[str, Any] | None = ...,
        task_id: str | None = ...,
        producer: Any = ...,
        *,
        add_to_parent: bool = ...,
    ) -> Any: ...


# -- which objects ------------------------------------------------------------------------------


def active_queryset(task: FanOutTask, queryset: QuerySet[Any] | None = None) -> QuerySet[Any]:
    """``queryset`` (default: every row of the task's model) restricted to active objects."""
    target = task.target
    if queryset is None:
        queryset = target.model._default_manager.all()
    elif not issubclass(queryset.model, target.model):
        raise TypeError(
            f"{task.name} works on {target.label}; got a queryset of {queryset.model._meta.label}"
        )
    if queryset.query.is_sliced:
        raise ValueError("dispatch_active streams the queryset by key: pass it unsliced")
    active: QuerySet[Any] = queryset.filter(**{target.active: True})
    return active


def iter_pk_batches(
    queryset: QuerySet[Any],
    batch_size: int = DEFAULT_BATCH_SIZE,
    pk_range: PkRange = (None, None),
) -> Iterator[list[Any]]:
    """Primary keys of ``queryset`` in key order, ``batch_size`` at a time (keyset pagination).

    ``pk_range`` is ``(lo, hi)``: ``lo <= pk < hi``, ``None`` for an open end.  A bound may come
    as a message carried it (a UUID as a string, say): it is converted with the primary key
    field's ``to_python``.  Each page is one ``WHERE pk > last ORDER BY pk LIMIT batch_size``
    query, so no server cursor is held and memory does not grow with the table.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    to_python = _pk_field(queryset.model).to_python
    lo, hi = (None if bound is None else to_python(bound) for bound in pk_range)
    keys = queryset.order_by("pk").values_list("pk", flat=True)
    if lo is not None:
        keys = keys.filter(pk__gte=lo)
    if hi is not None:
        keys = keys.filter(pk__lt=hi)
    page = keys
    while True:
        pks = list(page[:batch_size])
        if pks:
            yield pks
        if len(pks) < batch_size:
            return
        page = keys.filter(pk__gt=pks[-1])


# -- dispatching --------------------------------------------------------------------------------


def dispatch_active(
    task: FanOutTask,
    queryset: QuerySet[Any] | None = None,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    shards: int | None = None,
    **apply_async_options: Any,
) -> int:
    """Enqueue one message of ``task`` per active object of ``queryset``; return how many.

    ``queryset`` defaults to every object of the task's model; only active ones are sent, in key
    order, ``batch_size`` per database query and per publish round trip.  ``apply_async_options``
    (``queue``, ``priority``, ``countdown``...) apply to every message.  With ``shards=N`` the
    work is split into N key ranges dispatched by workers (see :func:`dispatch_active_sharded`),
    and the number of range messages is returned instead.
    """
    if shards is not None:
        if queryset is not None:
            raise ValueError(
                "sharded mode dispatches the task's whole model (workers re-read each range); "
                "filter without shards, or override the model's default manager"
            )
        return dispatch_active_sharded(task, shards, batch_size=batch_size, **apply_async_options)
    return dispatch_range(
        task, (None, None), queryset=queryset, batch_size=batch_size, **apply_async_options
    )


def dispatch_range(
    task: FanOutTask,
    pk_range: PkRange,
    *,
    queryset: QuerySet[Any] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    **apply_async_options: Any,
) -> int:
    """Enqueue one message per active object with ``lo <= pk < hi``; return how many."""
    batches = iter_pk_batches(active_queryset(task, queryset), batch_size, pk_range)
    return publish_pks(task, batches, batch_size=batch_size, **apply_async_options)


def publish_pks(
    task: FanOutTask,
    batches: Iterator[list[Any]],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    **apply_async_options: Any,
) -> int:
    """Send ``task`` once per primary key with ``apply_async``, over one producer; return how many.

    Each list of keys is published in one kombu batch where the transport supports it.
    """
    apply_async = task.apply_async  # once: a @shared_task proxy resolves it on every access
    count = 0
    with task.app.producer_or_acquire() as producer:
        # Feature-detected: kombu 5.7 added Producer.batch() and supports_batch_publish (Celery
        # 5.3 and 5.5 ship kombu releases without them), and not every transport buffers.
        batching = bool(getattr(producer, "supports_batch_publish", False))
        declared_once = batching and _route_is_fixed(task.app, apply_async_options)
        for pks in batches:
            with producer.batch(max_size=max(batch_size, 1)) if batching else nullcontext():
                for i, pk in enumerate(pks):
                    declare: dict[str, Any] = {"declare": []} if i and declared_once else {}
                    apply_async(
                        (pk,),
                        producer=producer,
                        add_to_parent=False,
                        **declare,
                        **apply_async_options,
                    )
            count += len(pks)
    return count


def _route_is_fixed(app: Celery, options: Mapping[str, Any]) -> bool:
    """Whether every message of a page can rely on the queue its first message declared.

    Celery asks kombu to declare a message's queue on every publish.  kombu's ``maybe_declare``
    sends the declaration once per connection, but binds a copy of the queue to the channel on
    every call to look it up: a fifth of the fan-out's CPU per message.  Inside a batch, the
    page's first message declares the queue as ``apply_async`` does and the others pass
    ``declare=[]`` (``Producer.publish``'s argument, which ``apply_async`` forwards): they only
    join the buffer on the same connection, and a failed write ends the fan-out rather than
    reconnecting mid-page.  Messages are unchanged; ``before_task_publish`` receivers see
    ``declare=[]`` for them.  Only where the route cannot change between messages: no
    ``task_routes`` (a router may route on the arguments), no ``router`` or ``declare`` option.
    """
    return not (app.conf.task_routes or "router" in options or "declare" in options)


# -- sharding -----------------------------------------------------------------------------------


def shard_ranges(queryset: QuerySet[Any], shards: int) -> list[PkRange]:
    """Split ``queryset``'s keys into at most ``shards`` contiguous ``(lo, hi)`` ranges.

    ``lo <= pk < hi``; the first range has ``lo=None`` and the last ``hi=None``, so every key,
    even one inserted meanwhile, falls in exactly one range.  Integer keys are split evenly between
    ``Min(pk)`` and ``Max(pk)`` (one aggregate query).  Other keys (UUID, string: PostgreSQL has no
    ``MIN``/``MAX`` for ``uuid``) are split at equal counts in key order: one count, then one query
    that numbers the keys in order (``ROW_NUMBER()``) and returns those at the boundaries.
    """
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ValueError(f"shards must be an integer >= 1, got {shards!r}")
    keys = queryset.order_by()
    edges: list[Any]
    if isinstance(_pk_field(queryset.model), IntegerField):
        bounds = keys.aggregate(lo=Min("pk"), hi=Max("pk"))
        lo, hi = bounds["lo"], bounds["hi"]
        if lo is None:
            return [(None, None)]
        step = -(-(hi - lo + 1) // shards)
        edges = [lo + i * step for i in range(1, shards) if lo + i * step <= hi]
    else:
        total = keys.count()
        # The first key of each later shard, by its 1-based position in key order.
        rows = sorted({total * i // shards + 1 for i in range(1, shards)} - {1})
        edges = (
            list(
                keys.annotate(row=Window(RowNumber(), order_by=F("pk").asc()))
                .filter(row__in=rows)
                .order_by("pk")
                .values_list("pk", flat=True)
            )
            if rows
            else []
        )
    points = [None, *edges, None]
    return [(points[i], points[i + 1]) for i in range(len(points) - 1)]


def _pk_field(model: type[Model]) -> Field[Any, Any]:
    """The field that holds ``model``'s key values (a multi-table child's key is its parent's)."""
    field: Field[Any, Any] = model._meta.pk
    while isinstance(field, ForeignKey):  # a OneToOneField parent link
        field = field.target_field
    return field


def dispatch_active_sharded(
    task: FanOutTask,
    shards: int,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    **apply_async_options: Any,
) -> int:
    """Send one ``celery_deactivate.dispatch_range`` message per key range; return how many.

    Any worker runs them (the internal tasks are registered by this app's ``AppConfig``), each
    enqueueing the active objects of its range with :func:`dispatch_range`.  The bounds travel as
    the task serializer carries them and are converted back with the key field's ``to_python``.
    The ``apply_async_options`` are for the object messages and must be serializable.
    """
    app = task.app
    ranges = shard_ranges(active_queryset(task), shards)
    range_task = app.tasks[DISPATCH_RANGE_TASK]
    with app.producer_or_acquire() as producer:
        for lo, hi in ranges:
            range_task.apply_async(
                (task.name, lo, hi),
                {"batch_size": batch_size, "options": apply_async_options},
                producer=producer,
            )
    return len(ranges)


# -- periodic -----------------------------------------------------------------------------------


def schedule_entry(
    task: FanOutTask | str,
    schedule: Any,
    *,
    shards: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    entry_options: Mapping[str, Any] | None = None,
    **apply_async_options: Any,
) -> dict[str, Any]:
    """A ``beat_schedule`` entry that runs ``dispatch_active`` for ``task`` every ``schedule``.

        app.conf.beat_schedule = {
            "poll-feeds": schedule_entry(poll, 600.0, shards=4, entry_options={"expires": 600}),
        }

    ``schedule`` is anything beat accepts (seconds, ``timedelta``, ``crontab``).  The entry runs
    the internal task ``celery_deactivate.dispatch_active`` on a worker; ``entry_options`` are the
    entry's own ``options`` (e.g. ``expires`` so that missed fan-outs do not pile up), and
    ``apply_async_options`` apply to every object message.
    """
    name = task if isinstance(task, str) else task.name
    entry: dict[str, Any] = {
        "task": DISPATCH_ACTIVE_TASK,
        "schedule": schedule,
        "args": (name,),
        "kwargs": {
            "shards": shards,
            "batch_size": batch_size,
            "options": dict(apply_async_options),
        },
    }
    if entry_options:
        entry["options"] = dict(entry_options)
    return entry


def task_named(app: Celery, name: str) -> FanOutTask:
    """The registered deactivating task ``name`` of ``app`` (for the internal tasks)."""
    task = app.tasks[name]
    if not isinstance(task, FanOutTask):
        raise TypeError(f"{name} is not a DeactivatingTask: it has no model to fan out over")
    return task
