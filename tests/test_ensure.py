"""ensure() over the fake connection: batching, re-probing, check mode, failures, secrets."""

import subprocess

import pytest

from tasks.host import BACKGROUND, Host, Result, StepFailed
from tasks.primitives import (
    Command,
    Directory,
    DistUpgrade,
    File,
    Group,
    Note,
    Packages,
    Service,
    User,
    apt_repository,
    ensure,
    one_apt_run,
)
from tests.fake import FakeConnection, UnexpectedCommand

CONVERGED = [
    (r"stat -c .* -- /opt/a ", "directory|root|root|755\n"),
    (r"stat -c .* -- /opt/b ", "directory|root|root|755\n"),
    (r"systemctl show", "LoadState=loaded\nUnitFileState=enabled\nActiveState=active\n"),
]


def test_converged_host_costs_one_round_trip_and_changes_nothing(make_host):
    host, conn = make_host(CONVERGED)
    changed = ensure(host, Directory("/opt/a"), Directory("/opt/b"), Service("nginx"))
    assert changed == 0
    assert len(conn.scripts) == 1 and conn.applied == []
    assert host.round_trips == 1
    assert [line[0] for line in host.report.lines] == ["ok", "ok", "ok"]


def test_a_probe_the_test_did_not_answer_fails_it(make_host):
    """An empty answer would read as "absent": the fake refuses, naming snippet and patterns."""
    host, conn = make_host([(r"-- /opt/b ", "missing\n")])
    with pytest.raises(UnexpectedCommand) as err:
        ensure(host, Directory("/opt/a"))
    assert "no answer for this probe snippet:\nstat -c" in str(err.value)
    assert "-- /opt/a " in str(err.value)
    assert str(err.value).endswith("configured patterns:\n  '-- /opt/b '")
    assert conn.applied == []


def test_the_output_of_an_applied_script_is_not_the_fakes_to_give(make_host):
    host, _conn = make_host()
    res = host.run("echo hi")
    assert res.ok
    with pytest.raises(UnexpectedCommand, match="read the output of this script.*\necho hi$"):
        assert res.stdout == "hi\n"


def test_notes_read_nothing_and_keep_the_other_states_in_place(make_host):
    host, conn = make_host([(r"-- /opt/a ", "missing\n")] + CONVERGED)
    changed = ensure(host, Note("first", "skipped: why"), Directory("/opt/a"),
                     Note("second", "skipped too"), Directory("/opt/b"))
    assert changed == 1 and "mkdir -p -- /opt/a" in conn.applied[0]
    assert host.round_trips == 2  # probe; apply with the probe of /opt/b (notes read nothing)
    assert [line[:2] for line in host.report.lines] == [
        ("ok", "first"), ("changed", "directory /opt/a"), ("ok", "second"),
        ("ok", "directory /opt/b")]
    host, conn = make_host([(r"-- /opt/a ", "missing\n")])
    assert ensure(host, Directory("/opt/a"), Note("last", "nothing to read")) == 1
    assert host.round_trips == 2  # probe, apply: no probe for the note left
    host, conn = make_host()
    assert ensure(host, Note("only", "nothing to do")) == 0
    assert conn.scripts == [] and host.round_trips == 0


def test_change_applies_then_reprobes_the_rest_in_its_round_trip(make_host):
    host, conn = make_host([(r"-- /opt/a ", "missing\n")] + CONVERGED)
    assert ensure(host, Directory("/opt/a"), Directory("/opt/b")) == 1
    assert len(conn.applied) == 1 and "mkdir -p -- /opt/a" in conn.applied[0]
    assert conn.applied[0].startswith("set -e\n")
    assert host.round_trips == 2  # probe; apply with the probe of what is left
    assert "-- /opt/b " in conn.scripts[1] and "-- /opt/a " not in conn.scripts[1]


def test_check_mode_probes_only_and_reports_would_change(make_host, capsys):
    host, conn = make_host([(r"-- /etc/x ", "missing\n")] + CONVERGED, check=True)
    assert ensure(host, File("/etc/x", "new\n", notify=["nginx:reload"]), Service("nginx")) == 2
    assert conn.applied == []
    out = capsys.readouterr().out
    assert "would change file /etc/x: created" in out
    assert "+new" in out
    # the service is planned for reload because the file would change it
    assert "would change service nginx.service: reloaded" in out


