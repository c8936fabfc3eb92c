"""Notices, and the notifiers that deliver them (mail, logging, a chat webhook).

A notifier is any callable taking keyword arguments; set it with the ``deactivate_notifier`` option
(a callable or a dotted path).  It is called after the change commits
(``transaction.on_commit``), once per notice::

    def notifier(*, task, instance, exception, task_id, kind, notice, **kwargs):
        ...

``kind`` says what the notice is about (:data:`DEACTIVATED`, :data:`DIGEST`,
:data:`OUTAGE_STARTED`, :data:`OUTAGE_ENDED`); ``notice`` is a :class:`Notice` with a ready
``subject`` (one line) and ``text`` (each error cut to :data:`NOTICE_ERROR_LENGTH` characters,
names to :data:`NAME_LENGTH`, text any encoder takes) and the same facts as data.
``instance``, ``exception`` and ``task_id`` are the deactivated object, its exception and the
failed task's id for :data:`DEACTIVATED`, and ``None`` for the other kinds.  Accept
``**kwargs``: arguments may be added later.  An exception a notifier raises is logged at ERROR
and never reaches the task nor undoes the change.

A Sentry notifier, for example::

    import sentry_sdk

    def to_sentry(*, notice, exception=None, **kwargs):
        with sentry_sdk.new_scope() as scope:
            scope.set_tag("celery_deactivate.kind", notice.kind)
            scope.set_extra("objects", [item.identity for item in notice.objects])
            sentry_sdk.capture_message(notice.subject, level="warning")

The kinds of notice:

.. data:: DEACTIVATED
   :value: "deactivated"

   One object was deactivated (the first of a quiet period, or every one without a window).

.. data:: DIGEST
   :value: "digest"

   The deactivations of one notice window, together.

.. data:: OUTAGE_STARTED
   :value: "outage_started"

   An outage of the task started: no deactivation until it ends; its first victims re-activated.

.. data:: OUTAGE_ENDED
   :value: "outage_ended"

   The outage ended: failures deactivate objects again.

What a notice holds:

.. data:: TRACEBACK_FRAMES
   :value: 3

   Frames of a traceback kept in notices (the innermost ones: where the body failed).

.. data:: NOTICE_ERROR_LENGTH
   :value: 4096

   Characters of an error in a notice's text (of each object's, in a digest): the head of the
   text recorded (at most :data:`~celery_deactivate.services.ERROR_LENGTH`), ending with "…".

.. data:: NAME_LENGTH
   :value: 200

   Characters of an object's name (``str(instance)``) in notices, on one line.
"""

from __future__ import annotations

import json
import logging
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any

from django.core import mail
from django.db.models import Model

from . import _metrics
from ._errors import describe
from ._notice import (
    DEACTIVATED,
    DIGEST,
    NAME_LENGTH,
    NOTICE_ERROR_LENGTH,
    OUTAGE_ENDED,
    OUTAGE_STARTED,
    TRACEBACK_FRAMES,
    Notice,
    NoticeObject,
    admin_url,
    deactivation_notice,
    digest_notice,
    name_of,
    object_of,
    one_line,
    outage_ended_notice,
    outage_started_notice,
    traceback_of,
)

__all__ = [
    "DEACTIVATED",
    "DIGEST",
    "NAME_LENGTH",
    "NOTICE_ERROR_LENGTH",
    "OUTAGE_ENDED",
    "OUTAGE_STARTED",
    "TRACEBACK_FRAMES",
    "Notice",
    "NoticeObject",
    "Webhook",
    "admin_url",
    "deactivation_notice",
    "deliver",
    "digest_notice",
    "log",
    "mail_admins",
    "name_of",
    "object_of",
    "one_line",
    "outage_ended_notice",
    "outage_started_notice",
    "traceback_of",
]

logger = logging.getLogger("celery_deactivate")
notice_logger = logging.getLogger("celery_deactivate.notices")

# -- delivering --------------------------------------------------------------------------------


def deliver(
    notifier: Any,
    notice: Notice,
    *,
    task: Any,
    instance: Model | None = None,
    exception: BaseException | None = None,
    task_id: str | None = None,
) -> bool:
    """Call ``notifier`` with ``notice``; log at ERROR and return ``False`` if it raises."""
    try:
        notifier(
            task=task,
            instance=instance,
            exception=exception,
            task_id=task_id,
            kind=notice.kind,
            notice=notice,
        )
    except Exception as error:
        logger.error(
            "celery_deactivate: notifier %r failed on the %s notice of %s (%s): %s",
            notifier,
            notice.kind,
            notice.task,
            ", ".join(item.identity for item in notice.objects[:5]) or "no object",
            describe(error),
            exc_info=error,
        )
        _metrics.notice(notice.task, notice.kind, delivered=False)
        return False
    _metrics.notice(notice.task, notice.kind, delivered=True)
    logger.info(
        "celery_deactivate: %s notice of %s sent (%d object(s))",
        notice.kind,
        notice.task,
        len(notice.objects),
    )
    return True


# -- the notifiers -----------------------------------------------------------------------------


def mail_admins(
    *,
    task: Any,
    instance: Model | None = None,
    exception: BaseException | None = None,
    task_id: str | None = None,
    notice: Notice | None = None,
    **kwargs: Any,
) -> None:
    """Mail the site admins (``settings.ADMINS``) the notice (the default notifier)."""
    if notice is None:  # called by hand, the way versions before 0.4 did
        assert instance is not None
        name = getattr(task, "name", str(task))
        notice = deactivation_notice(
            name, object_of(instance, exception=exception, task_id=task_id)
        )
    mail.mail_admins(notice.subject, notice.text, fail_silently=False)


def log(*, notice: Notice, **kwargs: Any) -> None:
    """Log the notice on the ``celery_deactivate.notices`` logger (WARNING; INFO for a recovery):
    for projects whose log pipeline already alerts (``deactivate_notifier=
    "celery_deactivate.notify.log"``)."""
    level = logging.INFO if notice.kind == OUTAGE_ENDED else logging.WARNING
    notice_logger.log(level, "%s\n%s", notice.subject, notice.text, extra={"notice": notice})


class Webhook:
    """Post each notice to a chat webhook as JSON ``{"text": ...}`` (the shape Slack, Mattermost
    and Rocket.Chat incoming webhooks accept)::

        # myproject/notifiers.py
        chat = Webhook(os.environ["CHAT_WEBHOOK_URL"])

        # settings.py
        CELERY_DEACTIVATE_NOTIFIER = "myproject.notifiers.chat"

    A response other than 2xx, or no answer within ``timeout`` seconds, raises (and is logged).
    """

    def __init__(
        self, url: str, *, timeout: float = 5.0, headers: Mapping[str, str] | None = None
    ) -> None:
        self.url = url
        self.timeout = timeout
        self.headers = {"Content-Type": "application/json", **(headers or {})}

    def payload(self, notice: Notice) -> dict[str, Any]:
        """The JSON body: override for another chat's format."""
        return {"text": f"*{notice.subject}*\n{notice.text}"}

    def __call__(self, *, notice: Notice, **kwargs: Any) -> None:
        body = json.dumps(self.payload(notice)).encode()
        request = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            response.read()

    def __repr__(self) -> str:  # the path of a webhook URL is its secret: keep it out of logs
        parts = urllib.parse.urlsplit(self.url)
        return f"Webhook('{parts.scheme}://{parts.netloc}/…')"
