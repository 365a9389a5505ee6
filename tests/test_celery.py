"""Celery over the fake connection: the rendered units, tmpfiles.d, the step, restarts."""

import configparser
import posixpath
import re
import subprocess
from types import SimpleNamespace

import pytest

from tasks import build_namespace, celery, db
from tasks import settings as settings_mod
from tasks.host import StepFailed
from tasks.inventory import Site
from tasks.primitives import PENDING_DIR, Change, File, Ok, Service, ensure, render
from tests.conftest import VALID, provision_declares
from tests.test_db import converged, host_for, parse_env_file

UNITS = ("celery.service", "celerybeat.service")


def make_settings(**overrides):
    return settings_mod.parse({**VALID, **overrides})


def unit_sections(text: str) -> dict[str, dict[str, list[str]]]:
    """A systemd unit file: section -> key -> every value given (keys may repeat), with
    backslash-newline continuations joined as systemd joins them."""
    text = re.sub(r"\\\n", " ", text)
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in text.splitlines():
        if not line.strip() or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def rendered(name: str, s=None) -> str:
    return render(name, s or make_settings())


# -- the unit files --------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["celery.service.j2", "celerybeat.service.j2"])
def test_units_parse_as_ini_with_the_sections_systemd_needs(name):
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.read_string(rendered(name))
    assert parser.sections() == ["Unit", "Service", "Install"]
    assert parser["Install"]["WantedBy"] == "multi-user.target"
    assert parser["Service"]["User"] == parser["Service"]["Group"] == "celery"


@pytest.mark.parametrize("name", ["celery.service.j2", "celerybeat.service.j2"])
def test_units_read_both_environment_files_and_run_the_release(name):
    s = make_settings(APP_NAME="shop")
    text = rendered(name, s)
    service = unit_sections(text)["Service"]
    assert service["EnvironmentFile"] == ["/opt/shop/conf/celery.conf", "/opt/shop/conf/shop.conf"]
    assert service["WorkingDirectory"] == ["/opt/shop/app"]
    assert unit_sections(text)["Unit"]["ConditionPathExists"] == ["/opt/shop/app"]
    assert "ratemyderp" not in text
    assert service["Restart"] == ["always"]
    # the site's requests first: the processes' niceness, and their autogroup's set by root
    assert service["Nice"] == ["10"]
    assert service["ExecStartPost"] == [
        "+/bin/sh -c '{ echo 10 > /proc/$$MAINPID/autogroup; } 2>/dev/null; exit 0'"]


def test_worker_unit_runs_the_worker_in_the_foreground():
    service = unit_sections(rendered("celery.service.j2"))["Service"]
    assert service["Type"] == ["simple"] and "PIDFile" not in service
    [start] = service["ExecStart"]
    assert " ".join(start.split()) == (
        "/bin/sh -c 'exec ${CELERY_BIN} -A ${CELERY_APP} worker --hostname=${CELERYD_NODES}@%%h "
        "--logfile=${CELERYD_LOG_FILE} --loglevel=${CELERYD_LOG_LEVEL} ${CELERYD_OPTS}'"), start
    # a stop is SIGTERM to the worker alone: Celery's warm shutdown (no `multi stopwait`, which
    # polls every 2 s)
    assert "ExecStop" not in service and service["KillMode"] == ["mixed"]
    assert "ExecReload" not in service
    assert service["TimeoutStopSec"] == ["330"]  # the task time limit, and some


def test_beat_unit_is_simple_with_its_schedule_file():
    service = unit_sections(rendered("celerybeat.service.j2"))["Service"]
    assert service["Type"] == ["simple"]
    [start] = service["ExecStart"]
    assert start.startswith("/bin/sh -c 'exec ${CELERY_BIN} -A ${CELERY_APP} beat ")
    for option in ("--pidfile=${CELERYBEAT_PID_FILE}", "--logfile=${CELERYBEAT_LOG_FILE}",
                   "--loglevel=${CELERYD_LOG_LEVEL}", "--schedule=${CELERYBEAT_SCHEDULE_FILE}"):
        assert option in start


