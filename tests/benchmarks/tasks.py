"""The tasks measured, all on ``testapp.Feed`` with the same body: get, (wait), increment, save.

Four paths (see :mod:`tests.benchmarks.scenarios`): ``ok`` succeeds, ``fail`` raises after the
save, ``io`` succeeds after sleeping 5 ms between the read and the save, as a body that calls
another service would, and ``mix`` raises on the feeds marked broken (one in twenty) and succeeds
on the others.  Five kinds:

- ``plain``: a Celery task, no guarantee.
- ``recipe``: the cookbook recipe the library replaces (docs/recipe.md), ported to Python 3: an
  atomic inner function, try/except, a full ``save()`` to deactivate, ``mail_admins``, re-raise.
- ``peer``: the recipe plus the guarantee the drop-in gives, written by hand: inside the
  recipe's transaction, the body is skipped unless the object is active (one more statement,
  as the drop-in's read before the body is one more statement than the recipe's).
- ``deactivating``: ``DeactivatingTask`` as a drop-in, the body fetches its object.
- ``object``: ``DeactivatingTask`` with ``deactivate_pass_object=True``, the body receives it.

Only the library's public API is used: ``base=DeactivatingTask``, options as task keywords,
``task.dispatch_active()``.  The worker children count their tasks, failures, queries and RSS
into a shared stats file (see :mod:`tests.benchmarks.stats`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from django.core.mail import mail_admins
from django.db import transaction

from celery_deactivate import DeactivatingTask
from tests.benchmarks import stats
from tests.benchmarks.app import app
from tests.testapp.models import Feed

#: Seconds the ``io`` body waits, as an I/O call would.
IO_SECONDS = 0.005


class Boom(ValueError):
    """The failure of the failing variants."""


def body(feed: Feed, fail: bool = False, wait: float = 0.0) -> int:
    fail = fail or feed.behaviour == "fail"  # the mix path's broken feeds
    if wait:
        time.sleep(wait)
    feed.polls += 1
    feed.save()
    if fail:
        raise Boom(f"{feed.title} is broken")
    return feed.pk


# -- plain: no guarantees ---------------------------------------------------------------------


@app.task(name="bench.plain_ok")
def plain_ok(pk: int) -> int:
    return body(Feed.objects.get(pk=pk))


@app.task(name="bench.plain_fail")
def plain_fail(pk: int) -> int:
    return body(Feed.objects.get(pk=pk), fail=True)


@app.task(name="bench.plain_io")
def plain_io(pk: int) -> int:
    return body(Feed.objects.get(pk=pk), wait=IO_SECONDS)


@app.task(name="bench.plain_mix")
def plain_mix(pk: int) -> int:
    return body(Feed.objects.get(pk=pk))


# -- the recipe, and the recipe with the drop-in's guarantee written by hand ------------------


def deactivate(obj: Feed, error: Any = None) -> None:
    """The recipe's ``Object.deactivate``: flags, then a full ``save()``."""
    if error:
        obj.error = True
    obj.active = False
    obj.save()


@transaction.atomic
def _manage_object(pk: int, fail: bool, wait: float) -> int:
    return body(Feed.objects.get(pk=pk), fail, wait)


@transaction.atomic
def _manage_active_object(pk: int, fail: bool, wait: float) -> int | None:
    if not Feed.objects.filter(pk=pk, active=True).exists():
        return None  # deactivated meanwhile: what the drop-in guarantees
    return body(Feed.objects.get(pk=pk), fail, wait)


def _recipe(
    manage: Callable[[int, bool, float], int | None], pk: int, fail: bool = False, wait: float = 0.0
) -> int | None:
    try:
        return manage(pk, fail, wait)
    except BaseException as exc:
        obj = Feed.objects.get(pk=pk)
        deactivate(obj, error=type(exc))
        mail_admins(
            "Object deactivate on error", f"'{obj.title}' deactivated bc an error occurred.\n"
        )
        raise


