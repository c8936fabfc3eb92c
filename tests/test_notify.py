"""Notifications without storms (issue #12): the first deactivation of a quiet period at once, the
later ones of its notice window in one digest; pluggable notifiers told what each notice is; a
failing notifier changes nothing; notices only after commit."""

from __future__ import annotations

import email
import email.policy
import json
import logging
import math
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from celery import Celery
from django.core import mail
from django.db import transaction
from django.utils import timezone

from celery_deactivate import _errors, _guard, notify, services
from celery_deactivate.models import TaskFailure, TaskState
from celery_deactivate.signals import object_deactivated
from celery_deactivate.tasks import maintain_guard
from tests.conftest import run_to_end, wait_for
from tests.testapp import outage_tasks, tasks
from tests.testapp.models import Entry, Feed

pytestmark = pytest.mark.django_db(transaction=True)


def failing(count: int, prefix: str = "broken") -> list[Feed]:
    return [Feed.objects.create(title=f"{prefix} {n}", behaviour="fail") for n in range(count)]


def run_all(task: Any, objects: list[Feed]) -> None:
    """Run ``task`` on each object; return once each failure is recorded (``run_to_end``)."""
    run_to_end(task, [(feed.pk,) for feed in objects])


def pending(task: Any) -> int:
    return TaskFailure.objects.filter(task=task.name, notice_pending=True).count()


