"""Faults on the real sandbox host: interrupted runs, failed deploys, a lost connection.

Each test puts the host where a real fault would: dpkg killed in the middle of an install, a
run cut between writing a unit file and reloading it, the SSH connection dropped under a step,
releases that cannot install, migrate or boot. The next run must put everything right by
itself (and the one after change nothing), and a failed deploy must keep the previous release
answering every request while it is attempted. Runs last on the shared sandbox; alone, its
fixture provisions and deploys first. It leaves the host converged and serving.
"""

import os
import re
import subprocess
import time
from dataclasses import dataclass

import pytest

from tests.conftest import FAB, REPO, changed_count, commit, failed_deploy, live_unit, revert
from tests.load import Load, release_served

APP = "ratemyderp"
UNIT_FILE = f"{APP}@.service"  # gunicorn's: instances blue and green
MARKER = f"/var/lib/fabstack/pending/{APP}@restart"
WATCH_SECONDS = 600  # a watcher on the host gives up after this long

# Each watcher prints "ready" once it watches, then what it did.
KILL_DPKG = r"""
end=$(( $(date +%s) + {seconds} ))
echo ready
while [ $(date +%s) -lt $end ]; do
  pids=$(pidof dpkg) || {{ sleep 0.005; continue; }}
  # frozen, dpkg cannot finish while we look: kill it only once its journal holds an entry
  kill -STOP $pids 2>/dev/null
  if ls /var/lib/dpkg/updates | grep -q '^[0-9]'; then
    kill -9 $pids $(pidof apt-get) 2>/dev/null
    echo "killed dpkg $pids and apt-get"; exit 0
  fi
  kill -CONT $pids 2>/dev/null; sleep 0.005
done
echo "dpkg never seen at work"
"""

UNIT_WRITTEN = r"""
end=$(( $(date +%s) + {seconds} ))
echo ready
until [ -e {marker} ] && grep -q -- '--workers {workers} ' /etc/systemd/system/{unit}; do
  [ $(date +%s) -lt $end ] || {{ echo "the new unit never landed"; exit 1; }}
  sleep 0.005
done
echo written
"""

CUT_UNDER_APT = r"""
end=$(( $(date +%s) + {seconds} ))
echo ready
until pid=$(pgrep -f '^apt-get -q -y .* install -- '); do
  [ $(date +%s) -lt $end ] || {{ echo "apt-get install never seen"; exit 1; }}
  sleep 0.005
done
# apt-get runs under fab's /bin/sh -s (under coreutils timeout), below the sshd of fab's
# connection ("sshd-session: ..." from OpenSSH 9.8 on, Debian 13): the first one up the tree
p=$pid
while p=$(ps -o ppid= -p $p | tr -d ' ') && [ "${{p:-1}}" -gt 1 ]; do
  case "$(ps -o args= -p $p)" in
    sshd:*|sshd-session:*) kill -9 $p && echo "cut sshd $p under apt-get $pid"; exit 0;;
  esac
done
echo "apt-get $pid is not under an SSH session"
"""