def test_one_apt_run_installs_the_later_packages_with_the_first_up_to_a_new_source():
    first, absent, later = Packages(["git"]), Packages(["telnet"], "absent"), Packages(["nginx"])
    pgdg = apt_repository("pgdg", "http://apt.example", "bookworm-pgdg", "main",
                          "http://apt.example/key")
    after_source = Packages(["postgresql-16"])
    before = Directory("/opt/a")
    out = one_apt_run([before, first, absent, later, *pgdg, after_source])
    assert out[1].names == ["git"] and out[1].also == ["nginx"]
    assert out[0] is before and out[2:] == [absent, later, *pgdg, after_source]
    assert one_apt_run([absent]) == [absent]


def test_one_apt_run_gives_the_packages_to_the_upgrade_just_before_them():
    upgrade, base, later = DistUpgrade(mode="first"), Packages(["git"]), Packages(["nginx"])
    out = one_apt_run([upgrade, base, later])
    assert out[0].mode == "first" and out[0].also == ["git", "nginx"]
    assert out[1].also == ["nginx"] and out[2] is later
    source = File("/etc/apt/sources.list.d/x.sources", "", notify=["apt:update"])
    assert one_apt_run([upgrade, source, base])[0] is upgrade


def test_check_mode_counts_the_packages_an_earlier_change_would_install(make_host, capsys):
    host, conn = make_host([(r"dpkg-query", "git ii \n")], check=True)
    assert ensure(host, *one_apt_run([Packages(["git", "ufw"]), Packages(["nginx"])])) == 1
    out = capsys.readouterr().out
    assert ("would change packages git ufw: installed ufw; installed in the same apt run, for "
            "later steps: nginx") in out
    assert "ok           packages nginx: all installed" in out


@pytest.mark.parametrize("file, state", [
    (File("/etc/x", "new\n", notify=["nginx:reload"]),  # only its mode differs
     "regular file|root|root|600\n" + File("/etc/x", "new\n").digest + "\n\n"),
    (File("/etc/x", "", present=False, notify=["nginx:reload"]), "present\n"),
])
def test_check_mode_plans_the_reload_of_a_mode_fix_or_a_removal(make_host, capsys, file, state):
    host, conn = make_host([(r"/etc/x", state)] + CONVERGED, check=True)
    assert ensure(host, file, Service("nginx")) == 2
    assert "would change service nginx.service: reloaded" in capsys.readouterr().out


def test_failed_change_raises_with_step_name(make_host):
    host, _conn = make_host([(r"-- /opt/a ", "missing\n")], failing=[r"mkdir"])
    with pytest.raises(StepFailed) as err:
        ensure(host, Directory("/opt/a"))
    assert err.value.what == "directory /opt/a"
    assert "simulated failure" in err.value.message


def test_scripts_go_on_stdin_never_in_the_command_line(make_host):
    host, conn = make_host([(r"-- /etc/secret ", "missing\n")])
    ensure(host, File("/etc/secret", "PASSWORD=hunter2-xyz\n", mode=0o600, secret=True))
    assert set(conn.commands) == {"timeout -k 5 300 nice -n 10 /bin/sh -s",
                                 "timeout -k 5 1800 nice -n 10 /bin/sh -s"}
    assert not any("hunter2" in c for c in conn.commands)


def test_secrets_are_masked_in_the_report(make_host, capsys):
    host, _conn = make_host()
    host._secrets = ["p@ss w0rd", "p%40ss%20w0rd"]
    host.changed("db role", "password set to p@ss w0rd (url p%40ss%20w0rd)")
    out = capsys.readouterr().out
    assert "w0rd" not in out and "********" in out


def test_sudo_user_without_password_is_told_what_to_do(settings):
    def refuse(command, stdin, wait):
        return Result("", "a password is required", 1)

    host = Host(FakeConnection(user="deploy"), settings, executor=refuse)
    with pytest.raises(StepFailed) as err:
        host.run("true")
    assert "--prompt-for-sudo-password" in err.value.message


def test_sudo_password_goes_on_stdin(settings):
    seen = []

    def execute(command, stdin, wait):
        seen.append((command, stdin))
        return Result("", "", 1 if command == "sudo -k -n true" else 0)

    host = Host(FakeConnection(user="deploy"), settings, sudo_password="s3cret-pw",
                executor=execute)
    host.run("echo hi")
    assert seen[-1] == ("sudo -k -S -p '' timeout -k 5 1800 nice -n 10 /bin/sh -s",
                        f"s3cret-pw\n{BACKGROUND}echo hi")
    assert all("s3cret" not in command for command, _ in seen)


# -- what fabstack did not create is never touched -----------------------------------------

ROOT_PASSWD = "root:x:0:0:root:/root:/bin/bash\ngroups root\ngid 0\npassword $\n"


