"""The service functions every state change goes through: targeted, race-free, signalled once."""

from __future__ import annotations

import threading
from typing import Any

import django
import pytest
from celery import Celery
from django.db import connection, connections
from django.test.utils import CaptureQueriesContext

from celery_deactivate import DeactivatingTask, _errors, _reads, services
from celery_deactivate.exceptions import DeactivateConfigError
from celery_deactivate.signals import object_deactivated, object_reactivated
from tests.testapp import tasks
from tests.testapp.models import (
    ActiveOnlyFeed,
    Feed,
    HiddenFeed,
    ProxyFeed,
    SpecialFeed,
    TrackedArticle,
)

pytestmark = pytest.mark.django_db(transaction=True)


def target() -> Any:
    return tasks.poll.target


def test_format_error_cuts_to_the_column() -> None:
    assert _errors.format_error(ValueError("abc"), None) == "ValueError: abc"
    assert _errors.format_error(ValueError("abcdef"), 10) == "ValueErro…"
    assert len(_errors.format_error(ValueError("x" * 500), 100)) == 100
    assert _errors.format_error(None, 10) == ""


def test_threshold_flips_the_row_on_the_nth_failure() -> None:
    feed = Feed.objects.create(title="f")
    outcomes = [
        services.record_failure(target(), feed.pk, ValueError(n), threshold=3, sender=None)
        for n in range(4)
    ]
    assert [(o.deactivated, o.failure_count) for o in outcomes] == [
        (False, 1),
        (False, 2),
        (True, 3),
        (False, None),  # inactive now: left alone
    ]
    feed.refresh_from_db()
    assert (feed.active, feed.error, feed.failure_count, feed.error_message) == (
        False,
        True,
        3,
        "ValueError: 2",
    )


def test_concurrent_failures_lose_no_increment_and_deactivate_once() -> None:
    # Given one object and 8 threads each recording 5 failures at once (threshold 30)
    feed = Feed.objects.create(title="contended")
    deactivations: list[Any] = []
    object_deactivated.connect(lambda **kw: deactivations.append(kw), weak=False, dispatch_uid="c")
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def fail_five() -> None:
        try:
            barrier.wait()
            for _ in range(5):
                services.record_failure(
                    target(), feed.pk, ValueError("x"), threshold=30, sender=None
                )
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=fail_five) for _ in range(8)]
    try:
        # When they all run
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        object_deactivated.disconnect(dispatch_uid="c")

    # Then exactly 30 were counted (the 10 after deactivation are not) and one deactivation sent
    assert errors == []
    feed.refresh_from_db()
    assert (feed.active, feed.failure_count) == (False, 30)
    assert len(deactivations) == 1


def test_failure_keeps_a_concurrent_change_of_another_field() -> None:
    feed = Feed.objects.create(title="f")
    stale = Feed.objects.get(pk=feed.pk)
    Feed.objects.filter(pk=feed.pk).update(note="changed meanwhile", title="renamed")

    outcome = services.record_failure(target(), stale.pk, ValueError("x"), threshold=1, sender=None)

    assert outcome.instance is not None and outcome.instance.note == "changed meanwhile"
    feed.refresh_from_db()
    assert (feed.note, feed.title, feed.active) == ("changed meanwhile", "renamed", False)


def test_returned_instance_matches_the_row() -> None:
    feed = Feed.objects.create(title="f", note="n")
    outcome = services.record_failure(target(), feed.pk, KeyError("k"), threshold=1, sender=None)
    fresh = Feed.objects.get(pk=feed.pk)
    instance = outcome.instance
    assert instance is not None
    for field in Feed._meta.concrete_fields:
        assert getattr(instance, field.attname) == getattr(fresh, field.attname), field.name
    assert instance._state.adding is False and instance._state.db == "default"


def test_a_key_given_as_text_is_prepared_by_the_field() -> None:
    # The key goes through the ORM's preparation: text is converted, nonsense is refused as the
    # ORM refuses it.
    feed = Feed.objects.create(title="f", failure_count=3)
    assert _reads.read_state(target(), feed.pk, "default") == (True, 3, None)
    assert _reads.read_state(target(), str(feed.pk), "default") == (True, 3, None)
    with pytest.raises(ValueError, match="expected a number but got 'not a key'"):
        _reads.read_state(target(), "not a key", "default")


