"""The system checks: ``manage.py check`` reports misconfigured deactivating tasks.

The test project's tasks (tests/testapp/tasks.py) are valid when declared; a worker-wide setting
made invalid for one test (the ``conf`` fixture, ``override_settings``) makes them invalid, as a
changed setting would on the next deploy.  Declaring an invalid task raises, so the deploy
check's test declares one on an app that is not finalized yet, as a project's task modules do.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from django.apps import apps
from django.core import checks
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.db import connection
from django.test import override_settings
from django.test.utils import CaptureQueriesContext

from celery_deactivate import DeactivatingTask, maintain_entry
from celery_deactivate.checks import TAG, deactivating_tasks
from celery_deactivate.tasks import MAINTAIN_TASK
from tests.testapp.models import RecipeObject


@pytest.fixture
def project_app(celery_app: Celery) -> Celery:
    """The test project's app, finalized with its tasks, as this thread's current app."""
    celery_app.set_current()
    return celery_app


def ours(messages: list[Any]) -> list[tuple[str, str, str]]:
    """``(id, task name, message)`` of this package's check messages."""
    return [
        (message.id, message.obj, message.msg)
        for message in messages
        if message.id.startswith("celery_deactivate.")
    ]


def test_the_test_project_has_no_issue(project_app: Celery) -> None:
    names = [task.name for task in deactivating_tasks()]
    assert "tests.testapp.tasks.poll" in names and "tests.testapp.tasks.sync_renamed" in names

    out = StringIO()
    call_command("check", "--tag", TAG, stdout=out)

    assert checks.run_checks(tags=[TAG]) == []
    assert "System check identified no issues" in out.getvalue()


def test_an_invalid_worker_wide_option_is_an_error_for_every_task_using_it(
    project_app: Celery, conf: Callable[..., None]
) -> None:
    conf(deactivate_notifier="tests.nowhere.notify")

    found = ours(checks.run_checks(tags=[TAG]))

    using_it = {task.name for task in deactivating_tasks() if task.deactivate_notifier is None}
    assert "tests.testapp.tasks.poll" in using_it
    assert {name for code, name, _ in found} == using_it
    assert {code for code, _, _ in found} == {"celery_deactivate.E003"}
    assert all(message.startswith("deactivate_notifier ") for _, _, message in found)
    with pytest.raises(SystemCheckError) as raised:
        call_command("check", stderr=StringIO())
    report = str(raised.value)
    assert "tests.testapp.tasks.poll: (celery_deactivate.E003) deactivate_notifier " in report
    assert (
        "HINT: The task does not set deactivate_notifier: correct the worker-wide setting "
        "app.conf.deactivate_notifier (CELERY_DEACTIVATE_NOTIFIER in Django settings)."
    ) in report
    # manage.py check <app_label>: only the tasks on that app's models
    assert checks.run_checks(app_configs=[apps.get_app_config("auth")], tags=[TAG]) == []


def test_a_worker_wide_option_a_model_cannot_satisfy_names_the_field(
    project_app: Celery, conf: Callable[..., None]
) -> None:
    conf(deactivate_after=3)  # needs a failure counter: RecipeObject has none

    found = ours(checks.run_checks(tags=[TAG]))

    assert [(code, name) for code, name, _ in found] == [
        ("celery_deactivate.E002", "tests.testapp.tasks.manage_object")
    ]
    assert "testapp.RecipeObject has no 'failure_count' field" in found[0][2]
    assert not hasattr(RecipeObject, "failure_count")


@override_settings(CELERY_DEACTIVATE_FIELDS={"error_message": "message"})
def test_a_field_named_in_the_django_settings_must_exist(project_app: Celery) -> None:
    found = ours(checks.run_checks(tags=[TAG]))

    codes = {name: code for code, name, _ in found}
    messages = {name: message for _, name, message in found}
    assert codes["tests.testapp.tasks.poll"] == "celery_deactivate.E002"
    assert messages["tests.testapp.tasks.poll"] == (
        "testapp.Feed has no field 'message' (the 'error_message' field)"
    )
    assert "tests.testapp.tasks.sync_renamed" not in codes  # it names its own fields