class Watcher:
    """A shell script on the host, beside a fab run: it waits for a moment, then acts.

    Use as a context manager; the script has said "ready" (it watches) when ``with`` enters.
    """

    def __init__(self, target, script: str):
        self.proc = subprocess.Popen(["ssh", "-F", str(target.info.ssh_config),
                                      target.info.alias, script],
                                     stdout=subprocess.PIPE, text=True)

    def __enter__(self) -> "Watcher":
        ready = self.proc.stdout.readline().strip()
        assert ready == "ready", f"the watcher did not start: {ready!r}"
        return self

    def line(self) -> str:
        """The next thing the watcher says (blocks until it says it)."""
        return self.proc.stdout.readline().strip()

    def rest(self) -> str:
        """Everything else the watcher says, once it is done."""
        return self.proc.communicate(timeout=WATCH_SECONDS)[0].strip()

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def start_fab(target, *args: str) -> subprocess.Popen:
    """fab against the sandbox as a process of its own (Target.fab waits for it)."""
    env = dict(os.environ, FABRIC_FABSTACK_ENV_FILE=str(target.env_file))
    return subprocess.Popen([FAB, "-S", str(target.info.ssh_config), "-H", target.info.alias,
                             *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def failed_line(step: str, output: str) -> str:
    """The report's line for the failed ``step`` (and what follows it), or ""."""
    match = re.search(rf"^\[[\w.-]+\] failed +{re.escape(step)}: .*", output, re.M | re.S)
    return match.group(0) if match else ""


@pytest.fixture(scope="module")
def env(target, app_repo, pebble_env):
    """This module's settings (the deploy module's: the example app, HTTPS from Pebble)."""
    values = {"DEPLOY_REPO": str(app_repo), "DEPLOY_SUBDIR": "example", "RELEASES_KEEP": "3",
              **pebble_env}
    target.write_env(**values)
    return values


@pytest.fixture(scope="module")
def served(target, env):
    """The stack provisioned and the app deployed (no-ops when they are already)."""
    target.fab("provision")
    target.fab("deploy")
    yield release_served(target.info.ip)
    target.write_env(**env)  # what a failed test may have left otherwise
    target.fab("provision", check=False)


# -- interrupted runs ---------------------------------------------------------------------

def test_provision_killed_mid_apt_install_recovers_by_itself(target, served):
    """kill -9 of dpkg and apt-get mid-install: the next provision finishes dpkg's run."""
    target.sh("dpkg --purge neovim >/dev/null")  # a base package nothing depends on
    with Watcher(target, KILL_DPKG.format(seconds=WATCH_SECONDS)) as watcher:
        killed = target.fab("provision", check=False)
        seen = watcher.rest()
    assert seen.startswith("killed dpkg"), f"{seen}\n{killed.stdout}"
    assert killed.returncode == 1, killed.stdout
    step = re.search(r"packages \(\d+\)", killed.stdout).group(0)
    assert "exit 137 (killed by signal 9)" in failed_line(step, killed.stdout), killed.stdout
    # what a power cut leaves: apt refuses to work until someone runs dpkg --configure -a
    stuck = target.sh("apt-get check", check=False)
    assert stuck.returncode != 0 and "dpkg was interrupted" in stuck.stderr, stuck.stderr

    again = target.fab("provision")
    assert "finished dpkg's interrupted run (dpkg --configure -a); installed neovim" \
        in again.stdout, again.stdout
    assert target.sh("dpkg-query -W -f '${db:Status-Abbrev}' neovim").stdout.strip() == "ii"
    assert target.sh("dpkg --audit").stdout.strip() == ""
    assert target.sh("apt-get check -q", check=False).returncode == 0
    after = target.fab("provision")
    assert changed_count(after.stdout) == 0, after.stdout


@dataclass
class Gunicorn:
    """What systemd runs for the app's unit, and how many workers its gunicorn has."""

    pid: str
    started: str
    need_reload: str
    workers: int
    marker: bool


def gunicorn(target) -> Gunicorn:
    """The instance that serves."""
    unit = live_unit(target)
    out = target.sh(f"systemctl show -p MainPID --value {unit}; "
                    f"systemctl show -p ExecMainStartTimestamp --value {unit}; "
                    f"systemctl show -p NeedDaemonReload --value {unit}; "
                    f"pgrep -c -P $(systemctl show -p MainPID --value {unit}); "
                    f"test -e {MARKER} && echo marker || echo none").stdout.splitlines()
    return Gunicorn(out[0], out[1], out[2], int(out[3]), out[4] == "marker")


def test_run_cut_between_writing_a_unit_and_reloading_it(target, env, served):
    """fab killed right after the unit file landed: the next run reloads and restarts it."""
    before = gunicorn(target)
    workers = before.workers - 1  # GUNICORN_WORKERS is on the unit's ExecStart line
    target.write_env(**env, GUNICORN_WORKERS=str(workers))
    try:
        script = UNIT_WRITTEN.format(seconds=WATCH_SECONDS, marker=MARKER, workers=workers,
                                     unit=UNIT_FILE)
        with Watcher(target, script) as watcher:
            fab = start_fab(target, "provision")
            moment = watcher.line()
            fab.kill()  # as a laptop that dies, or an operator's kill -9
            cut = fab.communicate()[0]
        assert moment == "written", cut
        target.sh("flock -w 5 /run/fabstack.lock true")  # the killed run's lock went with it
        stranded = gunicorn(target)
        # the moment in between: the new file is on disk, systemd still runs the old one
        assert (stranded.need_reload, stranded.pid, stranded.marker) == \
            ("yes", before.pid, True), (stranded, cut)

        with Load(target.info.ip) as load:
            again = target.fab("provision")
        assert "changed      gunicorn instance: " in again.stdout and ": restarted as a " \
            "deploy switches (its unit changed)" in again.stdout, again.stdout
        assert load.failed == [], load.summary()
        after = gunicorn(target)
        assert after.pid != before.pid and after.started != before.started, after
        assert (after.need_reload, after.workers, after.marker) == ("no", workers, False), after
        assert release_served(target.info.ip) == served
        assert changed_count(target.fab("provision").stdout) == 0
    finally:
        target.write_env(**env)
        target.fab("provision")
    assert gunicorn(target).workers == before.workers


def test_lost_connection_names_host_and_step_then_converges(target, served):
    """The session's sshd killed while apt-get installs: a clear error, then a clean run."""
    alias = target.info.alias
    target.sh("dpkg --purge net-tools >/dev/null")
    with Watcher(target, CUT_UNDER_APT.format(seconds=WATCH_SECONDS)) as watcher:
        cut = target.fab("provision", check=False)
        seen = watcher.rest()
    assert seen.startswith("cut sshd"), f"{seen}\n{cut.stdout}"
    assert cut.returncode == 1, cut.stdout
    step = re.search(r"packages \(\d+\)", cut.stdout).group(0)
    assert failed_line(step, cut.stdout).startswith(
        f"[{alias}] failed       {step}: lost the connection to {alias} during this step"), \
        cut.stdout
    # whatever apt-get managed before the pipe broke, the next run finishes it
    again = target.fab("provision")
    assert " 0 failed" in again.stdout
    assert target.sh("dpkg-query -W -f '${db:Status-Abbrev}' net-tools").stdout.strip() == "ii"
    assert target.sh("dpkg --audit").stdout.strip() == ""
    after = target.fab("provision")
    assert changed_count(after.stdout) == 0, after.stdout


HANG_FABFILE = """
from fabric import task

from tasks import build_namespace
from tasks.host import session
from tasks.primitives import Command, ensure


@task
def hang(c):
    \"\"\"A step that never ends by itself.\"\"\"
    with session(c, "hang") as h:
        ensure(h, Command("stuck step", "sleep 317 & wait"))


ns = build_namespace()
ns.add_task(hang)
"""


def start_hang(target, tmp_path, timeout: int) -> subprocess.Popen:
    """``fab hang`` (HANG_FABFILE) with ``timeout`` as fabstack.command_timeout, started."""
    (tmp_path / "fabfile.py").write_text(HANG_FABFILE)
    env = dict(os.environ, FABRIC_FABSTACK_ENV_FILE=str(target.env_file), PYTHONPATH=str(REPO),
               FABRIC_FABSTACK_COMMAND_TIMEOUT=str(timeout))
    return subprocess.Popen([FAB, "-r", str(tmp_path), "-S", str(target.info.ssh_config),
                             "-H", target.info.alias, "hang"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_a_step_that_hangs_times_out_naming_host_and_step(target, tmp_path):
    """fabstack.command_timeout: the step fails when it expires, and nothing it started stays."""
    started = time.monotonic()
    out = start_hang(target, tmp_path, 3).communicate(timeout=120)[0]
    took = time.monotonic() - started
    assert failed_line("stuck step", out).startswith(
        f"[{target.info.alias}] failed       stuck step: timed out after 3 s on "
        f"{target.info.alias}"), out
    assert took < 15, took
    assert target.sh("pgrep -af 'sleep 31[7]'", check=False).stdout == ""


def test_a_run_is_refused_while_another_holds_the_host_lock_and_a_killed_one_frees_it(
        target, served, tmp_path):
    """fab hang holds the lock: a deploy is refused naming it; fab killed: the lock is free."""
    hang = start_hang(target, tmp_path, 60)
    try:
        deadline = time.monotonic() + 30
        while ", task hang" not in target.sh("cat /run/fabstack.lock", check=False).stdout:
            assert time.monotonic() < deadline, "fab hang never took the lock"
            time.sleep(0.2)
        refused = target.fab("deploy", "--force", check=False)
        assert refused.returncode == 1, refused.stdout
        assert re.search(r"failed +host lock: another fabstack run holds the host lock: "
                         r"\S+@\S+ since [\d-]+ [\d:]+ \w+, task hang \(waited 10 s\); "
                         "nothing was done", refused.stdout), refused.stdout
        assert "release" not in refused.stdout
    finally:
        hang.kill()  # as a laptop that dies, or an operator's kill -9
        hang.communicate()
    # sshd closes the dead run's channels: the lock goes with them
    target.sh("flock -w 5 /run/fabstack.lock true")
    assert changed_count(target.fab("provision").stdout) == 0
    target.sh("pkill -f 'sleep 31[7]'; true")  # the stuck step itself ends at its timeout


# -- failed deploys (tests/conftest.py: failed_deploy) --------------------------------------

def test_failing_requirement_install_keeps_the_previous_release(target, served, app_repo):
    requirements = app_repo / "example/requirements.txt"
    res = failed_deploy(target, app_repo, "a requirement that does not exist", {
        str(requirements.relative_to(app_repo)):
            requirements.read_text() + "fabstack-no-such-package==0.0.1\n"})
    line = failed_line("requirements", res.stdout)
    assert line.startswith(f"[{target.info.alias}] failed       requirements: pip install "
                           "failed") and "fabstack-no-such-package" in line, res.stdout


def test_failing_migration_keeps_the_previous_release(target, served, app_repo):
    res = failed_deploy(target, app_repo, "a migration that fails", {
        "example/demo/migrations/0099_broken.py": (
            "from django.db import migrations\n\n\ndef boom(apps, schema_editor):\n"
            "    raise RuntimeError('this migration fails on purpose')\n\n\n"
            "class Migration(migrations.Migration):\n"
            "    dependencies = [('demo', '0001_initial')]\n"
            "    operations = [migrations.RunPython(boom)]\n")})
    assert "this migration fails on purpose" in failed_line("migrations", res.stdout), \
        res.stdout


def test_app_that_cannot_boot_never_goes_live(target, served, app_repo):
    wsgi = app_repo / "example/config/wsgi.py"
    res = failed_deploy(target, app_repo, "an app that cannot boot", {
        str(wsgi.relative_to(app_repo)):
            wsgi.read_text() + "\nraise RuntimeError('this app cannot boot, on purpose')\n"})
    line = failed_line("app boot check", res.stdout)
    assert "RuntimeError: this app cannot boot, on purpose" in line, res.stdout
    # found before anything changed: no migration, no switch, nothing to roll back
    assert "migrations" not in res.stdout and "health check" not in res.stdout, res.stdout


def test_release_that_answers_500_on_its_health_path_never_gets_a_request(target, served,
                                                                          app_repo):
    """It boots, so it is started beside the serving one: asked there directly, it answers
    500, and NGINX never sends it a user request."""
    views = app_repo / "example/demo/views.py"
    res = failed_deploy(target, app_repo, "a release that answers 500 on HEALTH_PATH", {
        str(views.relative_to(app_repo)): views.read_text() + (
            "\n\ndef health(request):  # replaces the one above\n"
            "    return HttpResponse('broken on purpose', status=500)\n")})
    line = failed_line("health check", res.stdout)
    assert "did not answer /health/ healthy on its own socket" in line and "HTTP 500" in line \
        and "no user request reached it" in line, res.stdout
    assert "changed      release " not in res.stdout.split("failed       health check")[1]


# The new release answers 503 until a moment set when it is committed (the same for every
# gunicorn worker: a delay counted from each worker's own start let a worker that booted a
# little later answer 503 to users once another had passed the health check), then as usual.
SLOW_HEALTH = """

import time as _time  # noqa: E402

_healthy = health


def health(request):  # replaces the one above
    if _time.time() < {ready_at}:
        return HttpResponse('warming up', status=503)
    return _healthy(request)
"""


def test_deploy_killed_after_its_instance_started_leaves_the_release_serving(target, served,
                                                                            app_repo):
    """fab killed while the new release runs in the other instance, before the switch: the
    release that served serves throughout, and the next deploy goes through (no unlock)."""
    ip = target.info.ip
    before = release_served(ip)
    live = live_unit(target)
    idle = live.replace("blue", "green") if "@blue" in live else live.replace("green", "blue")
    views = app_repo / "example/demo/views.py"
    commit(app_repo, "a release slow to answer healthy",
           {str(views.relative_to(app_repo)): views.read_text()
            + SLOW_HEALTH.format(ready_at=time.time() + 30)})
    try:
        with Load(ip) as load:
            fab = start_fab(target, "deploy")
            target.sh(f"for i in $(seq 600); do systemctl is-active --quiet {idle} && exit; "
                      "sleep 0.1; done; exit 1")
            fab.kill()  # as a laptop that dies, or an operator's kill -9
            cut = fab.communicate()[0]
            time.sleep(2)
            assert release_served(ip) == before, cut
            again = target.fab("deploy")
            time.sleep(1)
    finally:
        revert(app_repo)
    print(f"\nkilled deploy, then the next: {load.summary()}")
    assert f"changed      instance {idle.split('@')[1].split('.')[0]}: " in again.stdout, \
        again.stdout
    after = release_served(ip)
    assert after != before and live_unit(target) == idle
    assert load.failed == [] and set(load.releases) == {before, after}, load.summary()
    target.fab("deploy")  # the reverted commit: what the next tests expect


# -- afterwards -----------------------------------------------------------------------------

def test_the_host_ends_converged_and_serving(target, served, app_repo):
    """After every fault: nothing left to change, and the app's latest commit deploys."""
    assert changed_count(target.fab("provision").stdout) == 0
    head = subprocess.run(["git", "-C", str(app_repo), "rev-parse", "HEAD"],
                          capture_output=True, text=True, check=True).stdout.strip()
    target.fab("deploy")
    assert release_served(target.info.ip).endswith(head[:12])
    assert "is already current" in target.fab("deploy").stdout
