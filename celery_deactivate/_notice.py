"""What notices say: their kinds, the objects and facts they carry, and their texts (public
through ``celery_deactivate.notify``, which re-exports every name without an underscore)."""

from __future__ import annotations

import linecache
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Any

from django.apps import apps
from django.db.models import Model
from django.urls import NoReverseMatch, reverse

from ._errors import cut, describe

# The kinds and the limits (documented in celery_deactivate.notify, which users import).
DEACTIVATED = "deactivated"
DIGEST = "digest"
OUTAGE_STARTED = "outage_started"
OUTAGE_ENDED = "outage_ended"
TRACEBACK_FRAMES = 3
NOTICE_ERROR_LENGTH = 4096
NAME_LENGTH = 200


@dataclass(frozen=True)
class NoticeObject:
    """One object a notice is about."""

    label: str  # "app_label.Model"
    pk: Any
    name: str  # str(instance), on one line (name_of)
    error: str = ""  # "ValueError: the text", as recorded (the notice's text cuts it)
    traceback: str = ""  # the innermost frames
    url: str | None = None  # the admin change page, when the admin is installed
    deactivated_at: datetime | None = None
    task_id: str | None = None

    @property
    def identity(self) -> str:
        """``app_label.Model pk=42``, as the log lines name it."""
        return f"{self.label} pk={self.pk!r}"


@dataclass(frozen=True)
class Notice:
    """What a notifier is told: ``subject`` and ``text`` ready to send, and the facts as data."""

    kind: str
    task: str  # the task's name
    subject: str
    text: str
    #: Deactivated objects (:data:`DEACTIVATED`, :data:`DIGEST`) or the objects an outage
    #: re-activated (:data:`OUTAGE_STARTED`).
    objects: tuple[NoticeObject, ...] = ()
    #: The outage's start and end (outage notices); the digest's window.
    started_at: datetime | None = None
    ended_at: datetime | None = None
    #: Over the last ``deactivate_outage_window`` (outage notices): final failures, finished
    #: runs, distinct failing objects.
    counts: Mapping[str, int] = field(default_factory=dict)
    #: The last failure's exception, described (outage notices; the text cuts it).
    error: str = ""


# -- what notices say --------------------------------------------------------------------------


def admin_url(model: type[Model], pk: Any, site_url: str | None = None) -> str | None:
    """The object's change page in the admin, ``None`` when the admin is not installed or does
    not register the model; absolute when ``site_url`` (``deactivate_site_url``) is given."""
    if not apps.is_installed("django.contrib.admin"):
        return None
    from django.contrib.admin.utils import quote

    meta = model._meta
    try:
        path = reverse(f"admin:{meta.app_label}_{meta.model_name}_change", args=[quote(pk)])
    except NoReverseMatch:
        return None
    return f"{site_url}{path}" if site_url else path


def traceback_of(exc: BaseException | None, frames: int = TRACEBACK_FRAMES) -> str:
    """The innermost ``frames`` frames of ``exc``'s traceback ('' without one); never raises."""
    try:
        # Walked here rather than with traceback.extract_tb(limit=-frames), which computes every
        # frame's source positions to keep the last ones: a notice stays cheap on a failure
        # path that may run thousands of times in an outage.
        last: deque[TracebackType] = deque(maxlen=frames)
        tb = exc.__traceback__ if exc is not None else None
        while tb is not None:
            last.append(tb)
            tb = tb.tb_next
        lines = []
        for tb in last:
            code, lineno = tb.tb_frame.f_code, tb.tb_lineno or 0
            lines.append(f'  File "{code.co_filename}", line {lineno}, in {code.co_name}')
            linecache.checkcache(code.co_filename)  # a deploy under a running worker
            source = linecache.getline(code.co_filename, lineno, tb.tb_frame.f_globals)
            if source.strip():
                lines.append(f"    {source.strip()}")
        return cut("\n".join(lines), None)  # a file name that is not UTF-8
    except Exception:
        return ""


def object_of(
    instance: Model,
    *,
    exception: BaseException | None = None,
    task_id: str | None = None,
    deactivated_at: datetime | None = None,
    site_url: str | None = None,
) -> NoticeObject:
    return NoticeObject(
        label=instance._meta.label,
        pk=instance.pk,
        name=name_of(instance),
        error=describe(exception),
        traceback=traceback_of(exception),
        url=admin_url(type(instance), instance.pk, site_url),
        deactivated_at=deactivated_at,
        task_id=task_id,
    )


def deactivation_notice(task: str, item: NoticeObject, window: float = 0) -> Notice:
    """One deactivation; ``window``: the notice window it opened (later deactivations of the task
    within it wait for the digest)."""
    lines = [
        f"The task {task}[{item.task_id}] failed on {item.label} pk={item.pk!r}",
        f"({item.name}), which is now deactivated: it is not scheduled until reactivated.",
        "",
        _error(item.error),
        *_details(item, indent=""),
    ]
    if window:
        lines += [
            "",
            f"Further deactivations by {task} in the next {_duration(window)} are sent together "
            "in one digest.",
        ]
    return Notice(
        kind=DEACTIVATED,
        task=task,
        subject=one_line(f"{item.label} {item.name} deactivated after a task failure"),
        text="\n".join(lines),
        objects=(item,),
    )


