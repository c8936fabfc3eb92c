"""Fan-out: enqueue one task message per active object, fast, in constant memory.

    poll.dispatch_active()                      # every active Feed, one message each
    poll.dispatch_active(Feed.objects.filter(kind="rss"), queue="feeds")
    poll.dispatch_active(shards=8)              # 8 range tasks, run by any worker

Primary keys are streamed in key order with keyset pagination (``pk > last``, ``batch_size`` at a
time), never as model instances, so memory stays flat whatever the table size.  Every batch is
published over one producer connection.  When the transport buffers publishes (kombu's
``Producer.batch()``: a non-transactional Redis pipeline), each batch goes out in one round trip,
and the messages are built once per object by Celery's own ``create_task_message`` /
``send_task_message``, so they are exactly what ``apply_async`` sends (signals and sent events
included).  Options the fast path does not reproduce (``countdown``, ``eta``, ``expires``,
``link``...) and transports without batching use ``apply_async`` per object.

Sharded mode splits the key space into ``shards`` ranges and sends one
``celery_deactivate.dispatch_range`` message per range: the workers enqueue in parallel.
:func:`schedule_entry` is a ready ``beat_schedule`` entry that runs the fan-out periodically.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from celery import Task, signals
from celery.utils.nodenames import anon_nodename
from django.db.models import Max, Min, QuerySet
from kombu import Queue
from kombu.common import Broadcast
from kombu.utils.uuid import uuid

if TYPE_CHECKING:
    from .task import DeactivatingTask

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DISPATCH_ACTIVE_TASK",
    "DISPATCH_RANGE_TASK",
    "active_queryset",
    "dispatch_active",
    "dispatch_active_sharded",
    "dispatch_range",
    "iter_pk_batches",
    "schedule_entry",
    "shard_ranges",
]

#: Primary keys read, and messages buffered, per round trip.
DEFAULT_BATCH_SIZE = 1000
#: The internal task that runs a whole fan-out (what :func:`schedule_entry` schedules).
DISPATCH_ACTIVE_TASK = "celery_deactivate.dispatch_active"
#: The internal task that dispatches one key range of a sharded fan-out.
DISPATCH_RANGE_TASK = "celery_deactivate.dispatch_range"

#: ``apply_async`` options the fast path reproduces exactly; any other one takes ``apply_async``.
FAST_OPTIONS = frozenset(
    {
        "queue",
        "routing_key",
        "exchange",
        "exchange_type",
        "priority",
        "serializer",
        "compression",
        "delivery_mode",
        "time_limit",
        "soft_time_limit",
        "ignore_result",
    }
)

PkRange = tuple[Any, Any]


# -- which objects ------------------------------------------------------------------------------


def active_queryset(task: DeactivatingTask, queryset: QuerySet[Any] | None = None) -> QuerySet[Any]:
    """``queryset`` (default: every row of the task's model) restricted to active objects."""
    target = task._target()
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

    ``pk_range`` is ``(lo, hi)``: ``lo <= pk < hi``, ``None`` for an open end.  Each page is one
    ``WHERE pk > last ORDER BY pk LIMIT batch_size`` query, so no server cursor is held and memory
    does not grow with the table.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    lo, hi = pk_range
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
    task: DeactivatingTask,
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
    task: DeactivatingTask,
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
    task: Any,
    batches: Iterator[list[Any]],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    **apply_async_options: Any,
) -> int:
    """Send ``task`` once per primary key, over one producer; pipelined where kombu can."""
    task = getattr(task, "_get_current_object", lambda: task)()  # a @shared_task proxy
    app = task._get_app()
    count = 0
    with app.producer_or_acquire() as producer:
        batching = bool(getattr(producer, "supports_batch_publish", False))
        send = (
            _fast_sender(task, producer, apply_async_options) if batching else None
        ) or _ordinary_sender(task, producer, apply_async_options)
        for pks in batches:
            if batching:
                with producer.batch(max_size=max(batch_size, 1)):
                    for pk in pks:
                        send(pk)
            else:
                for pk in pks:
                    send(pk)
            count += len(pks)
    return count


def _ordinary_sender(task: Any, producer: Any, options: Mapping[str, Any]) -> Callable[[Any], None]:
    options = {"add_to_parent": False, **options}

    def send(pk: Any) -> None:
        task.apply_async((pk,), producer=producer, **options)

    return send