@app.task(name="bench.recipe_ok")
def recipe_ok(pk: int) -> int | None:
    return _recipe(_manage_object, pk)


@app.task(name="bench.recipe_fail")
def recipe_fail(pk: int) -> int | None:
    return _recipe(_manage_object, pk, fail=True)


@app.task(name="bench.recipe_io")
def recipe_io(pk: int) -> int | None:
    return _recipe(_manage_object, pk, wait=IO_SECONDS)


@app.task(name="bench.peer_ok")
def peer_ok(pk: int) -> int | None:
    return _recipe(_manage_active_object, pk)


@app.task(name="bench.peer_fail")
def peer_fail(pk: int) -> int | None:
    return _recipe(_manage_active_object, pk, fail=True)


@app.task(name="bench.peer_io")
def peer_io(pk: int) -> int | None:
    return _recipe(_manage_active_object, pk, wait=IO_SECONDS)


@app.task(name="bench.recipe_mix")
def recipe_mix(pk: int) -> int | None:
    return _recipe(_manage_object, pk)


@app.task(name="bench.peer_mix")
def peer_mix(pk: int) -> int | None:
    return _recipe(_manage_active_object, pk)


# -- DeactivatingTask -------------------------------------------------------------------------


@app.task(name="bench.deactivating_ok", base=DeactivatingTask, model=Feed)
def deactivating_ok(pk: int) -> int:
    return body(Feed.objects.get(pk=pk))


#: The failure path (every object fails) compares per-object deactivation with the recipe: no
#: outage guard (it would stop deactivating), the notice window at its default as users run it.
#: The guard's own figures: ``python -m tests.benchmarks.outage``; the defaults with the guard on:
#: the ``mix`` path.
PER_OBJECT = {"deactivate_outage_objects": 0}


@app.task(name="bench.deactivating_fail", base=DeactivatingTask, model=Feed, **PER_OBJECT)
def deactivating_fail(pk: int) -> int:
    return body(Feed.objects.get(pk=pk), fail=True)


@app.task(name="bench.deactivating_io", base=DeactivatingTask, model=Feed)
def deactivating_io(pk: int) -> int:
    return body(Feed.objects.get(pk=pk), wait=IO_SECONDS)


@app.task(name="bench.object_ok", base=DeactivatingTask, model=Feed, deactivate_pass_object=True)
def object_ok(feed: Feed) -> int:
    return body(feed)


@app.task(
    name="bench.object_fail",
    base=DeactivatingTask,
    model=Feed,
    deactivate_pass_object=True,
    **PER_OBJECT,
)
def object_fail(feed: Feed) -> int:
    return body(feed, fail=True)


@app.task(name="bench.object_io", base=DeactivatingTask, model=Feed, deactivate_pass_object=True)
def object_io(feed: Feed) -> int:
    return body(feed, wait=IO_SECONDS)


# The library's defaults (the guard and the notice window on) on a table 5 % of which is broken.


@app.task(name="bench.deactivating_mix", base=DeactivatingTask, model=Feed)
def deactivating_mix(pk: int) -> int:
    return body(Feed.objects.get(pk=pk))


@app.task(name="bench.object_mix", base=DeactivatingTask, model=Feed, deactivate_pass_object=True)
def object_mix(feed: Feed) -> int:
    return body(feed)


# -- harness ----------------------------------------------------------------------------------


@app.task(name="bench.gate")
def gate(path: str) -> None:
    """Hold one pool child until ``path`` exists (the runner queues a scenario meanwhile)."""
    open(f"{path}.started.{os.getpid()}", "w").close()
    while not os.path.exists(path):
        time.sleep(0.0005)


stats.connect(measured=lambda name: name.startswith("bench.") and name != "bench.gate")


@app.task(name="bench.fanout_target", base=DeactivatingTask, model=Feed, queue="bench_fanout")
def fanout_target(pk: int) -> int:
    """What the fan-out enqueues (into a queue no worker consumes during the benchmark)."""
    return body(Feed.objects.get(pk=pk))
