"""The example project's ``manage.py seed_demo`` (``make example-admin``): every state the library
shows is in the admin, with a history and a login.

It runs as a user runs it, in a subprocess from ``examples/``, on the example's embedded default
(SQLite, the filesystem broker) in a folder of its own (``EXAMPLE_VAR_DIR``): the servers of the
environment (``DATABASE_URL``...) are left out, and ``examples/var/`` is not touched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

#: Read by the example's own shell, after the seed: each feed's state, probe and history.
REPORT = """
import json
from django.contrib.auth import authenticate
from celery_deactivate.models import HistoryEvent
from celery_deactivate.states import state_of, states
from feeds.models import Feed
from feeds.tasks import poll

target = poll.target
print(json.dumps({
    "states": [str(state) for state in states(target)],
    "feeds": {
        feed.title: {
            "state": str(state_of(target, feed)),
            "probe due": feed.next_probe_at is not None,
            "entries": feed.entries.count(),
            "history": [
                [event.kind, event.cause, event.actor]
                for event in HistoryEvent.objects.filter(model="feeds.Feed", object_pk=str(feed.pk))
                .order_by("at", "id")
            ],
        }
        for feed in Feed.objects.order_by("pk")
    },
    "login": getattr(authenticate(username="admin", password="admin"), "is_superuser", False),
}))
"""


def manage(var: Path, *arguments: str) -> str:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("DATABASE_URL", "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND")
        and not key.startswith("DJANGO_")
    }
    done = subprocess.run(
        [sys.executable, "manage.py", *arguments],
        cwd=EXAMPLES,
        env={**env, "EXAMPLE_VAR_DIR": str(var)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, (
        f"{arguments}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    )
    return done.stdout


def test_seed_demo_leaves_a_feed_in_every_state_with_a_history_and_a_login(tmp_path: Path) -> None:
    # When the seed runs twice (the second starts over)
    manage(tmp_path, "seed_demo", "--superuser", "admin")
    out = manage(tmp_path, "seed_demo", "--superuser", "admin")
    found = json.loads(manage(tmp_path, "shell", "-c", REPORT).splitlines()[-1])

    # Then every state the admin's filter lists has a feed in it
    feeds = found["feeds"]
    assert len(feeds) == 5
    assert sorted({feed["state"] for feed in feeds.values()}) == sorted(found["states"])
    assert set(found["states"]) == {"active", "error", "hand", "probing"}
    # the feed deactivated by error has its probe scheduled; the one probing waits in the broker
    assert feeds["Night Owl Radio"]["state"] == "error"
    assert feeds["Night Owl Radio"]["probe due"] is True
    assert feeds["Chess Weekly"]["state"] == "probing"
    assert len(list((tmp_path / "broker" / "queue").iterdir())) == 1  # its probe, once
    assert feeds["Garden Journal"]["state"] == "hand"
    assert feeds["Garden Journal"]["history"] == [["deactivated", "hand", "admin"]]
    # one feed's history: a failure, a probe, a re-activation by the probe
    assert feeds["Kernel Notes"]["state"] == "active"
    assert [kind_cause[:2] for kind_cause in feeds["Kernel Notes"]["history"]] == [
        ["deactivated", "failure"],
        ["probe_sent", "probe"],
        ["reactivated", "probe"],
    ]
    assert feeds["Morning Digest"] == {
        "state": "active",
        "probe due": False,
        "entries": 3,
        "history": [],
    }
    assert found["login"] is True
    # and the command says what a visitor will see
    assert "Night Owl Radio   deactivated by error (probe at " in out
    assert "Chess Weekly      probing (since " in out
