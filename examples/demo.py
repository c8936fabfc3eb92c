"""Run the example project end to end: ``python examples/demo.py`` (or ``make demo``).

1. migrate a fresh database and create five feeds, one of them with a malformed document;
2. start a real ``celery worker`` (prefork, 2 processes) in a subprocess;
3. round 1: one ``poll`` task per feed: the malformed feed is deactivated, the admins get a mail;
4. round 2, the upstream is down for every feed: after three failing feeds the outage guard
   trips, re-activates the feeds it had just deactivated and mails one outage notice instead of
   a mail per feed; no feed is deactivated by the outage;
5. the upstream is back: the feeds are polled (and ``celery_deactivate.maintain`` runs, as beat
   would run it) until the outage ends, with one recovery notice; a last round polls every feed;
6. the way back: ``manage.py deactivated`` lists the broken feed; its upstream is fixed, and once
   its cool-down has passed (an hour here: the demo asks ``celery_deactivate.maintain``'s probes
   an hour ahead) one probe polls it and re-activates it;
7. the operators' view: ``manage.py deactivated feeds.Feed PK --history`` shows the broken feed's
   history (its failure, the probe, the re-activation), and the admin's status page of
   ``feeds.tasks.poll`` renders with its chart;
8. print the feeds, the task results, what the app's receivers logged in the worker and the mails
   to the admins, and check all of it.

Exits 0 when everything is as expected, 1 otherwise.  The worker is always stopped.

Embedded by default (SQLite, filesystem broker, file results under ``examples/var/``, which is
deleted first).  With ``DATABASE_URL``, ``CELERY_BROKER_URL`` and ``CELERY_RESULT_BACKEND`` set, it
runs on those servers instead; it empties the example's tables in that database and purges that
broker's task queue.
"""

from __future__ import annotations

import contextlib
import email
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from feeds.samples import (  # examples/: this script's folder
    BAD_DATE,
    BROKEN_TITLE,
    FEEDS,
    GOOD_DATES,
    rss,
)

EXAMPLES = Path(__file__).resolve().parent
ROOT = EXAMPLES.parent
VAR = EXAMPLES / "var"
PYTHONPATH = os.pathsep.join(
    [str(EXAMPLES), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
)

#: Seconds to wait for all the task results (every round), then for the worker to stop by itself.
RESULTS_TIMEOUT = 90.0
STOP_TIMEOUT = 10.0
#: Seconds between two polling rounds while the demo waits for the outage to end.
ROUND_INTERVAL = 1.0
#: Seconds the worker may take to record a round's last failures after their results are ready.
SETTLE_TIMEOUT = 10.0

FEED_TITLES = [title for title, _slug, _dates in FEEDS]


def setup_django() -> None:
    sys.path[:0] = [str(EXAMPLES), str(ROOT)]
    os.environ["DJANGO_SETTINGS_MODULE"] = "feeds_project.settings"
    import django

    django.setup()


def backends() -> str:
    from django.conf import settings

    database = settings.DATABASES["default"]
    where = database["NAME"] if "sqlite" in database["ENGINE"] else database["HOST"]
    return (
        f"database {database['ENGINE'].rsplit('.', 1)[-1]} ({where}), "
        f"broker {settings.CELERY_BROKER_URL}, results {settings.CELERY_RESULT_BACKEND}"
    )


def create_feeds() -> list[Any]:
    from django.core.management import call_command
    from feeds.models import Feed

    from celery_deactivate.models import HistoryEvent, TaskFailure, TaskRuns, TaskState

    call_command("migrate", verbosity=0)
    Feed.objects.all().delete()  # the entries go with them (a database given by DATABASE_URL)
    HistoryEvent.objects.filter(model="feeds.Feed").delete()
    for table in (TaskState, TaskRuns, TaskFailure):  # the outage guard's state of poll
        table.objects.filter(task="feeds.tasks.poll").delete()
    return [
        Feed.objects.create(
            title=title, url=f"https://{slug}.example.com/rss", document=rss(title, slug, dates)
        )
        for title, slug, dates in FEEDS
    ]


# -- the worker -----------------------------------------------------------------------------


def worker_concurrency() -> int:
    """2 pool processes; 1 on SQLite before Django 5.1, which cannot ``BEGIN IMMEDIATE``."""
    import django
    from django.db import connection

    return 1 if connection.vendor == "sqlite" and django.VERSION < (5, 1) else 2


def start_worker(log: IO[bytes]) -> subprocess.Popen[bytes]:
    command = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "feeds_project",
        "worker",
        "--pool=prefork",
        f"--concurrency={worker_concurrency()}",
        "--loglevel=WARNING",
        "--hostname=demo@%h",
        # No other workers to talk to: skip the start-up handshake and the gossip.
        "--without-mingle",
        "--without-gossip",
        "--without-heartbeat",
    ]
    env = {
        **os.environ,
        "PYTHONPATH": PYTHONPATH,
        "DJANGO_SETTINGS_MODULE": "feeds_project.settings",
    }
    # Its own process group, so that the pool processes can be killed with it if need be.
    return subprocess.Popen(
        command,
        cwd=EXAMPLES,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop_worker(worker: subprocess.Popen[bytes]) -> None:
    """Warm shutdown (SIGTERM); SIGKILL the whole process group after ``STOP_TIMEOUT``."""
    if worker.poll() is None:
        worker.terminate()
        try:
            worker.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            print(f"worker did not stop within {STOP_TIMEOUT:.0f}s: killing it", file=sys.stderr)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(worker.pid, signal.SIGKILL)  # pool processes left behind, if any
    worker.wait()


def wait_for(results: Sequence[Any], worker: subprocess.Popen[bytes], deadline: float) -> bool:
    """Poll until every result is ready; ``False`` past ``deadline`` or if the worker died."""
    pending = list(results)
    while pending:
        pending = [result for result in pending if not result.ready()]
        if not pending:
            break
        if worker.poll() is not None:
            print(f"the worker exited with status {worker.returncode}", file=sys.stderr)
            return False
        if time.monotonic() > deadline:
            print(f"{len(pending)} task(s) not done after {RESULTS_TIMEOUT:g}s", file=sys.stderr)
            return False
        time.sleep(0.05)
    return True


# -- output ---------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    cells = [list(headers), *([str(cell) for cell in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in cells
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines)


