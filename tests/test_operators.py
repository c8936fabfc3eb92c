"""The way back for operators: the admin actions (the command: test_command.py)."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client

from celery_deactivate.signals import object_deactivated, object_reactivated
from tests.testapp.models import Feed, Renamed

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def admin_client() -> Client:
    user = User.objects.create_superuser("ops", "ops@example.com", "secret")
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def sent() -> Any:
    events: list[tuple[str, int]] = []
    object_deactivated.connect(
        lambda instance, **kw: events.append(("off", instance.pk)), weak=False, dispatch_uid="o1"
    )
    object_reactivated.connect(
        lambda instance, **kw: events.append(("on", instance.pk)), weak=False, dispatch_uid="o2"
    )
    yield events
    object_deactivated.disconnect(dispatch_uid="o1")
    object_reactivated.disconnect(dispatch_uid="o2")


def action(client: Client, url: str, name: str, pks: list[int]) -> Any:
    return client.post(url, {"action": name, "_selected_action": pks}, follow=True)


def test_admin_reactivates_the_selection(admin_client: Client, sent: list[Any]) -> None:
    off = Feed.objects.create(
        title="off", active=False, error=True, error_message="Boom: x", failure_count=3
    )
    on = Feed.objects.create(title="on")

    response = action(admin_client, "/admin/testapp/feed/", "reactivate_selected", [off.pk, on.pk])

    assert response.status_code == 200
    assert "1 reactivated, 1 already active." in response.content.decode()
    off.refresh_from_db()
    assert (off.active, off.error, off.error_message, off.failure_count) == (True, False, "", 0)
    assert sent == [("on", off.pk)]


def test_admin_deactivates_with_custom_field_names(admin_client: Client, sent: list[Any]) -> None:
    obj = Renamed.objects.create(title="r")
    response = action(admin_client, "/admin/testapp/renamed/", "deactivate_selected", [obj.pk])
    assert "1 deactivated, 0 already inactive." in response.content.decode()
    obj.refresh_from_db()
    assert (obj.enabled, obj.broken) == (False, False)
    assert sent == [("off", obj.pk)]
