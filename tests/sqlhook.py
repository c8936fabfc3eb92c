"""An execute hook installed the way Sentry's Django integration installs its own: it replaces
``django.db.backends.utils.CursorWrapper.execute`` (and ``executemany``), so it sees every
statement that goes through Django's cursor, and none that goes around it."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from typing import Any

from django.db.backends.utils import CursorWrapper


def install(record: Callable[[str], None]) -> Callable[[], None]:
    """Record the SQL of every ``execute``/``executemany``; return a function that uninstalls."""
    real_execute, real_executemany = CursorWrapper.execute, CursorWrapper.executemany

    def execute(self: CursorWrapper, sql: Any, params: Any = None) -> Any:
        record(str(sql))
        return real_execute(self, sql, params)

    def executemany(self: CursorWrapper, sql: Any, param_list: Any) -> Any:
        record(str(sql))
        return real_executemany(self, sql, param_list)

    CursorWrapper.execute = execute  # type: ignore[method-assign]
    CursorWrapper.executemany = executemany  # type: ignore[method-assign]

    def uninstall() -> None:
        CursorWrapper.execute = real_execute  # type: ignore[method-assign]
        CursorWrapper.executemany = real_executemany  # type: ignore[method-assign]

    return uninstall


def install_to_file(path: str) -> None:
    """In a worker: append ``<process name>\\t<sql>`` lines to ``path``."""

    def record(sql: str) -> None:
        line = f"{multiprocessing.current_process().name}\t{' '.join(sql.split())}\n"
        with open(path, "a", encoding="utf-8") as file:
            file.write(line)

    install(record)


if os.environ.get("SQL_HOOK_LOG"):
    install_to_file(os.environ["SQL_HOOK_LOG"])
