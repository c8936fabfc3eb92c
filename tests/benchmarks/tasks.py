"""The tasks measured, all on ``testapp.Feed`` with the same body (get, increment, save).

The failing variants raise after the save.  ``recipe_*`` is ``../shared/recipe.txt`` ported to
Python 3: an atomic inner function, try/except, a full ``save()`` to deactivate, ``mail_admins``,
re-raise.  The worker children count their tasks, queries and RSS into a shared stats file (see
:mod:`tests.benchmarks.stats`).
"""

from __future__ import annotations

import os
import time
from typing import Any

from django.core.mail import mail_admins
from django.db import transaction

from celery_deactivate import DeactivatingTask
from tests.benchmarks import stats
from tests.benchmarks.app import app
from tests.testapp.models import Feed


class Boom(ValueError):
    """The failure of the failing variants."""


def body(feed: Feed, fail: bool) -> int:
    feed.polls += 1
    feed.save()
    if fail:
        raise Boom(f"{feed.title} is broken")
    return feed.pk


# -- plain: no guarantees ---------------------------------------------------------------------


@app.task(name="bench.plain_ok")
def plain_ok(pk: int) -> int:
    return body(Feed.objects.get(pk=pk), False)


@app.task(name="bench.plain_fail")
def plain_fail(pk: int) -> int:
    return body(Feed.objects.get(pk=pk), True)


# -- the recipe -------------------------------------------------------------------------------


def deactivate(obj: Feed, error: Any = None) -> None:
    """The recipe's ``Object.deactivate``: flags, then a full ``save()``."""
    if error:
        obj.error = True
    obj.active = False
    obj.save()


@transaction.atomic
def _manage_object(pk: int, fail: bool) -> int:
    return body(Feed.objects.get(pk=pk), fail)


def _recipe(pk: int, fail: bool) -> int:
    try:
        return _manage_object(pk, fail)
    except BaseException as exc:
        obj = Feed.objects.get(pk=pk)
        deactivate(obj, error=type(exc))
        mail_admins(
            "Object deactivate on error", f"'{obj.title}' deactivated bc an error occurred.\n"
        )
        raise


@app.task(name="bench.recipe_ok")
def recipe_ok(pk: int) -> int:
    return _recipe(pk, False)


@app.task(name="bench.recipe_fail")
def recipe_fail(pk: int) -> int:
    return _recipe(pk, True)


# -- DeactivatingTask -------------------------------------------------------------------------


@app.task(name="bench.deactivating_ok", base=DeactivatingTask, model=Feed)
def deactivating_ok(pk: int) -> int:
    return body(Feed.objects.get(pk=pk), False)


#: The failure scenarios compare per-object deactivation with the recipe: no outage guard (it
#: would stop deactivating after 10 failing objects) and one mail per deactivation, as the recipe.
#: The guard's own figures: ``python -m tests.benchmarks.outage``.
PER_OBJECT = {"deactivate_outage_objects": 0, "deactivate_notify_window": 0}


@app.task(name="bench.deactivating_fail", base=DeactivatingTask, model=Feed, **PER_OBJECT)
def deactivating_fail(pk: int) -> int:
    return body(Feed.objects.get(pk=pk), True)


@app.task(name="bench.object_ok", base=DeactivatingTask, model=Feed, deactivate_pass_object=True)
def object_ok(feed: Feed) -> int:
    return body(feed, False)


@app.task(
    name="bench.object_fail",
    base=DeactivatingTask,
    model=Feed,
    deactivate_pass_object=True,
    **PER_OBJECT,
)
def object_fail(feed: Feed) -> int:
    return body(feed, True)


# -- harness ----------------------------------------------------------------------------------


@app.task(name="bench.gate")
def gate(path: str) -> None:
    """Hold one pool child until ``path`` exists (the runner queues a scenario meanwhile)."""
    open(f"{path}.started.{os.getpid()}", "w").close()
    while not os.path.exists(path):
        time.sleep(0.0005)


@app.task(name="bench.noop")
def noop(pk: int) -> None:
    """The fan-out's target when no worker runs: never executed."""


stats.connect(measured=lambda name: name.startswith("bench.") and name not in {"bench.gate"})


@app.task(name="bench.fanout_target", base=DeactivatingTask, model=Feed, queue="bench_fanout")
def fanout_target(pk: int) -> int:
    """What the fan-out enqueues (into a queue no worker consumes during the benchmark)."""
    return body(Feed.objects.get(pk=pk), False)
