"""Sphinx configuration of the celery-deactivate documentation (``make docs``).

Nothing is downloaded at build time (no intersphinx).  Django is set up with the settings of
``_ext/docs_settings.py`` (SQLite in memory, no server) so that autodoc can import every module.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import django

DOCS = Path(__file__).resolve().parent
sys.path[:0] = [str(DOCS.parent), str(DOCS / "_ext")]
# Not setdefault: a DJANGO_SETTINGS_MODULE left in the environment must not decide the build.
os.environ["DJANGO_SETTINGS_MODULE"] = "docs_settings"
django.setup()

import celery_deactivate  # noqa: E402  (after django.setup())

project = "celery-deactivate"
copyright = "2026, the celery-deactivate authors"
release = celery_deactivate.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
    "myst_parser",
    "options_table",
    "metrics_table",
    "house_docstrings",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_ext"]

# Markdown: the README and CHANGELOG are included as they are; headings get anchors for links.
myst_heading_anchors = 3

# The API reference: what the docstrings say, in source order, no Celery docstrings inherited.
autodoc_member_order = "bysource"
autodoc_inherit_docstrings = False
autodoc_typehints = "signature"

# Nothing is fetched from other projects' sites (no intersphinx), so references to Django, Celery,
# kombu, billiard and the standard library stay plain text; so do names that signatures take from
# imports made only for type checking (``Task``, ``QuerySet``, ``models.Field``).
nitpick_ignore_regex = [
    (r"py:.*", r"(django|celery|kombu|billiard|psycopg|collections|typing|types|weakref)\..*"),
    (r"py:class", r"(?!celery_deactivate\.).*"),
]

html_theme = "alabaster"
html_title = f"celery-deactivate {release}"
html_theme_options = {
    "description": "Deactivate a Django model object when its Celery task fails for good.",
    "fixed_sidebar": True,
    "page_width": "1240px",  # code lines of up to 100 characters, as the code's line length
    "body_max_width": "none",
}
