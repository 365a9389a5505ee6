"""Bad input against the real, converged sandbox host: a clear error, and the host untouched.

Every case runs fab with one thing wrong (a settings file, a template, the host, the sudo
password, a task argument) and checks three things: a non-zero exit, a message that names the
problem, and the host's state (tests/conftest.py STATE: files, packages, firewall, PostgreSQL's
roles, the stack's processes) identical before and after.
"""

import os
import shutil
import subprocess
import time

import pytest

from tests.conftest import (
    FAB,
    REPO,
    SUDO_PASSWORD,
    SUDO_USER,
    Target,
    ensure_sudo_user,
    host_state,
    state_changes,
)

SETTINGS_ERROR = "Nothing was changed on any host."


@pytest.fixture(scope="module")
def stack(stack, target):
    """conftest's converged stack, with the sudo user the sudo cases log in as."""
    ensure_sudo_user(target)
    return stack


@pytest.fixture
def before(target, stack):
    """The host's state before the case runs."""
    return host_state(target)


def fab(target, *args, env_file, host=None, cwd=REPO, **env):
    """fab against the sandbox (or ``host``), with ``env_file`` and extra environment."""
    full_env = {k: v for k, v in os.environ.items() if k != "FABRIC_SUDO_PASSWORD"}
    full_env.update(FABRIC_FABSTACK_ENV_FILE=str(env_file), **env)
    return subprocess.run([FAB, "-S", str(target.info.ssh_config), "-H",
                           host or target.info.alias, *args],
                          cwd=cwd, env=full_env, capture_output=True, text=True, timeout=300)


def assert_refused(res, code, *named):
    """Exit ``code``, and every fragment of ``named`` in fab's output."""
    out = res.stdout + res.stderr
    assert res.returncode == code, out
    for fragment in named:
        assert fragment in out, (fragment, out)
    assert "Traceback" not in out, out


def assert_unchanged(target, before):
    """The host's state now is ``before``; else the changed lines are shown."""
    changes = state_changes(before, host_state(target))
    assert changes == [], "the host changed:\n" + "\n".join(changes[:40])


def test_state_fingerprint_is_stable_on_an_idle_host(target, before):
    """Two readings a while apart agree: any difference in a case is the case's doing."""
    time.sleep(20)
    assert_unchanged(target, before)


@pytest.mark.parametrize("bad, named", [
    pytest.param({"DOMAIN": None}, ["DOMAIN: missing"], id="missing-key"),
    pytest.param({"DOMAIN": "<your-domain.example>"},
                 ["DOMAIN: still the placeholder '<your-domain.example>'"], id="placeholder"),
    pytest.param("", ["DOMAIN: missing", "ADMIN_EMAIL: missing", "DB_PASSWORD: missing",
                      "DJANGO_SECRET_KEY: missing", "(4 problems)"], id="empty-env"),
    pytest.param({"DOMAIN": "bad_domain"},
                 ["DOMAIN: must be a fully qualified domain name"], id="malformed-domain"),
    pytest.param({"APP_NAME": "rate my derp"}, ["APP_NAME: 'rate my derp' has spaces"],
                 id="app-name-spaces"),
    pytest.param({"APP_NAME": "RateMyDerp"}, ["APP_NAME: 'RateMyDerp' has uppercase letters"],
                 id="app-name-uppercase"),
    pytest.param({"APP_NAME": "r" * 33}, ["APP_NAME: '" + "r" * 33 + "' is 33 characters long",
                                          "at most 31 characters"], id="app-name-too-long"),
    # names that would take over an account or a database that is not ours
    pytest.param({"APP_NAME": "root"}, ["APP_NAME: 'root' is reserved"], id="app-name-root"),
    pytest.param({"APP_NAME": "postgres"}, ["APP_NAME: 'postgres' is reserved"],
                 id="app-name-postgres"),
    pytest.param({"DB_USER": "postgres"}, ["DB_USER: 'postgres' is PostgreSQL's own"],
                 id="db-user-postgres"),
    pytest.param({"DB_NAME": "template1"}, ["DB_NAME: 'template1' is PostgreSQL's own"],
                 id="db-name-template1"),
    # values that would break the file they land in
    pytest.param({"HTTP_PROXY": 'http://10.0.0.1:3128";\nAcquire::http::Proxy "http://evil'},
                 ["HTTP_PROXY: holds a control character"], id="url-newline"),
    pytest.param({"HTTP_PROXY": 'http://10.0.0.1:3128";'},
                 ["HTTP_PROXY: must be a http:// or https:// URL without spaces, quotes or "
                  "backslashes (found '\"')"], id="url-quote"),
    pytest.param({"INFLUX_URL": "https://influx .example:8086"},
                 ["INFLUX_URL: must be a http:// or https:// URL without spaces"], id="url-space"),
    pytest.param({"ACME_SERVER": "https://acme.example:99999/dir"},
                 ["ACME_SERVER: is not a URL that can be parsed (Port out of range"],
                 id="url-port"),
    pytest.param({"DEPLOY_REF": "main --upload-pack=touch /x"},
                 ["DEPLOY_REF: must be a git ref"], id="git-ref"),
    pytest.param({"BASE_PACKAGES": "git -oAPT::Get::AllowUnauthenticated=1"},
                 ["BASE_PACKAGES: '-oAPT::Get::AllowUnauthenticated=1': not Debian package"],
                 id="package-option"),
])
def test_bad_settings(target, stack, before, tmp_path, bad, named):
    """Refused before any connection (exit 2), every bad key named."""
    env_file = tmp_path / ".env"
    if isinstance(bad, str):
        env_file.write_text(bad)
    else:
        Target(target.info, env_file).write_env(**{**stack, **bad})
    res = fab(target, "provision", env_file=env_file)
    assert_refused(res, 2, *named, SETTINGS_ERROR)
    assert "cannot talk to" not in res.stdout
    assert_unchanged(target, before)


