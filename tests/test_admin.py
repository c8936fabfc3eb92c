"""The admin: who may press the buttons, what they change, and the state at a glance.

Every test goes through Django's test Client against the real admin views of the test project
(tests/testapp/admin.py), and asserts the rows in the database.
"""

from __future__ import annotations

import datetime
import html
import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from django.contrib import messages
from django.contrib.admin import AdminSite
from django.contrib.auth.models import Permission, User
from django.core.exceptions import ImproperlyConfigured
from django.test import Client, RequestFactory
from django.utils import timezone

from celery_deactivate.admin import DeactivatableAdmin
from celery_deactivate.signals import object_deactivated, object_reactivated
from tests.testapp.models import Feed, KeyedFeed, RecipeObject, Renamed, UuidFeed

pytestmark = pytest.mark.django_db

FEEDS = "/admin/testapp/feed/"
OURS = {"reactivate_selected", "deactivate_selected"}


def client_for(username: str, *codenames: str, superuser: bool = False) -> Client:
    """A logged-in staff user with the given permissions (``view_feed``, ...)."""
    if superuser:
        user = User.objects.create_superuser(username, f"{username}@example.com", "secret")
    else:
        user = User.objects.create_user(username, is_staff=True)
        user.user_permissions.set(Permission.objects.filter(codename__in=codenames))
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def admin_client() -> Client:
    return client_for("ops", superuser=True)


@pytest.fixture
def sent() -> Iterator[list[tuple[str, Any]]]:
    """The ``object_deactivated`` / ``object_reactivated`` signals sent, in order."""
    events: list[tuple[str, Any]] = []

    def off(instance: Any, **kwargs: Any) -> None:
        events.append(("off", instance.pk))

    def on(instance: Any, **kwargs: Any) -> None:
        events.append(("on", instance.pk))

    object_deactivated.connect(off, dispatch_uid="test_admin.off")
    object_reactivated.connect(on, dispatch_uid="test_admin.on")
    yield events
    object_deactivated.disconnect(dispatch_uid="test_admin.off")
    object_reactivated.disconnect(dispatch_uid="test_admin.on")


def run_action(client: Client, url: str, name: str, pks: list[Any]) -> Any:
    return client.post(url, {"action": name, "_selected_action": pks}, follow=True)


def action_names(client: Client, url: str = FEEDS) -> set[str]:
    """The actions the changelist offers this user (none: no action form at all)."""
    response = client.get(url)
    assert response.status_code == 200
    form = response.context["action_form"]
    return set() if form is None else {name for name, _ in form.fields["action"].choices if name}


def sent_messages(response: Any) -> list[tuple[int, str]]:
    return [(message.level, message.message) for message in response.context["messages"]]


def broken_feed(title: str = "broken", message: str = "ConnectionError: refused") -> Feed:
    return Feed.objects.create(
        title=title,
        active=False,
        error=True,
        error_message=message,
        failure_count=3,
        deactivated_at=timezone.now(),
    )


def state(feed: Feed) -> tuple[bool, bool, str, int]:
    feed.refresh_from_db()
    return (feed.active, feed.error, feed.error_message, feed.failure_count)


# ---- permissions (issue #11.1) ---------------------------------------------------------------


def test_a_view_only_user_changes_nothing_and_sees_no_action(sent: list[Any]) -> None:
    viewer = client_for("viewer", "view_feed")
    on = Feed.objects.create(title="on")
    off = broken_feed()

    # Given a user who may only view feeds, when they post the actions directly,
    deactivate = run_action(viewer, FEEDS, "deactivate_selected", [on.pk])
    reactivate = run_action(viewer, FEEDS, "reactivate_selected", [off.pk])

    # then nothing changes and no signal is sent,
    assert deactivate.status_code == reactivate.status_code == 200
    assert state(on) == (True, False, "", 0)
    assert state(off) == (False, True, "ConnectionError: refused", 3)
    assert sent == []
    # and the changelist offers them no action at all (not even Django's "Delete selected").
    assert action_names(viewer) == set()


