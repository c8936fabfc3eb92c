"""Run the example project end to end: ``python examples/demo.py`` (or ``make demo``).

1. migrate a fresh database and create five feeds, one of them with a malformed document;
2. start a real ``celery worker`` (prefork, 2 processes) in a subprocess;
3. send one ``poll`` task per feed, wait for every result, then do it once more;
4. print the feeds before and after, the task results, what the app's ``object_deactivated``
   receiver logged in the worker and the mail sent to the admins;
5. check the outcome: the broken feed is deactivated with its error and none of its entries were
   kept, Celery saw the original exception, the second poll skipped that feed; the other feeds
   are active with their entries.

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
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Any

EXAMPLES = Path(__file__).resolve().parent
ROOT = EXAMPLES.parent
VAR = EXAMPLES / "var"
PYTHONPATH = os.pathsep.join(
    [str(EXAMPLES), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
)

#: Seconds to wait for all the task results (both rounds), then for the worker to stop by itself.
RESULTS_TIMEOUT = 40.0
STOP_TIMEOUT = 10.0

BROKEN_TITLE = "Night Owl Radio"
BAD_DATE = "yesterday, around midnight"


def rss(title: str, slug: str, dates: Sequence[str]) -> str:
    items = "".join(
        f"<item><title>{title} #{n}</title><link>https://{slug}.example.com/{n}</link>"
        f"<guid>{slug}-{n}</guid><pubDate>{date}</pubDate></item>"
        for n, date in enumerate(dates, start=1)
    )
    channel = f"<channel><title>{title}</title>{items}</channel>"
    return f'<?xml version="1.0"?><rss version="2.0">{channel}</rss>'


GOOD_DATES = [
    "Mon, 03 Nov 2025 08:00:00 +0000",
    "Tue, 04 Nov 2025 08:00:00 +0000",
    "Wed, 05 Nov 2025 08:00:00 +0000",
]

#: (title, slug, item dates): the third item of the broken feed has a date nobody can parse.
FEEDS = [
    ("Morning Digest", "digest", GOOD_DATES),
    ("Kernel Notes", "kernel", GOOD_DATES[:2]),
    (BROKEN_TITLE, "nightowl", [*GOOD_DATES[:2], BAD_DATE]),
    ("Garden Journal", "garden", GOOD_DATES),
    ("Chess Weekly", "chess", GOOD_DATES[:1]),
]

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

    call_command("migrate", verbosity=0)
    Feed.objects.all().delete()  # the entries go with them (a database given by DATABASE_URL)
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


def result_table(feeds: Sequence[Any], rounds: Sequence[Sequence[Any]]) -> str:
    def shown(result: Any) -> str:
        value = result.result
        if result.failed():
            return f"{result.state} {type(value).__qualname__}: {value}"
        if value is None:
            return f"{result.state} None (feed inactive: body skipped)"
        return f"{result.state} {value!r}"

    rows = [
        (feed.title, *map(shown, results)) for feed, *results in zip(feeds, *rounds, strict=True)
    ]
    return table(("feed", "1st poll", "2nd poll"), rows)


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
                headers = [f"{name}: {message[name]}" for name in ("From", "To", "Subject")]
                shown.append("\n".join([*headers, "", str(message.get_payload()).strip()]))
    return shown


def signal_lines(log_path: Path) -> list[str]:
    """What the app's ``object_deactivated`` receiver logged in the worker."""
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    return [line for line in text.splitlines() if "object_deactivated:" in line]


def show_log_tail(path: Path, lines: int = 40) -> None:
    if path.exists():
        tail = path.read_text(errors="replace").splitlines()[-lines:]
        print(f"\n--- last lines of {path.relative_to(ROOT)} ---", *tail, sep="\n")


# -- checks ---------------------------------------------------------------------------------


