"""The admin in a real browser: headless Chromium (Debian's ``chromium``), driven by Selenium
through Debian's ``chromium-driver``, against pytest-django's ``live_server``.

An operator logs in, filters the feeds deactivated by an error, opens one and reads its error,
goes back, re-activates it with the action and sees it active.  Another opens the status page
from the admin's index, reads its chart and counts, follows a count to the filtered changelist
and an object's history.  With ``SCREENSHOT_DIR`` set, the pages are saved there as
``admin-changelist.png``, ``admin-status.png`` and ``admin-history.png`` (the pictures in
``docs/images/``: ``make screenshots``)::

    SCREENSHOT_DIR=docs/images .venv/bin/python -m pytest tests/test_admin_browser.py
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import django
import pytest
from django.contrib.auth.models import User
from django.utils import timezone
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.select import Select
from selenium.webdriver.support.wait import WebDriverWait

from tests.testapp.models import Feed

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")

pytestmark = pytest.mark.skipif(
    not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
    reason=f"no Chromium at {CHROMIUM} with a driver at {CHROMEDRIVER} "
    "(Debian: apt-get install chromium chromium-driver; .ci/run installs them)",
)

ERROR = (
    "ConnectionError: HTTPSConnectionPool(host='feeds.example.org', port=443): "
    "Max retries exceeded with url: /rss.xml\n"
    "(Caused by NewConnectionError: [Errno 111] Connection refused)"
)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    """Headless Chromium, as root on a machine without network beyond loopback."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--force-device-scale-factor=1",
        "--window-size=1280,880",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def feeds() -> dict[str, Feed]:
    """A small project's feeds: most of them healthy, two failed, one paused by hand."""
    now = timezone.now()
    for title in ("Django weblog", "Python Insider", "Planet PostgreSQL", "Celery news"):
        Feed.objects.create(title=title)
    return {
        "refused": Feed.objects.create(
            title="Example Corp blog",
            active=False,
            error=True,
            error_message=ERROR,
            failure_count=3,
            deactivated_at=now - datetime.timedelta(hours=5),
        ),
        "parse": Feed.objects.create(
            title="Release notes",
            active=False,
            error=True,
            error_message="ParseError: mismatched tag: line 42, column 2",
            failure_count=3,
            deactivated_at=now - datetime.timedelta(minutes=40),
        ),
        "paused": Feed.objects.create(
            title="Old company news",
            active=False,
            deactivated_at=now - datetime.timedelta(days=12),
        ),
    }


def wait(driver: WebDriver, condition: Any, seconds: float = 20) -> Any:
    return WebDriverWait(driver, seconds).until(condition)


def screenshot(driver: WebDriver, url: str, folder: Path) -> None:
    """The changelist with the navigation sidebar folded away and the state counts shown (the
    filters' facets, Django 5.0+)."""
    driver.find_element(By.ID, "toggle-nav-sidebar").click()
    driver.get(f"{url}/admin/testapp/feed/" + ("?_facets=True" if django.VERSION >= (5, 0) else ""))
    wait(driver, expected_conditions.presence_of_element_located((By.ID, "result_list")))
    folder.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(folder / "admin-changelist.png"))
    driver.get(f"{url}/admin/testapp/feed/")


def titles(driver: WebDriver) -> set[str]:
    return {cell.text for cell in driver.find_elements(By.CSS_SELECTOR, "#result_list tbody th a")}