def digest_notice(
    task: str, items: Sequence[NoticeObject], since: datetime | None, until: datetime
) -> Notice:
    label = items[0].label if items else ""
    lines = [
        f"The task {task} deactivated {len(items)} more object(s) of {label} in its notice window"
        f"{f' ({since:%Y-%m-%d %H:%M:%S} to {until:%H:%M:%S})' if since else ''}.",
        "They are not scheduled until reactivated.",
    ]
    for item in items:
        when = f" at {item.deactivated_at:%H:%M:%S}" if item.deactivated_at else ""
        lines += ["", f"- {item.identity} ({item.name}){when}, task {item.task_id}"]
        lines += [f"  {_error(item.error)}", *_details(item, indent="  ")]
    return Notice(
        kind=DIGEST,
        task=task,
        subject=one_line(f"{len(items)} {label} objects deactivated by {task}"),
        text="\n".join(lines),
        objects=tuple(items),
        started_at=since,
        ended_at=until,
    )


def outage_started_notice(
    task: str,
    *,
    label: str,
    started_at: datetime,
    counts: Mapping[str, int],
    rate: float,
    window: float,
    error: str,
    reactivated: Sequence[NoticeObject],
) -> Notice:
    runs, failures, objects = counts["runs"], counts["failures"], counts["objects"]
    lines = [
        f"Outage of {task} since {started_at:%Y-%m-%d %H:%M:%S %Z}: {failures} of its {runs} "
        f"finished runs in the last {window:g} s failed for good ({_share(failures, runs)}), on "
        f"{objects} distinct objects of {label}.",
        "",
        "The cause looks shared (an upstream service, a credential, a deploy), not the objects: "
        "until the outage ends no failure of this task deactivates an object, and these "
        "failures are not counted against them.",
        f"The outage ends when the failure rate over the last {window:g} s falls below "
        f"{rate:.0%}; a recovery notice follows.",
        "",
        f"Last error: {_error(error)}",
    ]
    if reactivated:
        lines += [
            "",
            f"Re-activated: the {len(reactivated)} object(s) this task deactivated in the "
            "window, the outage's first victims:",
        ]
        lines += [f"- {item.identity} ({item.name}){_url_suffix(item)}" for item in reactivated]
    return Notice(
        kind=OUTAGE_STARTED,
        task=task,
        subject=one_line(
            f"Outage of {task}: {objects} objects failing, no deactivation until it ends"
        ),
        text="\n".join(lines),
        objects=tuple(reactivated),
        started_at=started_at,
        counts=dict(counts),
        error=error,
    )


def outage_ended_notice(
    task: str,
    *,
    started_at: datetime,
    ended_at: datetime,
    counts: Mapping[str, int],
    window: float,
) -> Notice:
    runs, failures = counts["runs"], counts["failures"]
    lasted = _duration((ended_at - started_at).total_seconds())
    lines = [
        f"The outage of {task} is over: it lasted {lasted} "
        f"({started_at:%Y-%m-%d %H:%M:%S} to {ended_at:%H:%M:%S %Z}).",
        f"Over the last {window:g} s, {failures} of {runs} finished runs failed for good "
        f"({_share(failures, runs)}).",
        "A failing object is deactivated again as usual.",
    ]
    return Notice(
        kind=OUTAGE_ENDED,
        task=task,
        subject=one_line(f"Outage of {task} over after {lasted}"),
        text="\n".join(lines),
        started_at=started_at,
        ended_at=ended_at,
        counts=dict(counts),
    )


def _error(text: str) -> str:
    return cut(text, NOTICE_ERROR_LENGTH)


def _details(item: NoticeObject, indent: str) -> list[str]:
    lines = [f"{indent}Admin: {item.url}"] if item.url else []
    if item.traceback:
        lines += [f"{indent}Traceback (innermost frames):"]
        lines += [f"{indent}{line}" for line in item.traceback.splitlines()]
    return lines


def _url_suffix(item: NoticeObject) -> str:
    return f": {item.url}" if item.url else ""


def _share(part: int, whole: int) -> str:
    return f"{part / whole:.0%}" if whole else "no finished run"


def _duration(seconds: float) -> str:
    seconds = max(round(seconds), 0)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def name_of(instance: Model) -> str:
    """``str(instance)`` on one line, at most :data:`NAME_LENGTH` characters (an RSS title holds
    line breaks), or a placeholder if it raises."""
    try:
        name = str(instance)
    except Exception as error:
        return f"<str() raised {type(error).__qualname__}>"
    return one_line(cut(name, NAME_LENGTH))


def one_line(text: str) -> str:
    """``text`` with each line break (``\\n``, ``\\r``, U+2028 and every other
    ``str.splitlines()`` knows) made a space: a mail header holds one line."""
    return " ".join(text.splitlines())
