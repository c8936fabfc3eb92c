"""``python -m tests.benchmarks.run [--rounds 5] [--n 2000] [--io-n 1000] [--memory] [--no-write]``.

For each available backend (the embedded default: an SQLite file + SQLAlchemy's SQLite broker;
PostgreSQL + Redis when ``DATABASE_URL`` and ``CELERY_BROKER_URL`` are set, see
:mod:`tests.benchmarks.env`), a child process starts ONE real ``celery worker --pool=prefork
--concurrency=2`` and runs every scenario (:mod:`tests.benchmarks.scenarios`) in interleaved
rounds, forwards then backwards, so that compared scenarios run side by side in every round and
each before the other as often.  For each run the table is reset (and, on PostgreSQL, vacuumed),
gate tasks hold the pool children while the messages are queued, then the clock runs from the
first measured task's start to the last one's end (no worker boot, no publishing); afterwards
the rows are checked (every task succeeded or failed as its scenario says, the feeds were polled
or rolled back and deactivated).  Ratios are medians of the per-round ratios; the time per task
is what one pool process spends on a task (concurrency / tasks per second), so the time the
extension adds is measured on the same runs as the ratios.  The report goes to stdout and, unless
``--no-write``, to ``tests/benchmarks/results.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from tests.benchmarks.env import ROOT, backends, child_env
from tests.benchmarks.mail import MAIL, mail_env, smtp_sink
from tests.benchmarks.scenarios import COMPARISONS, CONCURRENCY, KINDS, PATHS, SCENARIOS

RESULTS = Path(__file__).with_name("results.md")


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


class Runs:
    """One backend's measurements: per scenario, one dict per round."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self.rows: dict[str, list[dict[str, float]]] = data["scenarios"]
        self.concurrency: int = data["concurrency"]

    def has(self, path: str, *kinds: str) -> bool:
        return all(f"bench.{kind}_{path}" in self.rows for kind in kinds)

    def rounds(self, path: str, kind: str) -> list[dict[str, float]]:
        return self.rows[f"bench.{kind}_{path}"]

    def ms(self, round_: dict[str, float]) -> float:
        """Milliseconds one pool process spends per task."""
        return self.concurrency / round_["rate"] * 1000

    def ratios(self, path: str, kind: str, base: str) -> list[float]:
        pairs = zip(self.rounds(path, kind), self.rounds(path, base), strict=True)
        return [r["rate"] / b["rate"] for r, b in pairs]

    def added_ms(self, path: str, kind: str, base: str) -> list[float]:
        pairs = zip(self.rounds(path, kind), self.rounds(path, base), strict=True)
        return [self.ms(r) - self.ms(b) for r, b in pairs]