def test_a_key_set_twice(target, stack, before, tmp_path):
    """Which of two values was meant is not guessed: both lines named."""
    env_file = Target(target.info, tmp_path / ".env").write_env(**stack)
    lines = env_file.read_text().splitlines()
    first = next(i for i, line in enumerate(lines, 1) if line.startswith("DOMAIN="))
    env_file.write_text("\n".join(lines) + "\nDOMAIN=other.test\n")
    res = fab(target, "provision", env_file=env_file)
    assert_refused(res, 2, f"DOMAIN: is set twice: lines {first} and {len(lines) + 1}",
                   SETTINGS_ERROR)
    assert_unchanged(target, before)


@pytest.mark.parametrize("make, undo, key, value, named", [
    pytest.param("useradd --system --no-create-home --shell /bin/bash intruder",
                 "userdel intruder", "APP_NAME", "intruder",
                 ["user intruder: exists on the host and was not created by fabstack",
                  "group intruder: exists on the host and was not created by fabstack"],
                 id="existing-user"),
    pytest.param("cd / && runuser -u postgres -- psql -q -c 'CREATE ROLE intruder LOGIN'",
                 "cd / && runuser -u postgres -- psql -q -c 'DROP ROLE intruder'",
                 "DB_USER", "intruder",
                 ["postgresql role intruder: exists on the host and was not created by fabstack"],
                 id="existing-role"),
    pytest.param("cd / && runuser -u postgres -- psql -q -c 'CREATE DATABASE intruder'",
                 "cd / && runuser -u postgres -- psql -q -c 'DROP DATABASE intruder'",
                 "DB_NAME", "intruder",
                 ["postgresql database intruder: exists on the host and was not created"],
                 id="existing-database"),
])
def test_an_object_fabstack_did_not_create_is_refused(target, stack, tmp_path, make, undo,
                                                      key, value, named):
    """A user, role or database that exists and is not fabstack's (made here by hand, as
    someone else would): provision names it and changes nothing, not even the rest."""
    # The refusal comes after the first probe, whose upgrade check records the state of dpkg
    # it saw (/var/lib/fabstack/upgrade-checked): settle that record with a no-op run first.
    target.fab("provision")
    target.sh(make)
    try:
        before = host_state(target)
        env_file = Target(target.info, tmp_path / ".env").write_env(**{**stack, key: value})
        res = fab(target, "provision", env_file=env_file)
        assert_refused(res, 1, *named, "nothing was changed", "0 changed")
        assert_unchanged(target, before)
    finally:
        target.sh(undo)


def test_template_syntax_error(target, before, tmp_path):
    """A broken template in a copy of the project (never in the shared tree): file and line."""
    project = tmp_path / "project"
    for name in ("tasks", "sandbox", "files"):
        shutil.copytree(REPO / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "fabfile.py", project)
    (project / "files" / "zz-broken.j2").write_text("line one\n{{ s.app }\n")
    res = fab(target, "provision", env_file=target.env_file, cwd=project)
    assert_refused(res, 2, "files/zz-broken.j2:2", SETTINGS_ERROR)
    assert_unchanged(target, before)


def test_unreachable_host(target, before):
    """An address of the sandbox's own subnet where nothing answers."""
    address = target.info.ip.rsplit(".", 1)[0] + ".3"
    res = fab(target, "--connect-timeout", "20", "provision", env_file=target.env_file,
              host=f"root@{address}")
    assert_refused(res, 1, f"cannot talk to {address}", "0 changed")
    assert_unchanged(target, before)


def test_sudo_password_missing(target, before):
    """A sudo user without a password given: told how to give one."""
    res = fab(target, "provision", env_file=target.env_file,
              host=f"{SUDO_USER}@{target.info.alias}")
    assert_refused(res, 1, f"user {SUDO_USER} needs a sudo password",
                   "--prompt-for-sudo-password", "0 changed")
    assert_unchanged(target, before)


def test_sudo_password_wrong(target, before):
    """A sudo user with a wrong password: sudo's refusal named, nothing run."""
    res = fab(target, "provision", env_file=target.env_file,
              host=f"{SUDO_USER}@{target.info.alias}",
              FABRIC_SUDO_PASSWORD="wrong " + SUDO_PASSWORD)
    assert_refused(res, 1, f"sudo refused the password given for {SUDO_USER}", "0 changed")
    assert_unchanged(target, before)


@pytest.mark.parametrize("args, named", [
    pytest.param(["provision", "--bogus"], "No idea what '--bogus' is!", id="unknown-argument"),
    pytest.param(["provison"], "No idea what 'provison' is!", id="unknown-task"),
])
def test_unknown_task_or_argument(target, before, args, named):
    """Fabric refuses what it does not know before any task runs."""
    res = fab(target, *args, env_file=target.env_file)
    assert_refused(res, 1, named)
    assert_unchanged(target, before)