def test_an_operator_finds_a_broken_feed_reads_its_error_and_reactivates_it(
    live_server: Any, browser: WebDriver, feeds: dict[str, Feed]
) -> None:
    User.objects.create_superuser("ops", "ops@example.com", "correct horse")
    broken = feeds["refused"]

    # Log in.
    browser.get(f"{live_server.url}/admin/testapp/feed/")
    browser.find_element(By.ID, "id_username").send_keys("ops")
    browser.find_element(By.ID, "id_password").send_keys("correct horse")
    browser.find_element(By.CSS_SELECTOR, "#login-form [type=submit]").click()
    wait(browser, expected_conditions.presence_of_element_located((By.ID, "result_list")))
    assert len(titles(browser)) == 7
    if os.environ.get("SCREENSHOT_DIR"):
        screenshot(browser, live_server.url, Path(os.environ["SCREENSHOT_DIR"]))

    # Filter the feeds deactivated by an error.
    browser.find_element(By.LINK_TEXT, "Deactivated by error").click()
    wait(browser, expected_conditions.url_contains("deactivation=error"))
    assert titles(browser) == {"Example Corp blog", "Release notes"}

    # Open one and read its error, the whole of it.
    browser.find_element(By.LINK_TEXT, "Example Corp blog").click()
    wait(browser, expected_conditions.url_contains(f"/{broken.pk}/change/"))
    error = browser.find_element(By.CSS_SELECTOR, ".field-error_message .readonly").text
    assert error == ERROR
    state = browser.find_element(By.CSS_SELECTOR, ".field-deactivation_state .readonly").text
    assert state == "Deactivated by error"

    # Go back and re-activate it with the action.
    browser.back()
    wait(browser, expected_conditions.url_contains("deactivation=error"))
    browser.find_element(
        By.CSS_SELECTOR, f"input[name=_selected_action][value='{broken.pk}']"
    ).click()
    Select(browser.find_element(By.NAME, "action")).select_by_visible_text(
        "Re-activate selected feeds"
    )
    browser.find_element(By.CSS_SELECTOR, "button[name=index]").click()
    message = wait(
        browser,
        expected_conditions.visibility_of_element_located(
            (By.CSS_SELECTOR, ".messagelist .success")
        ),
    )

    # See it active: gone from the filtered list, active in the list of active feeds.
    assert message.text == "Re-activated 1 feed."
    assert titles(browser) == {"Release notes"}
    browser.find_element(By.LINK_TEXT, "Active").click()
    wait(browser, expected_conditions.url_contains("deactivation=active"))
    assert "Example Corp blog" in titles(browser)
    row = browser.find_element(
        By.XPATH,
        "//tr[th/a[text()='Example Corp blog']]/td[contains(@class, 'field-deactivation_state')]",
    )
    assert row.text == "Active"
    broken.refresh_from_db()
    assert (broken.active, broken.error, broken.error_message, broken.failure_count) == (
        True,
        False,
        "",
        0,
    )
    assert Feed.objects.filter(active=False).count() == 2


def log_in(driver: WebDriver, url: str, username: str, password: str) -> None:
    """Log in on the admin's login page at ``url``; return once the page after it is shown (the
    login page has a ``#content-main`` too: the user tools are the logged-in page's)."""
    driver.get(url)
    driver.find_element(By.ID, "id_username").send_keys(username)
    driver.find_element(By.ID, "id_password").send_keys(password)
    driver.find_element(By.CSS_SELECTOR, "#login-form [type=submit]").click()
    wait(driver, expected_conditions.presence_of_element_located((By.ID, "user-tools")))


