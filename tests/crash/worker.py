"""A real ``celery worker --pool=prefork`` subprocess that shares the test run's database.

Both processes meet through a :class:`Meeting`: the test database's name, the run's Redis as
broker and result backend (``CELERY_BROKER_URL``, ``CELERY_RESULT_BACKEND``), a folder for mails
(Django's filebased backend) and one for the task bodies' own state files.

Only Redis: the workers are other processes, so Celery's in-memory transport cannot reach them,
and kombu's filesystem transport races between processes (a reader can take a message or an
exchange table while its writer is still writing it: workers died at start with
``JSONDecodeError``).  Without Redis the crash tests are skipped (``conftest.meeting``).
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from celery import Celery

ROOT = Path(__file__).resolve().parents[2]

#: Seconds a worker may take to answer its first ping.
START_TIMEOUT = 60.0
#: Seconds a stopping worker gets before it is killed.
STOP_TIMEOUT = 20.0

MAIL_SEPARATOR = b"\n" + b"-" * 79 + b"\n"


#: Why the crash tests are skipped without Redis (the skip reason in pytest's summary).
NEEDS_REDIS = (
    "needs Redis (CELERY_BROKER_URL=redis://...) to reach the prefork worker processes; "
    "make test starts a throwaway one when it can install it"
)


def redis_broker_url() -> str | None:
    """The run's ``CELERY_BROKER_URL`` if it is a Redis URL, else ``None``."""
    broker = os.environ.get("CELERY_BROKER_URL", "")
    return broker if broker.startswith(("redis://", "rediss://")) else None


