"""The admin mixin alone (issue #20, part A, item 2): a ``ModelAdmin`` with
``DeactivatableAdminMixin`` and nothing else of the library keeps the library's fields read-only,
so that the state changes only through the actions (which go through the services and send the
signals), and keeps the class's own ``readonly_fields``.

Through Django's test Client against the test project's admin (tests/testapp/admin.py):
``UuidFeedAdmin`` (a ``DeactivatableModel``, every field role) and ``RenamedAdmin`` (renamed
fields).
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from django.contrib import admin
from django.contrib.auth.models import User
from django.test import Client, RequestFactory
from django.utils import timezone

from celery_deactivate.admin import DeactivatableAdmin, DeactivatableAdminMixin
from celery_deactivate.signals import object_reactivated
from celery_deactivate.target import ROLES
from tests.testapp.admin import UuidFeedAdmin
from tests.testapp.models import Feed, Renamed, UuidFeed

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client() -> Client:
    client = Client()
    client.force_login(User.objects.create_superuser("ops", "ops@example.com", "secret"))
    return client


def test_the_change_form_of_a_mixin_admin_changes_no_field_of_the_library(
    admin_client: Client,
) -> None:
    # Given an object a failure deactivated, with a probe scheduled
    due = timezone.now()
    feed = UuidFeed.objects.create(
        id=uuid.uuid4(),
        title="old",
        behaviour="ok",
        active=False,
        error=True,
        error_message="Boom",
        failure_count=3,
        deactivated_at=due,
        next_probe_at=due,
        cooldown=60,
    )
    url = f"/admin/testapp/uuidfeed/{feed.pk}/change/"
    reactivated: list[Any] = []
    object_reactivated.connect(lambda **kw: reactivated.append(kw), weak=False, dispatch_uid="m1")

    # The form offers the model's own editable field only; every role is shown read-only, with
    # the state and the object's history, and so is the class's own read-only field
    response = admin_client.get(url)
    assert set(response.context["adminform"].form.fields) == {"title"}
    readonly = {field["field"] for _, field in _readonly(response)}
    assert readonly == {"behaviour", "deactivation_state", "deactivation_history", *ROLES}

    # When an operator posts the fields anyway (ticks active, clears the error)
    data = {
        "title": "new",
        "behaviour": "fail",
        "active": "on",
        "error": "",
        "error_message": "",
        "failure_count": "0",
        "deactivated_at_0": "",
        "next_probe_at_0": "",
        "cooldown": "",
        "probing_since_0": "",
    }
    try:
        assert admin_client.post(url, data).status_code == 302
    finally:
        object_reactivated.disconnect(dispatch_uid="m1")

    # Then only the title changed: the state is as the failure left it, no signal was sent
    feed.refresh_from_db()
    assert (feed.title, feed.behaviour) == ("new", "ok")
    assert (feed.active, feed.error, feed.error_message, feed.failure_count) == (
        False,
        True,
        "Boom",
        3,
    )
    assert (feed.deactivated_at, feed.next_probe_at, feed.cooldown) == (due, due, 60)
    assert reactivated == []


def test_renamed_fields_are_read_only_too(admin_client: Client) -> None:
    obj = Renamed.objects.create(title="r", enabled=False, broken=True, last_error="E")
    url = f"/admin/testapp/renamed/{obj.pk}/change/"

    assert set(admin_client.get(url).context["adminform"].form.fields) == {"title", "failures"}
    data = {"title": "r2", "failures": "5", "enabled": "on", "broken": "", "last_error": ""}
    assert admin_client.post(url, data).status_code == 302

    obj.refresh_from_db()
    # failures is the model's own field for this admin (its deactivate_fields do not name it)
    assert (obj.title, obj.failures) == ("r2", 5)
    assert (obj.enabled, obj.broken, obj.last_error) == (False, True, "E")


def test_the_class_own_readonly_fields_come_first_and_stay() -> None:
    model_admin = UuidFeedAdmin(UuidFeed, admin.AdminSite())

    fields = model_admin.get_readonly_fields(RequestFactory().get("/"))

    assert fields[0] == "behaviour"
    assert set(fields) == {"behaviour", "deactivation_state", *ROLES}
    assert len(fields) == len(set(fields))


def test_a_field_of_the_library_in_list_editable_is_a_check_error() -> None:
    class Editable(DeactivatableAdminMixin, admin.ModelAdmin):  # type: ignore[type-arg]
        list_display = ("title", "active", "note")
        list_editable = ("active", "note")

    errors = Editable(Feed, admin.AdminSite()).check()

    assert [(error.id, error.obj) for error in errors] == [("celery_deactivate.E005", Editable)]
    assert "'active'" in errors[0].msg and "testapp.Feed" in errors[0].msg
    assert DeactivatableAdmin(Feed, admin.AdminSite()).check() == []


def _readonly(response: Any) -> list[tuple[Any, Any]]:
    """The read-only fields the change form shows, each with its fieldset."""
    found = []
    for fieldset in response.context["adminform"]:
        for line in fieldset:
            for field in line:
                if field.is_readonly:
                    found.append((fieldset, field.field))
    return found