def test_the_status_page_charts_the_history_and_its_counts_filter_the_changelist(
    live_server: Any, browser: WebDriver, feeds: dict[str, Feed]
) -> None:
    # Given an operator who may view feeds, and a week of history: the broken feeds deactivated
    # by their failures hours ago, one re-activated by hand, one paused by hand now.
    from django.contrib.auth.models import Permission

    from celery_deactivate import services
    from celery_deactivate.models import HistoryEvent
    from tests.testapp import tasks

    user = User.objects.create_user("ops", password="correct horse", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(codename="view_feed"))
    now = timezone.now()
    HistoryEvent.objects.bulk_create(
        HistoryEvent(
            at=now - datetime.timedelta(hours=hours),
            model="testapp.Feed",
            object_pk=str(feeds[key].pk),
            kind=kind,
            cause="failure" if kind == "deactivated" else "hand",
            task=tasks.poll.name if kind == "deactivated" else "",
            actor="" if kind == "deactivated" else "ops",
        )
        for key, kind, hours in (
            ("refused", "deactivated", 50),
            ("parse", "deactivated", 50),
            ("refused", "reactivated", 26),
            ("refused", "deactivated", 5),
        )
    )
    services.deactivate(Feed, Feed.objects.get(title="Celery news").pk, by=user)

    # When they open the status page from the admin's index
    log_in(browser, f"{live_server.url}/admin/", "ops", "correct horse")
    browser.find_element(By.LINK_TEXT, "Task status").click()
    section = wait(
        browser,
        expected_conditions.presence_of_element_located(
            (By.CSS_SELECTOR, f"section[data-task='{tasks.poll.name}']")
        ),
    )

    # Then the chart draws the test's events, one bar per hour and kind, with its title
    def hour(moment: datetime.datetime) -> str:
        return moment.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:00Z")

    bars = {
        (bar.get_attribute("data-kind"), bar.get_attribute("data-hour")): (
            bar.get_attribute("data-count"),
            bar.find_element(By.TAG_NAME, "title").get_attribute("textContent"),
        )
        for bar in section.find_elements(By.CSS_SELECTOR, "svg.deactivation-chart rect.bar")
    }
    fifty = now - datetime.timedelta(hours=50)
    assert {key: count for key, (count, _) in bars.items()} == {
        ("deactivated", hour(fifty)): "2",
        ("reactivated", hour(now - datetime.timedelta(hours=26))): "1",
        ("deactivated", hour(now - datetime.timedelta(hours=5))): "1",
        ("deactivated", hour(now)): "1",
    }
    assert bars[("deactivated", hour(fifty))][1].endswith(":00 UTC: 2 deactivated")
    svg = section.find_element(By.CSS_SELECTOR, "svg.deactivation-chart")
    assert svg.size["width"] > 600 and svg.size["height"] > 100  # rendered, not collapsed
    counts = {
        item.get_attribute("data-figure"): item.find_element(By.CLASS_NAME, "figure").text
        for item in section.find_elements(By.CSS_SELECTOR, "li[data-figure]")
    }
    assert counts == {
        "active": "3",
        "probing": "0",
        "error": "2",
        "hand": "2",
        "probe_waiting": "0",
        "probe_running": "0",
    }
    if os.environ.get("SCREENSHOT_DIR"):
        folder = Path(os.environ["SCREENSHOT_DIR"])
        folder.mkdir(parents=True, exist_ok=True)
        browser.execute_script("arguments[0].scrollIntoView()", section)
        assert section.screenshot(str(folder / "admin-status.png"))

    # And a count links to the changelist, filtered to what it counts
    section.find_element(By.CSS_SELECTOR, "li[data-figure='hand'] a").click()
    wait(browser, expected_conditions.url_contains("deactivation=hand"))
    assert titles(browser) == {"Old company news", "Celery news"}

    # And the change page shows the object's history, the newest first
    browser.find_element(By.LINK_TEXT, "Celery news").click()
    history = wait(
        browser,
        expected_conditions.presence_of_element_located(
            (By.CSS_SELECTOR, "table.deactivation-history")
        ),
    )
    rows = history.find_elements(By.CSS_SELECTOR, "tbody tr")
    assert [row.find_elements(By.TAG_NAME, "td")[1].text for row in rows] == ["deactivated by hand"]
    assert rows[0].find_elements(By.TAG_NAME, "td")[2].text == "ops"
    if os.environ.get("SCREENSHOT_DIR"):
        fieldset = history.find_element(By.XPATH, "ancestor::fieldset")
        browser.execute_script("arguments[0].scrollIntoView()", fieldset)
        assert fieldset.screenshot(str(Path(os.environ["SCREENSHOT_DIR"]) / "admin-history.png"))
