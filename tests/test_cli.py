"""The fab command line: task listing, and bad settings refused before any connection."""

import os
import shutil
import subprocess

import pytest

from tests.conftest import FAB, REPO

GOOD = ("DOMAIN=example.com\nADMIN_EMAIL=ops@example.com\nDB_PASSWORD=cli-test-db-password\n"
        "DJANGO_SECRET_KEY=" + "cli-test-secret-key-" * 3 + "\n")
# Port 1 on loopback refuses connections: had fab tried to connect, it would say so.
NO_HOST = "127.0.0.1:1"


def fab(*args, env_file=None):
    env = dict(os.environ)
    if env_file:
        env["FABRIC_FABSTACK_ENV_FILE"] = str(env_file)
    return subprocess.run([FAB, *args], cwd=REPO, env=env, capture_output=True, text=True)


def test_every_task_has_a_docstring():
    res = fab("--list")
    assert res.returncode == 0, res.stderr
    lines = [line for line in res.stdout.splitlines()[1:] if line.strip()]
    tasks = [line for line in lines if line.startswith("  ") and not line.startswith("    ")]
    assert tasks and all(len(line.split()) > 1 for line in tasks), res.stdout


@pytest.mark.parametrize("text, named", [
    ("ADMIN_EMAIL=ops@example.com\n", "DOMAIN: missing"),
    ("DOMAIN=<example.com>\nADMIN_EMAIL=ops@example.com\n", "DOMAIN: still the placeholder"),
    ("", "DOMAIN: missing"),
    ("DOMAIN=bad_domain\nADMIN_EMAIL=ops@example.com\n", "DOMAIN: must be"),
    ("DOMAIN=example.com\nADMIN_EMAIL=ops@example.com\nAPP_NAME=My App\n", "APP_NAME: must be"),
])
def test_bad_settings_fail_before_connecting(tmp_path, text, named):
    env_file = tmp_path / ".env"
    env_file.write_text(text)
    res = fab("-H", NO_HOST, "provision", env_file=env_file)
    assert res.returncode == 2
    assert named in res.stderr
    assert "Nothing was changed on any host" in res.stderr
    assert "cannot talk to" not in res.stdout + res.stderr


def test_template_error_fails_before_connecting(tmp_path):
    """A broken template in a copy of the project (never in the shared tree)."""
    project = tmp_path / "project"
    for name in ("tasks", "files"):
        shutil.copytree(REPO / name, project / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "fabfile.py", project)
    (project / "files" / "zz-broken.j2").write_text("line one\n{{ s.app }\n")
    env_file = tmp_path / ".env"
    env_file.write_text(GOOD)
    env = dict(os.environ, FABRIC_FABSTACK_ENV_FILE=str(env_file))
    res = subprocess.run([FAB, "-H", NO_HOST, "provision"], cwd=project, env=env,
                         capture_output=True, text=True)
    assert res.returncode == 2
    assert "files/zz-broken.j2:2" in res.stderr
    assert "cannot talk to" not in res.stdout


def test_unreachable_host_is_named(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text(GOOD)
    res = fab("-H", NO_HOST, "provision", env_file=env_file)
    assert res.returncode == 1
    assert "cannot talk to 127.0.0.1" in res.stdout