def test_a_user_who_may_change_sees_and_runs_the_actions(sent: list[Any]) -> None:
    editor = client_for("editor", "view_feed", "change_feed")
    on = Feed.objects.create(title="on")
    off = broken_feed()

    # Django's own "Delete selected" needs the delete permission, which this user lacks.
    assert action_names(editor) == OURS
    run_action(editor, FEEDS, "deactivate_selected", [on.pk])
    run_action(editor, FEEDS, "reactivate_selected", [off.pk])

    assert state(on)[:2] == (False, False)
    assert state(off) == (True, False, "", 0)
    assert sent == [("off", on.pk), ("on", off.pk)]


def test_a_superuser_sees_every_action_and_runs_ours(sent: list[Any], admin_client: Client) -> None:
    off = broken_feed()

    assert action_names(admin_client) == {"delete_selected", *OURS}
    run_action(admin_client, FEEDS, "reactivate_selected", [off.pk])

    assert state(off) == (True, False, "", 0)
    assert sent == [("on", off.pk)]


def test_a_view_only_user_cannot_act_on_renamed_fields_either() -> None:
    viewer = client_for("viewer", "view_renamed")
    obj = Renamed.objects.create(title="r")

    # The class's own action asks for no permission: it stays, ours go.
    assert action_names(viewer, "/admin/testapp/renamed/") == {"mark_checked"}
    run_action(viewer, "/admin/testapp/renamed/", "deactivate_selected", [obj.pk])

    obj.refresh_from_db()
    assert obj.enabled is True


# ---- the actions -----------------------------------------------------------------------------


def test_reactivate_reports_counts_with_plurals_and_levels(
    admin_client: Client, sent: list[Any]
) -> None:
    a, b = broken_feed("a"), broken_feed("b")
    on = Feed.objects.create(title="on")

    response = run_action(admin_client, FEEDS, "reactivate_selected", [a.pk, b.pk, on.pk])

    assert sent_messages(response) == [
        (messages.SUCCESS, "Re-activated 2 feeds."),
        (messages.INFO, "1 feed was already active."),
    ]
    for feed in (a, b):
        assert state(feed) == (True, False, "", 0)
        assert feed.deactivated_at is None
    assert sorted(sent) == sorted([("on", a.pk), ("on", b.pk)])


def test_deactivate_by_hand_records_no_error(admin_client: Client, sent: list[Any]) -> None:
    feed = Feed.objects.create(title="feed")
    before = timezone.now()

    response = run_action(admin_client, FEEDS, "deactivate_selected", [feed.pk])

    assert sent_messages(response) == [(messages.SUCCESS, "Deactivated 1 feed.")]
    assert state(feed) == (False, False, "", 0)
    assert feed.deactivated_at is not None and feed.deactivated_at >= before
    assert sent == [("off", feed.pk)]


def test_an_action_that_changes_nothing_warns(admin_client: Client, sent: list[Any]) -> None:
    a, b = broken_feed("a"), broken_feed("b")

    response = run_action(admin_client, FEEDS, "deactivate_selected", [a.pk, b.pk])

    assert sent_messages(response) == [(messages.WARNING, "2 feeds were already deactivated.")]
    assert state(a) == (False, True, "ConnectionError: refused", 3)
    assert sent == []


def test_deactivating_an_object_waiting_for_its_probe_turns_the_probe_off(
    admin_client: Client, sent: list[Any]
) -> None:
    waiting = broken_feed("waiting")
    Feed.objects.filter(pk=waiting.pk).update(next_probe_at=timezone.now(), cooldown=60)

    response = run_action(admin_client, FEEDS, "deactivate_selected", [waiting.pk])

    assert sent_messages(response) == [(messages.SUCCESS, "Deactivated 1 feed.")]
    assert state(waiting) == (False, True, "ConnectionError: refused", 3)
    assert (waiting.next_probe_at, waiting.cooldown, waiting.probing_since) == (None, None, None)
    assert sent == []  # deactivated already: no second object_deactivated


