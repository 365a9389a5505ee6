"""fab deploy on the real sandbox host: releases switched blue/green under a request stream,
per-release virtualenvs (the serving one untouched by a failed deploy), a host of the socket
unit and the shared virtualenv moved over, rollback (failed requirements, migrations, boot and
health check, and a deploy killed before its switch: test_realhost_faults.py)."""

import re
import shlex
import subprocess
import time

import pytest

from sandbox.container import Sandbox
from tests.conftest import (
    changed_count,
    commit,
    failed_deploy,
    host_state,
    live_unit,
    state_changes,
)
from tests.load import Load, get, release_served

APP = "ratemyderp"
DOMAIN = "ratemyderp.test"


@pytest.fixture(scope="module")
def deployed(target, app_repo, pebble_env):
    """provision (with a certificate from Pebble), then the first deploy of the example app."""
    target.write_env(DEPLOY_REPO=str(app_repo), DEPLOY_SUBDIR="example", RELEASES_KEEP="3",
                     **pebble_env)
    target.fab("provision")
    first = target.fab("deploy")
    return first


def test_the_site_answers_over_verified_https(target, deployed, pebble, app_repo):
    """The page, read from PostgreSQL and Redis, over HTTPS verified against Pebble's root."""
    ip = target.info.ip
    res = subprocess.run(["curl", "-sS", "--max-time", "10", "--noproxy", "*", "--cacert",
                          str(pebble.issuing_root), "--resolve", f"{DOMAIN}:443:{ip}",
                          f"https://{DOMAIN}/"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "release: " in res.stdout, res.stdout
    # the view's counters: a row in PostgreSQL and a key in Redis
    assert re.search(r"visits \(database\): \d+</p>\s*<p>visits \(cache\): \d+</p>",
                     res.stdout), res.stdout
    plain = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                            "--noproxy", "*", "--resolve", f"{DOMAIN}:80:{ip}",
                            f"http://{DOMAIN}/"], capture_output=True, text=True)
    assert plain.stdout == "301"
    static = subprocess.run(["curl", "-sS", "--noproxy", "*", "--cacert",
                             str(pebble.issuing_root), "--resolve", f"{DOMAIN}:443:{ip}",
                             f"https://{DOMAIN}/static/demo/site.css"],
                            capture_output=True, text=True)
    assert static.returncode == 0, static.stderr
    assert static.stdout == (app_repo / "example/demo/static/demo/site.css").read_text()