def check(
    feeds: Sequence[Any], first: Sequence[Any], second: Sequence[Any], signals: Sequence[str]
) -> list[str]:
    """What differs from the expected outcome (empty when the demo worked)."""
    from feeds.models import Feed

    problems = []
    for feed, result, again, (_title, _slug, dates) in zip(
        feeds, first, second, FEEDS, strict=True
    ):
        row = Feed.objects.get(pk=feed.pk)
        entries = row.entries.count()
        if feed.title == BROKEN_TITLE:
            expected_message = f'ValueError: Invalid date value or format "{BAD_DATE}"'
            if row.active or not row.error or row.deactivated_at is None:
                problems.append(f"{feed}: expected deactivated with error, got active={row.active}")
            if row.error_message != expected_message:
                problems.append(f"{feed}: error_message {row.error_message!r}")
            if row.failure_count != 1:
                problems.append(f"{feed}: failure_count {row.failure_count}, expected 1")
            if entries:
                problems.append(f"{feed}: {entries} entries kept, the rollback should undo them")
            if result.state != "FAILURE" or type(result.result) is not ValueError:
                problems.append(
                    f"{feed}: task {result.state} {result.result!r}, expected ValueError"
                )
            if again.state != "SUCCESS" or again.result is not None:
                problems.append(
                    f"{feed}: 2nd poll {again.state} {again.result!r}, expected skipped"
                )
        else:
            if not row.active or row.error or row.error_message or row.failure_count:
                problems.append(f"{feed}: expected active without error, got {row.error_message!r}")
            if entries != len(dates):
                problems.append(f"{feed}: {entries} entries, expected {len(dates)}")
            for task in (result, again):
                if task.state != "SUCCESS" or task.result != len(dates):
                    problems.append(f"{feed}: task {task.state} {task.result!r}")
    if len(signals) != 1 or f"feed {feeds[FEED_TITLES.index(BROKEN_TITLE)].pk} " not in signals[0]:
        problems.append(f"expected one object_deactivated signal, the worker logged {signals}")
    sent = mails()
    if len(sent) != 1 or BROKEN_TITLE not in sent[0]:
        problems.append(f"expected one mail about {BROKEN_TITLE}, found {len(sent)}")
    return problems


def main() -> int:
    started = time.monotonic()
    shutil.rmtree(VAR, ignore_errors=True)
    setup_django()

    from feeds.tasks import poll
    from feeds_project.celery import app

    print(f"celery-deactivate demo: {backends()}")
    feeds = create_feeds()
    print("\nBEFORE", feed_table(feeds), sep="\n")

    if app.control.purge():  # messages left by an interrupted run on a real broker
        print("(purged messages left over from an earlier run)")

    log_path = VAR / "worker.log"
    rounds: list[list[Any]] = []
    done = False
    with log_path.open("wb") as log:
        worker = start_worker(log)
        deadline = time.monotonic() + RESULTS_TIMEOUT
        try:
            # Two polls of every feed: the second one skips the feed the first one deactivated.
            for _ in range(2):
                rounds.append([poll.delay(feed.pk) for feed in feeds])
                done = wait_for(rounds[-1], worker, deadline)
                if not done:
                    break
        finally:
            stop_worker(worker)
    if not done:
        show_log_tail(log_path)
        return 1

    print("\nAFTER", feed_table(feeds), sep="\n")
    print("\nCELERY RESULTS", result_table(feeds, rounds), sep="\n")
    signals = signal_lines(log_path)
    print("\nSIGNAL RECEIVED IN THE WORKER (feeds/receivers.py)", *signals, sep="\n")
    for text in mails():
        print("\nMAIL TO THE ADMINS", text.strip(), sep="\n")

    problems = check(feeds, *rounds, signals)
    elapsed = time.monotonic() - started
    if problems:
        print("\nFAILED:", *problems, sep="\n  ")
        show_log_tail(log_path)
        return 1
    print(
        f"\nOK in {elapsed:.1f}s: {BROKEN_TITLE} was deactivated, its partial entries rolled back, "
        "and the 2nd poll skipped it; the other feeds stay active. "
        f"Worker log: {log_path.relative_to(ROOT)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