def _fast_sender(
    task: Any, producer: Any, options: Mapping[str, Any]
) -> Callable[[Any], None] | None:
    """What ``apply_async((pk,), **options)`` does to send, with the per-call work done once.

    Returns ``None`` (use ``apply_async``) whenever an option or a task feature would make the
    message differ: options outside :data:`FAST_OPTIONS`, eager mode, message protocol 1, a
    custom ``shadow_name``, pydantic arguments.  The result backend's ``on_task_call`` is not
    called: nobody holds these results (that changes no message).
    """
    app = task._get_app()
    conf = app.conf
    if (
        set(options) - FAST_OPTIONS
        or conf.task_always_eager
        or conf.task_protocol != 2
        or getattr(task, "__v2_compat__", False)
        or type(task).shadow_name is not Task.shadow_name
        or getattr(task, "_dump_pydantic_arguments", None) is not None
    ):
        return None
    amqp = app.amqp
    name = task.name
    # Task.apply_async, then Celery.send_task, up to create_task_message.
    merged = dict(task._get_exec_options(), **options)
    merged.setdefault("ignore_result", task.ignore_result)
    time_limit = merged.pop("time_limit", None)
    soft_time_limit = merged.pop("soft_time_limit", None)
    merged.pop("expires", None)
    ignore_result = merged.pop("ignore_result", None)
    router = amqp.router
    static_route = not router.routes
    routed = router.route(dict(merged), name, (), {}, task) if static_route else None
    parent = app.current_worker_task
    root_id = parent_id = None
    if parent:
        root_id = parent.request.root_id or parent.request.id
        parent_id = parent.request.id
        if conf.task_inherit_parent_priority:
            merged.setdefault("priority", parent.request.delivery_info.get("priority"))
            routed = router.route(dict(merged), name, (), {}, task) if static_route else None
    reply_to = app.thread_oid
    send_sent_event = conf.task_send_sent_event
    origin = anon_nodename()
    check_arguments = getattr(task, "__header__", None) if task.typing else None
    create = amqp.create_task_message
    observed = send_sent_event or any(
        signal.receivers
        for signal in (
            signals.before_task_publish,
            signals.after_task_publish,
            signals.task_sent,
        )
    )
    static_plan = None if routed is None or observed else _publish_plan(app, routed)
    publish = producer.publish
    declared: set[str] = set()

    def message(pk: Any, route: Mapping[str, Any]) -> Any:
        return create(
            uuid(),
            name,
            (pk,),
            {},
            None,
            None,
            None,
            None,
            None,
            0,
            None,
            None,
            None,
            reply_to,
            time_limit,
            soft_time_limit,
            send_sent_event,
            root_id,
            parent_id,
            None,
            None,
            ignore_result=ignore_result,
            replaced_task_nesting=0,
            origin=origin,
            argsrepr=f"({pk},)" if type(pk) is int else None,
            kwargsrepr="{}",
            **route,
        )

    def declare(queues: list[Any]) -> None:
        for queue in queues:
            if queue.name not in declared:  # send_task_message declares it on every call
                producer.maybe_declare(queue)
                declared.add(queue.name)

    if static_plan is not None:
        # Nothing observes publishing: send_task_message's routing is resolved once, and each
        # message goes straight to Producer.publish with the same arguments.
        route, queues, options = static_plan
        declare(queues)

        def send_planned(pk: Any) -> None:
            if check_arguments is not None:
                check_arguments(pk)
            headers, properties, body, _ = message(pk, route)
            properties.update(options)
            publish(body, headers=headers, **properties)

        return send_planned

    def send(pk: Any) -> None:
        args = (pk,)
        if check_arguments is not None:
            check_arguments(*args)
        route = routed if routed is not None else router.route(dict(merged), name, args, {}, task)
        queue = route.get("queue")
        if isinstance(queue, str):
            queue = amqp.queues[queue]
        if isinstance(queue, Queue) and not isinstance(queue, Broadcast):
            declare([queue])
        route_options = dict(route)
        route_options.pop("stamped_headers", None)
        # retry=False: inside a batch the publish only buffers; the pipeline flush is the I/O.
        amqp.send_task_message(
            producer, name, message(pk, route), declare=[], retry=False, **route_options
        )

    return send


#: ``send_task_message`` parameters that are not message properties.
_SEND_PARAMETERS = frozenset(
    {
        "queue",
        "exchange",
        "routing_key",
        "event_dispatcher",
        "retry",
        "retry_policy",
        "serializer",
        "delivery_mode",
        "compression",
        "declare",
        "headers",
        "exchange_type",
        "timeout",
        "confirm_timeout",
        "stamped_headers",
    }
)