def feed_table(feeds: Sequence[Any]) -> str:
    from feeds.models import Feed

    rows = []
    for feed in Feed.objects.filter(pk__in=[f.pk for f in feeds]).order_by("pk"):
        rows.append(
            (
                feed.title,
                "yes" if feed.active else "no",
                "yes" if feed.error else "no",
                feed.failure_count,
                feed.entries.count(),
                feed.error_message or "-",
            )
        )
    return table(("feed", "active", "error", "failures", "entries", "message"), rows)


def result_table(feeds: Sequence[Any], rounds: Mapping[str, Sequence[Any]]) -> str:
    def shown(result: Any) -> str:
        value = result.result
        if result.failed():
            return f"{result.state} {type(value).__qualname__}"
        if value is None:
            return f"{result.state} None (skipped)"
        return f"{result.state} {value!r}"

    rows = [
        (feed.title, *map(shown, results))
        for feed, *results in zip(feeds, *rounds.values(), strict=True)
    ]
    return table(("feed", *rounds), rows)


def mails() -> list[str]:
    """The mails sent so far (Django's file backend: one file per connection), shortened."""
    folder = VAR / "mail"
    if not folder.is_dir():
        return []
    shown = []
    for path in sorted(folder.iterdir()):
        for raw in path.read_text().split("-" * 79):
            if raw.strip():
                message = email.message_from_string(raw.strip())
                headers = [
                    f"{name}: {' '.join(str(message[name]).split())}"  # unfolded
                    for name in ("From", "To", "Subject")
                ]
                shown.append("\n".join([*headers, "", str(message.get_payload()).strip()]))
    return shown


#: What the app's receivers (feeds/receivers.py) log in the worker.
SIGNALS = ("object_deactivated", "object_reactivated", "outage_started", "outage_ended")


def signal_lines(log_path: Path) -> list[str]:
    """What the app's receivers of celery-deactivate's signals logged in the worker."""
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    return [
        line[line.index("feeds:") :] if "feeds:" in line else line
        for line in text.splitlines()
        if any(f"{name}:" in line for name in SIGNALS)
    ]


def signals_named(lines: Sequence[str], name: str) -> list[str]:
    return [line for line in lines if f"{name}:" in line]


def show_log_tail(path: Path, lines: int = 40) -> None:
    if path.exists():
        tail = path.read_text(errors="replace").splitlines()[-lines:]
        print(f"\n--- last lines of {path.relative_to(ROOT)} ---", *tail, sep="\n")


# -- checks ---------------------------------------------------------------------------------


class Snapshot:
    """The feeds' rows and the mails at one moment (what the checks compare)."""

    def __init__(self, feeds: Sequence[Any]) -> None:
        from feeds.models import Feed

        self.rows = {row.pk: row for row in Feed.objects.filter(pk__in=[f.pk for f in feeds])}
        self.mails = mails()