@pytest.mark.parametrize("name", ["celery.service.j2", "celerybeat.service.j2"])
def test_every_variable_the_units_use_comes_from_celery_conf(name):
    conf = parse_env_file(rendered("celery.conf.j2"))
    service = unit_sections(rendered(name))["Service"]
    commands = " ".join(v for key in ("ExecStart", "ExecStop", "ExecReload")
                        for v in service.get(key, []))
    used = set(re.findall(r"\$\{?([A-Z_]+)", commands))
    assert used and used <= set(conf), used - set(conf)


@pytest.mark.parametrize("name", ["celery.service.j2", "celerybeat.service.j2"])
def test_sandboxing_leaves_writable_exactly_what_celery_writes(name):
    service = unit_sections(rendered(name))["Service"]
    for key, value in {"ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
                       "NoNewPrivileges": "yes", "PrivateDevices": "yes",
                       "CapabilityBoundingSet": ""}.items():
        assert service[key] == [value], key
    writable = set(service["ReadWritePaths"][0].split())
    conf = parse_env_file(rendered("celery.conf.j2"))
    written = {posixpath.dirname(conf[k]) for k in (
        "CELERYD_LOG_FILE", "CELERYBEAT_PID_FILE", "CELERYBEAT_LOG_FILE",
        "CELERYBEAT_SCHEDULE_FILE")}
    assert written == writable == {celery.RUN_DIR, celery.LOG_DIR, db.CELERY_HOME}


def test_tmpfiles_entries_match_what_the_step_checks():
    entries = [line.split() for line in rendered("celery-tmpfiles.conf.j2").splitlines()
               if line and not line.startswith("#")]
    assert entries == [["d", "/run/celery", "0755", "celery", "celery", "-"],
                       ["d", "/var/log/celery", "0750", "celery", "celery", "-"]]
    assert {e[1]: f"{e[3]}:{e[4]} {int(e[2], 8):o}" for e in entries} == celery.TMPFILES_DIRS


# -- tmpfiles.d applied -------------------------------------------------------------------

RIGHT = "/run/celery celery:celery 755\n/var/log/celery celery:celery 750\n"
TMP = celery.TmpfilesApplied(celery.TMPFILES, celery.TMPFILES_DIRS, celery.TMPFILES_MARKER,
                             "celery")


@pytest.mark.parametrize("state, check, notified, expect", [
    (RIGHT, False, set(), Ok("/run/celery celery:celery 755, /var/log/celery celery:celery 750")),
    (RIGHT + "pending\n", False, set(), "applied (file changed)"),
    (RIGHT, True, {celery.TMPFILES_MARKER}, "applied (file changed)"),
    ("/run/celery missing\n/var/log/celery celery:celery 750\n", False, set(),
     "applied (/run/celery missing)"),
    ("/run/celery celery:celery 755\n/var/log/celery root:root 755\n", False, set(),
     "applied (/var/log/celery root:root 755)"),
    ("/run/celery missing\n/var/log/celery missing\n", True, set(),
     "applied (/run/celery missing, /var/log/celery missing)"),
])
def test_tmpfiles_case(state, check, notified, expect):
    host = SimpleNamespace(check=check, report=SimpleNamespace(notified=notified))
    outcome = TMP.plan(state, host)
    if isinstance(expect, Ok):
        assert outcome == expect
    else:
        assert isinstance(outcome, Change) and outcome.message == expect
        assert outcome.script == ("systemd-tmpfiles --create /etc/tmpfiles.d/celery.conf\n"
                                  "rm -f /var/lib/fabstack/pending/celery-tmpfiles@create")


def test_tmpfiles_without_the_celery_user_fails_naming_the_db_step():
    outcome = TMP.plan("/run/celery missing\nno-user\n", SimpleNamespace(check=False))
    assert outcome.message.startswith("cannot apply: user celery missing (the db step makes it")
    assert outcome.script.endswith("exit 1")
    # in check mode the db step (planned, not applied) would have made the user
    outcome = TMP.plan("/run/celery missing\nno-user\n",
                       SimpleNamespace(check=True, report=SimpleNamespace(notified=set())))
    assert outcome.message.startswith("applied")