def _publish_plan(
    app: Any, route: Mapping[str, Any]
) -> tuple[Mapping[str, Any], list[Any], dict[str, Any]]:
    """``send_task_message``'s arguments to ``Producer.publish``, for a fixed route.

    Returns the route (for ``create_task_message``), the queues to declare, and the publish
    keyword arguments; the same resolution as celery.app.amqp's ``send_task_message``.
    """
    amqp, conf = app.amqp, app.conf
    queue = route.get("queue")
    exchange = route.get("exchange")
    routing_key = route.get("routing_key")
    delivery_mode = route.get("delivery_mode")
    exchange_type = route.get("exchange_type")
    qname = queue
    if queue is None and exchange is None:
        queue = amqp.default_queue
    if queue is not None:
        if isinstance(queue, str):
            qname, queue = queue, amqp.queues[queue]
        else:
            qname = queue.name
    if delivery_mode is None:
        delivery_mode = getattr(getattr(queue, "exchange", None), "delivery_mode", None)
        delivery_mode = delivery_mode or conf.task_default_delivery_mode
    if exchange_type is None:
        exchange_type = getattr(getattr(queue, "exchange", None), "type", None) or "direct"
    if (not exchange or not routing_key) and exchange_type == "direct":
        exchange, routing_key = "", qname
    elif exchange is None:
        exchange = getattr(getattr(queue, "exchange", None), "name", None) or amqp.default_exchange
        routing_key = (
            routing_key or getattr(queue, "routing_key", None) or conf.task_default_routing_key
        )
    queues = [queue] if queue and not isinstance(queue, Broadcast) else []
    options = {key: value for key, value in route.items() if key not in _SEND_PARAMETERS}
    options.update(
        exchange=exchange,
        routing_key=routing_key,
        serializer=route.get("serializer") or conf.task_serializer,
        compression=route.get("compression") or conf.task_compression,
        # The publish only buffers inside a batch: the pipeline flush is the I/O, not retried.
        retry=False,
        retry_policy=dict(conf.task_publish_retry_policy),
        delivery_mode=delivery_mode,
        declare=[],
        timeout=None,
        confirm_timeout=None,
    )
    return route, queues, options


# -- sharding -----------------------------------------------------------------------------------


def shard_ranges(queryset: QuerySet[Any], shards: int) -> list[PkRange]:
    """Split ``queryset``'s keys into at most ``shards`` contiguous ``(lo, hi)`` ranges.

    ``lo <= pk < hi``; the first range has ``lo=None`` and the last ``hi=None``, so every key,
    even one inserted meanwhile, falls in exactly one range.  Integer keys are split evenly between
    ``Min(pk)`` and ``Max(pk)`` (one aggregate query); other keys at equal counts (one query per
    boundary).
    """
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ValueError(f"shards must be an integer >= 1, got {shards!r}")
    keys = queryset.order_by()
    bounds = keys.aggregate(lo=Min("pk"), hi=Max("pk"))
    lo, hi = bounds["lo"], bounds["hi"]
    if lo is None:
        return [(None, None)]
    edges: list[Any] = []
    if isinstance(lo, int) and isinstance(hi, int):
        step = -(-(hi - lo + 1) // shards)
        edges = [lo + i * step for i in range(1, shards) if lo + i * step <= hi]
    else:
        total = keys.count()
        ordered = keys.order_by("pk").values_list("pk", flat=True)
        for i in range(1, shards):
            edge = ordered[total * i // shards]
            if not edges or edge > edges[-1]:
                edges.append(edge)
    points = [None, *edges, None]
    return [(points[i], points[i + 1]) for i in range(len(points) - 1)]


def dispatch_active_sharded(
    task: DeactivatingTask,
    shards: int,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    **apply_async_options: Any,
) -> int:
    """Send one ``celery_deactivate.dispatch_range`` message per key range; return how many.

    Any worker runs them (the internal tasks are registered by this app's ``AppConfig``), each
    enqueueing the active objects of its range with :func:`dispatch_range`.  The
    ``apply_async_options`` are for the object messages and must be serializable.
    """
    app = task._get_app()  # type: ignore[attr-defined]  # celery.Task's, untyped here
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
    task: Any,
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


def task_named(app: Any, name: str) -> DeactivatingTask:
    """The registered deactivating task ``name`` of ``app`` (for the internal tasks)."""
    task = app.tasks[name]
    if not callable(getattr(task, "_target", None)):
        raise TypeError(f"{name} is not a DeactivatingTask: it has no model to fan out over")
    return task  # type: ignore[no-any-return]