def settle(expected: Any, seconds: float = SETTLE_TIMEOUT) -> None:
    """Wait until ``expected()`` holds, at most ``seconds``.  Celery stores a task's FAILURE
    before the worker records the failure (``Task.on_failure``), so the last failures of a round
    may still be recorded when its results are ready.  The checks afterwards say what differs
    if it never holds."""
    deadline = time.monotonic() + seconds
    while not expected() and time.monotonic() < deadline:
        time.sleep(0.05)


def check_round_1(feeds: Sequence[Any], results: Sequence[Any], after: Snapshot) -> list[str]:
    """The broken feed is deactivated, its entries rolled back; the others stored theirs."""
    problems = []
    for feed, result, (_title, _slug, dates) in zip(feeds, results, FEEDS, strict=True):
        row = after.rows[feed.pk]
        entries = row.entries.count()
        if feed.title == BROKEN_TITLE:
            expected_message = f'ValueError: Invalid date value or format "{BAD_DATE}"'
            if row.active or not row.error or row.deactivated_at is None:
                problems.append(f"{feed}: expected deactivated with error, got active={row.active}")
            if row.error_message != expected_message:
                problems.append(f"{feed}: error_message {row.error_message!r}")
            if entries:
                problems.append(f"{feed}: {entries} entries kept, the rollback should undo them")
            if result.state != "FAILURE" or type(result.result) is not ValueError:
                problems.append(
                    f"{feed}: task {result.state} {result.result!r}, expected ValueError"
                )
        elif result.state != "SUCCESS" or result.result != len(dates):
            problems.append(f"{feed}: 1st poll {result.state} {result.result!r}")
    if len(after.mails) != 1 or BROKEN_TITLE not in after.mails[0]:
        problems.append(
            f"round 1: expected one mail about {BROKEN_TITLE}, found {len(after.mails)}"
        )
    return problems


def check_outage(
    feeds: Sequence[Any], results: Sequence[Any], before: Snapshot, after: Snapshot, open_: bool
) -> list[str]:
    """Every poll failed; the guard tripped: one outage notice, no feed left deactivated."""
    problems = []
    if not open_:
        problems.append("the upstream is down: an outage of feeds.tasks.poll should be open")
    for feed, result in zip(feeds, results, strict=True):
        row = after.rows[feed.pk]
        if feed.title == BROKEN_TITLE:
            if row.active or result.result is not None:
                problems.append(f"{feed}: should stay deactivated and be skipped")
            continue
        if result.state != "FAILURE" or type(result.result).__name__ != "UpstreamUnavailable":
            problems.append(f"{feed}: 2nd poll {result.state} {result.result!r}")
        if not row.active or row.error or row.failure_count:
            problems.append(
                f"{feed}: the outage must not deactivate nor count it, got active={row.active} "
                f"failures={row.failure_count}"
            )
    new = after.mails[len(before.mails) :]
    if len(new) != 1 or "Subject: [feeds] Outage of feeds.tasks.poll" not in new[0]:
        problems.append(f"the outage: expected one outage notice, found {len(new)} mail(s)")
    return problems


def check_recovery(
    feeds: Sequence[Any], last: Sequence[Any], before: Snapshot, ended: bool
) -> list[str]:
    """The outage ended with one recovery notice; the feeds poll again."""
    problems = []
    if not ended:
        problems.append("the upstream is back: the outage should have ended")
    new = mails()[len(before.mails) :]
    if len(new) != 1 or "over after" not in new[0]:
        problems.append(f"the recovery: expected one recovery notice, found {len(new)} mail(s)")
    for feed, result, (_title, _slug, dates) in zip(feeds, last, FEEDS, strict=True):
        expected = None if feed.title == BROKEN_TITLE else len(dates)
        if result.state != "SUCCESS" or result.result != expected:
            problems.append(
                f"{feed}: last poll {result.state} {result.result!r}, expected {expected}"
            )
        entries = feed.entries.count()
        if entries != (0 if expected is None else len(dates)):
            problems.append(f"{feed}: {entries} entries")
    return problems