class Recorder:
    """A notifier that keeps what it is called with."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, **kwargs: Any) -> None:
        self.calls.append(kwargs)

    def kinds(self) -> list[str]:
        return [call["kind"] for call in self.calls]


def broken_notifier(**kwargs: Any) -> None:
    raise ConnectionRefusedError("the mail server is down")


@pytest.fixture
def window(conf: Callable[..., None]) -> float:
    """A notice window of one second (worker-wide: the in-thread worker shares the app)."""
    conf(deactivate_notify_window=1)
    return 1.0


# -- the notice window and its digest -----------------------------------------------------------


@pytest.mark.usefixtures("worker")
def test_first_at_once_the_rest_in_one_digest_naming_every_object(
    conf: Callable[..., None], celery_app: Celery
) -> None:
    # Given six objects that break within the notice window (3 s: a slow machine's burst too),
    conf(deactivate_notify_window=3)
    broken = failing(6)

    run_all(outage_tasks.unguarded, broken)

    # the first deactivation is mailed at once, the five others wait;
    wait_for(lambda: pending(outage_tasks.unguarded) == 5)
    assert len(mail.outbox) == 1
    first = mail.outbox[0]
    assert "deactivated after a task failure" in first.subject
    # when the window ends, maintain sends one digest listing each of them,
    wait_for(lambda: maintain_guard(celery_app)["digests"], timeout=10)
    wait_for(lambda: len(mail.outbox) == 2)
    digest = mail.outbox[1]
    assert (
        digest.subject
        == f"[Django] 5 testapp.Feed objects deactivated by {outage_tasks.unguarded.name}"
    )
    named = [feed for feed in broken if f"testapp.Feed pk={feed.pk} " in digest.body]
    assert len(named) == 5 and f"pk={named[0].pk}" not in first.body
    for feed in named:
        assert f"/admin/testapp/feed/{feed.pk}/change/" in digest.body  # the admin is installed
        assert f"Boom: {feed.title} is broken" in digest.body
    assert digest.body.count('raise Boom(f"{obj.title} is broken")') == 5  # traceback lines
    assert pending(outage_tasks.unguarded) == 0
    # and once only.
    assert maintain_guard(celery_app)["digests"] == 0
    assert len(mail.outbox) == 2


def test_a_notice_deferred_to_a_window_that_closed_meanwhile_is_sent_by_maintain(
    celery_app: Celery,
) -> None:
    # Given a notice window open (the first deactivation was mailed at once)
    first, second = failing(2)
    outage_tasks.unguarded.apply((first.pk,))
    assert len(mail.outbox) == 1
    state = TaskState.objects.filter(task=outage_tasks.unguarded.name)

    def close_the_window(**kwargs: Any) -> None:
        # as another process taking the window's digest before this deactivation commits
        state.update(notify_until=None)

    # When the next deactivation, deferred to that window, commits after it closed
    object_deactivated.connect(close_the_window, weak=False, dispatch_uid="closer")
    try:
        outage_tasks.unguarded.apply((second.pk,))
    finally:
        object_deactivated.disconnect(dispatch_uid="closer")
    assert pending(outage_tasks.unguarded) == 1
    assert state.get().notify_until is None

    # Then maintain sends it in a digest, once
    assert maintain_guard(celery_app)["digests"] == 1
    assert len(mail.outbox) == 2
    assert f"testapp.Feed pk={second.pk} " in mail.outbox[1].body
    assert pending(outage_tasks.unguarded) == 0
    assert maintain_guard(celery_app)["digests"] == 0
    assert len(mail.outbox) == 2


@pytest.mark.usefixtures("worker")
def test_the_next_failure_after_the_window_sends_the_digest(window: float) -> None:
    first, second, late = failing(3)
    run_all(outage_tasks.unguarded, [first, second])
    wait_for(lambda: pending(outage_tasks.unguarded) == 1)
    waiting = TaskFailure.objects.get(notice_pending=True).object_pk  # first or second: a race
    until = TaskState.objects.get(task=outage_tasks.unguarded.name).notify_until
    assert until is not None

    wait_for(lambda: timezone.now() > until, timeout=10)  # the window is over

    run_all(outage_tasks.unguarded, [late])

    wait_for(lambda: len(mail.outbox) == 2)
    digest = mail.outbox[1]
    assert f"testapp.Feed pk={waiting} " in digest.body
    # A digest with content opens the next window: the late one waits for its digest.
    assert pending(outage_tasks.unguarded) == 1
    assert TaskState.objects.get(task=outage_tasks.unguarded.name).notify_until > until


@pytest.mark.usefixtures("worker")
def test_a_window_of_zero_notifies_every_deactivation(conf: Callable[..., None]) -> None:
    conf(deactivate_notify_window=0)
    broken = failing(4)

    run_all(outage_tasks.unguarded, broken)

    wait_for(lambda: len(mail.outbox) == 4)
    assert not TaskState.objects.exists()  # no state at all: nothing written for it
    assert not TaskFailure.objects.exists()


@pytest.mark.usefixtures("worker")
def test_a_burst_sends_a_bounded_number_of_mails(window: float, celery_app: Celery) -> None:
    broken = failing(60)
    started = time.monotonic()

    run_all(outage_tasks.unguarded, broken)
    took = time.monotonic() - started
    wait_for(lambda: Feed.objects.filter(active=False).count() == 60)

    def all_sent() -> bool:
        maintain_guard(celery_app)
        return pending(outage_tasks.unguarded) == 0

    wait_for(all_sent, timeout=10)
    # The first at once, then one digest per window the burst lasted, and the last one.
    assert 2 <= len(mail.outbox) <= 2 + math.ceil(took / window), (len(mail.outbox), took)
    for feed in broken:
        named = [m for m in mail.outbox if re.search(rf"testapp\.Feed pk={feed.pk}\b", m.body)]
        assert len(named) == 1, feed.pk


# -- notifiers ------------------------------------------------------------------------------------


@pytest.mark.usefixtures("worker")
def test_a_failing_notifier_is_logged_and_changes_nothing(
    conf: Callable[..., None], caplog: pytest.LogCaptureFixture, celery_app: Celery
) -> None:
    conf(deactivate_notifier="tests.test_notify.broken_notifier")
    feed = Feed.objects.create(title="broken", behaviour="fail")

    with caplog.at_level(logging.ERROR, logger="celery_deactivate"):
        result = tasks.poll.delay(feed.pk)
        wait_for(result.ready)
        wait_for(lambda: "failed on the deactivated notice" in caplog.text)

    assert isinstance(result.result, tasks.Boom)  # the task's own exception, unchanged
    feed.refresh_from_db()
    assert (feed.active, feed.error, feed.failure_count) == (False, True, 1)
    record = next(r for r in caplog.records if "failed on the deactivated notice" in r.message)
    assert record.levelno == logging.ERROR
    assert "ConnectionRefusedError: the mail server is down" in record.message
    assert f"testapp.Feed pk={feed.pk}" in record.message


@pytest.mark.usefixtures("worker")
def test_a_failing_notifier_does_not_stop_the_guard(
    conf: Callable[..., None], caplog: pytest.LogCaptureFixture
) -> None:
    conf(deactivate_notifier=broken_notifier)
    with caplog.at_level(logging.ERROR, logger="celery_deactivate"):
        run_all(outage_tasks.guarded, failing(10))
        wait_for(lambda: "failed on the outage_started notice" in caplog.text)

    assert _guard.outage_of(outage_tasks.guarded) is not None
    assert not Feed.objects.filter(active=False).exists()


@pytest.mark.usefixtures("worker")
def test_every_kind_reaches_the_notifier_with_what_it_is(
    conf: Callable[..., None], celery_app: Celery
) -> None:
    recorder = Recorder()
    conf(deactivate_notifier=recorder)
    table = failing(10)

    run_all(outage_tasks.guarded_briefly, table)
    Feed.objects.update(behaviour="ok")
    wait_for(lambda: maintain_guard(celery_app)["outages_ended"], timeout=30)

    wait_for(lambda: "outage_ended" in recorder.kinds())
    assert recorder.kinds() == ["deactivated", "outage_started", "outage_ended"]
    deactivated, started, ended = recorder.calls
    assert isinstance(deactivated["instance"], Feed)
    assert isinstance(deactivated["exception"], tasks.Boom)
    assert deactivated["task"] is outage_tasks.guarded_briefly
    notice = started["notice"]
    assert isinstance(notice, notify.Notice) and notice.kind == notify.OUTAGE_STARTED
    assert started["instance"] is None and started["exception"] is None
    assert notice.counts["objects"] >= 5 and notice.error.startswith("Boom: ")
    assert {item.pk for item in notice.objects} >= {deactivated["instance"].pk}  # re-activated
    assert "Re-activated" in notice.text and notice.subject.startswith("Outage of")
    assert ended["notice"].started_at == notice.started_at
    assert ended["notice"].ended_at is not None


def test_the_log_notifier(conf: Callable[..., None], caplog: pytest.LogCaptureFixture) -> None:
    conf(deactivate_notifier="celery_deactivate.notify.log")
    feed = Feed.objects.create(title="logged", behaviour="fail")

    with caplog.at_level(logging.WARNING, logger="celery_deactivate.notices"):
        tasks.poll.apply((feed.pk,))

    record = next(r for r in caplog.records if r.name == "celery_deactivate.notices")
    assert record.levelno == logging.WARNING
    assert "testapp.Feed logged deactivated after a task failure" in record.message
    assert record.notice.kind == notify.DEACTIVATED  # type: ignore[attr-defined]
    assert mail.outbox == []


@pytest.fixture
def chat() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A chat server's incoming webhook on localhost, keeping the JSON bodies it receives."""
    received: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers["Content-Length"])
            received.append(json.loads(self.rfile.read(length)))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None: ...

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/hooks/secret-token", received
    server.shutdown()
    server.server_close()


