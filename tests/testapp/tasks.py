"""Tasks of the test project.  Each body does what its feed's ``behaviour`` says."""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Any

from celery import current_task
from django.db import IntegrityError, transaction
from django.db.models import Count, F

from celery_deactivate import DeactivatingTask
from tests.celery_app import app

from .models import (
    ActiveOnlyFeed,
    Entry,
    Feed,
    HiddenFeed,
    KeyedFeed,
    NarrowFeed,
    ProxyFeed,
    RecipeObject,
    Renamed,
    SpecialFeed,
    UuidFeed,
)

#: Lines of the "huge" behaviour's exception text (15 characters each: about 5 MB).
HUGE_LINES = 350_000
#: A file name that is not UTF-8, decoded as Python decodes file names: a lone surrogate in it.
UNDECODABLE_NAME = os.fsdecode(b"caf\xe9.xml")


class Boom(ValueError):
    """The deterministic failure of a broken object."""


class Transient(Exception):
    """A failure worth retrying."""


class Unprintable(Exception):
    """An exception whose text cannot be rendered."""

    def __str__(self) -> str:
        raise RuntimeError("this exception cannot be rendered")


def _swallow_a_database_error(obj: Any) -> None:
    """What a careless body does: catch an IntegrityError without a savepoint and go on."""
    with contextlib.suppress(IntegrityError):
        type(obj)._base_manager.create(pk=obj.pk, title="duplicate")


def work(obj: Any) -> Any:
    """Write inside the task's transaction, then behave as the object says."""
    behaviour = getattr(obj, "behaviour", "fail" if obj.title.startswith("bad") else "ok")
    if behaviour == "deactivated_by_hand":  # an operator deactivates it while the body runs
        obj.deactivate()
    if behaviour == "fail_fast":  # before any write: the failure's own statements come first
        raise Boom(f"{obj.title} is broken")
    if isinstance(obj, Feed):
        Entry.objects.create(feed=obj, text="polled")
        Feed.objects.filter(pk=obj.pk).update(polls=F("polls") + 1)
    if behaviour == "fail":
        raise Boom(f"{obj.title} is broken")
    if behaviour == "unprintable":
        raise Unprintable("secret")
    if behaviour == "nul":
        raise Boom("upstream sent a NUL \x00 byte")
    if behaviour == "surrogate":  # a file name that is not UTF-8, as os.fsdecode gives it
        raise Boom(f"cannot parse {UNDECODABLE_NAME}")
    if behaviour == "huge":  # an upstream that answers with megabytes of text
        raise Boom("the upstream answered:\n" + "<p>garbage</p>\n" * HUGE_LINES)
    if behaviour == "swallow":
        _swallow_a_database_error(obj)
    if behaviour == "set_rollback":
        transaction.set_rollback(True)
    if behaviour == "lookup":
        raise LookupError(f"{obj.title} not found upstream")
    if behaviour == "transient":
        raise Transient(f"{obj.title} timed out")
    if behaviour == "kill":  # the pool child dies as under the OOM killer
        os.kill(os.getpid(), signal.SIGKILL)
    return obj.pk


@app.task(base=DeactivatingTask, model=Feed)
def poll(pk: int) -> Any:
    return work(Feed.objects.get(pk=pk))


@app.task(base=DeactivatingTask, model=NarrowFeed)
def poll_narrow(pk: int) -> Any:
    return work(NarrowFeed.objects.get(pk=pk))


@app.task(base=DeactivatingTask, model=Feed, deactivate_after=3)
def poll_after3(pk: int) -> Any:
    return work(Feed.objects.get(pk=pk))


@app.task(base=DeactivatingTask, model=Feed, deactivate_pass_object=True)
def poll_object(feed: Feed, suffix: str = "") -> Any:
    return work(feed)


@app.task(
    base=DeactivatingTask,
    model=Feed,
    autoretry_for=(Transient,),
    max_retries=2,
    default_retry_delay=0,
    retry_backoff=False,
)
def poll_autoretry(pk: int) -> Any:
    return work(Feed.objects.get(pk=pk))


