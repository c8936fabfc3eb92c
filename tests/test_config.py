"""Misconfiguration fails fast with ImproperlyConfigured naming the model and field; options
resolve per task, then from the app's settings, then from their defaults."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from functools import cached_property
from typing import Any

import pytest
from celery import Celery, Task
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings
from django.utils.functional import cached_property as django_cached_property

from celery_deactivate import DeactivatingTask
from celery_deactivate._option_names import is_misspelt_option
from celery_deactivate.conf import resolve
from celery_deactivate.exceptions import DeactivateConfigError
from tests.testapp import tasks
from tests.testapp.models import Feed, NoActive, RecipeObject, SpecialFeed, WrongActive


def declare(app: Celery, base: type[DeactivatingTask] = DeactivatingTask, **options: Any) -> Any:
    """Declare and bind a task on ``app`` now (not lazily)."""

    def body(pk: int) -> None: ...

    body.__name__ = f"body_{len(app.tasks)}"
    return app.task(base=base, lazy=False, shared=False, **options)(body)


@pytest.fixture
def app() -> Celery:
    app = Celery("config-tests", set_as_current=False)
    app.finalize()
    return app


def test_model_is_required(app: Celery) -> None:
    with pytest.raises(ImproperlyConfigured, match="needs model="):
        declare(app)


def test_unknown_model_label(app: Celery) -> None:
    with pytest.raises(ImproperlyConfigured, match="'testapp.Nope' is not an installed model"):
        declare(app, model="testapp.Nope")


def test_model_without_active_field(app: Celery) -> None:
    with pytest.raises(
        ImproperlyConfigured, match="testapp.NoActive has no field 'active'"
    ) as info:
        declare(app, model=NoActive)
    assert isinstance(info.value, DeactivateConfigError)
    assert (info.value.model, info.value.field) == ("testapp.NoActive", "active")


def test_active_field_of_the_wrong_type(app: Celery) -> None:
    with pytest.raises(
        ImproperlyConfigured, match="testapp.WrongActive.active must be a BooleanField"
    ):
        declare(app, model=WrongActive)


def test_configured_field_that_does_not_exist(app: Celery) -> None:
    with pytest.raises(ImproperlyConfigured, match="testapp.Feed has no field 'enabled'"):
        declare(app, model=Feed, deactivate_fields={"active": "enabled"})


def test_unknown_field_role(app: Celery) -> None:
    with pytest.raises(ImproperlyConfigured, match="unknown role"):
        declare(app, model=Feed, deactivate_fields={"activ": "active"})


def test_typo_in_an_option_name_is_rejected(app: Celery) -> None:
    with pytest.raises(ImproperlyConfigured, match="unknown option 'deactivate_afer'"):
        declare(app, model=Feed, deactivate_afer=3)
    with pytest.raises(ImproperlyConfigured, match="unknown option 'dont_deactivate_for'"):
        declare(app, model=Feed, dont_deactivate_for=(KeyError,))


def notify_ops(**kwargs: Any) -> None:
    """A notifier: a function given as an option's value."""


@pytest.mark.parametrize(
    ("name", "value", "closest"),
    [
        ("deactivation_after", 3, "deactivate_after"),
        ("deactive_after", 3, "deactivate_after"),
        ("activate_after", 3, "deactivate_after"),
        ("deactivate_outage_object", 0, "deactivate_outage_objects"),
        ("do_not_deactivate_on", (KeyError,), "dont_deactivate_on"),
        # a function or a class as the value: still an option's value, not a method
        ("deactivate_notifer", notify_ops, "deactivate_notifier"),
        ("deactivate_onn", ValueError, "deactivate_on"),
    ],
)
def test_a_misspelt_option_is_an_error_naming_the_closest_option(
    app: Celery, name: str, value: Any, closest: str
) -> None:
    registered = set(app.tasks)

    with pytest.raises(DeactivateConfigError) as raised:
        declare(app, model=Feed, **{name: value})

    assert (
        f".body_{len(registered)}: unknown option {name!r} (did you mean {closest!r}?); "
        "the options are ["
    ) in str(raised.value)
    assert isinstance(raised.value, ImproperlyConfigured)
    assert set(app.tasks) == registered


def test_celerys_own_task_keywords_are_not_options(app: Celery) -> None:
    celerys = {
        "name": "tests.config.celerys",
        "acks_late": True,
        "autoretry_for": (KeyError,),
        "max_retries": 2,
        "default_retry_delay": 0,
        "retry_backoff": True,
        "rate_limit": "10/s",
        "ignore_result": True,
        "track_started": True,
        "soft_time_limit": 5,
        "time_limit": 10,
        "reject_on_worker_lost": True,
        "serializer": "json",
    }

    task = declare(app, model=Feed, bind=True, **celerys)

    assert {name: getattr(task, name) for name in celerys} == celerys
    public = [name for name in dir(Task) if not name.startswith("_")]
    assert "acks_late" in public
    assert [name for name in public if is_misspelt_option(name)] == []


class Helpers(DeactivatingTask):
    """A base class whose helpers have names like options: methods are not options."""

    def deactivate_related(self, pk: int) -> str:
        return f"related of {pk}"

    @classmethod
    def deactivate_everything(cls) -> str:
        return f"everything of {cls.__name__}"

    @staticmethod
    def deactivation_reason() -> str:
        return "reason"

    @property
    def deactivate_state(self) -> str:
        return "state"

    @cached_property
    def deactivate_cache(self) -> str:
        return "cached"

    @django_cached_property
    def deactivate_django_cache(self) -> str:
        return "cached by Django"


