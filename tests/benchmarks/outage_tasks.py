"""The tasks of the outage benchmark (:mod:`tests.benchmarks.outage`), on the benchmark's app:
``celery -A tests.benchmarks.outage_tasks worker``.  The same body as the other benchmark tasks;
the guard on (the defaults: 10 objects, 50 %, 300 s, a notice window of 300 s) or off (no guard,
one mail per deactivation, as before it)."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

from django.core.mail import EmailMessage
from django.core.mail.backends.base import BaseEmailBackend

from celery_deactivate import DeactivatingTask
from tests.benchmarks.app import app
from tests.benchmarks.tasks import body
from tests.testapp.models import Feed

__all__ = ["CountingBackend", "app"]

OFF = {"deactivate_outage_objects": 0, "deactivate_notify_window": 0}


@app.task(name="bench.outage_guard_ok", base=DeactivatingTask, model=Feed)
def guard_ok(pk: int) -> int:
    return body(Feed.objects.get(pk=pk), False)


@app.task(name="bench.outage_noguard_ok", base=DeactivatingTask, model=Feed, **OFF)
def noguard_ok(pk: int) -> int:
    return body(Feed.objects.get(pk=pk), False)


@app.task(name="bench.outage_guard_fail", base=DeactivatingTask, model=Feed)
def guard_fail(pk: int) -> int:
    return body(Feed.objects.get(pk=pk), True)


@app.task(name="bench.outage_noguard_fail", base=DeactivatingTask, model=Feed, **OFF)
def noguard_fail(pk: int) -> int:
    return body(Feed.objects.get(pk=pk), True)


@app.task(name="outage_gate", acks_late=True)
def gate(path: str) -> None:
    """Hold one pool child until ``path`` exists.  Acknowledged late: a worker reserves no more
    gates than it has children (``--prefetch-multiplier=1``), so each worker holds its own two."""
    open(f"{path}.started.{os.getpid()}", "w").close()
    while not os.path.exists(path):
        time.sleep(0.0005)


class CountingBackend(BaseEmailBackend):
    """Renders every message as a real backend would and appends one line per message to
    ``$BENCH_MAIL_LOG`` (``O_APPEND``: one write per line, safe across processes)."""

    def send_messages(self, email_messages: Sequence[EmailMessage]) -> int:
        lines = []
        for message in email_messages:
            message.message().as_bytes()
            lines.append(f"{message.subject}\n".replace("\n", " ").strip() + "\n")
        path = os.environ.get("BENCH_MAIL_LOG")
        if path:
            with open(path, "a") as log:
                log.write("".join(lines))
        return len(email_messages)
