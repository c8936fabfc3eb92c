"""The ``deactivated`` management command, through ``call_command``."""

from __future__ import annotations

from io import StringIO
from typing import Any

import pytest
from django.core.management import CommandError, call_command

from celery_deactivate.signals import object_reactivated
from tests.testapp.models import Feed

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
    assert "1 reactivated, 0 left unchanged." in out.getvalue()
    call_command("deactivated", "testapp.Feed", "--reactivate-all", stdout=out)
    assert "2 reactivated" in out.getvalue()
    assert Feed.objects.filter(active=True).count() == 3
    assert sorted(sent) == sorted([("on", a.pk), ("on", b.pk), ("on", c.pk)])


def test_command_rejects_a_model_it_cannot_handle() -> None:
    with pytest.raises(CommandError, match="unknown model"):
        call_command("deactivated", "testapp.Nope")
    with pytest.raises(CommandError, match="testapp.NoActive has no field 'active'"):
        call_command("deactivated", "testapp.NoActive")
