"""The ``deactivated`` management command, through ``call_command``."""

from __future__ import annotations

import uuid
from io import StringIO
from typing import Any

import pytest
from django.core.management import CommandError, call_command

from celery_deactivate.signals import object_reactivated
from tests.testapp.models import Feed, KeyedFeed, UuidFeed

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def sent() -> Any:
    events: list[tuple[str, Any]] = []
    object_reactivated.connect(
        lambda instance, **kw: events.append(("on", instance.pk)), weak=False, dispatch_uid="c1"
    )
    yield events
    object_reactivated.disconnect(dispatch_uid="c1")


def test_command_lists_deactivated_objects() -> None:
    Feed.objects.create(title="fine")
    off = Feed.objects.create(title="broken", active=False, error_message="Boom: broken")
    out = StringIO()
    call_command("deactivated", "testapp.Feed", stdout=out)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith(f"{off.pk}\tbroken\t") and lines[0].endswith("Boom: broken")
    assert lines[-1] == "1 deactivated testapp.Feed object(s)."


def test_command_reactivates_given_and_all(sent: list[Any]) -> None:
    a = Feed.objects.create(title="a", active=False)
    b = Feed.objects.create(title="b", active=False)
    c = Feed.objects.create(title="c", active=False)
    out = StringIO()
    call_command("deactivated", "testapp.Feed", "--reactivate", str(a.pk), stdout=out)
    assert f"Reactivated 1 testapp.Feed object (pk {a.pk})." in out.getvalue()
    call_command("deactivated", "testapp.Feed", "--reactivate-all", stdout=out)
    assert "Reactivated 2 testapp.Feed objects." in out.getvalue()
    assert Feed.objects.filter(active=True).count() == 3
    assert sorted(sent) == sorted([("on", a.pk), ("on", b.pk), ("on", c.pk)])


def test_command_rejects_a_model_it_cannot_handle() -> None:
    with pytest.raises(CommandError, match="unknown model"):
        call_command("deactivated", "testapp.Nope")
    with pytest.raises(CommandError, match="testapp.NoActive has no field 'active'"):
        call_command("deactivated", "testapp.NoActive")


# -- re-activation by pk: every pk is checked before anything changes (issue #11.7) ----------


def test_a_malformed_pk_reactivates_nothing(sent: list[Any]) -> None:
    first = Feed.objects.create(title="first", active=False, error=True)
    last = Feed.objects.create(title="last", active=False, error=True)

    with pytest.raises(CommandError, match=r"'abc'.*nothing was reactivated"):
        call_command(
            "deactivated", "testapp.Feed", "--reactivate", str(first.pk), "abc", str(last.pk)
        )

    assert Feed.objects.filter(active=True).count() == 0
    assert sent == []


def test_a_pk_naming_no_object_reactivates_nothing(sent: list[Any]) -> None:
    feed = Feed.objects.create(title="off", active=False)
    missing = feed.pk + 1000

    with pytest.raises(CommandError, match=rf"no testapp.Feed with pk {missing}\b"):
        call_command("deactivated", "testapp.Feed", "--reactivate", str(feed.pk), str(missing))

    feed.refresh_from_db()
    assert not feed.active
    assert sent == []


def test_uuid_pks_are_checked_then_reactivated(sent: list[Any]) -> None:
    feed = UuidFeed.objects.create(title="u", active=False, error=True, error_message="Boom: u")
    unknown = uuid.uuid4()

    with pytest.raises(CommandError, match="'not-a-uuid'"):
        call_command("deactivated", "testapp.UuidFeed", "--reactivate", str(feed.pk), "not-a-uuid")
    with pytest.raises(CommandError, match=f"no testapp.UuidFeed with pk {unknown}"):
        call_command("deactivated", "testapp.UuidFeed", "--reactivate", str(feed.pk), str(unknown))
    assert sent == []

    out = StringIO()
    call_command("deactivated", "testapp.UuidFeed", "--reactivate", str(feed.pk), stdout=out)

    feed.refresh_from_db()
    assert (feed.active, feed.error, feed.error_message) == (True, False, "")
    assert sent == [("on", feed.pk)]
    assert f"Reactivated 1 testapp.UuidFeed object (pk {feed.pk})." in out.getvalue()


def test_string_pks_are_checked_then_reactivated(sent: list[Any]) -> None:
    feed = KeyedFeed.objects.create(key="feed/ä 1", title="k", active=False, error=True)
    too_long = "x" * 41  # KeyedFeed.key has max_length=40: no object can have it

    with pytest.raises(CommandError, match="no testapp.KeyedFeed with pk 'FEED/Ä 1'"):
        call_command("deactivated", "testapp.KeyedFeed", "--reactivate", feed.pk, "FEED/Ä 1")
    with pytest.raises(CommandError, match=f"'{too_long}'"):
        call_command("deactivated", "testapp.KeyedFeed", "--reactivate", feed.pk, too_long)
    assert sent == []

    call_command("deactivated", "testapp.KeyedFeed", "--reactivate", feed.pk, stdout=StringIO())

    feed.refresh_from_db()
    assert feed.active
    assert sent == [("on", "feed/ä 1")]