# -- the units run once a release exists ---------------------------------------------------

RUNNING = "LoadState=loaded\nUnitFileState=enabled\nActiveState=active\nNeedDaemonReload=no\n"
STOPPED = RUNNING.replace("=active", "=inactive")
NEW_UNIT = "LoadState=not-found\nUnitFileState=\nActiveState=inactive\nNeedDaemonReload=no\n"
RELEASE = "release=yes\n"
SERVICE = celery.ReleaseService("celery.service", "/opt/ratemyderp/app")


@pytest.mark.parametrize("state, expect", [
    (RELEASE + RUNNING, Ok("enabled, running")),
    (STOPPED, Ok("enabled, stopped (no release deployed yet: /opt/ratemyderp/app missing)")),
    (RELEASE + STOPPED, "started"),
    (RUNNING, "stopped (no release deployed yet: /opt/ratemyderp/app missing)"),
    (NEW_UNIT, "unit files reloaded, enabled (no release deployed yet: /opt/ratemyderp/app "
     "missing)"),
    (RELEASE + NEW_UNIT, "unit files reloaded, enabled, started"),
    (RELEASE + RUNNING + "pending=restart\n", "restarted (its configuration changed)"),
    # a stopped unit keeps a pending restart: starting it later clears it
    (STOPPED + "pending=restart\n", Ok("enabled, stopped (no release deployed yet: "
                                       "/opt/ratemyderp/app missing)")),
    (RELEASE + STOPPED + "pending=restart\n", "started"),
])
def test_release_service_case(state, expect):
    outcome = SERVICE.plan(state, SimpleNamespace(check=False))
    if isinstance(expect, Ok):
        assert outcome == expect
    else:
        assert isinstance(outcome, Change) and outcome.message == expect


def test_release_service_probe_reads_the_release_with_the_unit():
    probe = SERVICE.probe()
    assert probe.startswith("test -d /opt/ratemyderp/app && echo release=yes\n")
    assert "systemctl show" in probe


# -- the step over the fake connection ---------------------------------------------------

def step_answers(release=True, **states):
    """Fake answers for each resource's probe: converged (running when ``release``), unless
    ``states`` gives another."""
    answers = []
    for r in celery.celery_resources(SimpleNamespace(settings=make_settings(),
                                                         site=Site.alone("h"))):
        if isinstance(r, celery.TmpfilesApplied):
            right = RIGHT
        elif isinstance(r, Service):
            right = RELEASE + RUNNING if release else STOPPED
        else:
            right = converged(r)
        state = states.get(r.what, right)
        if isinstance(r, Service) and release and r.what in states:
            state = RELEASE + state
        answers.append(("^" + re.escape(r.probe()) + "$", state))
    return answers


def test_converged_host_changes_nothing_in_one_round_trip(make_host, settings):
    for release in (True, False):
        host, conn = host_for(make_host, settings)
        conn.answers = step_answers(release)
        ensure(host, *celery.celery_resources(host))
        assert conn.applied == [] and host.report.count("changed") == 0
        assert host.round_trips == 1


def test_fresh_host_without_release_installs_and_enables_but_starts_nothing(make_host, settings,
                                                                            capsys):
    host, conn = host_for(make_host, settings)
    conn.answers = step_answers(release=False, **{
        "file /etc/tmpfiles.d/celery.conf": "missing\n",
        "tmpfiles /etc/tmpfiles.d/celery.conf": "/run/celery missing\n/var/log/celery missing\n",
        "file /etc/systemd/system/celery.service": "missing\n",
        "file /etc/systemd/system/celerybeat.service": "missing\n",
        "service celery.service": NEW_UNIT, "service celerybeat.service": NEW_UNIT})
    ensure(host, *celery.celery_resources(host))
    applied = "\n".join(conn.applied)
    assert "systemd-tmpfiles --create /etc/tmpfiles.d/celery.conf" in applied
    for unit in UNITS:
        assert f"systemctl enable -- {unit}" in applied
        assert f"systemctl start -- {unit}" not in applied
        assert f"systemctl restart -- {unit}" not in applied
    assert "changed      service celery.service: unit files reloaded, enabled (no release " \
        "deployed yet: /opt/ratemyderp/app missing)\n" in capsys.readouterr().out