def test_model_shapes() -> None:
    feed, child = services.target_for(Feed), services.target_for(SpecialFeed)
    proxy, hidden = services.target_for(ProxyFeed), services.target_for(HiddenFeed)
    assert (feed.inherited, feed.owner) == (False, Feed)
    assert (child.inherited, child.owner) == (True, Feed)
    assert (proxy.inherited, proxy.owner) == (False, Feed)
    assert (hidden.inherited, hidden.owner) == (False, HiddenFeed)


def test_a_multi_table_child_with_the_fields_in_its_own_table() -> None:
    tracked = services.target_for(TrackedArticle)
    assert (tracked.inherited, tracked.owner) == (False, TrackedArticle)
    article = TrackedArticle.objects.create(title="read me")

    assert _reads.read_state(tracked, article.pk, "default") == (True, 0, None)


@pytest.mark.parametrize("receiver", [True, False], ids=["in-a-transaction", "read-first"])
@pytest.mark.parametrize("model", [Feed, SpecialFeed, ProxyFeed, HiddenFeed, TrackedArticle])
def test_every_model_shape_is_deactivated_once_with_or_without_a_receiver(
    model: Any, receiver: bool
) -> None:
    received: list[Any] = []
    if receiver:
        object_deactivated.connect(
            lambda instance, **kw: received.append(instance), weak=False, dispatch_uid="shape"
        )
    try:
        obj = model.objects.create(title="shape", failure_count=2)
        target = services.target_for(model)
        first = services.record_failure(target, obj.pk, ValueError("x"), threshold=1, sender=None)
        again = services.record_failure(target, obj.pk, ValueError("y"), threshold=1, sender=None)
        missing = services.record_failure(target, 10**9, ValueError("z"), threshold=1, sender=None)
    finally:
        object_deactivated.disconnect(dispatch_uid="shape")

    assert (first.deactivated, first.failure_count) == (True, 3)
    instance = first.instance
    assert type(instance) is model and instance is not None
    assert (instance.active, instance.error, instance.error_message) == (
        False,
        True,
        "ValueError: x",
    )
    assert instance.title == "shape"
    assert again.instance is None and missing.instance is None  # inactive, missing: left alone
    stored = model._base_manager.get(pk=obj.pk)
    assert (stored.active, stored.error, stored.failure_count) == (False, True, 3)
    assert stored.deactivated_at == instance.deactivated_at
    assert received == ([instance] if receiver else [])


def test_multi_table_child() -> None:
    child = SpecialFeed.objects.create(title="child", kind="mti")
    target = services.target_for(SpecialFeed)

    outcome = services.record_failure(target, child.pk, ValueError("x"), threshold=1, sender=None)

    assert outcome.deactivated is True and isinstance(outcome.instance, SpecialFeed)
    child.refresh_from_db()
    assert (child.active, child.failure_count, child.kind) == (False, 1, "mti")
    assert _reads.read_state(target, child.pk, "default") == (False, 1, None)


def test_a_parent_row_without_the_child_is_not_the_child_s() -> None:
    # A Feed that is no SpecialFeed: the child's update must not reach it through the parent table
    parent = Feed.objects.create(title="parent only")
    target = services.target_for(SpecialFeed)

    outcome = services.record_failure(target, parent.pk, ValueError("x"), threshold=1, sender=None)

    assert outcome.instance is None
    assert Feed.objects.get(pk=parent.pk).active is True


def test_a_filtering_base_manager_is_honoured() -> None:
    archived = HiddenFeed.objects.create(title="archived")
    HiddenFeed.objects.filter(pk=archived.pk).update(archived=True)
    target = services.target_for(HiddenFeed)

    with pytest.raises(HiddenFeed.DoesNotExist):
        _reads.read_state(target, archived.pk, "default")
    outcome = services.record_failure(
        target, archived.pk, ValueError("x"), threshold=1, sender=None
    )

    assert outcome.instance is None
    assert services.deactivate(HiddenFeed, archived.pk) is None
    assert HiddenFeed.objects.count() == 0
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT active FROM {HiddenFeed._meta.db_table}")
        assert [bool(active) for (active,) in cursor.fetchall()] == [True]  # a 1 on MySQL


