"""Django settings for building the documentation: nothing to connect to, nothing written.

``docs/conf.py`` calls ``django.setup()`` with these so that autodoc can import every module of
celery_deactivate.  No query runs during the build; the database is SQLite in memory.
"""

SECRET_KEY = "docs-build-only"
INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django.contrib.admin",
    "celery_deactivate",
]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