def test_renamed_fields_and_the_class_own_actions(admin_client: Client, sent: list[Any]) -> None:
    url = "/admin/testapp/renamed/"
    obj = Renamed.objects.create(title="r", failures=2)

    assert action_names(admin_client, url) == {"delete_selected", "mark_checked", *OURS}
    response = run_action(admin_client, url, "deactivate_selected", [obj.pk])
    assert sent_messages(response) == [(messages.SUCCESS, "Deactivated 1 renamed.")]
    obj.refresh_from_db()
    assert (obj.enabled, obj.broken) == (False, False)

    Renamed.objects.filter(pk=obj.pk).update(broken=True, last_error="Boom")
    run_action(admin_client, url, "reactivate_selected", [obj.pk])
    obj.refresh_from_db()
    assert (obj.enabled, obj.broken, obj.last_error) == (True, False, "")
    # The class's own action still runs.
    response = run_action(admin_client, url, "mark_checked", [obj.pk])
    assert sent_messages(response) == [(messages.INFO, "Checked 1.")]
    assert sent == [("off", obj.pk), ("on", obj.pk)]


@pytest.mark.parametrize(
    ("model", "make"),
    [
        (UuidFeed, lambda: UuidFeed.objects.create(id=uuid.uuid4(), title="u", active=False)),
        (KeyedFeed, lambda: KeyedFeed.objects.create(key="key/one two", title="k", active=False)),
    ],
    ids=["uuid", "string"],
)
def test_actions_on_non_integer_keys(admin_client: Client, model: Any, make: Any) -> None:
    obj = make()
    url = f"/admin/testapp/{model._meta.model_name}/"

    response = run_action(admin_client, url, "reactivate_selected", [str(obj.pk)])

    verbose_name = model._meta.verbose_name
    assert sent_messages(response) == [(messages.SUCCESS, f"Re-activated 1 {verbose_name}.")]
    obj.refresh_from_db()
    assert obj.active is True


def test_actions_none_still_turns_every_action_off(admin_client: Client) -> None:
    class NoActions(DeactivatableAdmin):
        actions = None

    request = RequestFactory().get(FEEDS)
    request.user = User.objects.get(username="ops")
    assert NoActions(Feed, AdminSite()).get_actions(request) == {}
    assert set(DeactivatableAdmin(Feed, AdminSite()).get_actions(request)) == {
        "delete_selected",
        *OURS,
    }


def test_deactivate_fields_that_do_not_fit_fail_when_the_admin_is_made() -> None:
    class Misnamed(DeactivatableAdmin):
        deactivate_fields = {"error_message": "last_error"}

    with pytest.raises(ImproperlyConfigured, match=r"testapp.Feed has no field 'last_error'"):
        Misnamed(Feed, AdminSite())


# ---- the state at a glance ---------------------------------------------------------------------


def zip_rows(response: Any) -> list[tuple[Any, str]]:
    """The changelist's objects, each with the HTML of its row."""
    body = response.content.decode().split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    found = body.split("<tr")[1:]
    return list(zip(response.context["cl"].result_list, found, strict=True))


def rows(response: Any) -> dict[str, str]:
    """The changelist's rows: the object's name -> the HTML of its row."""
    return {str(obj): row for obj, row in zip_rows(response)}


def cell(row: str, column: str) -> str:
    """The text of one column of a row, tags left out."""
    found = re.search(rf'class="field-{column}[^"]*">(.*?)</t[dh]>', row, re.S)
    assert found, f"no column {column!r} in {row!r}"
    return re.sub(r"<[^>]+>", "", found.group(1)).strip()


@pytest.fixture
def three_states() -> dict[str, Feed]:
    when = timezone.make_aware(datetime.datetime(2026, 3, 14, 15, 9))
    return {
        "on": Feed.objects.create(title="healthy"),
        "error": broken_feed("timing out", "TimeoutError: the server did not answer\nline two"),
        "hand": Feed.objects.create(title="paused", active=False, deactivated_at=when),
    }