@pytest.mark.parametrize("receiver", [True, False], ids=["receiver", "no-receiver"])
def test_a_base_manager_hiding_inactive_rows_is_deactivated_with_or_without_a_receiver(
    eager: Any, receiver: bool
) -> None:
    # Given a model whose base manager hides inactive rows, with or without a receiver
    received: list[Any] = []
    if receiver:
        object_deactivated.connect(
            lambda instance, **kw: received.append(instance), weak=False, dispatch_uid="hide"
        )
    feed = ActiveOnlyFeed.objects.create(title="hidden once off", behaviour="fail")
    try:
        # When its task fails
        result = tasks.poll_active_only.delay(feed.pk)
    finally:
        object_deactivated.disconnect(dispatch_uid="hide")

    # Then the task's exception is the body's, and the object is deactivated either way
    assert isinstance(result.result, tasks.Boom)
    stored = ActiveOnlyFeed.every_row.get(pk=feed.pk)
    assert (stored.active, stored.error, stored.failure_count) == (False, True, 1)
    assert not ActiveOnlyFeed.objects.filter(pk=feed.pk).exists()
    if receiver:
        [instance] = received
        assert (type(instance), instance.pk, instance.active) == (ActiveOnlyFeed, feed.pk, False)


@pytest.mark.skipif(django.VERSION < (5, 2), reason="composite primary keys are new in Django 5.2")
@pytest.mark.parametrize("model", ["testapp.CompositeFeed", "class"])
def test_a_composite_primary_key_is_refused_at_declaration(model: str) -> None:
    from tests.testapp.models import CompositeFeed

    app = Celery("composite", set_as_current=False)
    app.finalize()

    def body(pk: Any) -> None: ...

    with pytest.raises(DeactivateConfigError, match="testapp.CompositeFeed has a composite"):
        app.task(
            base=DeactivatingTask,
            lazy=False,
            shared=False,
            model=CompositeFeed if model == "class" else model,
        )(body)
    with pytest.raises(DeactivateConfigError, match="composite primary key"):
        services.target_for(CompositeFeed)  # the admin, the command


def test_format_error_never_raises_and_fits_the_database() -> None:
    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    assert _errors.format_error(Unprintable(), None).endswith(
        "Unprintable: <str() raised RuntimeError>"
    )
    assert _errors.format_error(ValueError("a\x00b"), None) == "ValueError: a\ufffdb"
    assert _errors.format_error(ValueError("\ud800"), None) == "ValueError: \ufffd"
    assert _errors.format_error(ValueError(), None) == "ValueError"


def test_manual_deactivate_and_reactivate_send_their_signals() -> None:
    feed = Feed.objects.create(title="f", failure_count=2)
    sent: list[tuple[str, Any]] = []
    object_deactivated.connect(lambda **kw: sent.append(("off", kw)), weak=False, dispatch_uid="d")
    object_reactivated.connect(lambda **kw: sent.append(("on", kw)), weak=False, dispatch_uid="r")
    try:
        off = services.deactivate(Feed, feed.pk)
        assert services.deactivate(Feed, feed.pk) is None  # already inactive: nothing changes
        on = services.reactivate(Feed, feed.pk)
        assert services.reactivate(Feed, feed.pk) is None
    finally:
        object_deactivated.disconnect(dispatch_uid="d")
        object_reactivated.disconnect(dispatch_uid="r")
    assert off is not None and (off.active, off.error) == (False, False)
    assert on is not None and (on.active, on.error, on.failure_count, on.deactivated_at) == (
        True,
        False,
        0,
        None,
    )
    assert [(kind, kw["sender"]) for kind, kw in sent] == [("off", Feed), ("on", Feed)]
    assert sent[0][1]["exception"] is None


def test_reset_failures_is_one_targeted_update_only_when_needed() -> None:
    feed = Feed.objects.create(title="f", failure_count=4)
    with CaptureQueriesContext(connection) as captured:
        assert services.reset_failures(target(), feed.pk) == 1
        assert services.reset_failures(target(), feed.pk) == 0
    assert len(captured) == 2
    assert Feed.objects.get(pk=feed.pk).failure_count == 0


def test_queryset_helpers_do_not_filter_objects() -> None:
    on = Feed.objects.create(title="on")
    off = Feed.objects.create(title="off", active=False)
    assert list(Feed.objects.active()) == [on]
    assert list(Feed.objects.deactivated()) == [off]
    assert Feed.objects.count() == 2
