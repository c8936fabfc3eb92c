"""A database backend the library does not support (a third-party one, as Django's own
subclasses build them): SQLite's under another vendor name.  The test settings name it as the
``exotic`` database, which no test connects to (tests/test_checks.py routes to it)."""