def test_the_webhook_notifier_posts_to_a_chat(
    conf: Callable[..., None], chat: tuple[str, list[dict[str, Any]]]
) -> None:
    url, received = chat
    webhook = notify.Webhook(url, timeout=5)
    conf(deactivate_notifier=webhook)
    feed = Feed.objects.create(title="chatty", behaviour="fail")

    tasks.poll.apply((feed.pk,))

    assert len(received) == 1
    text = received[0]["text"]
    assert text.startswith("*testapp.Feed chatty deactivated after a task failure*\n")
    assert f"testapp.Feed pk={feed.pk}" in text
    assert "secret-token" not in repr(webhook)  # logs name the host, not the secret path


def test_a_webhook_that_answers_an_error_is_logged(
    conf: Callable[..., None], caplog: pytest.LogCaptureFixture
) -> None:
    conf(deactivate_notifier=notify.Webhook("http://127.0.0.1:9/nobody-listens", timeout=1))
    feed = Feed.objects.create(title="unheard", behaviour="fail")

    with caplog.at_level(logging.ERROR, logger="celery_deactivate"):
        tasks.poll.apply((feed.pk,))

    assert "notifier Webhook('http://127.0.0.1:9/…') failed" in caplog.text
    assert Feed.objects.get(pk=feed.pk).active is False


# -- odd names and odd error texts (#17.5, 6, 8) ------------------------------------------------


