"""What the first release publishes: ``make dist``'s sdist and wheel hold every file of the
package, and the wheel installed into a fresh virtualenv imports, migrates and renders.

A data file the package needs but setuptools leaves out (a template, a migration, a static file,
``py.typed``) shows here, not on a user's machine.  The builds start from a copy of the sources
as a fresh clone has them (no ``*.egg-info`` left by an editable install, whose file list would
hide a missing declaration), in isolated environments (setuptools comes from the package index):
``python -m build``, as ``make dist`` runs it (the sdist, then the wheel built from it), and
``python -m build --wheel``, straight from the tree, as ``pip install ./celery-deactivate`` does.
The fresh virtualenv gets the wheel alone (``--no-deps``); a ``.pth`` file adds this run's
site-packages after its own, for Django and Celery.  That directory's own ``.pth`` files are not
read (this run's editable install of the package stays out), and the script runs outside the
repository: ``celery_deactivate`` can only come from the wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import celery_deactivate

PACKAGE = Path(celery_deactivate.__file__).parent
ROOT = PACKAGE.parent

#: Run by the fresh virtualenv's interpreter, outside the repository.
INSTALLED_SCRIPT = """
import json
from importlib import resources

import django
from django.conf import settings

settings.configure(
    INSTALLED_APPS=[
        "django.contrib.admin",
        "django.contrib.auth",
        "django.contrib.contenttypes",
        "django.contrib.sessions",
        "django.contrib.messages",
        "celery_deactivate",
    ],
    DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
    TEMPLATES=[{"BACKEND": "django.template.backends.django.DjangoTemplates", "APP_DIRS": True}],
    DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
)
django.setup()

import celery_deactivate
from django.core.management import call_command
from django.db import connection
from django.template.loader import get_template

call_command("migrate", "celery_deactivate", verbosity=0)
template = get_template("admin/celery_deactivate/task_status.html")
print(json.dumps({
    "file": celery_deactivate.__file__,
    "version": celery_deactivate.__version__,
    "tables": sorted(t for t in connection.introspection.table_names() if "celery_deactivate" in t),
    "template": template.origin.name,
    "py.typed": resources.files("celery_deactivate").joinpath("py.typed").is_file(),
}))
"""


def package_files() -> set[str]:
    """Every file of the package's source tree, as a path in a wheel (no bytecode)."""
    return {
        path.relative_to(ROOT).as_posix()
        for path in PACKAGE.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }


#: What a clone holds that the builds read.
SOURCES = ("setup.cfg", "pyproject.toml", "MANIFEST.in", "README.md", "CHANGELOG.md", "LICENSE")


def fresh_sources(into: Path) -> Path:
    """The package's sources as a fresh clone has them: no build output, metadata nor bytecode."""
    for name in SOURCES:
        shutil.copy2(ROOT / name, into / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "*.sqlite3")
    for folder in ("celery_deactivate", "tests"):
        shutil.copytree(ROOT / folder, into / folder, ignore=ignore)
    return into


def wheel_files(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return {name for name in archive.namelist() if not name.split("/")[0].endswith("-info")}


def run(*command: str | Path, cwd: Path | None = None) -> str:
    """Run ``command``; its output.  Without this run's ``PYTHONPATH``: the fresh virtualenv
    imports what is installed in it, nothing else."""
    done = subprocess.run(
        [str(part) for part in command],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        cwd=cwd,
        env={key: value for key, value in os.environ.items() if key != "PYTHONPATH"},
    )
    assert done.returncode == 0, f"{command}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_the_wheel_installs_into_a_fresh_virtualenv_with_every_data_file(tmp_path: Path) -> None:
    # Given the sdist and the wheel that make dist builds, and the wheel built from the tree
    (tmp_path / "clone").mkdir()
    sources = fresh_sources(tmp_path / "clone")
    dist, direct = tmp_path / "dist", tmp_path / "direct"
    run(sys.executable, "-m", "build", "--outdir", dist, sources)
    run(sys.executable, "-m", "build", "--wheel", "--outdir", direct, sources)
    (wheel,) = dist.glob("celery_deactivate-*.whl")
    (sdist,) = dist.glob("celery_deactivate-*.tar.gz")
    (from_tree,) = direct.glob("celery_deactivate-*.whl")

    # Then all three hold every file of the package; the sdist also the changelog and the tests
    expected = package_files()
    assert "celery_deactivate/templates/admin/celery_deactivate/task_status.html" in expected
    assert "celery_deactivate/migrations/0001_initial.py" in expected
    assert wheel_files(wheel) == expected
    assert wheel_files(from_tree) == expected
    with tarfile.open(sdist) as archive:
        top = archive.getnames()[0].split("/")[0]
        in_sdist = {name.removeprefix(f"{top}/") for name in archive.getnames()}
    assert expected <= in_sdist
    assert {"CHANGELOG.md", "README.md", "tests/conftest.py", "tests/testapp/models.py"} <= in_sdist
    # and the licence's text, which the wheel carries in its metadata
    assert "LICENSE" in in_sdist
    with zipfile.ZipFile(wheel) as archive:
        assert any(
            name.endswith("-info/licenses/LICENSE") or name.endswith("-info/LICENSE")
            for name in archive.namelist()
        )

    # When the wheel alone is installed into a fresh virtualenv
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    run(python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel)

    # Then it imports from there, migrates its tables and finds its template
    fresh = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    (Path(fresh.strip()) / "outer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    found = json.loads(run(python, "-c", INSTALLED_SCRIPT, cwd=tmp_path))
    installed = Path(found["file"]).resolve()
    assert installed.is_relative_to(venv.resolve()), installed
    assert found["version"] == celery_deactivate.__version__
    assert "celery_deactivate_taskstate" in found["tables"]
    assert Path(found["template"]).resolve().is_relative_to(venv.resolve())
    assert found["py.typed"] is True
