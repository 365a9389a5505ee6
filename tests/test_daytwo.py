"""Day-two tasks' logic over the fake connection and as pure functions (issue 14)."""

import hashlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import time
from types import SimpleNamespace

import pytest

from tasks import logs, maintenance, manage, media, nginx, status, upgrade
from tasks.host import BACKGROUND, Result, StepFailed
from tasks.inventory import Site
from tasks.primitives import Change, File, Ok, render


def test_remainder_from_fabs_arguments():
    argv = ["fab", "-H", "a", "manage", "--", "shell", "-c", "x = 1; print(x)", "--", "-H"]
    assert manage.remainder(argv) == ["shell", "-c", "x = 1; print(x)", "--", "-H"]
    assert manage.remainder(["fab", "manage"]) == []


def test_only_superuser_variables_are_passed_on():
    env = {"DJANGO_SUPERUSER_PASSWORD": "p", "DJANGO_SUPERUSER_USERNAME": "u",
           "DJANGO_SECRET_KEY": "k", "HOME": "/root", "DJANGO_SUPERUSER_bad-name": "x"}
    assert manage.forwarded(env) == {"DJANGO_SUPERUSER_PASSWORD": "p",
                                     "DJANGO_SUPERUSER_USERNAME": "u"}


def test_the_manage_command_quotes_arguments_and_holds_no_values(make_host, settings):
    h, _ = make_host()
    h._exec = lambda command, script, wait: Result("/root/.f1\n", "", 0)
    command = manage.stage(h, ["shell", "-c", "print('a b'); $(id)"], {"DJANGO_SUPERUSER_X": "v"},
                           False)
    assert command.startswith("/bin/sh -c ")
    assert command.endswith(" manage /root/.f1 shell -c 'print('\"'\"'a b'\"'\"'); $(id)'")
    script = manage.runner_script(settings, False)
    assert script.startswith("stdin=''\n")
    assert f". /opt/{settings.app}/conf/{settings.app}.conf" in script
    assert f"runuser -u {settings.app} -- /opt/{settings.app}/venv/bin/python" in script
    assert settings["DJANGO_SECRET_KEY"] not in script
    assert manage.runner_script(settings, True).startswith("stdin=1\n")