def test_an_account_fabstack_did_not_create_is_refused_before_any_change(make_host):
    """APP_NAME=root slipping past the settings: nothing runs, every conflict is named."""
    host, conn = make_host([(r"-- /opt/a ", "missing\n"), (r"getent passwd root", ROOT_PASSWD),
                            (r"getent group root", "root:x:0:\n"),
                            (r"cat /var/lib/fabstack/owned", "user app\ngroup app\n")])
    with pytest.raises(StepFailed) as err:
        ensure(host, Directory("/opt/a"), Group("root"),
               User("root", group="root", home="/var/opt/root"))
    assert conn.applied == [] and host.round_trips == 1
    assert err.value.what == "ownership" and "nothing was changed" in err.value.message
    assert "group root: exists on the host and was not created by fabstack" in err.value.message
    assert "user root: exists on the host and was not created by fabstack" in err.value.message


def test_the_fixed_service_accounts_existing_beforehand_are_refused(make_host, settings):
    """A host whose `celery` and `backups` accounts are someone else's (not in the record)."""
    from tasks import backup, db

    host, conn = make_host([(r"getent passwd (celery|backups)",
                             "x:x:120:120::/home/x:/bin/bash\ngroups x\ngid 120\npassword $\n"),
                            (r"getent group (celery|backups)", "x:x:120:\n"),
                            (r"cat /var/lib/fabstack/owned", "group ratemyderp\n"),
                            # every other resource: nothing there (none is planned: the
                            # refusal comes first)
                            (r"", "")])
    with pytest.raises(StepFailed) as err:
        ensure(host, *db.db_resources(host), *backup.backup_resources(host))
    assert conn.applied == []
    for what in ("group celery", "user celery", "group backups", "user backups"):
        assert f"{what}: exists on the host and was not created" in err.value.message


def test_objects_fabstack_created_are_managed_and_new_ones_recorded_first(make_host):
    host, conn = make_host([(r"getent group app$", "app:x:999:\n"),
                            (r"getent group new$", ""),  # no such group yet
                            (r"cat /var/lib/fabstack/owned", "group app\n")])
    assert ensure(host, Group("app"), Group("new")) == 1
    assert host.round_trips == 2  # probe (the record read with it), create
    claim, create = conn.applied[0].index("'group new' >> /var/lib/fabstack/owned"), \
        conn.applied[0].index("groupadd --system new")
    assert claim < create  # a run killed in between leaves the claim, not a stray group


def test_postgres_objects_not_created_by_fabstack_are_refused(make_host):
    from tasks.db import PostgresDatabase, PostgresRole

    host, conn = make_host([(r"FROM pg_authid", "t|SCRAM-SHA-256$4096:x$y:z\n"),
                            (r"FROM pg_database", "postgres|UTF8\n"),
                            (r"cat /var/lib/fabstack/owned", "")])  # fabstack created nothing
    with pytest.raises(StepFailed) as err:
        ensure(host, PostgresRole("shop", "a-password-of-16+"), PostgresDatabase("shop", "shop"))
    assert conn.applied == [] and host.round_trips == 1
    assert "postgresql role shop: exists on the host and was not created" in err.value.message
    assert "postgresql database shop: exists on the host and was not created" in err.value.message
    # PostgreSQL not running yet (a fresh host): nothing exists, nothing to refuse
    host, conn = make_host([(r"FROM pg_authid", "unavailable\n"),  # psql cannot connect
                            (r"cat /var/lib/fabstack/owned", "")])
    ensure(host, PostgresRole("shop", "a-password-of-16+"))
    assert "'role shop' >> /var/lib/fabstack/owned" in conn.applied[0]


def test_a_fresh_provision_refuses_before_the_base_system_changes(make_host, monkeypatch):
    """Without apt lists the base system goes first: the later steps' objects are checked
    before it does."""
    from contextlib import nullcontext

    from tasks import provision

    celery = "celery:x:120:120::/home/c:/bin/bash\ngroups c\ngid 120\npassword $\n"
    host, conn = make_host([(r"getent passwd celery", celery),
                            # every other resource: nothing there, no apt lists (none is
                            # planned: the refusal comes first)
                            (r"", "")])
    monkeypatch.setattr(provision, "session", lambda c, title, check: nullcontext(host))
    monkeypatch.setattr(provision.python, "facts", lambda h, version: ({"ID": "debian"}, None))
    with pytest.raises(StepFailed, match="user celery: exists on the host"):
        provision.all.body(None)
    assert conn.applied == []


@pytest.mark.parametrize("proxy, secret", [("http://ops:pr0xy-pw@10.0.0.1:3128", True),
                                           ("http://10.0.0.1:3128", False)])
