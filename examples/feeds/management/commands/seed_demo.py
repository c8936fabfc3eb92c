"""``manage.py seed_demo``: the example's feeds in every state the library shows, for the admin.

It migrates, replaces the example's feeds (and the library's rows of them: history, outage
guard) with five, and brings each to its state the way the library would, through its public
functions: ``poll`` runs (in this process, eagerly), ``celery_deactivate.probes.maintain`` (as
beat runs it) and ``celery_deactivate.services.deactivate``.  With
``--superuser NAME`` it also creates or updates a superuser of that name (password
``--password``, default the name).  ``make example-admin`` runs it with ``--superuser admin``.

========================  =============================================================
Morning Digest            active, polled (3 entries)
Kernel Notes              active again: failed, probed, re-activated by the probe: its
                          history holds all three
Night Owl Radio           deactivated by error (a date nobody can parse); probe in an hour
Garden Journal            deactivated by hand
Chess Weekly              probing: failed, its probe sent and waiting in the broker; a
                          worker runs it (its document is good again) and re-activates it
========================  =============================================================

For the runs here, in this process only (``poll``'s own options, which come before the
project's settings; a worker keeps the project's), the outage guard is off
(``deactivate_outage_objects = 0``: three feeds fail within seconds on purpose, an outage under
the example's settings), and the feeds that fail and are probed here have a cool-down of a
second instead of an hour, so that their probes are due at once.

It can be run again: it starts over, and purges the broker's queue of the probe an earlier run
left there.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandParser

from celery_deactivate import probes, services
from celery_deactivate.models import HistoryEvent, TaskFailure, TaskRuns, TaskState
from celery_deactivate.states import describe
from feeds.models import Feed
from feeds.samples import FEEDS, rss
from feeds.tasks import poll

#: Seconds of the cool-down of the feeds that fail and are probed here (the project's: an hour).
COOLDOWN = 1


@contextmanager
def app_conf(app: Any, **values: Any) -> Iterator[None]:
    """Celery settings of this process for a while (the worker's are the project's)."""
    saved = {key: app.conf.get(key) for key in values}
    app.conf.update(values)
    try:
        yield
    finally:
        app.conf.update(saved)


@contextmanager
def task_options(task: Any, **values: Any) -> Iterator[None]:
    """Options of ``task`` in this process for a while.  (Not ``app.conf``: Celery 5.3 reads the
    project's ``CELERY_DEACTIVATE_*`` settings before a value given to ``app.conf.update()``.)"""
    saved = {name: task.__dict__[name] for name in values if name in task.__dict__}
    for name, value in values.items():
        setattr(task, name, value)
    try:
        yield
    finally:
        for name in values:
            if name in saved:
                setattr(task, name, saved[name])
            else:
                delattr(task, name)


def eager(app: Any) -> Any:
    """Tasks run in this process, their failures stored in the result (``poll.delay()``)."""
    return app_conf(app, task_always_eager=True, task_eager_propagates=False)


class Command(BaseCommand):
    help = (
        "Migrate and fill the example with feeds in every state (active, deactivated by error "
        "with a probe scheduled, deactivated by hand, probing) and one feed's history (a "
        "failure, a probe, a re-activation); --superuser NAME adds a login."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--superuser", metavar="NAME", help="create or update this superuser")
        parser.add_argument("--password", help="the superuser's password (default: its name)")

    def handle(
        self, *args: Any, superuser: str | None, password: str | None, **options: Any
    ) -> None:
        call_command("migrate", verbosity=0)
        app = poll.app
        self.start_over(app)
        feeds = {
            title: Feed.objects.create(
                title=title, url=f"https://{slug}.example.com/rss", document=rss(title, slug, dates)
            )
            for title, slug, dates in FEEDS
        }
        kernel, owl, garden, chess = (
            feeds[title]
            for title in ("Kernel Notes", "Night Owl Radio", "Garden Journal", "Chess Weekly")
        )
        user = self.login(superuser, password or superuser) if superuser else None

        # The outage guard off, and a cool-down of a second: see the module's docstring
        with task_options(poll, deactivate_outage_objects=0, deactivate_cooldown=COOLDOWN):
            with eager(app):
                for feed in feeds.values():
                    if feed != owl:
                        poll.delay(feed.pk)  # polled: entries stored
                # Kernel Notes fails once; its probe (run here) re-activates it
                self.fail_once(kernel)
                probes.maintain(app)
            # Chess Weekly fails once; its probe goes to the broker and waits for a worker
            self.fail_once(chess)
            probes.maintain(app)
        with eager(app):
            poll.delay(owl.pk)  # a date nobody can parse: deactivated, a probe in an hour
        services.deactivate(Feed, garden.pk, by=user or "seed_demo")

        target = poll.target
        for feed in Feed.objects.order_by("pk"):
            self.stdout.write(f"{feed.title:<16}  {describe(target, feed)}")

    def start_over(self, app: Any) -> None:
        """The example's rows, and a probe an earlier run left in the broker, go."""
        Feed.objects.all().delete()  # their entries with them
        HistoryEvent.objects.filter(model="feeds.Feed").delete()
        for table in (TaskState, TaskRuns, TaskFailure):
            table.objects.filter(task=poll.name).delete()
        with suppress(Exception):  # no broker to reach: nothing of ours is waiting there
            app.control.purge()

    def fail_once(self, feed: Feed) -> None:
        """Poll ``feed`` while its document is broken (deactivated by error), give it back its
        document and wait for its probe to be due."""
        good = feed.document
        Feed.objects.filter(pk=feed.pk).update(document='<rss version="2.0"></rss>')
        with eager(poll.app):
            poll.delay(feed.pk)
        Feed.objects.filter(pk=feed.pk).update(document=good)
        time.sleep(COOLDOWN + 0.1)

    def login(self, name: str, password: str) -> Any:
        user, _ = get_user_model()._default_manager.get_or_create(username=name)
        user.is_staff = user.is_superuser = user.is_active = True
        user.set_password(password)
        user.save()
        self.stdout.write(f"superuser {name!r}, password {password!r}")
        return user
