"""The SSH layer of tasks/host.py: a dropped connection or a killed command, reported clearly."""

import io
import subprocess
import threading
import time
from types import SimpleNamespace

import pytest
from invoke.exceptions import Exit

from tasks import host as host_mod
from tasks.host import ConnectionLost, Host, Result, StepFailed, session, ssh_exec
from tasks.primitives import BACKGROUND_NICE, Directory, ensure
from tests.conftest import VALID
from tests.fake import FakeConnection


class FakeChannel:
    """A paramiko channel whose command ends with ``code`` (-1: no exit status came)."""

    def __init__(self, code: int, stdout: bytes = b"", silent: bool = False):
        self.code, self.stdout, self.silent = code, stdout, silent
        self.status_event = threading.Event()
        self.status_event.set()

    def settimeout(self, seconds):
        self.timeout = seconds

    def exec_command(self, command):
        pass

    def sendall(self, data):
        pass

    def shutdown_write(self):
        pass

    def makefile(self, mode):
        if self.silent:  # what paramiko does when nothing comes within the channel's timeout
            raise TimeoutError
        return io.BytesIO(self.stdout)

    def makefile_stderr(self, mode):
        return io.BytesIO(b"")

    def recv_exit_status(self):
        return self.code

    def close(self):
        pass


class FakeTransport:
    def __init__(self, channel: FakeChannel, active: bool):
        self.channel, self.active, self.sock = channel, active, None

    def open_session(self):
        return self.channel

    def join(self, timeout=None):
        pass

    def is_active(self):
        return self.active


def conn_with(code: int, active: bool, stdout: bytes = b"", silent: bool = False):
    return SimpleNamespace(open=lambda: None,
                           transport=FakeTransport(FakeChannel(code, stdout, silent), active))


def test_a_connection_that_dies_under_a_command_is_lost():
    with pytest.raises(ConnectionLost, match="closed before the command finished"):
        ssh_exec(conn_with(-1, active=False), "/bin/sh -s", "sleep 60", 10)


def test_a_command_killed_by_a_signal_on_a_live_connection_is_its_own_failure():
    res = ssh_exec(conn_with(-1, active=True, stdout=b"partial"), "/bin/sh -s", "kill -9 $$",
                   10)
    assert (res.exited, res.stdout) == (-1, "partial")


def test_lost_connection_fails_the_running_step_naming_the_host(make_host):
    host, conn = make_host([(r"-- /opt/a ", "missing\n")])

    def execute(command, stdin, wait):
        if "mkdir" in stdin:
            raise ConnectionLost("the SSH connection closed before the command finished")
        return conn.exec_script(command, stdin)

    host._exec = execute
    with pytest.raises(StepFailed) as err:
        ensure(host, Directory("/opt/a"))
    assert err.value.what == "directory /opt/a"
    assert err.value.message.startswith("lost the connection to fakehost during this step "
                                        "(the SSH connection closed before the command finished)")


def test_a_command_killed_by_a_signal_says_so(make_host):
    host, _conn = make_host()
    host._exec = lambda command, stdin, wait: Result("", "Reading package lists...", 137)
    with pytest.raises(StepFailed, match=r"^packages: exit 137 \(killed by signal 9\): Reading"):
        host.run("apt-get install -y neovim", what="packages")


class FakeHolder:
    """The host lock's holder: answers ``answer`` (what the host's flock script prints)."""

    made: list = []

    def __init__(self, conn=None, command="", stdin="", wait=0, answer="locked"):
        self.command, self.stdin, self._answer, self.closed = command, stdin, answer, False
        FakeHolder.made.append(self)

    def answer(self):
        return self._answer

    def close(self):
        self.closed = True