def test_every_subject_is_one_line_whatever_the_names() -> None:
    # Given a task and an object whose names hold every kind of line break
    task = "feeds.poll\rnow"
    item = notify.NoticeObject(label="testapp.Feed", pk=1, name="Breaking\r\nnews\u2028today")
    now = timezone.now()
    notices = [
        notify.deactivation_notice(task, item),
        notify.digest_notice(task, [item], now, now),
        notify.outage_started_notice(
            task,
            label="testapp.Feed",
            started_at=now,
            counts={"runs": 2, "failures": 2, "objects": 2},
            rate=0.5,
            window=60,
            error="Boom: down",
            reactivated=[item],
        ),
        notify.outage_ended_notice(
            task, started_at=now, ended_at=now, counts={"runs": 2, "failures": 0}, window=60
        ),
    ]

    for notice in notices:
        notify.mail_admins(task=task, notice=notice)

    # Then every notice was mailed (a line break in a header raises BadHeaderError), on one line
    subjects = [message.subject for message in mail.outbox]
    assert len(subjects) == 4
    assert all(subject.splitlines() == [subject] for subject in subjects), subjects
    assert "Breaking news today deactivated" in subjects[0]
    assert "feeds.poll now" in subjects[1]


@pytest.mark.parametrize(
    ("behaviour", "error"),
    [
        ("surrogate", "Boom: cannot parse caf\ufffd.xml"),
        ("huge", "Boom: the upstream answered:\n<p>garbage</p>\n<p>garbage</p>\n"),
    ],
)
def test_the_notices_of_an_outage_of_odd_error_texts_are_mailed_short(
    behaviour: str, error: str
) -> None:
    # Given five objects failing with a text no encoder takes, or with megabytes of it
    for n in range(5):
        feed = Feed.objects.create(title=f"odd {n}", behaviour=behaviour)
        outage_tasks.guarded.apply((feed.pk,))

    # Then the first deactivation and the outage were both mailed, the error cut short
    assert _guard.outage_of(outage_tasks.guarded) is not None
    assert [message.subject.split(" ")[1] for message in mail.outbox] == ["testapp.Feed", "Outage"]
    for message in mail.outbox:
        assert error in message.body
        size = len(message.message().as_bytes())
        assert size < notify.NOTICE_ERROR_LENGTH + 3_000, size


def test_a_traceback_through_a_file_named_in_no_encoding_is_mailed() -> None:
    # Given a failure in code loaded from a file whose name is not UTF-8
    code = compile("raise tasks.Boom('down')", f"/srv/{tasks.UNDECODABLE_NAME}", "exec")
    with pytest.raises(tasks.Boom) as caught:
        exec(code, {"tasks": tasks})
    feed = Feed.objects.create(title="loaded")

    notice = notify.deactivation_notice("poll", notify.object_of(feed, exception=caught.value))
    notify.mail_admins(task="poll", notice=notice)

    assert 'File "/srv/caf\ufffd.xml", line 1, in <module>' in mail.outbox[0].body


def test_every_notice_cuts_the_error_text() -> None:
    # Given errors as recorded: up to the cap (64 Ki characters)
    recorded = _errors.describe(tasks.Boom("x" * 1_000_000))
    item = notify.NoticeObject(label="testapp.Feed", pk=1, name="verbose", error=recorded)
    now = timezone.now()
    counts = {"runs": 2, "failures": 2, "objects": 2}

    deactivated = notify.deactivation_notice("poll", item)
    digest = notify.digest_notice("poll", [item] * 20, now, now)
    started = notify.outage_started_notice(
        "poll",
        label="testapp.Feed",
        started_at=now,
        counts=counts,
        rate=0.5,
        window=60,
        error=recorded,
        reactivated=[],
    )

    # Then each object's error takes at most NOTICE_ERROR_LENGTH characters of the text
    assert len(recorded) == services.ERROR_LENGTH
    cut = "Boom: " + "x" * (notify.NOTICE_ERROR_LENGTH - 7) + "…"
    assert cut in deactivated.text
    assert len(deactivated.text) < notify.NOTICE_ERROR_LENGTH + 1_000
    assert digest.text.count(cut) == 20
    assert len(digest.text) < 20 * (notify.NOTICE_ERROR_LENGTH + 200)
    assert cut in started.text
    assert len(started.text) < notify.NOTICE_ERROR_LENGTH + 1_000


# -- links, options, transactions ---------------------------------------------------------------