def table(backend_name: str, data: dict[str, Any]) -> list[str]:
    runs = Runs(data)
    sizes = data["sizes"]
    shown_paths = [path for path in PATHS if runs.has(path, *KINDS)]
    order = list(KINDS)
    lines = [
        f"### {backend_name}",
        "",
        f"{data['servers']}. {plural(data['rounds'], 'interleaved round')} of "
        + ", ".join(f"{sizes[path]:,} tasks ({PATHS[path]})" for path in shown_paths)
        + f" per scenario; `--concurrency={runs.concurrency}`; load average "
        + " → ".join(f"{x:.1f}" for x in data["load"])
        + " (1 min, before → after).",
        "",
        "| path | task | tasks/s | ms/task | × plain | × recipe | × peer | queries/task "
        "| peak RSS (MiB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for scenario in SCENARIOS:
        if scenario.path not in shown_paths:
            continue
        path, kind = scenario.path, scenario.kind
        rounds = runs.rounds(path, kind)

        def vs(base: str, kind: str = kind, path: str = path) -> str:
            # Against the kinds above it in the table only (the plain task has no "× recipe").
            if order.index(base) > order.index(kind):
                return "—"
            return f"{median(runs.ratios(path, kind, base)):.2f}"

        lines.append(
            f"| {PATHS[path]} | {scenario.label} | {median([r['rate'] for r in rounds]):,.0f} | "
            f"{median([runs.ms(r) for r in rounds]):.2f} | {vs('plain')} | {vs('recipe')} | "
            f"{vs('peer')} | {median([r['queries'] for r in rounds]):.2f} | "
            f"{median([r['rss_mib'] for r in rounds]):.0f} |"
        )
    lines += [
        "",
        "Side by side (median of the per-round ratios, the rounds' range in brackets; "
        "time added per task from the same runs):",
        "",
    ]
    for c in COMPARISONS:
        if not runs.has(c.path, c.kind, c.base):
            continue
        ratios = runs.ratios(c.path, c.kind, c.base)
        added = runs.added_ms(c.path, c.kind, c.base)
        lines.append(
            f"- {c.means}: **{median(ratios):.3f}×** [{min(ratios):.3f}–{max(ratios):.3f}], "
            f"{median(added):+.2f} ms per task [{min(added):+.2f} to {max(added):+.2f}]"
        )
    fan = data.get("fanout")
    if fan and fan["delay"]:
        speedup = median([f / d for f, d in zip(fan["dispatch"], fan["delay"], strict=True)])
        batching = "batched" if fan["batch_publish"] else "not batched: the transport cannot"
        lines += [
            "",
            f"Fan-out of {fan['n']:,} active objects ({plural(len(fan['delay']), 'round')}, "
            "medians): "
            f"a `.delay()` loop {median(fan['delay']):,.0f} msg/s, `task.dispatch_active()` "
            f"{median(fan['dispatch']):,.0f} msg/s (**{speedup:.1f}×**; publishes {batching}).",
        ]
        if fan.get("floor"):
            ceiling = median([f / d for f, d in zip(fan["floor"], fan["delay"], strict=True)])
            lines += [
                "",
                "Celery's floor, the same runs: its own `apply_async` alone over the keys in "
                "memory, a page per `Producer.batch()` as `dispatch_active` sends them, "
                f"{median(fan['floor']):,.0f} msg/s (**{ceiling:.1f}×** the loop): no fan-out "
                "that sends through `apply_async` can go faster here. `dispatch_active()` "
                f"{at_floor(fan)} the floor (the two alternate which runs first).",
            ]
    stored = data.get("fanout_results")
    if stored and stored["delay"]:
        speedup = median([f / d for f, d in zip(stored["dispatch"], stored["delay"], strict=True)])
        ceiling = median([f / d for f, d in zip(stored["floor"], stored["delay"], strict=True)])
        lines += [
            "",
            "The same fan-out with a Redis result backend (results stored; outside a worker "
            "Celery subscribes to each sent task's result channel, and unsubscribes): a "
            f"`.delay()` loop {median(stored['delay']):,.0f} msg/s, `task.dispatch_active()` "
            f"{median(stored['dispatch']):,.0f} msg/s (**{speedup:.1f}×**), Celery's floor "
            f"{median(stored['floor']):,.0f} msg/s ({ceiling:.1f}×); `dispatch_active()` "
            f"{at_floor(stored)} the floor. Take `shards=` (the fan-out "
            "runs in workers, where Celery does not subscribe) or `ignore_result=True` on the "
            "task.",
        ]
    mem = data.get("memory")
    if mem:
        lines += [
            "",
            "Fan-out peak RSS of the dispatching process: "
            + ", ".join(f"{n:,} objects: {rss:.0f} MiB" for n, rss in mem)
            + ".",
        ]
    return lines


def at_floor(fan: dict[str, Any]) -> str:
    """``dispatch_active`` against Celery's floor: the median of the per-round ratios, and their
    range."""
    ratios = [d / f for d, f in zip(fan["dispatch"], fan["floor"], strict=True)]
    return f"**{median(ratios):.3f}×** [{min(ratios):.3f}–{max(ratios):.3f}]"


def machine() -> str:
    def v(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return "?"

    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{os.cpu_count()} CPUs ({cpu}), {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}, celery-deactivate {v('celery-deactivate')} "
        f"({commit()}), Celery {v('celery')}, kombu {v('kombu')}, Django {v('Django')}, "
        f"psycopg {v('psycopg')}, redis-py {v('redis')}"
    )


def commit() -> str:
    """The code measured: the commit, ``+ changes`` when the work tree differs from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "commit unknown"
    return (f"code of {head}" + (" + changes" if dirty else "")) if head else "commit unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--n", type=int, default=2000, help="tasks per scenario and round")
    parser.add_argument(
        "--io-n", type=int, default=1000, help="tasks per scenario and round, 5 ms body"
    )
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY)
    parser.add_argument(
        "--path", action="append", choices=list(PATHS), help="only these paths (ok, fail, io, mix)"
    )
    parser.add_argument("--fanout-n", type=int, default=10000, help="fan-out size on Redis")
    parser.add_argument(
        "--embedded-fanout-n",
        type=int,
        default=1000,
        help="fan-out size on the embedded broker (a few hundred messages/s: keep it small)",
    )
    parser.add_argument(
        "--memory",
        action="store_true",
        help="also measure fan-out RSS at 100k / 1M objects (PostgreSQL + Redis)",
    )
    parser.add_argument(
        "--backend", action="append", help="only these backends (embedded, pgredis)"
    )
    parser.add_argument(
        "--mail",
        choices=MAIL,
        default=MAIL[0],
        help="mail over SMTP to a sink on loopback (default), or rendered and dropped",
    )
    parser.add_argument("--no-write", action="store_true", help="do not write results.md")
    args = parser.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    command = "make bench" + (f" BENCH_ARGS={shlex.quote(shlex.join(given))}" if given else "")
    started = datetime.datetime.now().astimezone()
    out: list[str] = []
    for backend in backends():
        if args.backend and backend["key"] not in args.backend:
            continue
        with tempfile.TemporaryDirectory(prefix="cd-bench-") as workdir, smtp_sink() as port:
            env = child_env(backend, workdir) | mail_env(args.mail, port)
            fanout_n = args.fanout_n if backend["key"] == "pgredis" else args.embedded_fanout_n
            cmd = [
                sys.executable,
                "-m",
                "tests.benchmarks.worker_run",
                *("--rounds", str(args.rounds), "--n", str(args.n), "--io-n", str(args.io_n)),
                *("--concurrency", str(args.concurrency), "--fanout-n", str(fanout_n)),
                *(f"--path={path}" for path in args.path or ()),
                *("--workdir", workdir),
            ]
            # The memory run publishes 1,000,000 messages: Redis only (the embedded broker
            # takes a few hundred a second).
            if args.memory and backend["key"] == "pgredis":
                cmd.append("--memory")
            print(f"== {backend['name']}", file=sys.stderr, flush=True)
            proc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
            if proc.returncode:
                print(
                    f"benchmark failed on {backend['name']} (exit {proc.returncode})",
                    file=sys.stderr,
                )
                return proc.returncode
            raw = proc.stdout.strip().splitlines()[-1]
            Path(tempfile.gettempdir(), f"cd-bench-{backend['key']}.json").write_text(raw)
            data = json.loads(raw)
        out += [*table(backend["name"], data), ""]
    report = [
        "# Benchmark results",
        "",
        f"{started:%Y-%m-%d %H:%M %Z} · `{command}` · {machine()}.",
        "",
        "A real prefork worker per backend (`CELERY_DB_REUSE_MAX` set, results ignored); every "
        "scenario runs in every round, compared ones back to back, rounds alternate direction. "
        "The tasks (`tests/benchmarks/tasks.py`) share one body, a `get()` and a `save()` of a "
        "feed (the failing ones raise after it, the 5 ms one sleeps between them): a plain "
        "task; the recipe (the body in `transaction.atomic`, deactivate and mail on error); "
        "the peer, the recipe with the drop-in's guarantee written by hand (inside the "
        "transaction the body runs only if the feed is active); `DeactivatingTask` as a "
        "drop-in (the body gets its feed) and with `deactivate_pass_object=True` (the body "
        "receives it). ms/task: the time one pool process spends per task (concurrency ÷ "
        "tasks/s). × plain, × recipe, × peer: medians of the per-round throughput ratios. "
        "queries/task: statements counted by an execute wrapper in the warm-up pass only "
        "(savepoints included; BEGIN, COMMIT and ROLLBACK are not statements); the timed rounds "
        "run without it. "
        + (
            "Mail (the recipe's `mail_admins()`, the library's notices) goes through Django's "
            "SMTP backend to an SMTP server on loopback that drops it (aiosmtpd, its own process)."
            if args.mail == "smtp"
            else "Mail is rendered and dropped, not sent (`--mail render`)."
        ),
        "",
        *out,
    ]
    text = "\n".join(report).rstrip() + "\n"
    print(text)
    if not args.no_write:
        RESULTS.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
