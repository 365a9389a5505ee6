"""Every shell program in files/ passes shellcheck, rendered with the example settings.

The programs run on the host with /bin/sh (dash on Debian), so shellcheck checks them as POSIX
sh. The example settings are conf.example.env with each ``<placeholder>`` replaced by its text
(the values a reader of that file sees).
"""

import re
import subprocess
from pathlib import Path

import pytest

from tasks import settings as settings_mod
from tasks.primitives import FILES_DIR, render

ROOT = Path(__file__).resolve().parent.parent
SHELL_TEMPLATES = sorted(p.name for p in Path(FILES_DIR).glob("*.sh.j2"))


@pytest.fixture(scope="module")
def example_settings():
    raw, problems = settings_mod.read((ROOT / "conf.example.env").read_text())
    assert not problems, problems
    raw = {key: re.sub(r"^<(.*)>$", r"\1", value) if value else value
           for key, value in raw.items()}
    raw["DEPLOY_REPO"] = "/srv/app.git"  # its placeholder's text is a description
    raw["DJANGO_SECRET_KEY"] *= 2  # its placeholder's text is shorter than it asks
    return settings_mod.parse(raw, "conf.example.env")


def test_the_shell_programs_are_found():
    assert {"nginx-check.sh.j2", "deploy-release.sh.j2", "health-check.sh.j2"} <= set(
        SHELL_TEMPLATES)


@pytest.mark.parametrize("name", SHELL_TEMPLATES)
def test_shellcheck_passes(name, example_settings):
    text = render(name, example_settings)
    res = subprocess.run(["shellcheck", "--shell=sh", "--format=gcc", "-"], input=text,
                         capture_output=True, text=True)
    assert res.returncode == 0, f"shellcheck on files/{name}:\n{res.stdout}{res.stderr}"