def the_way_back(feeds: Sequence[Any]) -> list[str]:
    """``manage.py deactivated`` lists the broken feed; once its upstream is fixed and its
    cool-down has passed, its probe (sent by ``celery_deactivate.maintain``) re-activates it."""
    from datetime import timedelta
    from io import StringIO

    from django.conf import settings
    from django.core.management import call_command
    from django.utils import timezone
    from feeds.models import Feed
    from feeds_project.celery import app

    from celery_deactivate import probes

    listing = StringIO()
    call_command("deactivated", stdout=listing)
    print("\n$ python manage.py deactivated", listing.getvalue().rstrip(), sep="\n")
    broken = feeds[FEED_TITLES.index(BROKEN_TITLE)]
    problems = []
    if BROKEN_TITLE not in listing.getvalue():
        problems.append(f"manage.py deactivated does not list {BROKEN_TITLE}")
    Feed.objects.filter(pk=broken.pk).update(document=rss(BROKEN_TITLE, "nightowl", GOOD_DATES))
    print(f"\n*** {BROKEN_TITLE}'s upstream is fixed; an hour later its probe is due ***")
    later = timezone.now() + timedelta(seconds=settings.CELERY_DEACTIVATE_COOLDOWN + 1)
    sent = probes.maintain(app, now=later)
    settle(lambda: Feed.objects.get(pk=broken.pk).active)
    broken.refresh_from_db()
    if sent != 1 or not broken.active or broken.entries.count() != len(GOOD_DATES):
        problems.append(
            f"the probe: {sent} sent, {BROKEN_TITLE} active={broken.active} with "
            f"{broken.entries.count()} entries (expected 1 probe, active, {len(GOOD_DATES)})"
        )
    return problems


def the_operators_view(feeds: Sequence[Any]) -> list[str]:
    """The broken feed's history (the command), and the status page of the task (rendered by
    the admin, as a superuser made for it and removed afterwards)."""
    from io import StringIO

    from django.contrib.auth.models import User
    from django.core.management import call_command
    from django.test import Client

    from celery_deactivate.models import HistoryEvent

    broken = feeds[FEED_TITLES.index(BROKEN_TITLE)]
    listing = StringIO()
    call_command("deactivated", "feeds.Feed", str(broken.pk), "--history", stdout=listing)
    print(f"\n$ python manage.py deactivated feeds.Feed {broken.pk} --history")
    print(listing.getvalue().rstrip())
    problems = []
    events = HistoryEvent.objects.filter(model="feeds.Feed", object_pk=str(broken.pk))
    kinds = list(events.order_by("at", "id").values_list("kind", "cause"))
    expected = [("deactivated", "failure"), ("probe_sent", "probe"), ("reactivated", "probe")]
    if kinds != expected:
        problems.append(f"{BROKEN_TITLE}'s history: {kinds}, expected {expected}")
    user = User.objects.create_superuser("demo-status-page", "", None)
    try:
        client = Client(HTTP_HOST="127.0.0.1")
        client.force_login(user)
        page = client.get("/admin/celery_deactivate/taskstatus/")
    finally:
        user.delete()
    html = page.content.decode()
    bars = html.count('<rect class="bar"')
    print(
        f"\nThe status page (/admin/celery_deactivate/taskstatus/): HTTP {page.status_code}, "
        f"{bars} bar(s) in the chart of feeds.tasks.poll"
    )
    if page.status_code != 200 or 'data-task="feeds.tasks.poll"' not in html or not bars:
        problems.append(f"the status page: HTTP {page.status_code}, {bars} bars")
    return problems


def check_signals(feeds: Sequence[Any], lines: Sequence[str]) -> list[str]:
    """Each feed the outage's first failures deactivated was re-activated, and the broken feed by
    its probe; one start, one end."""
    broken = feeds[FEED_TITLES.index(BROKEN_TITLE)]

    def pks(name: str) -> list[str]:
        return sorted(line.split("feed ")[1].split()[0] for line in signals_named(lines, name))

    deactivated, reactivated = pks("object_deactivated"), pks("object_reactivated")
    victims = [pk for pk in deactivated if pk != str(broken.pk)]
    problems = []
    if deactivated.count(str(broken.pk)) != 1:
        problems.append(f"expected {BROKEN_TITLE} deactivated once, the worker logged {lines}")
    if not victims or reactivated != sorted([*victims, str(broken.pk)]):
        problems.append(
            f"expected the outage's victims and {BROKEN_TITLE} (its probe) re-activated, the "
            f"worker logged {lines}"
        )
    for name in ("outage_started", "outage_ended"):
        if len(signals_named(lines, name)) != 1:
            problems.append(f"expected one {name} signal, the worker logged {lines}")
    return problems


# -- the demo -----------------------------------------------------------------------------------


def poll_round(feeds: Sequence[Any], worker: subprocess.Popen[bytes], deadline: float) -> list[Any]:
    from feeds.tasks import poll

    results = [poll.delay(feed.pk) for feed in feeds]
    if not wait_for(results, worker, deadline):
        raise TimeoutError
    return results


