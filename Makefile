# celery-deactivate: every target creates the virtualenv it needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
STAMP  := $(VENV)/.installed
DOCS_STAMP := $(VENV)/.installed-docs
# Sphinx: warnings are errors; every warning is reported before the build fails.
SPHINXOPTS ?= -n -W --keep-going

.DEFAULT_GOAL := help
.PHONY: help venv mysql-driver test test-crash test-matrix demo example-admin docs screenshots lint typecheck bench clean dist

help: ## Show the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[docs]'
	touch $(DOCS_STAMP)

venv: $(STAMP) ## Create .venv and install the package with its test and dev extras

# The MySQL driver, for the suite's run on MariaDB (quick once it is there).
mysql-driver: $(STAMP)
	scripts/mysql-driver.sh $(PY)

# The servers: those DATABASE_URL/CELERY_BROKER_URL name, else throwaway ones on free loopback
# ports for the run, else SQLite + memory with each skip's reason (scripts/with-services.sh).
# The suite runs once on DATABASE_URL, then again on MariaDB when MYSQL_URL is set (the
# throwaway servers set it), then again on SQLite: scripts/on-each-database.sh.
test: mysql-driver ## Run the whole suite on PostgreSQL (+ PgBouncer), MariaDB and SQLite with Redis: yours (DATABASE_URL, CELERY_BROKER_URL), else started for the run, installed with apt-get when root
	scripts/with-services.sh scripts/on-each-database.sh $(PY) -m pytest -rs $(PYTEST_ARGS)

test-crash: mysql-driver ## Run only the prefork-worker fault-injection tests (servers and databases as for test)
	scripts/with-services.sh scripts/on-each-database.sh $(PY) -m pytest -rs -m crash $(PYTEST_ARGS)

test-matrix: $(STAMP) ## Run the suite across Celery 5.3/5.5/5.7 x Django 4.2/5.2/6.0 (nox, pyenv interpreters)
	$(BIN)/nox $(NOX_ARGS)

demo: $(STAMP) ## Run the example project end to end on SQLite + a filesystem broker
	$(PY) examples/demo.py

# examples/var/ is kept: its SQLite database gets the feeds, the history and the login.
example-admin: $(STAMP) ## The example's admin with feeds in every state and a login admin/admin (examples/README.md)
	cd examples && ../$(PY) manage.py seed_demo --superuser admin --password admin
	@echo
	@echo "Now: cd examples && ../$(PY) manage.py runserver"
	@echo "and open http://127.0.0.1:8000/admin/ (admin / admin)."

docs: $(DOCS_STAMP) ## Build the documentation site into docs/_build/html (Sphinx, warnings as errors)
	rm -rf docs/_build/html
	$(PY) -m sphinx $(SPHINXOPTS) -b html docs docs/_build/html

# The pictures of the admin in the docs are taken by its browser tests, never by hand.
screenshots: $(STAMP) ## Retake docs/images/admin-*.png with the admin's browser tests (headless Chromium)
	SCREENSHOT_DIR=docs/images $(PY) -m pytest -q tests/test_admin_browser.py $(PYTEST_ARGS)

lint: $(STAMP) ## ruff and mypy
	$(BIN)/ruff check celery_deactivate tests examples
	$(BIN)/ruff format --check celery_deactivate tests examples
	$(BIN)/mypy

typecheck: $(STAMP) ## mypy only
	$(BIN)/mypy

bench: $(STAMP) ## Benchmarks side by side (tests/benchmarks/results.md); with PostgreSQL + Redis also the outage guard (outage_results.md)
	$(PY) -m tests.benchmarks.run $(BENCH_ARGS)
	if [ -n "$$DATABASE_URL" ] && [ "$${CELERY_BROKER_URL#redis://}" != "$$CELERY_BROKER_URL" ]; then \
		$(PY) -m tests.benchmarks.outage $(OUTAGE_BENCH_ARGS); \
	else echo "outage guard benchmark skipped: it needs DATABASE_URL (PostgreSQL) and a redis:// CELERY_BROKER_URL"; fi

# What the first release will publish; tests/test_packaging.py installs such a wheel in a fresh venv.
dist: $(STAMP) ## Build the sdist and the wheel into dist/ (python -m build; install one with pip install dist/*.whl)
	rm -rf dist
	$(PY) -m build

clean: ## Remove the venv, build output and caches
	rm -rf $(VENV) .nox build dist *.egg-info .mypy_cache .ruff_cache examples/var docs/_build
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
