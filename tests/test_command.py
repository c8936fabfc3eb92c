"""The ``deactivated`` management command, through ``call_command``.

Objects of every key type (Feed: integer, UuidFeed: UUID, KeyedFeed: string) and a model with
renamed fields (Renamed, whose fields its task ``sync_renamed`` names).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from io import StringIO
from typing import Any

import pytest
from celery import Celery
from django.contrib.auth.models import User
from django.core.management import CommandError, call_command
from django.db import connection

from celery_deactivate import DeactivatingTask
from celery_deactivate.signals import object_reactivated
from tests.testapp.models import Feed, KeyedFeed, RecipeObject, Renamed, SpecialFeed, UuidFeed

pytestmark = pytest.mark.django_db(transaction=True)

WHEN = datetime(2025, 3, 4, 5, 6, 7, 890000, tzinfo=timezone.utc)


@pytest.fixture
def sent() -> Any:
    events: list[tuple[str, Any]] = []
    object_reactivated.connect(
        lambda instance, **kw: events.append(("on", instance.pk)), weak=False, dispatch_uid="c1"
    )
    yield events
    object_reactivated.disconnect(dispatch_uid="c1")


def run(*args: str, stdout: Any = None) -> str:
    """``manage.py deactivated *args``; what it wrote."""
    out = stdout if stdout is not None else StringIO()
    call_command("deactivated", *args, stdout=out)
    return str(out.getvalue())


def table(output: str) -> list[dict[str, str]]:
    """The table's rows as dicts by column, cut where the header's columns begin."""
    lines = output.splitlines()
    header = lines[0]
    names = header.split()
    starts = [header.index(name) for name in names]
    ends = [*starts[1:], None]
    return [
        {
            name: line[start:end].strip()
            for name, start, end in zip(names, starts, ends, strict=True)
        }
        for line in lines[1:-1]
    ]


def broken(title: str = "broken", **fields: Any) -> Feed:
    defaults = {
        "active": False,
        "error": True,
        "error_message": f"Boom: {title} is broken\nTraceback line",
        "deactivated_at": WHEN,
        "failure_count": 3,
    }
    return Feed.objects.create(title=title, **{**defaults, **fields})


# -- listing -----------------------------------------------------------------------------------


def test_lists_one_model_as_an_aligned_table() -> None:
    Feed.objects.create(title="fine")
    off = broken(error_message="Boom: " + "x" * 100)
    by_hand = Feed.objects.create(title="paused", active=False)

    output = run("testapp.Feed")

    assert output.splitlines()[0].split() == ["MODEL", "PK", "OBJECT", "STATE", "WHEN", "ERROR"]
    assert table(output) == [
        {
            "MODEL": "testapp.Feed",
            "PK": str(off.pk),
            "OBJECT": "broken",
            "STATE": "deactivated by error",
            "WHEN": "2025-03-04 05:06:07+00:00",
            "ERROR": "Boom: " + "x" * 53 + "…",  # shortened to 60 characters
        },
        {
            "MODEL": "testapp.Feed",
            "PK": str(by_hand.pk),
            "OBJECT": "paused",
            "STATE": "deactivated by hand",
            "WHEN": "",
            "ERROR": "",
        },
    ]
    assert output.splitlines()[-1] == "2 deactivated testapp.Feed objects."


def test_a_name_with_line_breaks_takes_one_line_of_the_table() -> None:
    off = broken("Breaking\r\nnews\u2028today")

    output = run("testapp.Feed")

    assert len(output.splitlines()) == 3  # the header, the object, the count
    assert [(row["PK"], row["OBJECT"]) for row in table(output)] == [
        (str(off.pk), "Breaking news today")
    ]


def test_lists_every_model_with_deactivation_fields() -> None:
    feed = broken()
    special = SpecialFeed.objects.create(title="special", active=False)  # a Feed too
    uuid_feed = UuidFeed.objects.create(title="u", active=False, error=True, error_message="E: u")
    keyed = KeyedFeed.objects.create(key="feed/1", title="k", active=False)
    renamed = Renamed.objects.create(title="r", enabled=False, broken=True, last_error="E: r")
    recipe = RecipeObject.objects.create(title="recipe", active=False)
    Renamed.objects.create(title="fine")
    UuidFeed.objects.create(title="fine")

    output = run()

    assert [(row["MODEL"], row["PK"], row["STATE"], row["ERROR"]) for row in table(output)] == [
        ("testapp.Feed", str(feed.pk), "deactivated by error", "Boom: broken is broken …"),
        ("testapp.Feed", str(special.pk), "deactivated by hand", ""),
        ("testapp.KeyedFeed", "'feed/1'", "deactivated by hand", ""),
        # no DeactivatableModel: the models of tasks, with the fields they name
        ("testapp.RecipeObject", str(recipe.pk), "deactivated by hand", ""),
        ("testapp.Renamed", str(renamed.pk), "deactivated by error", "E: r"),
        ("testapp.UuidFeed", str(uuid_feed.pk), "deactivated by error", "E: u"),
    ]
    assert output.splitlines()[-1] == "6 deactivated objects."  # SpecialFeed, ProxyFeed: as Feed
    assert keyed.pk == "feed/1"


def test_json_is_one_document_with_full_messages_and_iso_dates() -> None:
    feed = broken()
    uuid_feed = UuidFeed.objects.create(title="u", active=False)

    everything = json.loads(run("--json"))
    one = json.loads(run("testapp.Feed", "--json"))

    assert one == {
        "count": 1,
        "objects": [
            {
                "model": "testapp.Feed",
                "pk": feed.pk,
                "object": "broken",
                "state": "error",
                "state_label": "deactivated by error",
                "deactivated_at": "2025-03-04T05:06:07.890Z",
                "error": True,
                "error_message": "Boom: broken is broken\nTraceback line",
                "failure_count": 3,
                "next_probe_at": None,
                "probing_since": None,
            }
        ],
    }
    assert datetime.fromisoformat(one["objects"][0]["deactivated_at"]) == WHEN
    assert everything["count"] == 2
    assert everything["objects"][1]["pk"] == str(uuid_feed.pk)
    assert json.loads(run("testapp.KeyedFeed", "--json")) == {"count": 0, "objects": []}


def test_no_deactivated_object() -> None:
    Feed.objects.create(title="fine")
    assert run("testapp.feed") == "0 deactivated testapp.Feed objects.\n"


def test_renamed_fields_come_from_the_task_or_the_active_field_option(sent: list[Any]) -> None:
    obj = Renamed.objects.create(title="r", enabled=False, broken=True, last_error="E", failures=2)

    assert table(run("testapp.Renamed"))[0]["ERROR"] == "E"
    assert table(run("testapp.Renamed", "--active-field", "enabled"))[0]["STATE"] == (
        "deactivated by error"
    )
    run("testapp.Renamed", "--reactivate", str(obj.pk))

    obj.refresh_from_db()
    assert (obj.enabled, obj.broken, obj.last_error, obj.failures) == (True, False, "", 0)
    assert sent == [("on", obj.pk)]


def test_a_misconfigured_task_is_left_out_with_a_warning(conf: Callable[..., None]) -> None:
    off = broken()
    conf(deactivate_fields={"error_message": "message"})  # no model of these tasks has one
    err = StringIO()

    call_command("deactivated", stdout=(out := StringIO()), stderr=err)

    assert [row["PK"] for row in table(out.getvalue())] == [str(off.pk)]  # Feed: its defaults
    assert (
        "A deactivating task is misconfigured, left out: tests.testapp.tasks.poll: testapp.Feed "
        "has no field 'message' (the 'error_message' field)"
    ) in err.getvalue()


def test_a_task_that_cannot_be_declared_is_left_out_with_a_warning(celery_app: Celery) -> None:
    off = broken()
    app = Celery("unfinalized", set_as_current=False, fixups=[])

    @app.task(base=DeactivatingTask, model="testapp.Gone", name="tests.gone", shared=False)
    def gone(pk: int) -> None:
        """Raises when the app is finalized."""

    app.set_current()
    err = StringIO()
    try:
        call_command("deactivated", "testapp.Feed", stdout=(out := StringIO()), stderr=err)
    finally:
        celery_app.set_current()

    assert [row["PK"] for row in table(out.getvalue())] == [str(off.pk)]
    assert err.getvalue() == (
        "A deactivating task is misconfigured, left out: tests.gone: model='testapp.Gone' is not "
        "an installed model (App 'testapp' doesn't have a 'Gone' model.)\n"
    )


# -- re-activating -------------------------------------------------------------------------------


def test_reactivates_given_pks_then_all(sent: list[Any]) -> None:
    a, b, c = (broken(title) for title in "abc")
    on = Feed.objects.create(title="on")

    first = run("testapp.Feed", "--reactivate", str(a.pk), str(on.pk))
    rest = run("testapp.Feed", "--reactivate-all")

    assert (
        first
        == f"Reactivated 1 testapp.Feed object (pk {a.pk}); 1 is active already (pk {on.pk}).\n"
    )
    assert rest == "Reactivated 2 testapp.Feed objects.\n"
    a.refresh_from_db()
    assert (a.active, a.error, a.error_message, a.deactivated_at, a.failure_count) == (
        True,
        False,
        "",
        None,
        0,
    )
    assert Feed.objects.filter(active=True).count() == 4
    assert sorted(sent) == sorted([("on", a.pk), ("on", b.pk), ("on", c.pk)])


def test_reactivates_by_filter(sent: list[Any]) -> None:
    timeout = broken("timeout", error_message="Timeout: upstream")
    parse = broken("parse", error_message="ValueError: not RSS")
    paused = Feed.objects.create(title="paused", active=False)

    output = run(
        "testapp.Feed",
        "--reactivate-all",
        "--filter",
        "error_message__contains=Timeout",
        "--filter",
        "error=yes",
    )

    assert output == "Reactivated 1 testapp.Feed object.\n"
    assert set(Feed.objects.filter(active=True).values_list("pk", flat=True)) == {timeout.pk}
    assert sent == [("on", timeout.pk)]
    listed = table(run("testapp.Feed", "--filter", "error=false"))
    assert [row["PK"] for row in listed] == [str(paused.pk)]
    later = run("testapp.Feed", "--filter", "deactivated_at__gte=2025-03-04", "--json")
    assert [row["pk"] for row in json.loads(later)["objects"]] == [parse.pk]
    assert "0 deactivated" in run("testapp.Feed", "--filter", "deactivated_at__gt=2025-03-05")


def test_reactivates_uuid_and_string_keys_by_filter_and_all(sent: list[Any]) -> None:
    keep, go = (UuidFeed.objects.create(title=t, active=False) for t in ("keep", "go"))
    KeyedFeed.objects.create(key="b", title="b", active=False)
    KeyedFeed.objects.create(key="a", title="a", active=False)

    by_filter = json.loads(
        run(
            "testapp.UuidFeed",
            "--reactivate-all",
            "--filter",
            f"pk__in={go.pk},{uuid.uuid4()}",
            "--json",
        )
    )
    every = json.loads(run("testapp.KeyedFeed", "--reactivate-all", "--json"))

    assert by_filter == {
        "model": "testapp.UuidFeed",
        "dry_run": False,
        "reactivated": [str(go.pk)],
        "unchanged": [],
    }
    assert every["reactivated"] == ["a", "b"]
    assert sorted(map(str, sent)) == sorted(map(str, [("on", go.pk), ("on", "a"), ("on", "b")]))
    assert not UuidFeed.objects.get(pk=keep.pk).active


def test_dry_run_says_what_would_change_and_changes_nothing(sent: list[Any]) -> None:
    off = broken()
    on = Feed.objects.create(title="on")
    other = broken("other")

    by_pk = run("testapp.Feed", "--reactivate", str(off.pk), str(on.pk), "--dry-run")
    every = json.loads(run("testapp.Feed", "--reactivate-all", "--dry-run", "--json"))

    assert [row["PK"] for row in table(by_pk)] == [str(off.pk)]
    assert by_pk.splitlines()[-1] == (
        f"Dry run: would reactivate 1 testapp.Feed object (pk {off.pk}); "
        f"1 is active already (pk {on.pk}); nothing was changed."
    )
    assert every["dry_run"] is True
    assert every["reactivated"] == [off.pk, other.pk]
    assert [row["error_message"] for row in every["objects"]] == [
        off.error_message,
        other.error_message,
    ]
    assert Feed.objects.filter(active=False).count() == 2
    assert sent == []


class Terminal(StringIO):
    def isatty(self) -> bool:
        return True


def test_a_progress_bar_on_a_terminal_for_long_runs_only() -> None:
    for prefix, count in (("pipe", 100), ("tty", 100), ("short", 3)):
        Feed.objects.bulk_create([Feed(title=f"{prefix}{i}", active=False) for i in range(count)])

    def reactivate(prefix: str, stdout: StringIO) -> str:
        return run(
            "testapp.Feed",
            "--reactivate-all",
            "--filter",
            f"title__startswith={prefix}",
            stdout=stdout,
        )

    piped = reactivate("pipe", StringIO())
    short = reactivate("short", Terminal())
    long = reactivate("tty", Terminal())

    assert piped == "Reactivated 100 testapp.Feed objects.\n"
    assert short == "Reactivated 3 testapp.Feed objects.\n"
    assert long.startswith("\r[------------------------------]   0/100\r[")
    assert "\r[###############---------------]  50/100\r" in long
    assert long.endswith(
        "\r[##############################] 100/100\nReactivated 100 testapp.Feed objects.\n"
    )
    assert long.count("\r") == 101  # once per percent
    assert Feed.objects.filter(active=False).count() == 0


# -- mistakes --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["testapp.Nope"], "unknown model 'testapp.Nope'"),
        (["Feed"], "unknown model 'Feed': expected app_label.ModelName"),
        (["testapp.NoActive"], "^testapp.NoActive is neither a DeactivatableModel nor the model"),
        (["testapp.WrongActive"], "^testapp.WrongActive is neither a DeactivatableModel nor"),
        (
            ["testapp.Feed", "--active-field", "enabled"],
            "^--active-field 'enabled' is not an active flag of testapp.Feed",
        ),
        (["--reactivate", "1"], "--reactivate needs a model"),
        (["--reactivate-all"], "--reactivate-all needs a model"),
        (["--filter", "error=true"], "--filter needs a model"),
        (["--active-field", "enabled"], "--active-field needs a model"),
        (["testapp.Feed", "--dry-run"], "--dry-run goes with --reactivate or --reactivate-all"),
        (["testapp.Feed", "--reactivate", "1", "--filter", "error=true"], "--reactivate names"),
        (
            ["testapp.Feed", "--filter", "colour=red"],
            "testapp.Feed has no field 'colour'; its fields are .*behaviour",
        ),
        (["testapp.Feed", "--filter", "title"], "--filter 'title': expected FIELD=VALUE"),
        (["testapp.Feed", "--filter", "error=maybe"], "expected true or false, got 'maybe'"),
        (
            ["testapp.Feed", "--filter", "polls=many"],
            "'polls=many': Field 'polls' expected a number but got 'many'",
        ),
        (
            ["testapp.Feed", "--filter", "title__sounds=x"],
            "'title__sounds=x': Unsupported lookup 'sounds'",
        ),
        (["testapp.Feed", "--filter", "deactivated_at__lt=yesterday"], "invalid format"),
        (["testapp.UuidFeed", "--filter", "pk__in=1,2"], "is not a valid UUID"),
    ],
)
def test_every_user_mistake_is_a_command_error(args: list[str], message: str) -> None:
    broken()
    with pytest.raises(CommandError, match=message):
        run(*args)
    assert Feed.objects.filter(active=False).count() == 1


@pytest.mark.parametrize("flag", ["is_superuser", "is_active"])
def test_a_model_no_deactivating_task_works_on_is_refused(flag: str) -> None:
    user = User.objects.create(username="ada", is_superuser=False, is_active=False)

    with pytest.raises(CommandError) as raised:
        run("auth.User", "--active-field", flag, "--reactivate-all")

    assert str(raised.value) == (
        "auth.User is neither a DeactivatableModel nor the model of a deactivating task: "
        "the command only changes what celery-deactivate manages"
    )
    user.refresh_from_db()
    assert (user.is_superuser, user.is_active) == (False, False)


def test_the_active_field_must_be_an_active_flag_of_the_model(sent: list[Any]) -> None:
    feed = broken()  # error=True

    with pytest.raises(CommandError) as raised:
        run("testapp.Feed", "--active-field", "error", "--reactivate-all")

    assert str(raised.value) == (
        "--active-field 'error' is not an active flag of testapp.Feed; its active flag: 'active'"
    )
    feed.refresh_from_db()
    assert (feed.active, feed.error) == (False, True)
    assert sent == []


@pytest.mark.parametrize("action", [[], ["--reactivate-all"], ["--reactivate-all", "--dry-run"]])
def test_a_filter_the_database_refuses_is_a_command_error(
    sent: list[Any], action: list[str]
) -> None:
    feed = broken()

    with pytest.raises(CommandError) as raised:
        run("testapp.Feed", *action, "--filter", "title__regex=(")

    message = str(raised.value)
    assert message.startswith("--filter 'title__regex=(': the database refused it: ")
    if connection.vendor == "postgresql":
        assert "invalid regular expression" in message
    feed.refresh_from_db()
    assert not feed.active
    assert sent == []


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