@dataclass
class Meeting:
    """Where the test process and its worker subprocesses meet."""

    folder: Path
    database_name: str
    broker_url: str
    result_backend: str
    session: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    _client: Celery | None = None
    #: Every AsyncResult sent, alive until the session ends.  Celery 5.3's Redis result backend
    #: unsubscribes a result's channel in ``AsyncResult.__del__``: when the garbage collector runs
    #: one while another unsubscribe holds the pubsub's lock (read from a py-spy dump of a hung
    #: run: ``PubSub.unsubscribe`` -> ``AsyncResult.__del__`` -> ``PubSub.unsubscribe``), the
    #: test process waits on that lock forever.
    sent: list[Any] = field(default_factory=list)

    @classmethod
    def create(cls, folder: Path, database_name: str) -> Meeting:
        broker = redis_broker_url()
        if broker is None:
            raise RuntimeError(NEEDS_REDIS)
        backend = os.environ.get("CELERY_RESULT_BACKEND") or broker
        for name in ("state", "mail", "logs"):
            (folder / name).mkdir(parents=True, exist_ok=True)
        return cls(folder, database_name, broker, backend)

    def queue(self, name: str) -> str:
        """A queue of this test session only: no stale message of an earlier run reaches it."""
        return f"crash-{self.session}-{name}"

    @property
    def client(self) -> Celery:
        """A Celery app of the test process that sends to and reads from the workers."""
        if self._client is None:
            app = Celery(f"crash-client-{self.session}", set_as_current=False)
            app.conf.update(
                broker_url=self.broker_url,
                result_backend=self.result_backend,
                broker_connection_retry_on_startup=False,
                result_extended=True,
            )
            self._client = app
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("CELERY_", "EMAIL_", "PYTEST_"))
        }
        env.update(
            DJANGO_SETTINGS_MODULE="tests.settings",
            TEST_DATABASE_NAME=self.database_name,
            USE_TEST_DATABASE_NAME="1",
            CELERY_BROKER_URL=self.broker_url,
            CELERY_RESULT_BACKEND=self.result_backend,
            CRASH_STATE_DIR=str(self.folder / "state"),
            CRASH_SIGNAL_LOG="1",
            EMAIL_FILE_PATH=str(self.folder / "mail"),
            SQLITE_TRANSACTION_MODE="IMMEDIATE",  # SQLite: concurrent bodies wait, never fail
            WORKER_LOST_WAIT="0.5",  # report a killed child at once (default: 10 s)
            # Per-object accounting: no outage guard and one notice per deactivation, unless a
            # task sets them (the guard's own tests, tests/crash/test_outage.py).  Nothing is
            # written after the deactivation a test waits for.
            DEACTIVATE_OUTAGE_OBJECTS="0",
            DEACTIVATE_NOTIFY_WINDOW="0",
            PYTHONUNBUFFERED="1",
        )
        env.update(extra)
        return env

    # -- what the workers left behind -------------------------------------------------------

    def celery(self, *args: str, log: IO[bytes], **extra_env: str) -> subprocess.Popen[bytes]:
        """Start ``celery -A tests.celery_app <args>`` in this meeting's environment, its output
        into ``log``, in a process group of its own (stopping it can end its children too)."""
        return subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tests.celery_app", *args],
            cwd=ROOT,
            env=self.env(**extra_env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def mails(self) -> list[str]:
        """Every mail the workers wrote (filebased backend), oldest file first."""
        messages: list[str] = []
        for path in sorted((self.folder / "mail").glob("*.log")):
            for chunk in path.read_bytes().split(MAIL_SEPARATOR):
                if chunk.strip():
                    # Decoded: Django 6 writes bodies quoted-printable ("pk=3D42").
                    mail = email.message_from_bytes(chunk.strip(), policy=email.policy.default)
                    body = mail.get_body(("plain",))
                    text = body.get_content() if body is not None else ""
                    messages.append(f"Subject: {mail['Subject']}\n\n{text}")
        return messages

    def mails_about(self, pk: int) -> list[str]:
        pattern = re.compile(rf"testapp\.Feed pk={pk}\b(?!\d)")
        return [message for message in self.mails() if pattern.search(message)]

    def clear(self) -> None:
        """Forget the mails and body state files of earlier tests."""
        for name in ("mail", "state"):
            for path in (self.folder / name).iterdir():
                path.unlink()


class Worker:
    """One ``celery -A tests.celery_app worker --pool=prefork`` subprocess.

    Use as a context manager, or call :meth:`stop` in a ``finally``: it always ends, killing the
    whole process group (the main process and its pool children) if it does not stop in time.
    """

    def __init__(
        self,
        meeting: Meeting,
        name: str,
        *,
        queue: str = "default",
        concurrency: int = 1,
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
    ) -> None:
        self.meeting = meeting
        self.name = name
        self.queue = meeting.queue(queue)
        self.hostname = f"{name}-{meeting.session}@crash"
        self.concurrency = concurrency
        self.extra_env = env or {}
        self.extra_args = args
        self.log_path = meeting.folder / "logs" / f"{name}-{uuid.uuid4().hex[:6]}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.log_offset = 0

    def __enter__(self) -> Worker:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def start(self) -> None:
        with self.log_path.open("wb") as log:
            self.process = self.meeting.celery(
                "worker",
                "--pool=prefork",
                f"--concurrency={self.concurrency}",
                "--prefetch-multiplier=1",
                "--loglevel=INFO",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "-n",
                self.hostname,
                "-Q",
                self.queue,
                *self.extra_args,
                log=log,
                **self.extra_env,
            )
        self.wait_ready()

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Poll ``ping`` until the worker answers; fail if it exits or the deadline passes."""
        deadline = time.monotonic() + timeout
        control = self.meeting.client.control
        while time.monotonic() < deadline:
            if not self.alive:
                raise AssertionError(f"worker {self.name} exited at start:\n{self.log_tail()}")
            if control.ping(destination=[self.hostname], timeout=0.5):
                return
        raise AssertionError(f"worker {self.name} not ready in {timeout}s:\n{self.log_tail()}")

    def ping(self, timeout: float = 1.0) -> bool:
        return bool(self.meeting.client.control.ping(destination=[self.hostname], timeout=timeout))

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def send_signal(self, signum: int) -> None:
        """Signal the main process (``SIGTERM``: warm shutdown, ``SIGQUIT``: cold shutdown)."""
        if self.alive:
            assert self.process is not None
            self.process.send_signal(signum)

    def wait_exit(self, timeout: float) -> int | None:
        assert self.process is not None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Warm shutdown, then kill the process group after ``timeout`` seconds."""
        if self.process is None:
            return
        if self.alive:
            self.process.send_signal(signal.SIGTERM)
            self.wait_exit(timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # stray pool children, if any
        if self.alive:
            self.process.wait(10)

    def log(self) -> str:
        """What the worker logged since it started, or since :meth:`forget_log`."""
        if not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as file:
            file.seek(self.log_offset)
            return file.read().decode(errors="replace")

    def forget_log(self) -> None:
        self.log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def error_lines(self, *needles: str) -> list[str]:
        """Lines logged at ERROR that contain every one of ``needles``."""
        return [
            line
            for line in self.log().splitlines()
            if "ERROR/" in line and all(needle in line for needle in needles)
        ]

    def send(self, task: str, *args: Any, **options: Any) -> Any:
        """Send the task named ``task`` to this worker's queue; return its ``AsyncResult`` (kept
        alive until the session ends: :attr:`Meeting.sent`)."""
        result = self.meeting.client.send_task(task, args=args, queue=self.queue, **options)
        self.meeting.sent.append(result)
        return result
