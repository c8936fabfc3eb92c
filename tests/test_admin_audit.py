"""The admin's audit trail (issue #20, part A, item 3): each object an action of the mixin
changes gets a ``LogEntry`` (the admin's "History" page), with the user and what was done; an
object the action left alone gets none.

Through Django's test Client against the test project's admin (tests/testapp/admin.py).
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from django.contrib.admin.models import CHANGE, LogEntry
from django.contrib.auth.models import Permission, User
from django.contrib.contenttypes.models import ContentType
from django.test import Client
from django.utils import timezone

from tests.testapp.models import Feed, UuidFeed

pytestmark = pytest.mark.django_db

FEEDS = "/admin/testapp/feed/"


def editor() -> tuple[Client, User]:
    """A staff user who may view and change feeds (no superuser)."""
    user = User.objects.create_user("editor", is_staff=True)
    user.user_permissions.set(
        Permission.objects.filter(codename__in=["view_feed", "change_feed", "change_uuidfeed"])
    )
    client = Client()
    client.force_login(user)
    return client, user


def act(client: Client, url: str, action: str, pks: list[Any]) -> None:
    response = client.post(url, {"action": action, "_selected_action": pks}, follow=True)
    assert response.status_code == 200


def history(obj: Any) -> list[tuple[str, int, str, str]]:
    """The object's log entries, oldest first: (user, flag, message, repr)."""
    entries = LogEntry.objects.filter(
        content_type=ContentType.objects.get_for_model(type(obj)), object_id=str(obj.pk)
    ).order_by("pk")
    return [
        (entry.user.username, entry.action_flag, entry.get_change_message(), entry.object_repr)
        for entry in entries
    ]


def broken(title: str, **fields: Any) -> Feed:
    return Feed.objects.create(
        title=title, active=False, error=True, error_message="Boom", failure_count=1, **fields
    )


def test_each_object_an_action_changes_gets_an_entry_and_no_other() -> None:
    client, _ = editor()
    on = Feed.objects.create(title="on")
    paused = Feed.objects.create(title="paused", active=False)

    act(client, FEEDS, "deactivate_selected", [on.pk, paused.pk])

    assert history(on) == [("editor", CHANGE, "Deactivated by hand.", "on")]
    assert history(paused) == []  # deactivated already: the action did not change it

    act(client, FEEDS, "reactivate_selected", [on.pk, paused.pk])
    act(client, FEEDS, "reactivate_selected", [on.pk])  # active already: no entry

    assert history(on) == [
        ("editor", CHANGE, "Deactivated by hand.", "on"),
        ("editor", CHANGE, "Re-activated.", "on"),
    ]
    assert history(paused) == [("editor", CHANGE, "Re-activated.", "paused")]
    assert LogEntry.objects.count() == 3


def test_turning_a_probe_off_is_an_entry_of_its_own() -> None:
    client, _ = editor()
    waiting = broken("waiting", next_probe_at=timezone.now(), cooldown=60)
    failed = broken("failed")  # no probe: the action changes nothing

    act(client, FEEDS, "deactivate_selected", [waiting.pk, failed.pk])

    assert history(waiting) == [
        ("editor", CHANGE, "Cool-down probes turned off; still deactivated by error.", "waiting")
    ]
    assert history(failed) == []


def test_the_history_page_shows_who_did_what() -> None:
    client, user = editor()
    feed = broken("broken")
    act(client, FEEDS, "reactivate_selected", [feed.pk])

    page = client.get(f"{FEEDS}{feed.pk}/history/")

    assert page.status_code == 200
    [entry] = page.context["action_list"]
    assert (entry.user, entry.get_change_message()) == (user, "Re-activated.")
    assert "Re-activated." in page.content.decode()


def test_the_mixin_alone_logs_too_with_a_uuid_key() -> None:
    client, _ = editor()
    obj = UuidFeed.objects.create(id=uuid.uuid4(), title="u", active=False)

    act(client, "/admin/testapp/uuidfeed/", "reactivate_selected", [str(obj.pk)])

    assert history(obj) == [("editor", CHANGE, "Re-activated.", "u")]


def test_a_view_only_user_leaves_no_entry() -> None:
    user = User.objects.create_user("viewer", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(codename="view_feed"))
    client = Client()
    client.force_login(user)
    feed = broken("broken")

    act(client, FEEDS, "reactivate_selected", [feed.pk])

    assert LogEntry.objects.count() == 0
    feed.refresh_from_db()
    assert feed.active is False