def test_proxy_files_are_root_only_and_secret_when_the_proxy_has_a_password(proxy, secret):
    """apt and pip run as root: nobody else reads the proxy's password."""
    from types import SimpleNamespace

    from tasks import provision
    from tasks import settings as settings_mod
    from tests.conftest import VALID

    s = settings_mod.parse({**VALID, "HTTP_PROXY": proxy})
    files = provision.network_resources(SimpleNamespace(settings=s))[:2]
    assert [(f.path, f.owner, f.mode, f.secret) for f in files] == [
        ("/etc/apt/apt.conf.d/80fabstack-proxy", "root", 0o600, secret),
        ("/etc/pip.conf", "root", 0o600, secret)]


# -- a change and the re-probe of the rest share a round trip (real /bin/sh here) ------------

def local_shell(command, stdin, wait):
    """Run the host's command here, as sshd would run it there (its script on stdin)."""
    res = subprocess.run(command, shell=True, input=stdin, capture_output=True, text=True,
                         timeout=wait)
    return Result(res.stdout, res.stderr, res.returncode)


def made(path, script="echo made > {p}"):
    return Command(f"make {path.name}", script.format(p=path), creates=str(path))


def test_each_change_carries_the_probe_of_the_rest_and_a_rerun_changes_nothing(settings,
                                                                              tmp_path):
    host = Host(FakeConnection(), settings, executor=local_shell)
    # the probe of b runs after a's change, in its round trip: a's file is already there
    b = Command("b", "true", unless=f"test -e {tmp_path / 'a'}", message="ran")
    assert ensure(host, made(tmp_path / "a"), b, made(tmp_path / "c")) == 2
    assert host.round_trips == 3  # probe; make a + probe b and c; make c
    assert [line[:2] for line in host.report.lines] == [
        ("changed", "make a"), ("ok", "b"), ("changed", "make c")]
    host = Host(FakeConnection(), settings, executor=local_shell)
    assert ensure(host, made(tmp_path / "a"), b, made(tmp_path / "c")) == 0
    assert host.round_trips == 1


def test_a_change_reads_ahead_past_the_next_change_and_the_rest_when_reached(settings,
                                                                          tmp_path):
    scripts = []

    def shell(command, stdin, wait):
        scripts.append(stdin)
        return local_shell(command, stdin, wait)

    files = [tmp_path / f"f{n}" for n in range(8)]
    # a fresh host: every change's round trip reads the next one and READ_AHEAD (3) more
    host = Host(FakeConnection(), settings, executor=shell)
    assert ensure(host, *map(made, files)) == 8
    assert host.round_trips == 9  # probe; each change with its read-ahead, no probe between
    assert f"test -e {files[4]}" in scripts[1] and f"test -e {files[5]}" not in scripts[1]
    # a change that makes the later resources right: they are read again when reached
    scripts.clear()
    host = Host(FakeConnection(), settings, executor=shell)
    later = [made(tmp_path / f"g{n}") for n in range(8)]
    first = made(tmp_path / "all", "touch " + " ".join(r.creates for r in later) + " {p}")
    assert ensure(host, first, *later) == 1
    assert host.round_trips == 3  # probe; the change with g0..g3; g4..g7 when reached
    assert [line[0] for line in host.report.lines] == ["changed"] + ["ok"] * 8
    assert f"test -e {later[3].creates}" in scripts[1]
    assert f"test -e {later[4].creates}" not in scripts[1]


def test_a_failing_change_stops_before_the_rest_is_read_or_changed(settings, tmp_path):
    host = Host(FakeConnection(), settings, executor=local_shell)
    host._secrets = ["hunter2-xyz"]
    failing = made(tmp_path / "a", "echo 'no: hunter2-xyz' >&2\nfalse\ntouch {p}.after")
    later = Command("later", f"touch {tmp_path / 'later'}", unless="false")
    with pytest.raises(StepFailed) as err:
        ensure(host, failing, later)
    assert err.value.what == "make a" and err.value.message == "exit 1: no: ********"
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # set -e: nothing after `false`
    assert [line[:2] for line in host.report.lines] == []  # reported by the session
    assert host.round_trips == 2


def test_a_change_cannot_read_the_probe_that_follows_it(settings, tmp_path):
    host = Host(FakeConnection(), settings, executor=local_shell)
    reader = made(tmp_path / "a", "cat > {p}")  # a command that reads its input
    assert ensure(host, reader, made(tmp_path / "b")) == 2
    assert (tmp_path / "a").read_text() == "" and (tmp_path / "b").read_text() == "made\n"