@app.task(base=DeactivatingTask, model=Feed, bind=True, max_retries=1, default_retry_delay=0)
def poll_retry(self: DeactivatingTask, pk: int) -> Any:
    feed = Feed.objects.get(pk=pk)
    try:
        if feed.behaviour == "flaky_once" and self.request.retries == 0:
            raise Transient(f"{feed.title} timed out once")
        return work(feed)
    except Transient as exc:
        raise self.retry(exc=exc) from exc


@app.task(base=DeactivatingTask, model=Feed, dont_deactivate_on=(LookupError,))
def poll_selective(pk: int) -> Any:
    return work(Feed.objects.get(pk=pk))


@app.task(base=DeactivatingTask, model=Feed, deactivate_notify=False)
def poll_quiet(pk: int) -> Any:
    return work(Feed.objects.get(pk=pk))


@app.task(base=DeactivatingTask, model="testapp.RecipeObject")
def manage_object(pk: int) -> Any:
    return work(RecipeObject.objects.get(pk=pk))


@app.task(
    base=DeactivatingTask,
    model=Renamed,
    deactivate_fields={
        "active": "enabled",
        "error": "broken",
        "error_message": "last_error",
        "failure_count": "failures",
    },
)
def sync_renamed(pk: int) -> Any:
    return work(Renamed.objects.get(pk=pk))


@app.task(
    base=DeactivatingTask,
    model=Feed,
    deactivate_pass_object=True,
    autoretry_for=(Transient,),
    max_retries=1,
    default_retry_delay=0,
    retry_backoff=False,
)
def poll_object_autoretry(feed: Feed) -> Any:
    return work(feed)


class PollAnnotated(DeactivatingTask):
    """A class-based task whose ``get_queryset`` decides how the instance is loaded."""

    name = "tests.testapp.tasks.poll_annotated"
    model = Feed
    deactivate_pass_object = True

    def get_queryset(self, using: str) -> Any:
        return super().get_queryset(using).annotate(entry_count=Count("entries"))

    def run(self, feed: Feed) -> Any:
        Feed.objects.filter(pk=feed.pk).update(note=f"{feed.entry_count} entries")  # type: ignore[attr-defined]
        return work(feed)


poll_annotated = app.register_task(PollAnnotated())


@app.task(base=DeactivatingTask, model=UuidFeed)
def poll_uuid(pk: Any) -> Any:
    return work(UuidFeed.objects.get(pk=pk))


@app.task(base=DeactivatingTask, model=KeyedFeed)
def poll_keyed(pk: Any) -> Any:
    return work(KeyedFeed.objects.get(pk=pk))


@app.task(base=DeactivatingTask, model=ProxyFeed)
def poll_proxy(pk: Any) -> Any:
    return work(ProxyFeed.objects.get(pk=pk))


@app.task(base=DeactivatingTask, model=SpecialFeed)
def poll_special(pk: Any) -> Any:
    return work(SpecialFeed.objects.get(pk=pk))


@app.task(base=DeactivatingTask, model=HiddenFeed)
def poll_hidden(pk: Any) -> Any:
    return work(HiddenFeed.objects.get(pk=pk))


@app.task(base=DeactivatingTask, model=ActiveOnlyFeed)
def poll_active_only(pk: Any) -> Any:
    return work(ActiveOnlyFeed.objects.get(pk=pk))


@app.task(base=DeactivatingTask, model=Feed)
def current(pk: int) -> Any:
    """What Celery says runs (``celery.current_task``): its name and its request's arguments."""
    if not current_task:
        return None
    return current_task.name, list(current_task.request.args)


@app.task(base=DeactivatingTask, model=Feed, deactivate_atomic=False)
def poll_outside(pk: int) -> Any:
    return work(Feed.objects.get(pk=pk))


def _bump(pk: int) -> int:
    """A body that writes first, then reads."""
    Feed.objects.filter(pk=pk).update(polls=F("polls") + 1)
    return Feed.objects.get(pk=pk).polls


@app.task(base=DeactivatingTask, model=Feed)
def bump(pk: int) -> int:
    return _bump(pk)


@app.task
def bump_plain(pk: int) -> int:
    """The same body in a plain task, as a project would write it without the library."""
    with transaction.atomic():
        return _bump(pk)


@app.task(base=DeactivatingTask, model=Feed, deactivate_cooldown=60, deactivate_cooldown_max=300)
def poll_cooldown(pk: int) -> Any:
    return work(Feed.objects.get(pk=pk))
