"""ensure() over the fake connection: batching, re-probing, check mode, failures, secrets."""

import pytest

from tasks.host import Host, Result, StepFailed
from tasks.primitives import Directory, File, Note, Service, ensure
from tests.fake import FakeConnection

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


def test_notes_read_nothing_and_keep_the_other_states_in_place(make_host):
    host, conn = make_host([(r"-- /opt/a ", "missing\n")] + CONVERGED)
    changed = ensure(host, Note("first", "skipped: why"), Directory("/opt/a"),
                     Note("second", "skipped too"), Directory("/opt/b"))
    assert changed == 1 and "mkdir -p -- /opt/a" in conn.applied[0]
    assert host.round_trips == 3  # probe, apply, probe of /opt/b (the notes read nothing)
    assert [line[:2] for line in host.report.lines] == [
        ("ok", "first"), ("changed", "directory /opt/a"), ("ok", "second"),
        ("ok", "directory /opt/b")]
    host, conn = make_host([(r"-- /opt/a ", "missing\n")])
    assert ensure(host, Directory("/opt/a"), Note("last", "nothing to read")) == 1
    assert host.round_trips == 2  # probe, apply: no probe for the note left
    host, conn = make_host()
    assert ensure(host, Note("only", "nothing to do")) == 0
    assert conn.scripts == [] and host.round_trips == 0


def test_change_applies_then_reprobes_the_rest(make_host):
    host, conn = make_host([(r"-- /opt/a ", "missing\n")] + CONVERGED)
    assert ensure(host, Directory("/opt/a"), Directory("/opt/b")) == 1
    assert len(conn.applied) == 1 and "mkdir -p -- /opt/a" in conn.applied[0]
    assert conn.applied[0].startswith("set -e\n")
    assert host.round_trips == 3  # probe, apply, probe of what is left


def test_check_mode_probes_only_and_reports_would_change(make_host, capsys):
    host, conn = make_host([(r"-- /etc/x ", "missing\n")] + CONVERGED, check=True)
    assert ensure(host, File("/etc/x", "new\n", notify=["nginx:reload"]), Service("nginx")) == 2
    assert conn.applied == []
    out = capsys.readouterr().out
    assert "would change file /etc/x: created" in out
    assert "+new" in out
    # the service is planned for reload because the file would change it
    assert "would change service nginx.service: reloaded" in out


def test_failed_change_raises_with_step_name(make_host):
    host, _conn = make_host([(r"-- /opt/a ", "missing\n")], failing=[r"mkdir"])
    with pytest.raises(StepFailed) as err:
        ensure(host, Directory("/opt/a"))
    assert err.value.what == "directory /opt/a"
    assert "simulated failure" in err.value.message


def test_scripts_go_on_stdin_never_in_the_command_line(make_host):
    host, conn = make_host([(r"-- /etc/secret ", "missing\n")])
    ensure(host, File("/etc/secret", "PASSWORD=hunter2-xyz\n", mode=0o600, secret=True))
    assert set(conn.commands) == {"timeout -k 5 300 /bin/sh -s", "timeout -k 5 1800 /bin/sh -s"}
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
    assert seen[-1] == ("sudo -k -S -p '' timeout -k 5 1800 /bin/sh -s", "s3cret-pw\necho hi")
    assert all("s3cret" not in command for command, _ in seen)