def test_release_present_starts_stopped_units(make_host, settings):
    host, conn = host_for(make_host, settings)
    conn.answers = step_answers(**{"service celery.service": STOPPED,
                                   "service celerybeat.service": STOPPED})
    ensure(host, *celery.celery_resources(host))
    applied = "\n".join(conn.applied)
    assert [applied.count(f"systemctl start -- {u}") for u in UNITS] == [1, 1]


def test_release_gone_stops_running_units(make_host, settings):
    host, conn = host_for(make_host, settings)
    conn.answers = step_answers(release=False, **{"service celery.service": RUNNING,
                                                  "service celerybeat.service": RUNNING})
    ensure(host, *celery.celery_resources(host))
    applied = "\n".join(conn.applied)
    assert [applied.count(f"systemctl stop -- {u}") for u in UNITS] == [1, 1]


def test_changed_unit_file_and_pending_conf_restart_each_unit_once(make_host, settings):
    """The worker's unit file changed in this run, and celery.conf (written by the db step)
    left restart markers for both: each unit is restarted exactly once."""
    host, conn = host_for(make_host, settings)
    conn.answers = step_answers(**{
        "file /etc/systemd/system/celery.service": "regular file|root|root|644\nold\n\n",
        "service celery.service": RUNNING.replace("Reload=no", "Reload=yes") + "pending=restart\n",
        "service celerybeat.service": RUNNING + "pending=restart\n"})
    ensure(host, *celery.celery_resources(host))
    applied = "\n".join(conn.applied)
    assert "touch /var/lib/fabstack/pending/celery.service@restart" in applied
    assert applied.count("systemctl daemon-reload") == 1
    assert [applied.count(f"systemctl restart -- {u}") for u in UNITS] == [1, 1]


def test_step_without_the_db_step_fails_before_touching_units(make_host, settings):
    host, conn = host_for(make_host, settings)
    conn.answers = step_answers(**{
        "tmpfiles /etc/tmpfiles.d/celery.conf": "/run/celery missing\nno-user\n",
        "file /etc/systemd/system/celery.service": "missing\n"})
    conn.failing = [r"exit 1$"]  # the host runs that script as written: it fails
    with pytest.raises(StepFailed, match="tmpfiles"):
        ensure(host, *celery.celery_resources(host))
    assert "systemctl" not in "\n".join(conn.applied)


def test_check_mode_on_a_fresh_host_plans_and_applies_nothing(make_host, settings, capsys):
    host, conn = host_for(make_host, settings, check=True)
    conn.answers = step_answers(release=False, **{
        "file /etc/tmpfiles.d/celery.conf": "missing\n",
        "tmpfiles /etc/tmpfiles.d/celery.conf": "no-user\n",
        "file /etc/systemd/system/celery.service": "missing\n",
        "service celery.service": NEW_UNIT})
    ensure(host, *celery.celery_resources(host))
    assert conn.applied == []
    out = capsys.readouterr().out
    assert "would change file /etc/systemd/system/celery.service: created" in out
    assert "would change tmpfiles /etc/tmpfiles.d/celery.conf: applied" in out


def test_db_step_environment_files_notify_both_units():
    s = make_settings()
    files = {r.path: r for r in db.db_resources(SimpleNamespace(settings=s,
                                                                site=Site.alone("h")))
             if isinstance(r, File)}
    for path in (s.layout.env_file, f"{s.layout.conf}/celery.conf"):
        assert {"celery.service@restart", "celerybeat.service@restart"} <= set(
            files[path].markers)
    # gunicorn reads the app's environment too; celery.conf is Celery's alone
    assert f"{s.app}.service@restart" in files[s.layout.env_file].markers
    assert f"{s.app}.service@restart" not in files[f"{s.layout.conf}/celery.conf"].markers


