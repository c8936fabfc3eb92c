"""The project's Celery app: configured from Django settings (``CELERY_`` namespace)."""

import os

from celery import Celery

from celery_deactivate import maintain_entry
from celery_deactivate.dispatch import schedule_entry

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "feeds_project.settings")

app = Celery("feeds_project")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

# Every ten minutes, one poll message per active feed (celery_deactivate.dispatch.schedule_entry:
# the fan-out runs on a worker; add shards=N to split it across workers).  "expires" drops a
# fan-out that beat queued but no worker started before the next one.
# Every minute, celery_deactivate.maintain (celery_deactivate.maintain_entry) sends the cool-down
# probes that are due (the poll task sets deactivate_cooldown), ends the outages that are over and
# sends the digests that are due.
app.conf.beat_schedule = {
    "poll-active-feeds": schedule_entry("feeds.tasks.poll", 600.0, entry_options={"expires": 600}),
    "celery-deactivate-maintain": maintain_entry(every=60),
}