def test_the_changelist_shows_each_state(admin_client: Client, three_states: Any) -> None:
    response = admin_client.get(FEEDS)

    shown = rows(response)
    states = {title: cell(row, "deactivation_state") for title, row in shown.items()}
    assert states == {
        "healthy": "Active",
        "timing out": "Deactivated by error",
        "paused": "Deactivated by hand",
    }
    assert "icon-yes.svg" in shown["healthy"]
    assert "icon-no.svg" in shown["timing out"]
    assert "icon-alert.svg" in shown["paused"]
    # The message's first line in the column, the whole of it on hover.
    assert "TimeoutError: the server did not answer</span>" in shown["timing out"]
    assert 'title="TimeoutError: the server did not answer\nline two"' in shown["timing out"]
    assert cell(shown["paused"], "deactivated_at").startswith("March 14, 2026")
    assert cell(shown["healthy"], "deactivated_at") == "-"


def test_a_long_message_is_shortened_in_the_list(admin_client: Client) -> None:
    broken_feed("long", "ValueError: " + "x" * 200)

    shown = rows(admin_client.get(FEEDS))["long"]

    assert "ValueError: " + "x" * 67 + "…</span>" in shown
    assert 'title="ValueError: ' + "x" * 200 + '"' in shown


def test_a_changelist_of_megabyte_errors_stays_small(admin_client: Client) -> None:
    # Given 20 objects whose errors were recorded in full, 1 MB each (before 0.5, or by hand)
    message = "ValueError: " + "line of text\n" * 80_000
    for n in range(20):
        broken_feed(f"verbose {n}", message)

    response = admin_client.get(FEEDS)

    # Then each row shows the first line and a tooltip of the head of the error: the page is
    # 48 KB, measured (21 MB before)
    shown = rows(response)
    assert len(shown) == 20
    assert (
        len(response.content) < 20 * DeactivatableAdmin.deactivation_message_title_length + 40_000
    )
    found = re.search(r'title="([^"]*)"', shown["verbose 0"])
    assert found
    title = html.unescape(found.group(1))
    assert title.startswith("ValueError: line of text\nline of text\n")
    assert title.endswith("…")
    assert len(title) == DeactivatableAdmin.deactivation_message_title_length
    assert cell(shown["verbose 0"], "deactivation_message") == "ValueError: line of text"


@pytest.mark.parametrize(
    ("value", "titles"),
    [
        ("active", {"healthy"}),
        ("error", {"timing out"}),
        ("hand", {"paused"}),
        (None, {"healthy", "timing out", "paused"}),
    ],
)
def test_the_state_filter(
    admin_client: Client, three_states: Any, value: str | None, titles: set[str]
) -> None:
    response = admin_client.get(FEEDS, {"deactivation": value} if value else {})
    assert {str(feed) for feed in response.context["cl"].result_list} == titles


def test_the_filter_choices(admin_client: Client) -> None:
    def choices(url: str) -> list[str]:
        spec = admin_client.get(url).context["cl"].filter_specs[0]
        return [label for _, label in spec.lookup_choices]

    assert choices(FEEDS) == [
        "Active",
        "Deactivated by error",
        "Deactivated by hand",
        "Probing",
    ]
    # The seed recipe's model has no cool-down fields: no probing state.
    assert choices("/admin/testapp/recipeobject/") == [
        "Active",
        "Deactivated by error",
        "Deactivated by hand",
    ]
    # A model that records no error has no "by error" nor "by hand"; it has probes.
    assert choices("/admin/testapp/proxyfeed/") == ["Active", "Deactivated", "Probing"]