def test_first_deploy_serves_the_app(target, deployed, app_repo):
    assert "serving" in deployed.stdout, deployed.stdout
    head = subprocess.run(["git", "-C", str(app_repo), "rev-parse", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    release = release_served(target.info.ip)
    assert release.endswith(head[:12])
    assert target.sh(f"readlink /opt/{APP}/app").stdout.strip() == f"releases/{release}"
    # static files collected, served by NGINX itself
    assert target.sh(f"test -f /var/opt/{APP}/static/demo/site.css").returncode == 0
    # the release runs from a virtualenv of its own, which /opt/APP/venv names; the seed
    # virtualenv provision made is gone (no release runs from it)
    venv = target.sh(f"readlink /opt/{APP}/releases/{release}/.fabstack-venv").stdout.strip()
    assert re.fullmatch(rf"/opt/{APP}/venvs/[0-9a-f]{{16}}", venv), venv
    assert target.sh(f"readlink /opt/{APP}/venv").stdout.strip() == venv
    assert target.sh(f"ls /opt/{APP}/venvs").stdout.split() == [venv.rsplit("/", 1)[1]]


def heartbeats(target, release: str) -> int:
    return int(target.sh(f"cd / && runuser -u postgres -- psql -X -At -d {APP} -c "
                         f"\"SELECT count(*) FROM demo_heartbeat WHERE release = '{release}'\""
                         ).stdout.strip())


def test_beat_schedules_and_the_worker_writes_within_a_minute(target, deployed):
    release = release_served(target.info.ip)
    deadline = time.monotonic() + 60
    while heartbeats(target, release) == 0:
        assert time.monotonic() < deadline, f"no heartbeat from release {release} in 60 s"
        time.sleep(2)


def test_redeploy_of_the_same_commit_changes_nothing(target, deployed):
    res = target.fab("deploy")
    assert "is already current" in res.stdout
    assert changed_count(res.stdout) == 0, res.stdout
    again = target.fab("provision")
    assert changed_count(again.stdout) == 0, again.stdout


def test_provision_right_after_a_deploy_changes_nothing(target, deployed, app_repo):
    """Twice, so that each instance has been switched to, while Celery's restart, which the
    deploy queued, is still under way. (A switch that enabled an instance without a
    daemon-reload made Debian 13's systemd call every unit's files changed: provision then
    reloaded them.)"""
    for n in range(2):
        commit(app_repo, f"provision after deploy {n}", {"example/demo/static/demo/p.txt": str(n)})
        target.fab("deploy")
        res = target.fab("provision")
        assert changed_count(res.stdout) == 0, res.stdout


def test_provision_removes_the_instance_links_of_before(target, deployed):
    """A host of a fabstack that enabled the serving instance at each switch: the generator
    starts it now, and provision takes the links away (once)."""
    wants = "/etc/systemd/system/multi-user.target.wants"
    target.sh(f"ln -s /etc/systemd/system/{APP}@.service {wants}/{APP}@blue.service && "
              f"ln -s /etc/systemd/system/{APP}@.service {wants}/{APP}@green.service && "
              "systemctl daemon-reload")
    res = target.fab("provision")
    assert "changed      enabled gunicorn instances: removed" in res.stdout, res.stdout
    assert target.sh(f"ls {wants}").stdout.count(f"{APP}@") == 0
    assert changed_count(target.fab("provision").stdout) == 0


def test_deploy_check_changes_nothing_on_the_host(target, deployed, app_repo):
    """--check of a new commit: says what it would deploy; the host's fingerprint is the same."""
    commit(app_repo, "a release only checked", {"example/demo/static/demo/checked.txt": "1"})
    before = host_state(target)
    res = target.fab("deploy", "--check")
    assert "would change release " in res.stdout and "would deploy " in res.stdout, res.stdout
    assert state_changes(before, host_state(target)) == []


def test_new_release_under_load_drops_no_request(target, deployed, app_repo):
    before = release_served(target.info.ip)
    page = app_repo / "example/demo/templates/demo/home.html"
    commit(app_repo, "new page text", {str(page.relative_to(app_repo)):
                                       page.read_text().replace("release:", "Release 2 release:")})
    with Load(target.info.ip) as load:
        res = target.fab("deploy")
        time.sleep(1)
    after = release_served(target.info.ip)
    assert after != before and "Release 2" in get(target.info.ip)[1]
    print(f"\nzero-downtime deploy: {load.sent} requests, {len(load.failed)} failed, "
          f"worst {load.worst * 1000:.0f} ms")
    assert load.sent > 20 and load.failed == [], (load.failed[:5], res.stdout)
    assert "requirements: unchanged" in res.stdout
    # every worker of the instance that serves answered HEALTH_PATH itself before its first
    # request (files/gunicorn.conf.py.j2)
    unit = live_unit(target)
    workers = target.sh(f"pgrep -P $(systemctl show -p MainPID --value {unit})").stdout.split()
    assert len(workers) == 3, workers  # GUNICORN_WORKERS
    log = target.sh(f"cat /var/log/{APP}/gunicorn.log").stdout
    for pid in workers:
        assert f"[{pid}] [INFO] warm-up: /health/ answered 200 OK" in log, (pid, log[-2000:])
    # it warmed up at background priority, and serves at full priority (app-instance.sh.j2:
    # instance_nice)
    master = target.sh(f"systemctl show -p MainPID --value {unit}").stdout.strip()
    assert target.sh(f"cat /proc/{master}/autogroup").stdout.endswith(" nice 0\n")


def venv_fingerprint(target, venv: str) -> str:
    """A hash of virtualenv ``venv``: every entry's path, type, mode and link target, and
    every file's content."""
    return target.sh(f"cd {venv} && {{ find . -printf '%p %y %m %l\\n' | sort; "
                     "find . -type f -print0 | sort -z | xargs -0 sha256sum; } | sha256sum"
                     ).stdout.strip()


def test_a_new_requirement_that_breaks_the_app_leaves_the_serving_virtualenv_as_it_was(
        target, deployed, app_repo):
    """A requirement that installs, and a release that cannot boot with it: the virtualenv the
    serving release runs from is byte for byte what it was, and no request fails."""
    serving = target.sh(f"readlink -e /opt/{APP}/venv").stdout.strip()
    fingerprint = venv_fingerprint(target, serving)
    requirements = app_repo / "example/requirements.txt"
    wsgi = app_repo / "example/config/wsgi.py"
    res = failed_deploy(target, app_repo, "a new requirement the app breaks on", {
        str(requirements.relative_to(app_repo)): requirements.read_text() + "six==1.17.0\n",
        str(wsgi.relative_to(app_repo)): wsgi.read_text() + (
            "\nimport six  # noqa: E402\n"
            "raise RuntimeError(f'six {six.__version__} breaks this app, on purpose')\n")})
    assert "changed      requirements: installed into a new virtualenv " in res.stdout
    assert "RuntimeError: six 1.17.0 breaks this app, on purpose" in res.stdout, res.stdout
    assert target.sh(f"readlink -e /opt/{APP}/venv").stdout.strip() == serving
    assert venv_fingerprint(target, serving) == fingerprint


# gunicorn as fabstack ran it before its two instances: behind a socket unit on port 8000, from
# the host's one shared virtualenv and the /opt/APP/app link
LEGACY_SOCKET = """[Socket]
ListenStream=127.0.0.1:8000
[Install]
WantedBy=sockets.target
"""
LEGACY_SERVICE = f"""[Unit]
Requires={APP}.socket
[Service]
Type=notify
User={APP}
EnvironmentFile=/opt/{APP}/conf/{APP}.conf
WorkingDirectory=/opt/{APP}/app
ExecStart=/opt/{APP}/venv/bin/gunicorn --chdir /opt/{APP}/app --workers 2 config.wsgi
[Install]
WantedBy=multi-user.target
"""
LEGACY_UPSTREAM = f"upstream {APP}_live {{\n    server 127.0.0.1:8000;\n}}\n"


def make_it_a_host_of_before(target) -> None:
    """The host as fabstack left it before per-release virtualenvs and blue/green: gunicorn
    behind APP.socket, running from one virtualenv directory at /opt/APP/venv with the current
    release's requirements, a current release that names no virtualenv of its own, and the
    upstream file naming that socket's port (as provision writes it on such a host)."""
    target.sh(f"set -e; cd /opt/{APP}; rm venv; python3 -m venv venv; "
              "venv/bin/pip install -q --disable-pip-version-check -r app/requirements.txt; "
              f"rm app/.fabstack-venv; "
              f"printf %s {shlex.quote(LEGACY_SOCKET)} > /etc/systemd/system/{APP}.socket; "
              f"printf %s {shlex.quote(LEGACY_SERVICE)} > /etc/systemd/system/{APP}.service; "
              f"systemctl daemon-reload; "
              f"systemctl enable --now --quiet {APP}.socket {APP}.service; "
              f"printf %s {shlex.quote(LEGACY_UPSTREAM)} "
              f"> /etc/nginx/conf.d/fabstack-{APP}-upstream.conf; "
              f"nginx -t -q; systemctl reload nginx; "
              f"systemctl disable --now --quiet {APP}@blue.service {APP}@green.service; "
              "rm -r instances")
    assert target.sh(f"test -d /opt/{APP}/venv && test ! -L /opt/{APP}/venv",
                     check=False).returncode == 0


def test_a_host_of_before_moves_to_blue_green_on_its_next_deploy(target, deployed, app_repo):
    """A host of APP.socket and the shared virtualenv: provision leaves both serving; the next
    deploy starts the release in instance blue, switches, removes the socket unit and keeps
    the shared virtualenv as venvs/legacy for the releases before, under a request stream
    with no failed request; rollback to such a release runs from it again."""
    ip = target.info.ip
    make_it_a_host_of_before(target)
    old = release_served(ip)
    assert "gunicorn instance: served by ratemyderp.socket's gunicorn" in \
        target.fab("provision").stdout
    commit(app_repo, "a release after the shared virtualenv",
           {"example/demo/static/demo/migrated.txt": "1"})
    with Load(ip) as load:
        res = target.fab("deploy")
        time.sleep(1)
    print(f"\nmigrating deploy: {load.summary()}")
    new = release_served(ip)
    assert new != old and load.sent > 20 and load.failed == [], (load.summary(), res.stdout)
    assert live_unit(target) == f"{APP}@blue.service"
    assert target.sh(f"ls /etc/systemd/system/{APP}.socket /etc/systemd/system/{APP}.service",
                     check=False).returncode == 2
    assert target.sh("ss -ltnH 'sport = 8000'").stdout.strip() == ""
    venv = target.sh(f"readlink /opt/{APP}/releases/{new}/.fabstack-venv").stdout.strip()
    assert target.sh(f"readlink /opt/{APP}/venv").stdout.strip() == venv
    assert target.sh(f"test -d /opt/{APP}/venvs/legacy", check=False).returncode == 0, \
        res.stdout
    with Load(ip) as load:
        res = target.fab("rollback")
        time.sleep(1)
    print(f"rollback to a release of the shared virtualenv: {load.summary()}")
    assert release_served(ip) == old and load.failed == [], (load.summary(), res.stdout)
    assert target.sh(f"readlink /opt/{APP}/venv").stdout.strip() == f"/opt/{APP}/venvs/legacy"
    assert live_unit(target) == f"{APP}@green.service"
    target.fab("deploy")  # forward again: the next tests start from the latest commit
    assert release_served(ip) != old


def test_rollback_releases_and_retention(target, deployed, app_repo):
    before = release_served(target.info.ip)
    listing = target.fab("releases").stdout
    assert f"release {before}: current" in listing
    with Load(target.info.ip) as load:
        res = target.fab("rollback")
        time.sleep(1)
    print(f"\nrollback: {load.summary()}")
    assert "serving" in res.stdout and load.failed == [], (load.summary(), res.stdout)
    previous = release_served(target.info.ip)
    assert previous != before and previous < before
    assert set(load.releases) == {before, previous}, load.summary()
    # roll forward again, then ship more releases than RELEASES_KEEP (3)
    for n in range(3):
        commit(app_repo, f"release {n}", {f"example/demo/static/demo/n{n}.txt": str(n)})
        target.fab("deploy")
    kept = target.sh(f"ls /opt/{APP}/releases").stdout.split()
    assert len(kept) == 3, kept


# Another run's hold on the host lock, as fabstack's own holder keeps it: until stdin closes.
HOLD_LOCK = ("exec 9>>/run/fabstack.lock; flock 9; printf 'x someone@else since 04:00 UTC, "
             "task provision\\n' > /run/fabstack.lock; echo held; exec cat >/dev/null")


def test_deploy_rollback_and_restore_are_refused_while_another_run_holds_the_host_lock(
        target, deployed):
    holder = subprocess.Popen(["ssh", "-F", str(target.info.ssh_config), target.info.alias,
                               HOLD_LOCK], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = host_state(target)
        for args in (("deploy", "--force"), ("rollback",),
                     ("restore-db", "--dump", "none.dump", "--yes")):
            res = target.fab(*args, check=False)
            assert res.returncode == 1, res.stdout
            assert "failed       host lock: another fabstack run holds the host lock: " \
                "someone@else since 04:00 UTC, task provision (waited 10 s); nothing was done" \
                in res.stdout, res.stdout
        assert state_changes(before, host_state(target)) == []
    finally:
        holder.kill()
        holder.wait()
    target.sh("flock -w 5 /run/fabstack.lock true")  # its connection closed: the lock is free
    assert "is already current" in target.fab("deploy").stdout


def test_no_secret_in_deploy_output(target, deployed):
    out = deployed.stdout + deployed.stderr
    for secret in ("sandbox-db-password", "sandbox-key-"):
        assert secret not in out


def test_everything_comes_back_after_a_reboot(target, deployed, sandbox):
    """poweroff and boot again: the site, its workers and its data come back by themselves."""
    release = release_served(target.info.ip)
    Sandbox(name=sandbox.name, suite=sandbox.suite,
            subnet=sandbox.host_ip.rsplit(".", 1)[0]).reboot()
    deadline = time.monotonic() + 90
    while True:
        try:
            assert release_served(target.info.ip) == release
            break
        except (OSError, AssertionError):
            assert time.monotonic() < deadline, "the site did not come back within 90 s"
            time.sleep(2)
    status = target.fab("status", check=False)
    assert status.returncode == 0, status.stdout
    # the generator started the instance the upstream file names, and only that one
    live = live_unit(target)
    other = f"{APP}@{'green' if live == f'{APP}@blue.service' else 'blue'}.service"
    assert target.sh(f"systemctl is-active {live}").stdout.strip() == "active"
    assert target.sh(f"systemctl is-active {other}", check=False).stdout.strip() == "inactive"
    before = heartbeats(target, release)
    deadline = time.monotonic() + 60
    while heartbeats(target, release) == before:
        assert time.monotonic() < deadline, "no heartbeat after the reboot"
        time.sleep(2)
