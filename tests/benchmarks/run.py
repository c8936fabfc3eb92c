"""``python -m tests.benchmarks.run [--rounds 7] [--n 2000] [--fanout-n 10000] [--memory]``.


For each available backend (the embedded default: SQLite file + SQLAlchemy/SQLite broker;
PostgreSQL + Redis when ``DATABASE_URL`` and ``CELERY_BROKER_URL`` are set), a child process
starts ONE real ``celery worker --pool=prefork --concurrency=2`` and runs every scenario in
interleaved rounds (forwards, then backwards, so that compared scenarios run side by side and
each before the other as often): the table is reset (and, on PostgreSQL, vacuumed), two gate
tasks hold the pool children while N messages are queued, then the clock runs from the first
measured task's start to the last one's end (no worker boot, no publishing).  The table of
medians goes to stdout and to ``tests/benchmarks/results.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).with_name("results.md")

SCENARIOS = [
    ("plain", "ok", "bench.plain_ok"),
    ("recipe", "ok", "bench.recipe_ok"),
    ("DeactivatingTask", "ok", "bench.deactivating_ok"),
    ("DeactivatingTask pass-object", "ok", "bench.object_ok"),
    ("plain", "fail", "bench.plain_fail"),
    ("recipe", "fail", "bench.recipe_fail"),
    ("DeactivatingTask", "fail", "bench.deactivating_fail"),
    ("DeactivatingTask pass-object", "fail", "bench.object_fail"),
]


def backends() -> list[dict[str, str]]:
    found = [{"name": "embedded (SQLite + sqla+sqlite broker)", "key": "embedded"}]
    db, broker = os.environ.get("DATABASE_URL"), os.environ.get("CELERY_BROKER_URL", "")
    if db and broker.startswith("redis://"):
        parts = urlsplit(db)
        bench_db = urlunsplit(
            parts._replace(path="/" + os.environ.get("BENCH_DATABASE", "cd_bench"))
        )
        redis = urlsplit(broker)
        bench_broker = urlunsplit(redis._replace(path="/" + os.environ.get("BENCH_REDIS_DB", "6")))
        found.append(
            {
                "name": "PostgreSQL + Redis",
                "key": "pgredis",
                "BENCH_DATABASE_URL": bench_db,
                "BENCH_BROKER_URL": bench_broker,
            }
        )
    return found


def child_env(backend: dict[str, str], workdir: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "CELERY_BROKER_URL"}}
    env.update({k: v for k, v in backend.items() if k.startswith("BENCH_")})
    env["DJANGO_SETTINGS_MODULE"] = "tests.benchmarks.settings"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("CELERY_DB_REUSE_MAX", "1000")
    if backend["key"] == "embedded":
        env["BENCH_SQLITE"] = str(Path(workdir) / "bench.sqlite3")
        # kombu's filesystem transport can hand a consumer a half-written file while publishing
        # runs; the SQLAlchemy transport on an SQLite file is transactional.
        env["BENCH_BROKER_URL"] = f"sqla+sqlite:///{Path(workdir) / 'broker.sqlite3'}"
    return env


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ratio(rows: list[dict[str, float]], base: list[dict[str, float]]) -> float:
    return median([r["rate"] / b["rate"] for r, b in zip(rows, base, strict=True)])


def table(backend_name: str, data: dict[str, Any]) -> list[str]:
    rows = data["scenarios"]

    def med(key: str, field: str) -> float:
        return median([r[field] for r in rows[key]])

    lines = [
        f"### {backend_name}",
        "",
        f"{data['rounds']} interleaved rounds of {data['n']} tasks per scenario; medians.",
        "",
        "| path | task | tasks/s | × plain | × recipe | queries/task | peak RSS (MiB) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for label, path, name in SCENARIOS:
        rate = med(name, "rate")
        # Ratios: median of the per-round ratios (each round's scenarios ran back to back).
        vs_plain = ratio(rows[name], rows[f"bench.plain_{path}"])
        vs_recipe = ratio(rows[name], rows[f"bench.recipe_{path}"])
        shown = "—" if label == "plain" else f"{vs_recipe:.2f}"
        lines.append(
            f"| {'success' if path == 'ok' else 'failure'} | {label} | {rate:,.0f} | "
            f"{vs_plain:.2f} | {shown} | "
            f"{med(name, 'queries'):.2f} | {med(name, 'rss_mib'):.0f} |"
        )
    fan = data.get("fanout")
    if fan:
        delay = median(fan["delay"])
        fast = median(fan["dispatch"])
        speedup = median([f / d for f, d in zip(fan["dispatch"], fan["delay"], strict=True)])
        lines += [
            "",
            f"Fan-out of {fan['n']:,} active objects ({data['rounds']} rounds, medians): "
            f"`.delay()` loop {delay:,.0f} msg/s, `dispatch_active` {fast:,.0f} msg/s "
            f"(**{speedup:.1f}×**, fast path: {fan['path']}).",
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


def versions() -> str:
    def v(mod: str) -> str:
        try:
            from importlib.metadata import version

            return version(mod)
        except Exception:
            return "?"

    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    server = []
    for cmd, label in (
        (
            [
                "psql",
                "-h",
                "127.0.0.1",
                "-p",
                "55432",
                "-U",
                "postgres",
                "-tAc",
                "show server_version",
            ],
            "PostgreSQL",
        ),
        (["redis-cli", "-p", "56379", "info", "server"], "Redis"),
    ):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=5).stdout
            if label == "Redis":
                out = next(
                    (x.split(":")[1] for x in out.splitlines() if x.startswith("redis_version")), ""
                )
            if out.strip():
                server.append(f"{label} {out.strip()}")
        except (OSError, subprocess.SubprocessError):
            pass
    return (
        f"{os.cpu_count()} CPUs ({cpu}), {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}, Celery {v('celery')}, kombu {v('kombu')}, "
        f"Django {v('Django')}, psycopg {v('psycopg')}, redis-py {v('redis')}"
        + ("; " + ", ".join(server) if server else "")
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--n", type=int, default=2000, help="tasks per scenario and round")
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
    parser.add_argument("--no-write", action="store_true", help="do not write results.md")
    args = parser.parse_args(argv)
    out: list[str] = []
    for backend in backends():
        if args.backend and backend["key"] not in args.backend:
            continue
        with tempfile.TemporaryDirectory(prefix="cd-bench-") as workdir:
            env = child_env(backend, workdir)
            cmd = [
                sys.executable,
                "-m",
                "tests.benchmarks.worker_run",
                "--rounds",
                str(args.rounds),
                "--n",
                str(args.n),
                "--fanout-n",
                str(args.fanout_n if backend["key"] == "pgredis" else args.embedded_fanout_n),
                "--workdir",
                workdir,
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
    command = "make bench" + (
        f" BENCH_ARGS='{' '.join(argv or sys.argv[1:])}'" if (argv or sys.argv[1:]) else ""
    )
    report = [
        "# Benchmark results",
        "",
        f"{datetime.date.today().isoformat()} · `{command}` · {versions()}.",
        "",
        "Real prefork worker (`--concurrency=2`, `CELERY_DB_REUSE_MAX` set, results ignored). "
        "× plain / × recipe: medians of the per-round ratios. Queries: statements per task, "
        "counted by an execute wrapper in the warm-up pass only (SAVEPOINTs included; "
        "BEGIN/COMMIT/ROLLBACK are not statements, a BEGIN sent with a query is not counted "
        "apart); the timed rounds run with no wrapper installed.",
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
