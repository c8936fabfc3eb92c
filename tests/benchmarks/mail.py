"""How the benchmark's mail goes out: over SMTP to a server on loopback (the default), or
rendered and dropped (``--mail render``).

A project's ``mail_admins()`` and the library's notices go through Django's SMTP backend, one
SMTP session per message: the recipe pays one on every failure, the library one per notice
window.  The sink (:func:`smtp_sink`) is aiosmtpd in a process of its own on 127.0.0.1, which
accepts and drops every message: the cheapest SMTP there is (a relay elsewhere adds its network
and TLS round trips).

Django's locmem backend (the test settings') would keep every message in ``mail.outbox``: over a
benchmark's tens of thousands of failures that grows the workers' memory, and each garbage
collection walks it; :class:`RenderingBackend` renders each message as a real backend would and
keeps none.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from django.core.mail import EmailMessage
from django.core.mail.backends.base import BaseEmailBackend

#: The ways mail can go out (``--mail``): the first is the default.
MAIL = ("smtp", "render")


@contextmanager
def smtp_sink() -> Iterator[int]:
    """An SMTP server on loopback, in a process of its own, for the block; yields its port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "tests.benchmarks.mail", str(port)])
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the SMTP sink did not start on port {port}") from None
                time.sleep(0.05)
        yield port
    finally:
        server.terminate()
        server.wait(timeout=10)


def mail_env(mail: str, port: int | None) -> dict[str, str]:
    """The variables :mod:`tests.benchmarks.settings` reads for the mail."""
    return {"BENCH_SMTP_PORT": str(port)} if mail == "smtp" and port else {}


class RenderingBackend(BaseEmailBackend):
    """Renders every message as a real backend would, keeps none (``--mail render``)."""

    def send_messages(self, email_messages: Sequence[EmailMessage]) -> int:
        for message in email_messages:
            message.message().as_bytes()
        return len(email_messages)


class _Drop:
    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return "250 OK"


def serve(port: int) -> None:
    from aiosmtpd.controller import Controller

    controller = Controller(_Drop(), hostname="127.0.0.1", port=port)
    controller.start()
    try:
        while True:
            time.sleep(3600)
    finally:
        controller.stop()


if __name__ == "__main__":
    serve(int(sys.argv[1]))
