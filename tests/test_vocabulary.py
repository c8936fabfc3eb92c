"""One vocabulary for the states (issue #20): the admin's column and filter, and the command's
table and JSON, name each object's state the same way.

One feed per state: active, deactivated by error with a probe scheduled, deactivated by error
with none, deactivated by hand, probing (a probe in flight).  The admin through Django's test
Client, the command through ``call_command``.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta
from io import StringIO
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.management import call_command
from django.test import Client
from django.utils import timezone
from django.utils.text import capfirst

from celery_deactivate import services
from celery_deactivate.states import State, condition, state_of, states
from tests.testapp.models import Feed, ProxyFeed

pytestmark = pytest.mark.django_db

FEEDS = "/admin/testapp/feed/"


def clock(moment: datetime) -> str:
    """``14:05`` today, the date too on another day, in the current time zone."""
    local = timezone.localtime(moment)
    same_day = local.date() == timezone.localdate()
    return local.strftime("%H:%M" if same_day else "%Y-%m-%d %H:%M")


@pytest.fixture
def one_per_state() -> dict[str, Any]:
    """Feeds by title, and the names every tool must give them."""
    now = timezone.now()
    due = now + timedelta(minutes=10)
    since = now - timedelta(minutes=2)
    off = {"active": False, "error": True, "error_message": "Boom", "deactivated_at": now}
    Feed.objects.create(title="healthy")
    Feed.objects.create(title="waiting", **off, next_probe_at=due, cooldown=600)
    Feed.objects.create(title="failed", **off)
    Feed.objects.create(title="paused", active=False, deactivated_at=now)
    Feed.objects.create(title="trying", **off, next_probe_at=now, cooldown=600, probing_since=since)
    return {
        "healthy": (State.ACTIVE, "active"),
        "waiting": (State.BY_ERROR, f"deactivated by error (probe at {clock(due)})"),
        "failed": (State.BY_ERROR, "deactivated by error"),
        "paused": (State.BY_HAND, "deactivated by hand"),
        "trying": (State.PROBING, f"probing (since {clock(since)})"),
    }


@pytest.fixture
def admin_client() -> Client:
    client = Client()
    client.force_login(User.objects.create_superuser("ops", "ops@example.com", "secret"))
    return client


def shown_states(response: Any) -> dict[str, str]:
    """The changelist's state column by object, tags left out."""
    body = response.content.decode().split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    found = {}
    for obj, row in zip(response.context["cl"].result_list, body.split("<tr")[1:], strict=True):
        cell = re.search(r'class="field-deactivation_state[^"]*">(.*?)</td>', row, re.S)
        assert cell, row
        found[str(obj)] = re.sub(r"<[^>]+>", "", cell.group(1)).strip()
    return found


def command(*args: str) -> str:
    out = StringIO()
    call_command("deactivated", "testapp.Feed", *args, stdout=out)
    return out.getvalue()


def test_the_changelist_names_each_state(admin_client: Client, one_per_state: Any) -> None:
    shown = shown_states(admin_client.get(FEEDS))

    assert shown == {title: capfirst(name) for title, (_, name) in one_per_state.items()}


def test_the_filter_lists_each_state_and_nothing_else(
    admin_client: Client, one_per_state: Any
) -> None:
    for state in State:
        if state is State.DEACTIVATED:
            continue  # Feed records its error: no plain "deactivated"
        response = admin_client.get(FEEDS, {"deactivation": state.value})
        listed = {str(feed) for feed in response.context["cl"].result_list}
        expected = {title for title, (wanted, _) in one_per_state.items() if wanted is state}
        assert listed == expected, state
    counts = {
        state.value: admin_client.get(FEEDS, {"deactivation": state.value})
        .context["cl"]
        .result_count
        for state in (State.ACTIVE, State.BY_ERROR, State.BY_HAND, State.PROBING)
    }
    assert counts == {"active": 1, "error": 2, "hand": 1, "probing": 1}


def test_the_command_table_uses_the_same_names(one_per_state: Any) -> None:
    lines = command().splitlines()

    header = lines[0]
    start, end = header.index("STATE"), header.index("WHEN")
    by_title = {line.split()[2]: line[start:end].strip() for line in lines[1:-1]}
    assert by_title == {
        title: name for title, (state, name) in one_per_state.items() if state is not State.ACTIVE
    }


def test_the_command_json_gives_the_state_key_and_name(
    admin_client: Client, one_per_state: Any
) -> None:
    objects = json.loads(command("--json"))["objects"]

    got = {item["object"]: (item["state"], item["state_label"]) for item in objects}
    assert got == {
        title: (state.value, name)
        for title, (state, name) in one_per_state.items()
        if state is not State.ACTIVE
    }
    trying = next(item for item in objects if item["object"] == "trying")
    assert trying["probing_since"] is not None and trying["next_probe_at"] is not None
    # The admin's filter takes the same keys.
    for item in objects:
        response = admin_client.get(FEEDS, {"deactivation": item["state"]})
        assert item["object"] in {str(feed) for feed in response.context["cl"].result_list}


def test_each_state_condition_selects_what_state_of_says(one_per_state: Any) -> None:
    for model in (Feed, ProxyFeed):
        fields = {"error": None} if model is ProxyFeed else None
        target = services.target_for(model, fields)
        for state in states(target):
            selected = set(model.objects.filter(condition(target, state)))
            assert selected == {
                obj for obj in model.objects.all() if state_of(target, obj) is state
            }
    # Without an error field, the inactive ones are "deactivated", "probing" apart.
    proxy = services.target_for(ProxyFeed, {"error": None})
    assert states(proxy) == (State.ACTIVE, State.DEACTIVATED, State.PROBING)
    named = {str(obj): state_of(proxy, obj) for obj in ProxyFeed.objects.all()}
    assert named == {
        "healthy": State.ACTIVE,
        "waiting": State.DEACTIVATED,
        "failed": State.DEACTIVATED,
        "paused": State.DEACTIVATED,
        "trying": State.PROBING,
    }


def test_a_failure_with_a_cool_down_is_deactivated_by_error_in_both(
    admin_client: Client,
) -> None:
    # Given a feed a failure just deactivated, with cool-down probes on (the example's case)
    feed = Feed.objects.create(title="just failed")
    target = services.target_for(Feed)
    services.record_failure(
        target, feed.pk, RuntimeError("down"), threshold=1, sender=None, cooldown=(600, 86400)
    )
    feed.refresh_from_db()
    assert feed.next_probe_at is not None

    # Then the admin and the command both say "deactivated by error", with the probe's time
    name = f"deactivated by error (probe at {clock(feed.next_probe_at)})"
    assert shown_states(admin_client.get(FEEDS)) == {"just failed": capfirst(name)}
    response = admin_client.get(FEEDS, {"deactivation": "error"})
    assert [str(obj) for obj in response.context["cl"].result_list] == ["just failed"]
    assert json.loads(command("--json"))["objects"][0]["state_label"] == name