def test_admin_links_relative_absolute_or_none(conf: Callable[..., None]) -> None:
    feed = Feed.objects.create(title="linked")
    assert notify.admin_url(Feed, feed.pk) == f"/admin/testapp/feed/{feed.pk}/change/"
    assert (
        notify.admin_url(Feed, feed.pk, "https://ops.example.com")
        == f"https://ops.example.com/admin/testapp/feed/{feed.pk}/change/"
    )
    assert notify.admin_url(Entry, 1) is None  # not registered in the admin

    conf(deactivate_site_url="https://ops.example.com/")
    broken = Feed.objects.create(title="linked broken", behaviour="fail")
    tasks.poll.apply((broken.pk,))
    assert (
        f"Admin: https://ops.example.com/admin/testapp/feed/{broken.pk}/change/"
        in mail.outbox[0].body
    )


def test_deactivate_notify_false_silences_every_kind(conf: Callable[..., None]) -> None:
    conf(deactivate_notify=False)
    for feed in failing(6):
        outage_tasks.guarded.apply((feed.pk,))

    assert _guard.outage_of(outage_tasks.guarded) is not None
    assert mail.outbox == []


class Rollback(Exception):
    pass


def test_an_outage_started_in_a_transaction_that_rolls_back_notifies_nobody() -> None:
    table = failing(6)

    def caller() -> None:
        with transaction.atomic():
            for feed in table:
                with pytest.raises(tasks.Boom):
                    outage_tasks.guarded(feed.pk)
            assert _guard.outage_of(outage_tasks.guarded) is not None  # in the transaction
            assert mail.outbox == []
            raise Rollback

    with pytest.raises(Rollback):
        caller()

    assert mail.outbox == []
    assert _guard.outage_of(outage_tasks.guarded) is None
    assert not Feed.objects.filter(active=False).exists()


# -- a mail server that is down for a while -------------------------------------------------------


class Inbox:
    """A real SMTP server's handler (aiosmtpd): keeps each mail's subject and plain text."""

    def __init__(self) -> None:
        self.mails: list[str] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        body = message.get_body(("plain",))
        self.mails.append(f"{message['Subject']}\n{body.get_content() if body else ''}")
        return "250 OK"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.usefixtures("worker")
def test_notices_due_while_the_mail_server_is_down_are_delivered_once_it_is_back(
    settings: Any, celery_app: Celery, caplog: pytest.LogCaptureFixture
) -> None:
    # Given mail through SMTP to a server that is down (nothing listens on its port),
    port = free_port()
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST, settings.EMAIL_PORT, settings.EMAIL_TIMEOUT = "127.0.0.1", port, 5
    task = outage_tasks.unguarded  # the default notice window (300 s)
    table = failing(3)
    state = TaskState.objects.filter(task=task.name)

    with caplog.at_level(logging.ERROR, logger="celery_deactivate"):
        # the first deactivation's notice fails and waits, with the two later ones, for a digest
        run_all(task, table)
        wait_for(lambda: pending(task) == 3)
        # whose try, due (its retry time has come), fails too: nothing is dropped,
        state.update(notify_until=timezone.now())
        maintain_guard(celery_app)
    assert pending(task) == 3
    (line,) = [
        r.message for r in caplog.records if "digest of 3 deactivation(s) was not" in r.message
    ]
    assert all(f"testapp.Feed pk={feed.pk}" in line for feed in table)  # every object named
    # and the next try waits longer (10 s, doubled after each failed try).
    retry = state.get()
    assert retry.digest_attempts == 2
    assert retry.notify_until > timezone.now() + timedelta(seconds=15)

    # When the mail server is back and the retry is due,
    inbox = Inbox()
    server = Controller(inbox, hostname="127.0.0.1", port=port)
    server.start()
    try:
        state.update(notify_until=timezone.now())
        maintain_guard(celery_app)
        wait_for(lambda: inbox.mails)
    finally:
        server.stop()

    # Then one digest names the three, and none is pending any more.
    assert len(inbox.mails) == 1
    assert "3 testapp.Feed objects deactivated by" in inbox.mails[0].splitlines()[0]
    assert all(f"testapp.Feed pk={feed.pk}" in inbox.mails[0] for feed in table)
    assert pending(task) == 0
    assert state.get().digest_attempts == 0