def test_an_object_waiting_for_its_probe_is_deactivated_by_error(admin_client: Client) -> None:
    # Given a feed a failure deactivated, its probe scheduled, and one whose probe is out
    waiting = broken_feed("waiting")
    due = timezone.now() + datetime.timedelta(minutes=10)
    Feed.objects.filter(pk=waiting.pk).update(next_probe_at=due, cooldown=600)
    out = broken_feed("out")
    Feed.objects.filter(pk=out.pk).update(next_probe_at=due, probing_since=timezone.now())

    by_error = admin_client.get(FEEDS, {"deactivation": "error"})
    probing = admin_client.get(FEEDS, {"deactivation": "probing"})

    # Then the waiting one stays "deactivated by error", with its probe's time; only the one
    # whose probe is in flight is "probing"
    [(feed, row)] = zip_rows(by_error)
    assert str(feed) == "waiting"
    at = timezone.localtime(due).strftime("%H:%M")
    if timezone.localdate(due) != timezone.localdate():
        at = timezone.localtime(due).strftime("%Y-%m-%d %H:%M")
    assert cell(row, "deactivation_state") == f"Deactivated by error (probe at {at})"
    [(feed, row)] = zip_rows(probing)
    assert str(feed) == "out"
    assert "icon-clock.svg" in row and cell(row, "deactivation_state").startswith("Probing (since ")


def test_a_model_without_an_error_field(admin_client: Client) -> None:
    broken_feed("off")
    Feed.objects.create(title="on")

    response = admin_client.get("/admin/testapp/proxyfeed/", {"deactivation": "deactivated"})

    [(feed, row)] = zip_rows(response)
    assert str(feed) == "off"
    assert "icon-no.svg" in row and cell(row, "deactivation_state") == "Deactivated"


def test_the_seed_recipe_model_lists_only_what_it_records(admin_client: Client) -> None:
    RecipeObject.objects.create(title="seed", active=False, error=True)

    response = admin_client.get("/admin/testapp/recipeobject/")

    assert response.context["cl"].list_display == [
        "action_checkbox",
        "__str__",
        "deactivation_state",
    ]
    assert cell(rows(response)["seed"], "deactivation_state") == "Deactivated by error"


def test_search_finds_the_error_message_and_the_class_own_fields(
    admin_client: Client, three_states: Any
) -> None:
    def found(q: str) -> set[str]:
        response = admin_client.get(FEEDS, {"q": q})
        return {str(feed) for feed in response.context["cl"].result_list}

    assert found("did not answer") == {"timing out"}
    assert found("paused") == {"paused"}


# ---- the change page ---------------------------------------------------------------------------


def test_the_change_page_shows_the_full_error_read_only(
    admin_client: Client, three_states: Any
) -> None:
    feed = three_states["error"]
    url = f"{FEEDS}{feed.pk}/change/"

    response = admin_client.get(url)

    sections = {
        name: options["fields"] for name, options in response.context["adminform"].fieldsets
    }
    assert sections == {
        None: ("title", "behaviour", "polls", "note"),
        "Deactivation": ("deactivation_state", "deactivated_at", "failure_count", "error_message"),
        "History": ("deactivation_history",),
    }
    html = response.content.decode()
    assert "TimeoutError: the server did not answer<br>line two" in html
    assert "Deactivated by error" in html
    form = response.context["adminform"].form
    assert set(form.fields) == {"title", "behaviour", "polls", "note"}

    # Saving the form cannot change the state: only the actions do (and they send the signals).
    data = {"title": "renamed", "behaviour": "ok", "polls": 0, "note": "", "active": "on"}
    assert admin_client.post(url, data).status_code == 302
    feed.refresh_from_db()
    assert (feed.title, feed.active, feed.error) == ("renamed", False, True)


def test_the_add_page_leaves_the_state_to_the_defaults(admin_client: Client) -> None:
    response = admin_client.get(f"{FEEDS}add/")

    assert [name for name, _ in response.context["adminform"].fieldsets] == [None]
    data = {"title": "new", "behaviour": "ok", "polls": 0, "note": ""}
    assert admin_client.post(f"{FEEDS}add/", data).status_code == 302
    assert state(Feed.objects.get(title="new")) == (True, False, "", 0)