@override_settings(
    CELERY_DEACTIVATE_OUTAGE_OBJECT=0,
    CELERY_DEACTIVATION_AFTER=3,
    CELERY_DEACTIVATE_COLOUR="red",
)
def test_an_unknown_django_setting_is_an_error_naming_the_closest_option(
    project_app: Celery,
) -> None:
    found = checks.run_checks(tags=[TAG])

    assert ours(found) == [
        (
            "celery_deactivate.E004",
            "CELERY_DEACTIVATE_COLOUR",
            "CELERY_DEACTIVATE_COLOUR is not a setting of celery-deactivate: it is ignored",
        ),
        (
            "celery_deactivate.E004",
            "CELERY_DEACTIVATE_OUTAGE_OBJECT",
            "CELERY_DEACTIVATE_OUTAGE_OBJECT is not a setting of celery-deactivate: it is "
            "ignored (did you mean CELERY_DEACTIVATE_OUTAGE_OBJECTS?)",
        ),
        (
            "celery_deactivate.E004",
            "CELERY_DEACTIVATION_AFTER",
            "CELERY_DEACTIVATION_AFTER is not a setting of celery-deactivate: it is ignored "
            "(did you mean CELERY_DEACTIVATE_AFTER?)",
        ),
    ]
    assert found[0].hint.startswith("Correct or remove it: the settings are CELERY_ + ")
    assert found[1].hint == "Rename it CELERY_DEACTIVATE_OUTAGE_OBJECTS."
    with pytest.raises(SystemCheckError) as raised:
        call_command("check", "--deploy", stdout=StringIO(), stderr=StringIO())
    assert (
        "CELERY_DEACTIVATE_OUTAGE_OBJECT: (celery_deactivate.E004) CELERY_DEACTIVATE_OUTAGE_OBJECT "
        "is not a setting"
    ) in str(raised.value)


def test_an_unknown_setting_on_the_app_is_an_error_naming_the_closest_option(
    project_app: Celery, conf: Callable[..., None]
) -> None:
    conf(deactivate_outage_object=0, deactive_after=3, task_acks_late=True)

    found = checks.run_checks(tags=[TAG])

    assert [(code, name) for code, name, _ in ours(found)] == [
        ("celery_deactivate.E004", "app.conf.deactivate_outage_object"),
        ("celery_deactivate.E004", "app.conf.deactive_after"),
    ]
    assert found[0].msg.endswith("(did you mean app.conf.deactivate_outage_objects?)")
    assert found[1].hint == "Rename it app.conf.deactivate_after."


@pytest.fixture
def unfinalized(project_app: Celery) -> Iterator[Celery]:
    """A project app as ``manage.py check`` sees it: current, its tasks declared, not finalized
    (no Django fixup: the test process has Django set up already)."""
    app = Celery("unfinalized", set_as_current=False, fixups=[])
    app.set_current()
    try:
        yield app
    finally:
        project_app.set_current()
        app.close()


def test_deploy_check_loads_the_tasks_and_reports_a_declaration_error(
    unfinalized: Celery,
) -> None:
    # shared=False: @app.task would also declare it on every app finalized later in the session
    @unfinalized.task(
        base=DeactivatingTask, model="testapp.Gone", name="tests.checks.gone", shared=False
    )
    def gone(pk: int) -> None:
        """Declared lazily on an app that is not finalized: nothing raises yet."""

    assert checks.run_checks(tags=[TAG]) == []
    assert not unfinalized.finalized  # the plain check finalizes nothing

    found = checks.run_checks(tags=[TAG], include_deployment_checks=True)

    assert unfinalized.finalized
    assert [(message.id, message.obj) for message in found] == [
        ("celery_deactivate.E001", "tests.checks.gone")
    ]
    assert found[0].msg.startswith("model='testapp.Gone' is not an installed model")
    assert found[0].hint.startswith("Set model= on the task")


def test_deploy_check_on_the_test_project(project_app: Celery) -> None:
    assert checks.run_checks(tags=[TAG], include_deployment_checks=True) == []


def test_deploy_check_reports_a_declaration_error_once_with_its_hint(unfinalized: Celery) -> None:
    @unfinalized.task(
        base=DeactivatingTask,
        model="testapp.Feed",
        name="tests.checks.three",
        deactivate_after=0,
        shared=False,
    )
    def three(pk: int) -> None:
        """Raises when the app is finalized: deactivate_after must be >= 1."""

    found = checks.run_checks(tags=[TAG], include_deployment_checks=True)

    assert [(message.id, message.obj, message.msg) for message in found] == [
        (
            "celery_deactivate.E003",
            "tests.checks.three",
            "deactivate_after must be an integer >= 1, got 0",
        )
    ]
    assert found[0].hint == "Correct deactivate_after= where the task is declared."


class ToExotic:
    """Routes the writes of one app's models to the ``exotic`` database (tests/exotic_db)."""

    app_label = "testapp"

    def db_for_write(self, model: type[Any], **hints: Any) -> str | None:
        return "exotic" if model._meta.app_label == self.app_label else None


class LibraryToExotic(ToExotic):
    app_label = "celery_deactivate"


def test_a_model_on_a_database_the_library_does_not_support_is_a_warning(
    project_app: Celery,
) -> None:
    with override_settings(DATABASE_ROUTERS=[f"{__name__}.ToExotic"]):
        found = ours(checks.run_checks(tags=[TAG]))
    with override_settings(DATABASE_ROUTERS=[f"{__name__}.LibraryToExotic"]):
        library = ours(checks.run_checks(tags=[TAG]))

    assert ("celery_deactivate.W001", "testapp.Feed") in [(id_, obj) for id_, obj, _ in found]
    assert all(
        id_ == "celery_deactivate.W001" and obj.startswith("testapp.") for id_, obj, _ in found
    )
    feed = next(msg for _, obj, msg in found if obj == "testapp.Feed")
    assert feed == (
        "testapp.Feed is written on the database 'exotic', whose backend (exotic) "
        "celery-deactivate does not support"
    )
    assert [(id_, obj) for id_, obj, _ in library] == [
        ("celery_deactivate.W001", "the library's tables")
    ]
    # and none on the supported database of the run (PostgreSQL, MySQL, MariaDB or SQLite)
    assert checks.run_checks(tags=[TAG]) == []