def show_mails(title: str, messages: Sequence[str]) -> None:
    for text in messages:
        print(f"\n{title}", text.strip(), sep="\n")


def main() -> int:
    started = time.monotonic()
    shutil.rmtree(VAR, ignore_errors=True)
    setup_django()

    from django.conf import settings
    from feeds.models import Feed
    from feeds.tasks import poll
    from feeds_project.celery import app

    from celery_deactivate.tasks import maintain

    print(f"celery-deactivate demo: {backends()}")
    feeds = create_feeds()
    print("\nBEFORE", feed_table(feeds), sep="\n")

    if app.control.purge():  # messages left by an interrupted run on a real broker
        print("(purged messages left over from an earlier run)")

    log_path = VAR / "worker.log"
    rounds: dict[str, list[Any]] = {}
    problems: list[str] = []
    with log_path.open("wb") as log:
        worker = start_worker(log)
        deadline = time.monotonic() + RESULTS_TIMEOUT
        try:
            # Round 1: the malformed feed is deactivated.
            rounds["1st poll"] = poll_round(feeds, worker, deadline)
            settle(lambda: len(mails()) == 1)
            after_1 = Snapshot(feeds)
            print("\nAFTER THE 1st POLL", feed_table(feeds), sep="\n")
            show_mails("MAIL TO THE ADMINS", after_1.mails)
            problems += check_round_1(feeds, rounds["1st poll"], after_1)

            # Its failure leaves the guard's window first: the guard then counts the outage's.
            window = float(settings.CELERY_DEACTIVATE_OUTAGE_WINDOW)
            time.sleep(window + 0.5)

            # Round 2: the upstream is down for every feed.
            settings.UPSTREAM_DOWN_FLAG.touch()
            print("\n*** the upstream goes down: every feed fails ***")
            rounds["upstream down"] = poll_round(feeds, worker, deadline)
            settle(lambda: len(mails()) == 2 and Feed.objects.filter(active=False).count() == 1)
            after_2 = Snapshot(feeds)
            print("\nAFTER THE POLL DURING THE OUTAGE", feed_table(feeds), sep="\n")
            show_mails("MAIL TO THE ADMINS", after_2.mails[len(after_1.mails) :])
            problems += check_outage(
                feeds, rounds["upstream down"], after_1, after_2, poll.outage_open()
            )

            # The upstream is back: poll on (and run maintain, as beat would) until it ends.
            settings.UPSTREAM_DOWN_FLAG.unlink()
            print("\n*** the upstream is back ***")
            recovery_rounds = 0
            while poll.outage_open() and time.monotonic() < deadline:
                maintain.delay()
                poll_round(feeds, worker, deadline)
                recovery_rounds += 1
                time.sleep(ROUND_INTERVAL)
            ended = not poll.outage_open()
            print(f"(the outage ended after {recovery_rounds} polling round(s))")
            rounds["after recovery"] = poll_round(feeds, worker, deadline)
            settle(lambda: len(mails()) == 3)
            show_mails("MAIL TO THE ADMINS", mails()[len(after_2.mails) :])
            problems += check_recovery(feeds, rounds["after recovery"], after_2, ended)

            # The way back: the operator's list, then the broken feed's cool-down probe.
            problems += the_way_back(feeds)
            problems += the_operators_view(feeds)
        except TimeoutError:
            stop_worker(worker)
            show_log_tail(log_path)
            return 1
        finally:
            stop_worker(worker)

    print("\nAFTER", feed_table(feeds), sep="\n")
    print("\nCELERY RESULTS", result_table(feeds, rounds), sep="\n")
    lines = signal_lines(log_path)
    print("\nSIGNALS RECEIVED IN THE WORKER (feeds/receivers.py)", *lines, sep="\n")
    problems += check_signals(feeds, lines)
    if len(mails()) != 3:
        problems.append(f"expected 3 mails in all, found {len(mails())}")

    elapsed = time.monotonic() - started
    if problems:
        print("\nFAILED:", *problems, sep="\n  ")
        show_log_tail(log_path)
        return 1
    print(
        f"\nOK in {elapsed:.1f}s: {BROKEN_TITLE} was deactivated with its partial entries rolled "
        "back; when the upstream went down for every feed the guard tripped, no feed was "
        "deactivated and one outage notice was sent instead of a mail per feed; after the "
        f"recovery notice every feed polls again; once fixed, {BROKEN_TITLE} came back through "
        "its cool-down probe, and its history and the task's status page show it all. "
        f"Worker log: {log_path.relative_to(ROOT)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
