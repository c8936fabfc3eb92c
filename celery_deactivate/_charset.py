"""Text a column can hold: on MySQL and MariaDB, a 4-byte character (an emoji) becomes U+FFFD in
a column whose character set stores at most 3 bytes a character (``utf8mb3``, ``utf8``,
``ucs2``), or when the connection's does; in strict mode the server refuses it ("Incorrect
string value") and the whole change with it.

The character sets are read from ``information_schema`` with one ``SELECT`` through Django's
cursor, only when a value to write holds such a character: other changes run no statement more,
and nothing is cached, so a table converted since is seen at once.  Other backends store any
text the library writes (NUL bytes and lone surrogates are replaced by ``_errors`` for all).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from django.db import connections
from django.db.models import Field, Model, QuerySet

#: Characters outside the Basic Multilingual Plane: 4 bytes in UTF-8.
_FOUR_BYTES = re.compile("[\U00010000-\U0010ffff]")
#: MySQL's character sets of at most 3 bytes a character that take any other Unicode text.
NARROW = ("utf8", "utf8mb3", "ucs2")


def update(rows: QuerySet[Any], values: Mapping[str, Any]) -> int:
    """``rows.update(**values)``, each text value made storable in its column (:func:`storable`)."""
    changed: int = rows.update(**storable(rows.model, values, rows.db))
    return changed


def storable(model: type[Model], values: Mapping[str, Any], using: str) -> dict[str, Any]:
    """``values`` (field name -> value) with each text value the columns of ``model``'s table on
    ``using`` can hold: 4-byte characters replaced by U+FFFD in a 3-byte column (MySQL, MariaDB)."""
    wide = [
        name
        for name, value in values.items()
        if isinstance(value, str) and _FOUR_BYTES.search(value)
    ]
    if not wide or connections[using].vendor != "mysql":
        return dict(values)
    narrow = narrow_columns(model._meta.db_table, using)
    fitted = dict(values)
    for name in wide:
        field = model._meta.get_field(name)
        if isinstance(field, Field) and field.column in narrow:
            fitted[name] = _FOUR_BYTES.sub("\ufffd", values[name])
    return fitted


def narrow_columns(table: str, using: str) -> set[str]:
    """The text columns of ``table`` that cannot hold a 4-byte character: a 3-byte character set,
    theirs or the connection's."""
    marks = ", ".join(["%s"] * len(NARROW))
    with connections[using].cursor() as cursor:
        cursor.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = DATABASE() "
            "AND table_name = %s AND character_set_name IS NOT NULL "
            f"AND (character_set_name IN ({marks}) OR @@character_set_connection IN ({marks}))",
            [table, *NARROW, *NARROW],
        )
        return {str(name) for (name,) in cursor.fetchall()}