def test_methods_of_a_subclass_are_not_options(app: Celery) -> None:
    task = declare(app, model=Feed, base=Helpers)

    assert isinstance(task, Helpers)
    assert task.deactivate_related(4) == "related of 4"
    assert task.deactivate_everything() == f"everything of {type(task).__name__}"
    assert (task.deactivation_reason(), task.deactivate_state) == ("reason", "state")
    assert (task.deactivate_cache, task.deactivate_django_cache) == ("cached", "cached by Django")
    resolve(task, "deactivate_after")  # the options still resolve


def test_an_attribute_of_a_subclass_may_be_a_misspelt_option(app: Celery) -> None:
    with pytest.raises(DeactivateConfigError, match=r"\(did you mean 'deactivate_after'\?\)"):

        class Misspelt(DeactivatingTask):
            deactive_after = 3


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("deactivate_after", 0, "deactivate_after must be an integer >= 1"),
        ("deactivate_after", "3", "deactivate_after must be an integer >= 1"),
        ("deactivate_on", (int,), "deactivate_on must be exception classes"),
        ("deactivate_on", "no.such.Module", "deactivate_on"),
        ("deactivate_notify", "yes", "deactivate_notify must be True or False"),
        ("deactivate_notifier", 42, "deactivate_notifier must be a callable"),
        ("deactivate_pass_object", 1, "deactivate_pass_object must be True or False"),
        ("deactivate_atomic", "no", "deactivate_atomic must be True or False"),
        # Celery calls no failure hook for a BaseException that is not an Exception:
        ("deactivate_on", (BaseException,), "can only name Exception subclasses"),
        ("deactivate_on", KeyboardInterrupt, "KeyboardInterrupt: Celery treats"),
        ("deactivate_on", (ValueError, "builtins.SystemExit"), "got SystemExit"),
    ],
)
def test_bad_option_values(app: Celery, option: str, value: Any, message: str) -> None:
    with pytest.raises(ImproperlyConfigured, match=message):
        declare(app, model=Feed, **{option: value})


def test_an_option_that_was_removed_is_an_error(app: Celery) -> None:
    with pytest.raises(ImproperlyConfigured, match="unknown option 'deactivate_fold_begin'"):
        declare(app, model=Feed, deactivate_fold_begin=False)


def test_dont_deactivate_on_may_name_any_exception(app: Celery) -> None:
    task = declare(app, model=Feed, dont_deactivate_on=(KeyboardInterrupt, ValueError))
    assert resolve(task, "dont_deactivate_on") == (KeyboardInterrupt, ValueError)


def test_fields_spread_over_two_tables_are_rejected(app: Celery) -> None:
    with pytest.raises(ImproperlyConfigured, match="must live in one table") as raised:
        declare(app, model=SpecialFeed, deactivate_fields={"error_message": "kind"})
    assert "testapp.SpecialFeed" in str(raised.value)


def test_cooldown_needs_the_probe_fields(app: Celery) -> None:
    with pytest.raises(ImproperlyConfigured, match="no 'next_probe_at'") as raised:
        declare(app, model=RecipeObject, deactivate_cooldown=60)
    assert "testapp.RecipeObject" in str(raised.value)
    assert raised.value.field == "next_probe_at"  # type: ignore[attr-defined]


def test_counting_needs_a_counter_field(app: Celery) -> None:
    with pytest.raises(
        ImproperlyConfigured,
        match="deactivate_after=3 needs a failure counter.*testapp.RecipeObject",
    ):
        declare(app, model=RecipeObject, deactivate_after=3)


def test_string_model_reference_and_optional_fields(app: Celery) -> None:
    task = declare(app, model="testapp.RecipeObject")
    target = task.target
    assert target.model is RecipeObject
    assert (target.active, target.error, target.error_message, target.failure_count) == (
        "active",
        "error",
        None,
        None,
    )


def test_per_task_value_wins_over_app_setting_which_wins_over_default(
    conf: Callable[..., None],
) -> None:
    assert resolve(tasks.poll, "deactivate_after") == 1  # default
    conf(deactivate_after=2)
    assert resolve(tasks.poll, "deactivate_after") == 2  # worker-wide
    assert resolve(tasks.poll_after3, "deactivate_after") == 3  # per task


def test_django_settings_under_the_celery_namespace() -> None:
    with override_settings(
        CELERY_DEACTIVATE_NOTIFY=False, CELERY_DONT_DEACTIVATE_ON=["builtins.KeyError"]
    ):
        assert resolve(tasks.poll, "deactivate_notify") is False
        assert resolve(tasks.poll, "dont_deactivate_on") == (KeyError,)
    assert resolve(tasks.poll, "deactivate_notify") is True


def test_bad_app_setting_fails_with_the_option_name(conf: Callable[..., None]) -> None:
    conf(deactivate_after=-1)
    with pytest.raises(ImproperlyConfigured, match="deactivate_after must be an integer"):
        tasks.poll.check_configuration()


def test_string_model_declared_before_apps_are_ready_is_checked_by_app_ready() -> None:
    # A project's celery.py (and tasks declared with it) may be imported before django.setup().
    script = """
import os
os.environ["DJANGO_SETTINGS_MODULE"] = "tests.settings"
from celery import Celery
from celery_deactivate import DeactivatingTask
app = Celery("early", set_as_current=False)
app.finalize()
@app.task(base=DeactivatingTask, model="testapp.Nope", lazy=False, shared=False)
def early(pk): ...
print("declared")
import django
django.setup()
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.stdout.strip() == "declared"
    assert done.returncode != 0
    assert "ImproperlyConfigured" in done.stderr or "DeactivateConfigError" in done.stderr
    assert "model='testapp.Nope' is not an installed model" in done.stderr
