"""Per-child counters shared between the benchmark worker's pool children and the runner.

A file of fixed slots, mapped in memory by every child (``worker_process_init``) and by the runner:
writing a counter is a memory store, so measuring costs the tasks next to nothing.  Slot layout:
pid, tasks, queries, failures, peak RSS (KiB), first task start, last task end (``time.time()``).

Queries are counted only in a counting pass (:func:`set_counting`), by an execute wrapper put
on the connection for each task: the timed rounds run with no wrapper installed, as a
production worker does (an installed wrapper costs every query).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery import signals
from django.db import connections

SLOT = struct.Struct("<qqqqqdd")
#: Byte offsets of the fields in a slot.
PID, TASKS, QUERIES, FAILURES, RSS, FIRST, LAST = (8 * i for i in range(7))
SLOTS = 64
SIZE = SLOT.size * SLOTS
#: The last slot is the runner's: its first field set means "count queries".
CONTROL = (SLOTS - 1) * SLOT.size
PAGE = os.sysconf("SC_PAGE_SIZE") // 1024


@dataclass
class Totals:
    tasks: int
    queries: int
    failures: int
    rss_kib: int
    first: float
    last: float


def create(path: str) -> None:
    with open(path, "wb") as f:
        f.write(b"\0" * SIZE)


def open_map(path: str) -> mmap.mmap:
    with open(path, "r+b") as f:
        return mmap.mmap(f.fileno(), SIZE)


def set_counting(m: mmap.mmap, on: bool) -> None:
    struct.pack_into("<q", m, CONTROL, int(on))


def counting(m: mmap.mmap) -> bool:
    return bool(struct.unpack_from("<q", m, CONTROL)[0])


def reset(m: mmap.mmap) -> None:
    """Zero every counter, keeping the slots' owners."""
    for i in range(SLOTS - 1):
        pid = SLOT.unpack_from(m, i * SLOT.size)[0]
        SLOT.pack_into(m, i * SLOT.size, pid, 0, 0, 0, 0, 0.0, 0.0)


def totals(m: mmap.mmap) -> Totals:
    rows = [SLOT.unpack_from(m, i * SLOT.size) for i in range(SLOTS - 1)]
    used = [r for r in rows if r[1]]
    return Totals(
        tasks=sum(r[1] for r in rows),
        queries=sum(r[2] for r in rows),
        failures=sum(r[3] for r in rows),
        rss_kib=max((r[4] for r in rows), default=0),
        first=min((r[5] for r in used), default=0.0),
        last=max((r[6] for r in used), default=0.0),
    )


def rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class _Child:
    def __init__(self, path: str) -> None:
        self.map = open_map(path)
        with open(path, "r+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                for i in range(SLOTS - 1):
                    if SLOT.unpack_from(self.map, i * SLOT.size)[0] in (0, os.getpid()):
                        break
                else:
                    raise RuntimeError("no free stats slot")
                self.offset = i * SLOT.size
                struct.pack_into("<q", self.map, self.offset + PID, os.getpid())
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def add(self, field: int, amount: int = 1) -> None:
        at = self.offset + field
        (value,) = struct.unpack_from("<q", self.map, at)
        struct.pack_into("<q", self.map, at, value + amount)

    def started(self) -> None:
        at = self.offset + FIRST
        if struct.unpack_from("<d", self.map, at)[0] == 0.0:
            struct.pack_into("<d", self.map, at, time.time())

    def finished(self) -> None:
        struct.pack_into("<d", self.map, self.offset + LAST, time.time())
        (count,) = struct.unpack_from("<q", self.map, self.offset + TASKS)
        if count % 32 == 0:
            self.sample_rss()
        self.add(TASKS)

    def sample_rss(self) -> None:
        at = self.offset + RSS
        rss = rss_kib()
        if rss > struct.unpack_from("<q", self.map, at)[0]:
            struct.pack_into("<q", self.map, at, rss)


_child: _Child | None = None


def connect(measured: Callable[[str], bool]) -> None:
    """Count the ``measured`` tasks of every pool child in the file ``$BENCH_STATS``."""

    @signals.worker_process_init.connect(weak=False)
    def init(**kwargs: Any) -> None:
        global _child
        path = os.environ.get("BENCH_STATS")
        if not path:
            return
        _child = _Child(path)

    def count_query(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        if _child is not None:
            _child.add(QUERIES)
        return execute(sql, params, many, context)

    @signals.task_prerun.connect(weak=False)
    def prerun(sender: Any = None, **kwargs: Any) -> None:
        if _child is not None and measured(sender.name):
            _child.started()
            if counting(_child.map):
                connections["default"].execute_wrappers.append(count_query)

    @signals.task_failure.connect(weak=False)
    def failure(sender: Any = None, **kwargs: Any) -> None:
        if _child is not None and measured(sender.name):
            _child.add(FAILURES)

    @signals.task_postrun.connect(weak=False)
    def postrun(sender: Any = None, **kwargs: Any) -> None:
        if _child is not None and measured(sender.name):
            wrappers = connections["default"].execute_wrappers
            if count_query in wrappers:
                wrappers.remove(count_query)
            _child.finished()