def test_the_manage_runner_reads_and_deletes_the_variables_then_runs(settings, tmp_path):
    """The runner run by sh with stand-ins: runuser prints its arguments and two variables."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "runuser").write_text('#!/bin/sh\necho "$*"; echo "$DJANGO_SUPERUSER_X $FROM_ENV"\n'
                                   'cat\n')
    (stubs / "runuser").chmod(0o755)
    env_file, release = tmp_path / "app.conf", tmp_path / "app"
    env_file.write_text('FROM_ENV="env value"\n')
    release.mkdir()
    variables = tmp_path / "vars"
    variables.write_text("DJANGO_SUPERUSER_X='a b'\n")
    script = (manage.runner_script(settings, False)
              .replace(f"/opt/{settings.app}/conf/{settings.app}.conf", str(env_file))
              .replace(f"cd /opt/{settings.app}/app ", f"cd {release} "))
    res = subprocess.run(["sh", "-c", script, "manage", str(variables), "check", "--deploy"],
                         input="not for the command", capture_output=True, text=True,
                         env={"PATH": f"{stubs}:/usr/bin:/bin"}, check=True)
    assert res.stdout == (f"-u {settings.app} -- /opt/{settings.app}/venv/bin/python manage.py "
                          "check --deploy\na b env value\n")
    assert not variables.exists()


def test_stage_writes_variables_on_stdin_only(make_host):
    h, _ = make_host()
    scripts = []
    h._exec = lambda command, script, wait: scripts.append(script) or Result("/root/.f1\n", "", 0)
    command = manage.stage(h, ["createsuperuser"], {"DJANGO_SUPERUSER_PASSWORD": "s3cr3t pw"},
                           False)
    assert "s3cr3t" not in command and "/root/.f1" in command
    lines = "DJANGO_SUPERUSER_PASSWORD='s3cr3t pw'\n"  # on the script's stdin only
    assert scripts[-1].startswith(f"{BACKGROUND}variables={shlex.quote(lines)}\n")


def test_stage_refuses_a_host_without_a_release(make_host):
    h, _ = make_host()
    h._exec = lambda command, script, wait: Result("", "no release deployed: /opt/x/app/manage.py "
                                             "is missing", 3)
    with pytest.raises(StepFailed, match="no release deployed"):
        manage.stage(h, ["check"], {}, False)


def test_streamed_output_is_masked_line_by_line():
    out = io.StringIO()
    lines = manage.MaskedLines(lambda t: t.replace("topsecret", "********"), out, ["pw-extra"])
    for chunk in ("a top", "secret b\nc pw-ex", "tra d\n", "tail"):
        lines.write(chunk)
    assert out.getvalue() == "a ******** b\nc ******** d\n"
    lines.flush()
    assert out.getvalue().endswith("tail")


# -- fab logs ------------------------------------------------------------------------------

def test_since_takes_a_number_and_a_unit():
    assert logs.since_seconds("5min") == 300 and logs.since_seconds("1h") == 3600
    assert logs.since_seconds("2d") == 172800 and logs.since_seconds("30s") == 30
    for bad in ("", "1 week", "-1h", "1h; id"):
        with pytest.raises(StepFailed, match="30s, 5min, 1h, 2d"):
            logs.since_seconds(bad)


@pytest.mark.parametrize("line", [
    "[2026-11-30 05:00:01 +0000] [12] [INFO] Starting gunicorn 23.0.0",
    "[2026-11-30 05:00:01,123: INFO/MainProcess] celery@host ready.",
    "2026-11-30 05:00:01,123 WARNING django.request 99 Not Found: /x",
    "2026/11/30 05:00:01 [error] 7#7: *1 open() failed",
    '127.0.0.1 - - [30/Nov/2026:05:00:01 +0000] "GET / HTTP/1.1" 200 5',
    "123:M 30 Nov 2026 05:00:01.123 * Ready to accept connections tcp",
    "2026-11-30 05:00:01.456 UTC [77] LOG:  database system is ready",
])
def test_log_file_timestamps(line):
    assert logs.line_time(line, 0) == 1796014801  # 2026-11-30 05:00:01 UTC
    assert logs.line_time(line, 3600) == 1796014801 - 3600


def journal(stamp, unit, message, cursor, tag="x"):
    return json.dumps({"__REALTIME_TIMESTAMP": str(int(stamp * 1e6)), "_SYSTEMD_UNIT": unit,
                       "SYSLOG_IDENTIFIER": tag, "MESSAGE": message, "__CURSOR": cursor})


def test_backlog_is_merged_in_time_order_prefixed_and_masked(settings):
    out = io.StringIO()
    reader = logs.LogLines(logs.sources(settings),
                           lambda t: t.replace("topsecret", "********"), out)
    for line in ["cut=1796014000 offset=0",
                 journal(1796014805, "celery.service", "Started celery.service", "c2"),
                 journal(1796014802, "ratemyderp.service", "Not Found: /topsecret", "c1"),
                 journal(1796014802, "ratemyderp.service", "Not Found: /topsecret", "c1"),
                 journal(1796014806, "x.service", "b1", "c3", tag="ratemyderp-backup"),
                 logs.FILE_MARK + "/var/log/celery/w1-1.log",
                 "[2026-11-30 04:00:00,000: INFO/MainProcess] too old",
                 "[2026-11-30 05:00:03,000: INFO/MainProcess] celery@h ready.",
                 "Traceback (most recent call last):", ""]:
        reader.feed(line)
    reader.flush()
    assert out.getvalue().splitlines() == [
        "2026-11-30 05:00:02 app | Not Found: /********",
        "2026-11-30 05:00:03 celery/w1-1.log | [2026-11-30 05:00:03,000: INFO/MainProcess] "
        "celery@h ready.",
        "2026-11-30 05:00:03 celery/w1-1.log | Traceback (most recent call last):",
        "2026-11-30 05:00:05 celery | Started celery.service",
        "2026-11-30 05:00:06 backup | b1",
    ]


def test_follow_prints_new_lines_as_they_come(settings):
    out = io.StringIO()
    selected = {"nginx": logs.sources(settings)["nginx"]}
    reader = logs.LogLines(selected, lambda t: t, out)
    for line in ["cut=1796014000 offset=0", logs.FOLLOW_MARK, "",
                 "==> /var/log/nginx/error.log <==", "2026/11/30 05:00:09 [error] boom",
                 journal(1796014801, "init.scope", "Reloaded nginx.service", "c9")]:
        reader.feed(line)
    assert out.getvalue().splitlines() == [
        "2026-11-30 05:00:09 nginx/error.log | 2026/11/30 05:00:09 [error] boom",
        "2026-11-30 05:00:01 nginx | Reloaded nginx.service"]


@pytest.mark.parametrize("follow", [False, True])
def test_the_logs_script_is_valid_shell(settings, tmp_path, follow):
    every = logs.sources(settings)
    for selected in (every, {"backup": every["backup"]}, {"app": every["app"]}):
        path = tmp_path / "logs.sh"
        path.write_text(logs.script(settings, selected, 300, follow))
        assert subprocess.run(["sh", "-n", str(path)]).returncode == 0
        assert ("\nfollow=1\n" in path.read_text()) == follow


def test_the_logs_script_reads_the_journal_and_the_files_changed_since(settings, tmp_path):
    """The script run by sh, journalctl a stub that prints its arguments: unit globs reach it
    unexpanded (a file in the folder matches one), file globs are expanded; an old file is
    left out."""
    stubs, folder = tmp_path / "bin", tmp_path / "logs"
    stubs.mkdir()
    folder.mkdir()
    (stubs / "journalctl").write_text('#!/bin/sh\necho "journalctl $*"\n')
    (stubs / "journalctl").chmod(0o755)
    (folder / "new.log").write_text("one\ntwo\n")
    (folder / "old.log").write_text("old\n")
    os.utime(folder / "old.log", (time.time() - 7200, time.time() - 7200))
    (folder / "pg1.service").touch()
    selected = {"x": logs.Source(("a.service", "pg*.service"), ("x-backup",),
                                 (f"{folder}/*.log",))}
    res = subprocess.run(["sh", "-s"], input=logs.script(settings, selected, 300, False),
                         capture_output=True, text=True, cwd=folder, check=True,
                         env={"PATH": f"{stubs}:/usr/bin:/bin"})
    lines = res.stdout.splitlines()
    assert re.fullmatch(r"cut=\d+ offset=[-+]?\d+", lines[0])
    cut = lines[0].split()[0].removeprefix("cut=")
    assert lines[1:] == [
        f"journalctl --no-pager -q -o json --since=@{cut} -u a.service -u pg*.service",
        f"journalctl --no-pager -q -o json --since=@{cut} -t x-backup",
        f"{logs.FILE_MARK}{folder}/new.log", "one", "two", ""]


# -- fab maintenance -------------------------------------------------------------------------

def test_site_shows_the_maintenance_page_while_it_exists(settings):
    site = nginx.Site(settings)
    probe = site.probe()
    assert f"[ -e {nginx.maintenance_page(settings)} ]" in probe
    on = render("nginx-site-tls.conf.j2", settings, maintenance=True)
    state = f"regular file|root|root|644\n{hashlib.sha256(on.encode()).hexdigest()}\n\n"
    outcome = site.plan("tls\nmaintenance\n" + state, SimpleNamespace(check=False))
    assert isinstance(outcome, Ok) and outcome.message.endswith("[HTTPS; maintenance page on]")
    outcome = site.plan("tls\n" + state, SimpleNamespace(check=False))
    assert isinstance(outcome, Change)  # the page is gone: back to the app
    assert "return 503;" in on and "Retry-After 300 always" in on
    assert "if ($remote_addr = 127.0.0.1) { set $fabstack_maintenance 0; }" in on
    assert "return 503" not in render("nginx-site-tls.conf.j2", settings)


def test_the_message_is_html_escaped(settings):
    page = render("maintenance.html.j2", settings, message="<b>Back at 5</b> & \"soon\"")
    assert "&lt;b&gt;Back at 5&lt;/b&gt; &amp; &#34;soon&#34;" in page and "<b>" not in page
    assert "back shortly" in render("maintenance.html.j2", settings)


def test_maintenance_off_puts_the_site_back_before_the_page_goes(make_host, settings):
    h, _ = make_host()
    on = maintenance.maintenance_resources(h, True, "x")
    page = nginx.maintenance_page(h.settings)
    assert [r.path for r in on if isinstance(r, File)] == [page]
    assert isinstance(on[-2], nginx.Site) and on[-2].forced is None
    off = maintenance.maintenance_resources(h, False, None)
    assert not any(isinstance(r, File) for r in off)
    assert isinstance(off[0], nginx.Site) and off[0].forced is False
    normal = render("nginx-site-tls.conf.j2", settings)
    state = f"regular file|root|root|644\n{hashlib.sha256(normal.encode()).hexdigest()}\n\n"
    outcome = off[0].plan("tls\nmaintenance\n" + state, SimpleNamespace(check=False))
    assert isinstance(outcome, Ok) and outcome.message.endswith("[HTTPS]")


def test_status_says_when_the_page_is_on(settings):
    answers = ["1796014801\n", "", "", "", "", "none\n", "", "", "1796011201\n"]
    lines = status.assess(settings, Site.alone("h"), answers)
    line = next(line for line in lines if line.what == "maintenance")
    assert line.status == "warning" and line.message.startswith("on since 2026-11-30 04:00 UTC")
    answers[-1] = ""
    assert not any(line.what == "maintenance"
                   for line in status.assess(settings, Site.alone("h"), answers))


# -- fab restore-media -------------------------------------------------------------------------

def test_media_path_stays_inside_the_media_folder():
    assert media.clean_path("uploads/a.jpg") == "uploads/a.jpg"
    assert media.clean_path("/media/uploads/") == "uploads"
    for bad in ("", "..", "../etc/passwd", "uploads/../../x", "/"):
        with pytest.raises(StepFailed, match="inside the media folder"):
            media.clean_path(bad)


def restore(tmp_path, rel="", delete=False, apply=True, meta=True):
    args = {"snapshot": str(tmp_path / "snap"), "media": str(tmp_path / "media"), "path": rel,
            "delete": delete, "apply": apply, "meta_name": media.META_NAME}
    (tmp_path / "snap" / media.META_NAME).unlink(missing_ok=True)
    if meta:
        (tmp_path / "snap" / media.META_NAME).write_text(json.dumps({
            "": [0o755, "root", "root"], "up": [0o750, "root", "root"],
            "up/a.bin": [0o604, "root", "root"], "up/b.bin": [0o600, "root", "root"]}))
    res = subprocess.run(["python3", "-", json.dumps(args)], input=media.RESTORE_PY,
                         capture_output=True, text=True, check=True)
    return json.loads(res.stdout)


@pytest.fixture
def snapshot_and_media(tmp_path):
    for root in ("snap", "media"):
        (tmp_path / root / "up").mkdir(parents=True)
    (tmp_path / "snap/up/a.bin").write_bytes(b"\0a-old")
    (tmp_path / "snap/up/b.bin").write_bytes(b"b")
    os.utime(tmp_path / "snap/up/a.bin", (1_700_000_000, 1_700_000_000))
    (tmp_path / "snap/up/a.bin").chmod(0o640)  # as the backup script leaves them
    (tmp_path / "media/up/new.bin").write_bytes(b"uploaded after the snapshot")
    (tmp_path / "media/up/b.bin").write_bytes(b"b, edited after the snapshot")
    return tmp_path


def test_restore_puts_a_file_back_with_its_mode_and_time(snapshot_and_media):
    tmp = snapshot_and_media
    plan = restore(tmp, "up/a.bin", apply=False)
    assert plan["restored"] == ["up/a.bin"] and not (tmp / "media/up/a.bin").exists()
    assert restore(tmp, "up/a.bin")["restored"] == ["up/a.bin"]
    st = (tmp / "media/up/a.bin").stat()
    assert (tmp / "media/up/a.bin").read_bytes() == b"\0a-old"
    assert (st.st_mode & 0o7777, st.st_uid, st.st_mtime) == (0o604, 0, 1_700_000_000)
    assert restore(tmp, "up/a.bin") == {"restored": [], "newer": [], "deleted": [], "same": 1,
                                        "meta": True}


def test_restore_keeps_newer_uploads_unless_asked(snapshot_and_media):
    tmp = snapshot_and_media
    out = restore(tmp)
    assert out["newer"] == ["up/b.bin"] and out["deleted"] == []
    assert "up/a.bin" in out["restored"] and (tmp / "media/up/new.bin").exists()
    assert (tmp / "media/up/b.bin").read_bytes() == b"b, edited after the snapshot"
    out = restore(tmp, delete=True)
    assert out["restored"] == ["up/b.bin"] and out["deleted"] == ["up/new.bin"]
    assert (tmp / "media/up/b.bin").read_bytes() == b"b"
    assert not (tmp / "media/up/new.bin").exists()


def test_restore_brings_back_a_deleted_folder(snapshot_and_media):
    tmp = snapshot_and_media
    shutil.rmtree(tmp / "media/up")
    out = restore(tmp, "up/b.bin")
    assert out["restored"] == ["up/", "up/b.bin"]
    assert (tmp / "media/up").stat().st_mode & 0o7777 == 0o750
    out = restore(tmp, meta=False)  # an old snapshot: the media folder's owner, 0644
    assert out["restored"] == ["up/", "up/a.bin", "up/b.bin"] and not out["meta"]
    assert (tmp / "media/up/a.bin").stat().st_mode & 0o7777 == 0o644


# -- fab upgrade ---------------------------------------------------------------------------

SIMULATION = """Reading package lists...
Calculating upgrade...
Inst libssl3 [3.0.15-1~deb12u1] (3.0.17-1~deb12u2 Debian-Security:12/stable-security [amd64])
Inst linux-image-6.1.0-40-amd64 (6.1.153-1 Debian:12.12/stable [amd64])
Inst build-essential [12.9] (12.10 Debian:12.12/stable [amd64])
Remv oldthing [1.0-1]
Conf libssl3 (3.0.17-1~deb12u2 Debian-Security:12/stable-security [amd64])
"""


def test_pending_names_each_package_with_old_and_new_version():
    found = upgrade.pending(SIMULATION)
    assert [(u.package, u.describe()) for u in found] == [
        ("libssl3", "3.0.15-1~deb12u1 -> 3.0.17-1~deb12u2 (security)"),
        ("linux-image-6.1.0-40-amd64", "not installed -> 6.1.153-1"),
        ("build-essential", "12.9 -> 12.10"),
        ("oldthing", "1.0-1 -> removed"),
    ]
    with pytest.raises(StepFailed, match="apt cannot plan the upgrade: Unmet dependencies"):
        upgrade.pending("Reading package lists...\nE: Unmet dependencies. Try 'apt "
                        "--fix-broken install'\n")


def test_needrestart_batch_report():
    found = upgrade.needs("NEEDRESTART-VER: 3.6\nNEEDRESTART-KCUR: 6.1.0-28-amd64\n"
                          "NEEDRESTART-KEXP: 6.1.0-40-amd64\nNEEDRESTART-KSTA: 3\n"
                          "NEEDRESTART-SVC: nginx.service\nNEEDRESTART-SVC: systemd-manager\n"
                          "NEEDRESTART-SESS: root @ session #3\n")
    assert found.services == ["nginx.service", "systemd-manager"]
    assert found.sessions == ["root @ session #3"]
    assert found.reboot and (found.running, found.expected) == ("6.1.0-28-amd64",
                                                                "6.1.0-40-amd64")
    assert not upgrade.needs("NEEDRESTART-VER: 3.6\nNEEDRESTART-KSTA: 1\n").reboot
    assert not upgrade.needs("NEEDRESTART-MISSING\n").installed


def test_restarts_systemd_first_nginx_then_the_app_last(settings):
    app = f"{settings.app}.service"
    plan, left = upgrade.restart_plan(settings, [
        app, "nginx.service", "ssh.service", "postgresql@15-main.service", "systemd-manager",
        "redis-server.service", "dbus.service", "celery.service", "user@0.service",
        "bad unit;id"], stopped=["cron.service"])
    assert plan == [("script", "systemd-manager"), ("restart", "celery.service"),
                    ("start", "cron.service"), ("restart", "ssh.service"),
                    ("nginx", "nginx.service"), ("app", app)]
    assert sorted(left) == ["bad unit;id", "dbus.service", "postgresql@15-main.service",
                            "redis-server.service", "user@0.service"]
    assert "fails the app's requests" in left["postgresql@15-main.service"]
    assert "reboot" in left["dbus.service"]


def upgrade_answers(settings, simulation: str, needrestart: str) -> list[tuple[str, str]]:
    """The host's answers to fab upgrade's probes: needrestart installed and set up."""
    conf = File(upgrade.NEEDRESTART_CONF, render("needrestart.conf.j2", settings))
    return [(r"apt-lists-updated", "1796000000 1796000100 \n"),
            (r"fabstack\.conf", f"regular file|root|root|644\n{conf.digest}\n"),
            (r"conf\.d 2>", "directory|root|root|755\n"),
            (r"apt-get -s", simulation),
            (r"needrestart -b", needrestart),
            (r"dpkg-query", "needrestart ii\n"),
            (r"policy-rc\.d", ""),  # no policy-rc.d on the host
            (r"readlink", "releases/20261130-abc\n")]


def test_upgrade_with_nothing_pending_changes_nothing(make_host, settings, capsys):
    h, conn = make_host(upgrade_answers(settings, "0 upgraded, 0 newly installed\n",
                                        "NEEDRESTART-VER: 3.6\nNEEDRESTART-KSTA: 1\n"
                                        "NEEDRESTART-KCUR: 6.1.0-40-amd64\n"))
    upgrade.upgrade_host(h, reboot=True)
    out = capsys.readouterr().out
    assert "system upgrade: no upgrades pending" in out
    assert "needrestart: no service runs old libraries" in out
    assert "kernel: running 6.1.0-40-amd64, the newest installed" in out
    assert "reboot: not needed" in out
    assert h.report.count("changed") == 0 and conn.applied == [] and h.round_trips == 2


def test_upgrade_security_only_under_policy_rc_d(make_host, settings, capsys):
    h, conn = make_host(upgrade_answers(settings, SIMULATION, "NEEDRESTART-VER: 3.6\n"))

    def execute(command, stdin, wait):  # the upgrade's output: nothing stopped, nothing old
        res = conn.exec_script(command, stdin)
        return Result(f"{upgrade.MARK}\nNEEDRESTART-VER: 3.6\n", "", 0) \
            if "NEEDRESTART_SUSPEND=1" in stdin else res

    h._exec = execute
    upgrade.upgrade_host(h, security=True)
    out = capsys.readouterr().out
    assert "pending      package libssl3: 3.0.15-1~deb12u1 -> 3.0.17-1~deb12u2 (security)" in out
    assert "left         package build-essential: 12.9 -> 12.10: not from a security " \
        "archive (--security)" in out
    assert out.index("pending      package libssl3") < out.index("changed      system upgrade")
    (script,) = [s for s in conn.applied if "policy-rc.d" in s]
    assert "install --only-upgrade -- libssl3'" in script and "build-essential" not in script
    assert f"mark={upgrade.q(upgrade.POLICY_MARK)}" in script
    assert "NEEDRESTART_SUSPEND=1" in script


@pytest.mark.parametrize("name", ["upgrade.sh.j2", "upgrade-restart.sh.j2"])
def test_the_upgrade_scripts_are_valid_shell(settings, tmp_path, name):
    path = tmp_path / "script.sh"
    path.write_text(render(name, settings))
    assert subprocess.run(["sh", "-n", str(path)]).returncode == 0


@pytest.mark.parametrize("roles, missing", [(None, "gunicorn"),
                                            (["db", "redis"], "service postgresql.service")])
def test_a_reboot_waits_for_fab_status_of_the_hosts_roles(make_host, monkeypatch, roles,
                                                          missing):
    """After the reboot, fab status's checks of the host's roles (all, or a data host's) must
    pass; here the host comes back with nothing running, so the wait ends naming them."""
    from tasks.inventory import load, site_of

    h, conn = make_host()
    if roles:
        entries = load({"fabstack": {"hosts": {
            "app": {"ssh": "a", "private": "10.0.0.11", "roles": ["lb", "web", "worker"]},
            "data": {"ssh": "fakehost", "private": "10.0.0.12", "roles": roles}}}})
        h.site = site_of(entries, "fakehost")
    monkeypatch.setattr(upgrade.time, "sleep", lambda seconds: None)
    conn.close = lambda: None
    h.run = lambda script, what="", **kw: Result("this boot\n", "", 0)
    h.probe = lambda snippets: ["another boot\n", "", "1796014801\n", "", "", "", "", "none\n",
                                "", "", ""][:len(snippets)]
    with pytest.raises(StepFailed) as failed:
        upgrade.reboot_and_wait(h, "a test", timeout=0.2)
    assert "fab status names" in failed.value.message and missing in failed.value.message
    assert ("gunicorn" in failed.value.message) is (roles is None)