# -- W002: celery_deactivate.maintain scheduled nowhere ------------------------------------------


def w002(messages: list[Any]) -> list[Any]:
    return [message for message in messages if message.id == "celery_deactivate.W002"]


@pytest.mark.django_db
def test_maintain_scheduled_nowhere_is_a_warning_with_django_celery_beat(
    project_app: Celery, conf: Callable[..., None]
) -> None:
    beat_models = pytest.importorskip("django_celery_beat.models", reason="the [beat] extra")
    # Given the test project's app, which schedules nothing, and no periodic task
    conf(beat_schedule={})
    assert not beat_models.PeriodicTask.objects.filter(task=MAINTAIN_TASK).exists()

    # Then a plain check (manage.py check, Celery's worker) uses no database and says nothing of
    # the table it cannot read
    with CaptureQueriesContext(connection) as queries:
        assert w002(checks.run_checks()) == []
    assert len(queries) == 0
    # and a check that may use the database (migrate, check --database) warns
    (found,) = w002(checks.run_checks(databases=["default"]))
    assert found.obj == MAINTAIN_TASK
    assert found.msg == (
        "celery_deactivate.maintain is not scheduled: digests, the end of outages and cool-down "
        "probes wait for it"
    )
    assert found.hint.endswith(
        "or a django-celery-beat periodic task of celery_deactivate.maintain."
    )
    out, err = StringIO(), StringIO()
    call_command("check", "--database", "default", stdout=out, stderr=err)
    assert "celery_deactivate.maintain: (celery_deactivate.W002)" in err.getvalue()

    # When a periodic task runs it, the warning goes; when that task is disabled, it comes back
    every = beat_models.IntervalSchedule.objects.create(every=60, period="seconds")
    row = beat_models.PeriodicTask.objects.create(
        name="celery-deactivate", task=MAINTAIN_TASK, interval=every
    )
    assert w002(checks.run_checks(databases=["default"])) == []
    beat_models.PeriodicTask.objects.filter(pk=row.pk).update(enabled=False)
    assert len(w002(checks.run_checks(databases=["default"]))) == 1

    # When the app's beat_schedule has it (maintain_entry), the table is not even read
    conf(beat_schedule={"celery-deactivate": maintain_entry(every=60)})
    with CaptureQueriesContext(connection) as queries:
        assert w002(checks.run_checks(databases=["default"])) == []
    assert len(queries) == 0


#: A project of its own, in a subprocess: django-celery-beat installed or not (``argv[1]``), on a
#: SQLite database that cannot be opened (its folder does not exist), the current app Celery's
#: default one: not finalized, as when ``manage.py check`` runs, then finalized with no
#: deactivating task (none waits for maintain), then with maintain in its beat_schedule.
UNREACHABLE_PROJECT = """
import json, sys
import django
from django.conf import settings

with_beat = sys.argv[1] == "beat"
settings.configure(
    INSTALLED_APPS=[
        "django.contrib.contenttypes",
        "django.contrib.auth",
        "celery_deactivate",
        *(["django_celery_beat"] if with_beat else []),
    ],
    DATABASES={"default": {
        "ENGINE": "django.db.backends.sqlite3", "NAME": "/nonexistent-folder/db.sqlite3",
    }},
    DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
)
django.setup()
from celery import current_app
from django.core import checks
from django.db import connection
from celery_deactivate import maintain_entry

def w002():
    found = checks.run_checks(databases=["default"])
    return [[m.msg, m.hint] for m in found if m.id == "celery_deactivate.W002"]

without = w002()
current_app.finalize()
no_task = w002()
current_app.conf.beat_schedule = {"celery-deactivate": maintain_entry()}
print(json.dumps({"without": without, "no task": no_task, "with": w002(),
                  "connected": connection.connection is not None}))
"""


@pytest.mark.parametrize("installed", ["beat", "no-beat"])
def test_the_check_survives_an_unreachable_database(installed: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", UNREACHABLE_PROJECT, installed],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=Path(__file__).parent.parent,
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)

    ((message, hint),) = found["without"]
    assert message.startswith("celery_deactivate.maintain is not scheduled: ")
    if installed == "beat":
        assert message.endswith(
            "(it is not in the app's beat_schedule, and django-celery-beat's periodic tasks on "
            "the database 'default' could not be read: OperationalError)"
        )
        assert "django-celery-beat periodic task" in hint
    else:  # the check used no database: no connection was even tried
        assert message.endswith("wait for it")
        assert "django-celery-beat" not in hint
        assert found["connected"] is False
    assert found["no task"] == []  # a finalized app without deactivating tasks
    assert found["with"] == []  # the app's beat_schedule runs it
