"""The library's reads of an object, compiled by the ORM once and run with each key, read what
the ORM's own ``get()`` reads: on every model shape, with every backend's converters, the same
instance, the same errors, one statement through Django's cursor."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.core.exceptions import ObjectDoesNotExist
from django.db import connection
from django.db.models import Model
from django.utils import timezone

from celery_deactivate import _reads
from celery_deactivate.services import target_for
from tests.testapp import models
from tests.testapp.models import (
    ActiveOnlyFeed,
    DeepFeed,
    Feed,
    HiddenFeed,
    KeyedFeed,
    ProxyFeed,
    SpecialFeed,
    TenantFeed,
    UuidFeed,
)

pytestmark = pytest.mark.django_db(transaction=True)

#: What the ORM raises for a key it refuses.
REFUSED = (ValueError, TypeError, ObjectDoesNotExist)

SHAPES = [
    Feed,
    SpecialFeed,
    DeepFeed,
    ProxyFeed,
    UuidFeed,
    KeyedFeed,
    HiddenFeed,
    ActiveOnlyFeed,
    TenantFeed,
]


def make(model: Any, n: int, **values: Any) -> Any:
    if model is TenantFeed:
        values["tenant"] = models.TENANT[0]
    if model is KeyedFeed:
        values["key"] = f"key-{n}\nline"  # odd text in the key
    return model.objects.create(title=f"{model.__name__} {n}", **values)


def columns(instance: Model) -> dict[str, Any]:
    """Every column's value with its type."""
    return {
        f.attname: (getattr(instance, f.attname), type(getattr(instance, f.attname)))
        for f in instance._meta.concrete_fields
    }


@pytest.mark.parametrize("model", SHAPES, ids=lambda m: m.__name__)
def test_the_instance_is_the_one_the_base_manager_gets(model: type[Model]) -> None:
    when = timezone.now() - timedelta(minutes=5)
    first = make(model, 1, failure_count=2, deactivated_at=when, error_message="é\n🙂")
    second = make(model, 2)

    for made in (first, second, first):  # compiled on the first read, the key changed after
        read: Any = _reads.read_instance(model, made.pk, "default")
        expected = model._base_manager.get(pk=made.pk)
        assert type(read) is model
        assert columns(read) == columns(expected)
        assert (read._state.db, read._state.adding) == ("default", False)
    assert read.deactivated_at == when and timezone.is_aware(read.deactivated_at)


@pytest.mark.parametrize("model", SHAPES, ids=lambda m: m.__name__)
def test_the_state_and_the_changed_row_are_the_rows_values(model: type[Model]) -> None:
    feed = make(model, 1, failure_count=3)
    other = make(model, 2)

    # (active, failure_count, probing_since): the roles a DeactivatableModel has
    assert _reads.read_state(target_for(model), feed.pk, "default") == (True, 3, None)
    assert _reads.read_state(target_for(model), other.pk, "default") == (True, 0, None)
    changed = _reads.read_changed(target_for(model), feed.pk, "default")
    assert columns(changed) == columns(model._base_manager.get(pk=feed.pk))


def test_a_row_the_base_manager_hides_is_missing_but_its_change_is_read() -> None:
    hidden = HiddenFeed.objects.create(title="h")
    HiddenFeed._base_manager.filter(pk=hidden.pk).update(archived=True)

    with pytest.raises(HiddenFeed.DoesNotExist, match="HiddenFeed matching query does not exist"):
        _reads.read_instance(HiddenFeed, hidden.pk, "default")
    with pytest.raises(HiddenFeed.DoesNotExist):
        _reads.read_state(target_for(HiddenFeed), hidden.pk, "default")
    changed: Any = _reads.read_changed(target_for(HiddenFeed), hidden.pk, "default")
    assert changed.archived is True


@pytest.mark.parametrize("key", ["abc", None, 10**30], ids=["text", "none", "too-large"])
def test_a_key_the_orm_refuses_is_refused_the_same_way(key: Any) -> None:
    Feed.objects.create(title="a")
    with pytest.raises(REFUSED) as orm:
        Feed._base_manager.get(pk=key)

    with pytest.raises(REFUSED) as ours:
        _reads.read_instance(Feed, key, "default")

    assert type(ours.value) is type(orm.value)
    assert str(ours.value) == str(orm.value)


def test_each_read_is_one_statement_through_djangos_cursor_with_its_key() -> None:
    feeds = [DeepFeed.objects.create(title=str(n)) for n in range(2)]
    seen: list[tuple[str, tuple[Any, ...]]] = []

    def wrapper(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        seen.append((sql, tuple(params)))
        return execute(sql, params, many, context)

    with connection.execute_wrapper(wrapper):
        for feed in feeds:
            _reads.read_instance(DeepFeed, feed.pk, "default")

    assert len(seen) == 2 and seen[0][0] == seen[1][0]  # the statement compiled once
    assert [params for _, params in seen] == [(feeds[0].pk,), (feeds[1].pk,)]
    assert "ORDER BY" not in seen[0][0].upper()  # as get() reads: the model's ordering left out


def test_a_base_manager_whose_rows_change_is_read_as_it_is_at_each_read() -> None:
    mine = TenantFeed.objects.create(title="a's", tenant="a")
    try:
        assert _reads.read_instance(TenantFeed, mine.pk, "default").pk == mine.pk
        assert _reads.read_state(target_for(TenantFeed), mine.pk, "default")[0] is True
        models.TENANT[0] = "b"  # another tenant's turn: the row is not its own

        with pytest.raises(TenantFeed.DoesNotExist):
            _reads.read_instance(TenantFeed, mine.pk, "default")
        with pytest.raises(TenantFeed.DoesNotExist):
            _reads.read_state(target_for(TenantFeed), mine.pk, "default")
    finally:
        models.TENANT[0] = "a"
