"""Celery worker and beat on the real sandbox host: a release of the example app, heartbeats
written by the worker on beat's schedule, restarts on configuration changes, a reboot."""

import io
import re
import subprocess
import tarfile
import time

import pytest

from sandbox.container import Sandbox
from tests.conftest import REPO, changed_count

APP = "ratemyderp"
RELEASE = f"/opt/{APP}/releases/celery-test"
UNITS = ("celery.service", "celerybeat.service")
HEARTBEATS = (f"cd / && runuser -u postgres -- psql -X -At -d {APP} "
              "-c 'SELECT count(*) FROM demo_heartbeat'")


def example_archive() -> bytes:
    """This checkout's example app (the files git tracks, as they are now) as a tar stream."""
    names = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "example"],
                           capture_output=True, check=True).stdout.decode().split("\0")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in names:
            if name and (REPO / name).is_file():
                tar.add(REPO / name, arcname=name.removeprefix("example/"), recursive=False)
    return buf.getvalue()


def place_release(target) -> None:
    """The example app as a release, its requirements installed and its database migrated,
    with /opt/APP/app pointing at it (what a deploy will do)."""
    subprocess.run(["ssh", "-F", str(target.info.ssh_config), target.info.alias,
                    f"rm -rf {RELEASE} && mkdir -p {RELEASE} && tar -x -C {RELEASE} && "
                    f"echo celery-test > {RELEASE}/REVISION"],
                   input=example_archive(), check=True, timeout=120)
    target.sh(f"/opt/{APP}/venv/bin/pip install -q -r {RELEASE}/requirements.txt")
    target.sh(f"cd {RELEASE} && runuser -u {APP} -- sh -c 'set -a; . /opt/{APP}/conf/{APP}.conf;"
              f" set +a; exec /opt/{APP}/venv/bin/python manage.py migrate --noinput'")
    target.sh(f"ln -sfn releases/celery-test /opt/{APP}/app")


def wait_for(predicate, timeout: float, what: str, interval: float = 2):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(interval)


def heartbeats(target) -> int:
    out = target.sh(HEARTBEATS, check=False).stdout.strip()
    return int(out) if out.isdigit() else -1


def active(target) -> list[str]:
    return target.sh("systemctl is-active " + " ".join(UNITS), check=False).stdout.split()


def worker_pid(target) -> str:
    return target.sh("systemctl show -p MainPID --value celery.service").stdout.strip()


def journal_count(target, unit: str, since: str, pattern: str) -> int:
    out = target.sh(f"journalctl -q -u {unit} --since=@{since} -o cat", check=False).stdout
    return len(re.findall(pattern, out, re.M))


@pytest.fixture(scope="module")
def runs(target):
    """Provisioned up to the data tier, the units installed before a release, then a release
    placed and celery.setup run twice."""
    target.write_env()
    for task in ("provision.base", "python", "db"):
        target.fab(task)
    target.sh(f"rm -f /opt/{APP}/app")
    before = target.fab("celery")
    units_before = target.sh("systemctl is-enabled " + " ".join(UNITS) + "; systemctl is-active "
                             + " ".join(UNITS), check=False).stdout.split()
    place_release(target)
    first = target.fab("celery")
    second = target.fab("celery")
    yield {"before": before, "units_before": units_before, "first": first, "second": second}
    # Leave the host as provision leaves it: no release, the units stopped.
    target.write_env()
    target.sh(f"rm -f /opt/{APP}/app; rm -rf {RELEASE}")
    target.fab("db")
    target.fab("celery")


def test_before_a_release_units_are_enabled_but_not_started(runs):
    out = runs["before"].stdout
    for unit in UNITS:
        assert re.search(rf"(changed|ok) +service {unit}: .*enabled.* \(no release deployed yet: "
                         rf"/opt/{APP}/app missing\)", out), out
        assert f"service {unit}: started" not in out
    assert runs["units_before"] == ["enabled", "enabled", "inactive", "inactive"]


def test_with_a_release_both_run_and_a_second_run_changes_nothing(runs, target):
    for unit in UNITS:
        assert re.search(rf"changed +service {unit}: .*started", runs["first"].stdout), \
            runs["first"].stdout
    assert changed_count(runs["second"].stdout) == 0, runs["second"].stdout
    assert " 0 failed" in runs["second"].stdout
    assert active(target) == ["active", "active"]
    assert target.sh("systemctl is-enabled " + " ".join(UNITS)).stdout.split() == \
        ["enabled", "enabled"]


def test_worker_writes_heartbeats_on_beats_schedule(runs, target):
    wait_for(lambda: heartbeats(target) > 0, 60, "a Heartbeat row")
    rows = target.sh("cd / && runuser -u postgres -- psql -X -At -d "
                     f"{APP} -c 'SELECT release FROM demo_heartbeat LIMIT 1'").stdout.strip()
    assert rows == "celery-test"


def test_files_directories_and_users(runs, target):
    stat = target.sh("stat -c '%n %U %G %a' /run/celery /var/log/celery /var/lib/celery "
                     "/etc/systemd/system/celery.service /etc/tmpfiles.d/celery.conf"
                     ).stdout.splitlines()
    assert stat == ["/run/celery celery celery 755", "/var/log/celery celery celery 750",
                    "/var/lib/celery celery celery 750",
                    "/etc/systemd/system/celery.service root root 644",
                    "/etc/tmpfiles.d/celery.conf root root 644"]
    # beat's schedule in the celery user's home, its pid file and the worker's logs where the
    # settings say (the worker has no pid file: it is celery.service's main process)
    assert target.sh("ls /var/lib/celery").stdout.startswith("celerybeat-schedule")
    assert target.sh("ls /run/celery").stdout.split() == ["beat.pid"]
    assert "w1.log" in target.sh("ls /var/log/celery").stdout.split()
    pid = worker_pid(target)
    assert pid != "0"
    assert target.sh(f"ps -o user=,ni= -p {pid}").stdout.split() == ["celery", "10"]
    beat = target.sh("systemctl show -p MainPID --value celerybeat.service").stdout.strip()
    for p in (pid, beat):  # their autogroup too (each is a session of its own)
        assert target.sh(f"cat /proc/{p}/autogroup").stdout.endswith(" nice 10\n")
    assert "worker" in target.sh(f"tr '\\0' ' ' < /proc/{pid}/cmdline").stdout


