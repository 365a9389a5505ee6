"""fab deploy on the real sandbox host: releases, zero-downtime reload, a failed health check,
rollback (failed requirements, migrations and boot: test_realhost_faults.py)."""

import re
import subprocess
import time

import pytest

from sandbox.container import Sandbox
from tests.conftest import changed_count, commit, host_state, revert, state_changes
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


def test_failing_health_check_puts_the_previous_release_back(target, deployed, app_repo):
    before = release_served(target.info.ip)
    views = app_repo / "example/demo/views.py"
    commit(app_repo, "app that is never healthy", {str(views.relative_to(app_repo)): (
        views.read_text() + "\n\ndef health(request):  # replaces the one above\n"
        "    return HttpResponse('broken on purpose', status=503)\n")})
    res = target.fab("deploy", check=False)
    assert res.returncode == 1
    assert "health check" in res.stdout and f"put release {before} back" in res.stdout
    assert release_served(target.info.ip) == before
    revert(app_repo)


def test_rollback_releases_and_retention(target, deployed, app_repo):
    before = release_served(target.info.ip)
    listing = target.fab("releases").stdout
    assert f"release {before}: current" in listing
    res = target.fab("rollback")
    assert "serving" in res.stdout
    previous = release_served(target.info.ip)
    assert previous != before and previous < before
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
    before = heartbeats(target, release)
    deadline = time.monotonic() + 60
    while heartbeats(target, release) == before:
        assert time.monotonic() < deadline, "no heartbeat after the reboot"
        time.sleep(2)
