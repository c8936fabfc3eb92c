"""The benchmark's email backend: renders every message as a real backend would, keeps none.

Django's locmem backend (the test settings') keeps every message in ``mail.outbox``: over a
benchmark's tens of thousands of failures that grows the workers' memory, and each garbage
collection walks it.
"""

from __future__ import annotations

from collections.abc import Sequence

from django.core.mail import EmailMessage
from django.core.mail.backends.base import BaseEmailBackend


class RenderingBackend(BaseEmailBackend):
    def send_messages(self, email_messages: Sequence[EmailMessage]) -> int:
        for message in email_messages:
            message.message().as_bytes()
        return len(email_messages)
