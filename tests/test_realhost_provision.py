"""provision on the real sandbox Debian host: check mode, converge, converge again, verify."""

import os
import subprocess

import pytest

from tests.conftest import (
    FAB,
    REPO,
    SUDO_PASSWORD,
    SUDO_USER,
    Target,
    changed_count,
    ensure_sudo_user,
    host_state,
    state_changes,
)

APP = "ratemyderp"


@pytest.fixture(scope="module")
def fresh_state(target):
    return host_state(target)


def test_check_mode_lists_changes_and_changes_nothing(target, fresh_state):
    res = target.fab("provision", "--check")
    assert "would change" in res.stdout
    assert "packages" in res.stdout and f"user {APP}: would" not in res.stdout
    assert f"user {APP}: created" in res.stdout
    assert changed_count(res.stdout) > 5
    assert state_changes(fresh_state, host_state(target)) == [], "check mode changed the host"


def test_deploy_before_provision_says_so(target, fresh_state, tmp_path):
    """A deploy to a host provision has not made ready names what is missing, changes nothing."""
    env_file = Target(target.info, tmp_path / ".env").write_env(DEPLOY_REPO=str(REPO),
                                                                 DEPLOY_SUBDIR="example")
    res = target.fab("deploy", check=False, env_file=env_file)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "the host is not fully provisioned, missing the virtualenv" in res.stdout, res.stdout
    assert "run `fab provision` first" in res.stdout
    assert "Traceback" not in res.stderr, res.stderr
    assert state_changes(fresh_state, host_state(target)) == [], "the deploy changed the host"


def test_provision_converges_then_changes_nothing(target, fresh_state):
    first = target.fab("provision")
    assert changed_count(first.stdout) > 5, first.stdout
    second = target.fab("provision")
    assert changed_count(second.stdout) == 0, second.stdout
    assert " 0 failed" in second.stdout


def test_host_state_after_provision(target, testinfra_host):
    host = testinfra_host
    user = host.user(APP)
    assert user.exists and user.group == APP
    assert user.home == f"/var/opt/{APP}" and user.shell == "/usr/sbin/nologin"
    assert host.check_output(f"getent shadow {APP} | cut -d: -f2").startswith(("!", "*"))
    expected = {
        f"/opt/{APP}": ("root", "root", 0o755),
        f"/opt/{APP}/conf": ("root", APP, 0o750),
        f"/opt/{APP}/backup": ("root", "backups", 0o750),
        f"/var/opt/{APP}": (APP, APP, 0o755),
        f"/var/opt/{APP}/static": (APP, APP, 0o755),
        f"/var/opt/{APP}/media": (APP, APP, 0o755),
        f"/var/log/{APP}": (APP, APP, 0o750),
    }
    for path, (owner, group, mode) in expected.items():
        d = host.file(path)
        assert d.is_directory, path
        assert (d.user, d.group, d.mode) == (owner, group, mode), path
    for package in ("neovim", "net-tools", "git", "python3", "virtualenv", "ufw",
                    "python3-venv"):
        assert host.package(package).is_installed, package
    status = host.check_output("ufw status verbose")
    assert "Status: active" in status and "deny (incoming)" in status
    for rule in ("22/tcp (OpenSSH)", "80/tcp", "443/tcp"):
        assert any(line.startswith(rule) and "ALLOW IN" in line for line in status.splitlines()), \
            (rule, status)
    # PYTHON_VERSION is empty: the virtualenv runs the distro's python3 (3.11 or 3.13)
    version = "python -c 'import sys; print(sys.version_info[:2])'"
    assert host.check_output(f"/opt/{APP}/venv/bin/{version}") == \
        host.check_output(f"/usr/bin/{version.replace('python', 'python3', 1)}")
    assert host.check_output("apt-get -s dist-upgrade | grep -c '^Inst ' || true") == "0"


def test_sudo_user_with_password(target, sandbox):
    """A non-root user with a password-protected sudo gets the same converged host.

    (A missing or wrong sudo password: tests/test_realhost_badinput.py.)
    """
    ensure_sudo_user(target)
    env = dict(os.environ, FABRIC_FABSTACK_ENV_FILE=str(target.env_file),
               FABRIC_SUDO_PASSWORD=SUDO_PASSWORD)
    res = subprocess.run([FAB, "-S", str(sandbox.ssh_config), "-H",
                          f"{SUDO_USER}@{sandbox.alias}", "provision"],
                         cwd=REPO, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert changed_count(res.stdout) == 0, res.stdout


def test_unknown_host_key_is_refused(target, sandbox, tmp_path):
    """Host keys are checked: a known_hosts without the target's key refuses to connect."""
    config = tmp_path / "ssh_config"
    config.write_text(sandbox.ssh_config.read_text().replace(
        str(sandbox.known_hosts), str(tmp_path / "empty_known_hosts")))
    env = dict(os.environ, FABRIC_FABSTACK_ENV_FILE=str(target.env_file))
    res = subprocess.run([FAB, "-S", str(config), "-H", sandbox.alias, "provision"],
                         cwd=REPO, env=env, capture_output=True, text=True)
    assert res.returncode == 1
    assert "not found in known_hosts" in res.stdout, res.stdout