def test_units_run_sandboxed(runs, target):
    pid = worker_pid(target)
    beat = target.sh("systemctl show -p MainPID --value celerybeat.service").stdout.strip()
    for p in (pid, beat):
        # the system is read-only for the service; its own directories are not
        denied = target.sh(f"nsenter -t {p} -m -- touch /opt/{APP}/app/x", check=False)
        assert denied.returncode != 0 and "Read-only file system" in denied.stderr
        target.sh(f"nsenter -t {p} -m -- sh -c 'touch /var/lib/celery/.w && "
                  "rm /var/lib/celery/.w'")
        status = target.sh(f"grep -E '^(NoNewPrivs|CapEff)' /proc/{p}/status").stdout
        assert re.search(r"NoNewPrivs:\s+1", status) and re.search(r"CapEff:\s+0+\n", status)
    score = target.sh("systemd-analyze security --no-pager celery.service | tail -1").stdout
    assert re.search(r"Overall exposure level for celery\.service: [0-4]\.\d", score), score


def test_configuration_change_restarts_each_unit_once(runs, target):
    """CELERY_TIME_LIMIT is in celery.conf and in the worker's unit (TimeoutStopSec): both
    change, the worker and beat are each restarted once, and run the new settings."""
    old_worker = worker_pid(target)
    since = target.sh("date +%s").stdout.strip()
    time.sleep(1)
    target.write_env(CELERY_TIME_LIMIT="240", CELERY_CONCURRENCY="3")
    db_run = target.fab("db")
    assert re.search(r"changed +file /opt/\S+/celery\.conf", db_run.stdout), db_run.stdout
    run = target.fab("celery")
    out = run.stdout
    assert "changed      file /etc/systemd/system/celery.service" in out
    for unit in UNITS:
        assert len(re.findall(rf"service {unit}: .*restarted", out)) == 1, out
        assert journal_count(target, unit, since, r"^Stopping ") == 1
        assert journal_count(target, unit, since, r"^Started ") == 1
    assert worker_pid(target) != old_worker
    assert wait_for(lambda: "--concurrency=3" in target.sh(
        f"tr '\\0' ' ' < /proc/{worker_pid(target)}/cmdline").stdout, 20, "new options")
    assert target.sh("systemctl show -p TimeoutStopUSec --value celery.service"
                     ).stdout.strip() == "4min 30s"
    assert changed_count(target.fab("celery").stdout) == 0
    assert active(target) == ["active", "active"]


def test_celery_restart_task(runs, target):
    old = worker_pid(target)
    res = target.fab("celery.restart")
    for unit in UNITS:
        assert f"service {unit}: restarted (asked for)" in res.stdout
    assert worker_pid(target) != old and active(target) == ["active", "active"]


def test_a_restart_lets_the_running_task_finish(runs, target):
    """A stop is Celery's warm shutdown: a task running when the worker is told to stop
    finishes on it (it is neither killed nor handed back to the queue)."""
    since = target.sh("date +%s").stdout.strip()
    task = target.sh(
        f"cd {RELEASE} && runuser -u {APP} -- sh -c 'set -a; . /opt/{APP}/conf/{APP}.conf; "
        f"set +a; exec /opt/{APP}/venv/bin/python manage.py shell -c "
        "\"from demo.tasks import heartbeat; print(heartbeat.delay(pause=5).id)\"'"
    ).stdout.split()[-1]
    logs = "cat /var/log/celery/w1*.log"
    wait_for(lambda: f"heartbeat[{task}] received" in target.sh(logs).stdout, 20,
             "the task taken by the worker", interval=0.2)
    assert "restarted (asked for)" in target.fab("celery.restart").stdout
    log = target.sh(logs).stdout
    assert re.search(rf"INFO/ForkPoolWorker-\d+\] Task demo\.tasks\.heartbeat\[{task}\] "
                     r"succeeded in 5\.", log), log[-2000:]
    assert journal_count(target, "celery.service", since, r"^Stopping ") == 1
    assert active(target) == ["active", "active"]


def test_a_restart_under_way_is_not_a_change(runs, target):
    """A deploy queues Celery's restart and returns: a provision right after it finds the
    units stopping or starting, with systemd's job on them, and leaves them to it."""
    target.sh("systemctl restart --no-block celery.service celerybeat.service")
    res = target.fab("celery")
    assert changed_count(res.stdout) == 0, res.stdout
    wait_for(lambda: active(target) == ["active", "active"], 30, "units active", interval=0.5)


def test_units_come_back_after_a_reboot_and_heartbeats_continue(runs, target, sandbox):
    Sandbox(name=sandbox.name, subnet=sandbox.host_ip.rsplit(".", 1)[0]).reboot()
    assert wait_for(lambda: active(target) == ["active", "active"], 60, "units active")
    count = heartbeats(target)
    wait_for(lambda: heartbeats(target) > count, 60, "a new Heartbeat after the reboot")
    assert changed_count(target.fab("celery").stdout) == 0
