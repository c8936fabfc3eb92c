"""An exception as the library records and logs it: ``"ValueError: the text"``, at most
:data:`~celery_deactivate.services.ERROR_LENGTH` characters, text any encoder and column takes."""

from __future__ import annotations

import re

#: Characters of an exception's text the library records (the object's ``error_message``, the
#: failure table's ``error``) and logs: the head of a longer text, ending with "…".  A column
#: with a smaller ``max_length`` cuts it further.
ERROR_LENGTH = 64 * 1024

#: Code points no encoder takes (a file name that is not UTF-8, decoded by ``os.fsdecode``).
_LONE_SURROGATES = re.compile("[\ud800-\udfff]")


def describe(exc: BaseException | None) -> str:
    """``"ValueError: the text"``; never raises, whatever the exception's ``__str__`` does.

    The type's name is always there; text that cannot be rendered becomes a placeholder.  At
    most :data:`~celery_deactivate.services.ERROR_LENGTH` characters, and text any encoder
    takes (:func:`cut`): a mail, a JSON body, a log file, a database column.
    """
    if exc is None:
        return ""
    name = type(exc).__qualname__
    try:
        text = str(exc)
    except Exception as error:  # a broken __str__ must not hide the failure
        text = f"<str() raised {type(error).__qualname__}>"
    return cut(f"{name}: {text}" if text else name, ERROR_LENGTH)


def cut(text: str, limit: int | None) -> str:
    """``text``, its head when it is longer than ``limit`` characters (ending with "…"), with
    lone surrogates replaced by U+FFFD, so that any encoder takes it."""
    if limit is not None and len(text) > limit:
        text = text[: max(limit - 1, 0)] + "…"
    return _LONE_SURROGATES.sub("\ufffd", text)


def format_error(exc: BaseException | None, max_length: int | None) -> str:
    """:func:`describe`, made storable: NUL bytes (PostgreSQL text cannot hold them) and lone
    surrogates replaced, cut to fit a column of ``max_length`` characters, and to
    :data:`~celery_deactivate.services.ERROR_LENGTH` without one."""
    return fit(describe(exc), max_length)


def fit(text: str, max_length: int | None) -> str:
    limit = ERROR_LENGTH if max_length is None else min(max_length, ERROR_LENGTH)
    return cut(text.replace("\x00", "\ufffd"), limit)