def fake_context(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{key}={value}\n" for key, value in VALID.items()))
    return SimpleNamespace(config={"fabstack": {"env_file": str(env_file)}}, host="fakehost",
                           user="root", original_host=None)


def test_session_names_the_step_a_connection_error_cut(tmp_path, monkeypatch, capsys):
    """An SSH error after the host answered once belongs to the step that was running."""
    fake = FakeConnection(answers=[(r"-- /opt/a ", "missing\n")])

    def execute(conn, command, stdin, wait):
        if "mkdir" in stdin:
            raise OSError("Socket is closed")
        return fake.exec_script(command, stdin)

    monkeypatch.setattr(host_mod, "ssh_exec", execute)
    monkeypatch.setattr(host_mod, "HeldCommand", FakeHolder)
    with pytest.raises(Exit) as exc, session(fake_context(tmp_path), "provision") as h:
        ensure(h, Directory("/opt/a"))
    assert exc.value.code == 1
    out = capsys.readouterr().out
    assert "[fakehost] failed       directory /opt/a: cannot talk to fakehost: Socket is closed" \
        in out


def test_session_before_any_answer_blames_the_connection(tmp_path, monkeypatch, capsys):
    def refuse(conn, command, stdin, wait):
        raise ConnectionRefusedError("Connection refused")

    monkeypatch.setattr(host_mod, "ssh_exec", refuse)
    monkeypatch.setattr(host_mod, "HeldCommand", FakeHolder)
    with pytest.raises(Exit), session(fake_context(tmp_path), "provision") as h:
        ensure(h, Directory("/opt/a"))
    assert "[fakehost] failed       connection: cannot talk to fakehost: Connection refused" \
        in capsys.readouterr().out


class FakeSftp:
    """Records what an upload does, in order: the folder's mode before any file is opened."""

    def __init__(self):
        self.calls, self.data = [], io.BytesIO()

    def mkdir(self, path, mode=0o777):
        self.calls.append(("mkdir", path, mode))

    def open(self, path, mode):
        self.calls.append(("open", path, mode))
        sftp = self

        class File(io.BytesIO):
            def set_pipelined(self, on):
                pass

            def close(self):
                sftp.data.write(self.getvalue())
                super().close()
        return File()


@pytest.mark.parametrize("source", [b"archive bytes", "file"])
def test_an_upload_lands_in_a_folder_private_before_it_is_written(make_host, tmp_path, source):
    h, conn = make_host()
    sftp = FakeSftp()
    conn.open, conn.sftp = (lambda: None), (lambda: sftp)
    if source == "file":
        (tmp_path / "x.dump").write_bytes(b"dump bytes")
        source = str(tmp_path / "x.dump")
    path = h.upload(source, "x.dump", "upload dump")
    folder = path.rsplit("/", 1)[0]
    assert sftp.calls == [("mkdir", folder, 0o700), ("open", path, "wb")]
    assert sftp.data.getvalue() in (b"archive bytes", b"dump bytes")
    assert h.drop_upload(path) == f"rm -rf -- {folder}" and folder.startswith("/tmp/fabstack-")


def test_every_script_runs_under_timeout_and_says_so_when_it_expires(settings):
    seen = []

    def hang(command, stdin, wait):  # what coreutils timeout returns once it stopped the script
        seen.append((command, wait))
        time.sleep(1)
        return Result("", "", 124)

    h = Host(FakeConnection(host="web1"), settings, executor=hang, command_timeout=600)
    with pytest.raises(StepFailed) as err:
        h.run("psql -c 'select pg_sleep(9999)'", what="row counts", timeout=1)
    assert seen == [("timeout -k 5 1 nice -n 10 /bin/sh -s", 1 + 5 + 30)]
    assert err.value.what == "row counts"
    assert err.value.message.startswith("timed out after 1 s on web1 (stopped with everything")
    h.run("true", check=False)
    assert seen[-1][0] == "timeout -k 5 600 nice -n 10 /bin/sh -s"


def test_every_script_first_lowers_its_sessions_cpu_priority(settings):
    seen = []
    h = Host(FakeConnection(), settings,
             executor=lambda command, stdin, wait: seen.append(stdin) or Result("", "", 0))
    h.run("echo hi")
    assert seen == [f"{host_mod.BACKGROUND}echo hi"]
    # as the host's sh runs it, in a session of its own (the autogroup of this test's run is
    # not touched): quietly, and the script goes on
    res = subprocess.run(["sh", "-s"], input=seen[0].replace("echo hi", "cat /proc/self/autogroup"),
                         capture_output=True, text=True, start_new_session=True)
    assert (res.returncode, res.stderr) == (0, "")
    assert res.stdout.endswith(f" nice {BACKGROUND_NICE}\n")


def test_a_quick_exit_124_is_the_scripts_own_failure(settings):
    h = Host(FakeConnection(), settings, executor=lambda command, stdin, wait: Result("", "x", 124))
    with pytest.raises(StepFailed) as err:
        h.run("exit 124", what="step")
    assert err.value.message == "exit 124: x"


def test_a_host_that_stops_answering_times_out_on_the_channel(settings):
    with pytest.raises(host_mod.ChannelTimeout):
        ssh_exec(conn_with(0, True, silent=True), "true", "", 10)

    def silent(command, stdin, wait):
        raise host_mod.ChannelTimeout

    h = Host(FakeConnection(host="web1"), settings, executor=silent, probe_timeout=60)
    with pytest.raises(StepFailed) as err:
        h.probe(["true"])
    assert err.value.message == "timed out after 95 s on web1: the host stopped answering"


def test_the_first_command_waits_for_the_host_lock_then_it_is_held_to_the_end(settings):
    conn = FakeConnection(answers=[(r"-- /opt/a ", "missing\n")])
    holders = []
    h = Host(conn, settings, executor=conn.exec_script, lock="provision",
             holder=lambda command, stdin: holders.append(FakeHolder(None, command, stdin))
             or holders[-1])
    ensure(h, Directory("/opt/a"))
    [holder] = holders
    assert holder.command == "/bin/sh -s"
    token = h._lock_token
    assert holder.stdin.startswith(f"lock=/run/fabstack.lock\nwait=10\ntoken={token}\n")
    assert ", task provision" in holder.stdin
    assert conn.scripts[0].startswith(f"lock=/run/fabstack.lock\ntoken={token}\n")
    assert all(token not in script for script in conn.scripts[1:])
    assert not holder.closed
    h.release_lock()
    assert holder.closed


def test_the_lock_scripts_hold_the_lock_and_refuse_a_second_run(settings, tmp_path):
    """The holder and the gate, run by sh on a lock file here (flock, as on the host)."""
    lock = tmp_path / "fabstack.lock"

    def scripts(task):
        h = Host(FakeConnection(), settings, lock=task)
        here = f"lock={lock}\n"
        return (h._lock_script().replace("lock=/run/fabstack.lock\n", here)
                .replace("wait=10\n", "wait=0\n"),
                h._lock_gate().replace("lock=/run/fabstack.lock\n", here) + "echo through\n")

    def sh(text):
        return subprocess.run(["sh", "-s"], input=text, capture_output=True, text=True,
                              timeout=20)

    holder, gate = scripts("deploy")
    first = subprocess.Popen(["sh", "-s"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    try:
        first.stdin.write(holder)
        first.stdin.flush()
        assert first.stdout.readline() == "locked\n"
        assert sh(gate).stdout == "through\n"  # the first command of the run goes ahead
        holder2, gate2 = scripts("provision")
        res = sh(holder2)
        assert res.returncode == 3 and res.stdout.startswith("busy ")
        assert res.stdout.rstrip().endswith(", task deploy")
        started = time.monotonic()
        res = sh(gate2)  # the refused run's first command stops at once
        assert res.returncode == host_mod.LOCK_GATE_EXIT and res.stdout == ""
        assert time.monotonic() - started < 5
    finally:
        first.stdin.close()  # the channel closes: the lock goes with it
        first.wait(timeout=10)
    holder3, _ = scripts("backup-db")
    assert sh(holder3).stdout == "locked\n"


def test_a_run_refused_by_the_host_lock_says_who_holds_it(settings):
    conn = FakeConnection(answers=[(r"^true$", "")])  # `true` prints nothing
    busy = "busy ann@laptop since 2026-11-30 04:00:00 UTC, task deploy"
    h = Host(conn, settings, executor=conn.exec_script, lock="provision",
             holder=lambda command, stdin: FakeHolder(answer=busy))
    with pytest.raises(StepFailed) as err:
        h.probe(["true"])
    assert err.value.what == "host lock"
    assert err.value.message == ("another fabstack run holds the host lock: ann@laptop since "
                                 "2026-11-30 04:00:00 UTC, task deploy (waited 10 s); nothing "
                                 "was done")


@pytest.mark.parametrize("check, lock", [(True, True), (False, False)])
def test_check_mode_and_read_only_tasks_take_no_lock(tmp_path, monkeypatch, check, lock):
    fake = FakeConnection(answers=[(r"^true$", "")])  # `true` prints nothing
    monkeypatch.setattr(host_mod, "ssh_exec", lambda conn, command, stdin, wait:
                        fake.exec_script(command, stdin))
    FakeHolder.made = []
    monkeypatch.setattr(host_mod, "HeldCommand", FakeHolder)
    with session(fake_context(tmp_path), "deploy", check=check, lock=lock) as h:
        h.probe(["true"])
    assert FakeHolder.made == [] and "flock" not in fake.scripts[0]


def test_a_lock_that_cannot_be_taken_is_not_blamed_on_another_run(settings):
    conn = FakeConnection()
    h = Host(conn, settings, executor=conn.exec_script, lock="deploy",
             holder=lambda command, stdin: FakeHolder(answer=""))
    with pytest.raises(StepFailed) as err:
        h.run("true")
    assert err.value.message == ("could not take the host lock (/run/fabstack.lock: no answer); "
                                 "nothing was done")