# -- restart after a deploy ----------------------------------------------------------------

def run_restart_script(script: str, tmp_path) -> tuple[list[str], list[str]]:
    """The restart script itself, run by sh: a stub systemctl logs its arguments, the pending
    restarts' markers are in a scratch folder. Returns systemctl's calls and the markers left."""
    stubs, pending, log = tmp_path / "bin", tmp_path / "pending", tmp_path / "log"
    stubs.mkdir()
    pending.mkdir()
    (stubs / "systemctl").write_text('#!/bin/sh\necho "$*" >> "$LOG"\n')
    (stubs / "systemctl").chmod(0o755)
    for marker in ("celery.service@restart", "celerybeat@create", "ratemyderp.service@restart"):
        (pending / marker).touch()
    assert f"pending={PENDING_DIR}\n" in script
    subprocess.run(["sh", "-s"], input=script.replace(f"pending={PENDING_DIR}\n",
                                                      f"pending={pending}\n"),
                   text=True, check=True, env={"PATH": f"{stubs}:/usr/bin:/bin", "LOG": str(log)})
    return log.read_text().splitlines(), [p.name for p in pending.iterdir()]


def test_restart_celery_restarts_both_once_and_reports(make_host, settings, capsys, tmp_path):
    host, conn = host_for(make_host, settings)
    celery.restart_celery(host)
    [script] = conn.applied
    calls, left = run_restart_script(script, tmp_path)
    assert calls == [
        "restart -- celery.service celerybeat.service",
        "is-active --quiet -- celery.service", "is-active --quiet -- celerybeat.service"]
    assert left == ["ratemyderp.service@restart"]
    out = capsys.readouterr().out
    for unit in UNITS:
        assert f"changed      service {unit}: restarted (asked for)" in out
    assert host.report.count("changed") == 2


def test_a_deploys_restart_is_queued_not_waited_for(make_host, settings, capsys, tmp_path):
    host, conn = host_for(make_host, settings)
    celery.restart_celery(host, "(new release)", wait=False)
    [script] = conn.applied
    calls, left = run_restart_script(script, tmp_path)
    assert calls == ["restart --no-block -- celery.service celerybeat.service"]
    assert left == ["ratemyderp.service@restart"]
    out = capsys.readouterr().out
    assert ("changed      service celery.service: restart queued (new release); its running "
            "tasks finish first\n") in out
    assert "changed      service celerybeat.service: restart queued (new release)\n" in out


def test_restart_celery_failure_is_a_failed_step(make_host, settings):
    host, conn = host_for(make_host, settings)
    conn.failing = [r"systemctl restart"]
    with pytest.raises(StepFailed, match="restart celery"):
        celery.restart_celery(host)


def test_restart_celery_in_check_mode_changes_nothing(make_host, settings, capsys):
    host, conn = host_for(make_host, settings, check=True)
    celery.restart_celery(host)
    assert conn.applied == []
    assert "would change service celery.service: restarted" in capsys.readouterr().out


# -- wiring --------------------------------------------------------------------------------

def test_tasks_are_in_the_namespace():
    ns = build_namespace()
    assert {"celery.setup", "celery.restart"} <= set(ns.task_names)
    assert ns.collections["celery"].default == "setup"


def test_provision_runs_celery_after_the_data_tier(monkeypatch):
    """provision declares the Celery units after the files they read (one ensure, in order)."""
    s = make_settings()
    host = SimpleNamespace(settings=s, check=False, site=Site.alone("h"))
    whats = [r.what for r in provision_declares(monkeypatch, host)]
    assert whats.index(f"file {s.layout.env_file}") < whats.index(
        "file /etc/systemd/system/celery.service") < whats.index("service celery.service")
