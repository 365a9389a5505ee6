"""A target host as the library sees it: one SSH connection, scripts over stdin, a report.

:class:`Host` runs each step's shell script (:meth:`~Host.run`, :meth:`~Host.probe`,
:meth:`~Host.apply`) as root by feeding it to ``/bin/sh -s`` on its standard input (under
sudo as another user, its password, when one is needed, on the same stdin), so nothing in
it, secrets included, appears in a process's arguments; and under coreutils ``timeout``
(``fabstack.command_timeout``, probes ``fabstack.probe_timeout``), which stops it with
everything it started; at ``primitives.BACKGROUND_NICE`` (its SSH session's autogroup too), so
that the site's requests come first. A run that changes the host holds its lock
(:data:`LOCK_FILE`: a ``flock`` held by a shell on an SSH channel of its own, so it goes with
the connection) from its first command, which waits on the host until the lock is held, to its
end. The host counts SSH round trips, masks secrets in everything it prints and collects a
:class:`Report`; tasks open one with :func:`session`. The interactive sessions (``db.psql``,
``db.redis-cli``), ``manage``'s command and ``fab logs``'s stream do not go through
:meth:`~Host.run`: they have no timeout, and their command lines hold no secret.
"""

from __future__ import annotations

import getpass
import os
import posixpath
import shlex
import shutil
import socket
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from urllib.parse import quote

from fabric import Connection, task
from invoke.exceptions import Exit
from paramiko import RejectPolicy, SSHException

from . import inventory, primitives
from . import settings as settings_mod
from .scripts import script

MASK = "********"
CHECK_HELP = "Show what would change and change nothing."  # every converging task's --check
PROBE_MARK = "@@fabstack-probe@@"
DIFF_LINES = 40  # longer diffs are cut in the report
COMMAND_TIMEOUT = 1800  # seconds: apt installs and upgrades can take many minutes
PROBE_TIMEOUT = 300  # seconds: reading state is quick, a probe that hangs is stuck
KILL_AFTER = 5  # seconds between timeout's TERM and its KILL
CHANNEL_GRACE = 30  # seconds the SSH channel waits beyond the remote timeout
LOCK_FILE = "/run/fabstack.lock"  # flock-ed by the run that holds the host; says who it is
# (LOCK_FILE.refused: the last run refused, so that its first command stops waiting)
LOCK_WAIT = 10  # seconds a run waits for another to release the host lock
LOCK_GATE_EXIT = 75  # the first command's exit status when the lock was not taken
# Every command runs at primitives.BACKGROUND_NICE, the site's requests first; its script's
# first line sets its SSH session's autogroup to it (tasks/primitives/templates.py).
BACKGROUND = primitives.autogroup_nice("self", primitives.BACKGROUND_NICE) + "\n"


def say(text: str, out=None) -> None:
    """Print ``text`` and a newline on ``out`` (default: sys.stdout then) in one write: the
    lines of hosts run in parallel never interleave."""
    out = out or sys.stdout
    out.write(text + "\n")
    out.flush()


class ChannelTimeout(TimeoutError):
    """The host sent nothing more, not even timeout's verdict, within the channel's wait."""


class ConnectionLost(EOFError):
    """The SSH connection died while a command ran: its outcome on the host is unknown."""


class StepFailed(Exception):
    """A step could not be completed on the host; ``what`` names the step."""

    def __init__(self, what: str, message: str):
        super().__init__(f"{what}: {message}")
        self.what = what
        self.message = message


@dataclass
class Result:
    stdout: str
    stderr: str
    exited: int

    @property
    def ok(self) -> bool:
        return self.exited == 0


@dataclass
class Report:
    """What one run did to one host: every step's outcome, printed as it happens."""

    host: str
    check: bool = False
    out: object = None  # None: sys.stdout at the time of printing
    lines: list[tuple[str, str, str]] = field(default_factory=list)
    # check mode: the restart and reload markers (UNIT@ACTION) its planned changes would
    # leave on the host (primitives.Change.notify), read by the plans after them
    notified: set[str] = field(default_factory=set)

    def add(self, status: str, what: str, message: str, diff: str = "") -> None:
        self.lines.append((status, what, message))
        shown = "would change" if (self.check and status == "changed") else status
        text = f"[{self.host}] {shown:<12} {what}: {message}"
        if diff:
            lines = diff.splitlines()
            if len(lines) > DIFF_LINES:
                lines = lines[:DIFF_LINES] + [f"... ({len(lines) - DIFF_LINES} more lines)"]
            text += "".join(f"\n    {line}" for line in lines)
        say(text, self.out)

    def count(self, status: str) -> int:
        return sum(1 for line in self.lines if line[0] == status)

    @property
    def changes(self) -> list[str]:
        return [f"{what}: {message}" for status, what, message in self.lines
                if status == "changed"]

    def summary(self, title: str, seconds: float, round_trips: int) -> str:
        verb = "would change" if self.check else "changed"
        return (f"[{self.host}] {title}: {self.count('changed')} {verb}, {self.count('ok')} ok, "
                f"{self.count('failed')} failed in {seconds:.2f} s ({round_trips} SSH round trips)")


class Host:
    """One target host: runs scripts, batches probes, masks secrets, keeps the report."""

    def __init__(self, conn, settings: settings_mod.Settings, check: bool = False,
                 sudo_password: str | None = None, out=None, executor=None,
                 command_timeout: int = COMMAND_TIMEOUT, probe_timeout: int = PROBE_TIMEOUT,
                 lock: str | None = None, holder=None, site: inventory.Site | None = None):
        self.conn = conn
        self._exec = executor or (lambda command, stdin, wait: ssh_exec(conn, command, stdin,
                                                                        wait))
        self._hold = holder or (lambda command, stdin: HeldCommand(conn, command, stdin,
                                                                   LOCK_WAIT + CHANNEL_GRACE))
        # the task that takes the host lock at its first command (None: it takes none)
        self._lock_task = lock
        self._lock = None  # the lock's holder, once asked for
        self._lock_token = uuid.uuid4().hex
        self.command_timeout, self.probe_timeout = command_timeout, probe_timeout
        self.settings = settings
        self.check = check
        self.sudo_password = sudo_password
        # the host's name in the report: its inventory name, else the host fab was given
        self.name = site.me.name if site else conn.original_host
        # the hosts of its site and their roles (a whole stack: this host alone)
        self.site = site or inventory.Site.alone(self.name)
        self.report = Report(self.name, check=check, out=out)
        self.round_trips = 0
        self._sudo: str | None = None  # "root", "nopasswd" or "password"
        self._secrets = sorted(_secret_forms(settings.secrets), key=len, reverse=True)
        self.facts: dict[str, str] = {}
        self.step: str | None = None  # the step whose command runs (or ran last) on the host

    # -- output -------------------------------------------------------------
    def mask(self, text: str) -> str:
        """``text`` with every secret value (and its URL-encoded form) replaced by ****."""
        for secret in self._secrets:
            text = text.replace(secret, MASK)
        return text

    def ok(self, what: str, message: str) -> None:
        self.report.add("ok", what, self.mask(message))

    def changed(self, what: str, message: str, diff: str = "") -> None:
        self.report.add("changed", what, self.mask(message), self.mask(diff))

    def failed(self, what: str, message: str) -> None:
        self.report.add("failed", what, self.mask(message))

    # -- commands -----------------------------------------------------------
    def _raw(self, command: str, stdin: str, timeout: int | None = None) -> Result:
        """One command; ``timeout``: the one it runs under (coreutils timeout), if any."""
        wait = (timeout or self.probe_timeout) + KILL_AFTER + CHANNEL_GRACE
        started = time.monotonic()
        try:
            res = self._exec(command, stdin, wait)
        except ConnectionLost as exc:
            raise StepFailed(self.step or "connection", f"lost the connection to {self.name} "
                             f"during this step ({exc}); it may be half done: run the task "
                             "again to finish it") from exc
        except ChannelTimeout as exc:
            raise StepFailed(self.step or "connection", f"timed out after {wait} s on "
                             f"{self.name}: the host stopped answering") from exc
        self.round_trips += 1
        # 124: timeout's TERM ended it; 137: its KILL did (the script ignored TERM)
        if (timeout is not None and res.exited in (124, 137)
                and time.monotonic() - started >= timeout):
            raise StepFailed(self.step or "command", f"timed out after {timeout} s on "
                             f"{self.name} (stopped with everything it started; "
                             "fabstack.command_timeout sets the limit)")
        return res

    def _privilege(self) -> str:
        if self._sudo is None:
            if self.conn.user == "root":
                self._sudo = "root"
            elif self._raw("sudo -k -n true", "").ok:
                self._sudo = "nopasswd"
            elif self.sudo_password is None:
                raise StepFailed("sudo", f"user {self.conn.user} needs a sudo password: run fab "
                                 "with --prompt-for-sudo-password")
            elif self._raw("sudo -k -S -p '' true", self.sudo_password + "\n").ok:
                self._sudo = "password"
            else:
                raise StepFailed("sudo", f"sudo refused the password given for {self.conn.user}")
        return self._sudo

    def _root_command(self, shell: str, script: str) -> tuple[str, str]:
        """The command and stdin that run ``script`` with ``shell`` as root."""
        mode = self._privilege()
        if mode == "root":
            return shell, script
        if mode == "nopasswd":
            return f"sudo -n {shell}", script
        return f"sudo -k -S -p '' {shell}", self.sudo_password + "\n" + script

    # -- the host lock ------------------------------------------------------
    def _lock_script(self) -> str:
        """The holder: takes the lock (waiting LOCK_WAIT s), says who holds it, keeps it."""
        who = (f"{getpass.getuser()}@{socket.gethostname()} since "
               f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}, task {self._lock_task}")
        return script("host-lock.sh.j2", self.settings, lock=LOCK_FILE, wait=LOCK_WAIT,
                      token=self._lock_token, who=who)

    def _lock_gate(self) -> str:
        """Lines that wait until this run's holder has the lock (the first command's start)."""
        return script("host-lock-gate.sh.j2", self.settings, lock=LOCK_FILE,
                      token=self._lock_token, tries=(LOCK_WAIT + 5) * 100,
                      gate_exit=LOCK_GATE_EXIT)

    def _confirm_lock(self) -> None:
        answer = self._lock.answer()
        if answer == "locked":
            return
        self.step = "host lock"
        if answer.startswith("busy "):
            raise StepFailed("host lock", "another fabstack run holds the host lock: "
                             f"{answer.removeprefix('busy ')} (waited {LOCK_WAIT} s); "
                             "nothing was done")
        raise StepFailed("host lock", f"could not take the host lock ({LOCK_FILE}: "
                         f"{answer or 'no answer'}); nothing was done")

    def take_lock(self) -> None:
        """Hold the host lock now (it is otherwise taken by the first command)."""
        if self._lock_task is not None and self._lock is None:
            self.run(":", what="host lock")

    def lock_values(self) -> dict[str, str]:
        """The shell values by which a program on the host tells that this run still holds the
        host lock (files/healthy.sh.j2: run_alive); none for a run that takes no lock."""
        return {"token": self._lock_token, "lock": LOCK_FILE} if self._lock_task else {}

    def release_lock(self) -> None:
        """Let the host lock go (closing its channel ends the holder), if this run holds it."""
        if self._lock is not None:
            self._lock.close()

    def run(self, script: str, what: str = "command", check: bool = True,
            timeout: int | None = None) -> Result:
        """Run ``script`` as root with ``/bin/sh``, at ``primitives.BACKGROUND_NICE``; raise
        StepFailed if it fails and ``check``.

        ``what`` names the step in the report, and in the error if the connection drops or
        the script outlives ``timeout`` seconds (default: the host's ``command_timeout``).
        """
        self.step = what
        timeout = timeout or self.command_timeout
        first = self._lock_task is not None and self._lock is None
        if first:
            self._lock = self._hold(*self._root_command("/bin/sh -s", self._lock_script()))
            script = self._lock_gate() + script
        res = self._raw(*self._root_command(
            f"timeout -k {KILL_AFTER} {timeout} nice -n {primitives.BACKGROUND_NICE} /bin/sh -s",
            BACKGROUND + script), timeout)
        if first:
            self._confirm_lock()
        if check and not res.ok:
            detail = (res.stderr.strip() or res.stdout.strip() or "no output")[-2000:]
            status = f"exit {res.exited}"
            if 128 < res.exited < 160:  # the shell's report of a command killed by a signal
                status += f" (killed by signal {res.exited - 128})"
            raise StepFailed(what, self.mask(f"{status}: {detail}"))
        return res

    def upload(self, source: bytes | str, name: str, what: str) -> str:
        """Copy ``source`` (bytes, or the path of a file here) to the host by SFTP; its path there.

        It lands in a new folder of /tmp made 0700 before anything is written into it, so
        nobody else on the host can open the file at any moment; :meth:`drop_upload` gives
        the shell line that removes folder and file.
        """
        self.take_lock()
        self.step = what
        folder = f"/tmp/fabstack-{uuid.uuid4().hex}"
        self.conn.open()
        sftp = self.conn.sftp()
        sftp.mkdir(folder, mode=0o700)
        path = f"{folder}/{name}"
        with sftp.open(path, "wb") as f:
            f.set_pipelined(True)
            if isinstance(source, bytes):
                f.write(source)
            else:
                with open(source, "rb") as local:
                    shutil.copyfileobj(local, f, 1 << 20)
        self.round_trips += 1
        return path

    @staticmethod
    def drop_upload(path: str) -> str:
        """The shell line that removes an :meth:`upload` and its private folder."""
        return f"rm -rf -- {shlex.quote(posixpath.dirname(path))}"

    def probe(self, snippets: list[str]) -> list[str]:
        """Run read-only shell ``snippets`` in one round trip; return each one's stdout."""
        if not snippets:
            return []
        res = self.run(_probe_script(snippets), what="probe host state", check=False,
                       timeout=self.probe_timeout)
        return self._answers(res, snippets)

    def apply(self, script: str, snippets: list[str], what: str) -> list[str]:
        """Run the change ``script`` under ``set -e`` as :meth:`run` does (StepFailed naming
        ``what`` if it fails), then, in the same round trip, the read-only ``snippets`` as
        :meth:`probe` does; return each snippet's stdout.

        The change runs in a subshell with its input from /dev/null (so no command of it can
        read the snippets); the snippets run only when it succeeded, and their exit status
        is not the step's.
        """
        if not snippets:
            self.run("set -e\n" + script, what=what)
            return []
        res = self.run(f"(\nset -e\n{script}\n) </dev/null\nstatus=$?\n"
                       "[ $status -eq 0 ] || exit $status\n" + _probe_script(snippets)
                       + "true\n", what=what)
        return self._answers(res, snippets)

    def _answers(self, res: Result, snippets: list[str]) -> list[str]:
        """Each snippet's stdout from the output of :func:`_probe_script`'s script."""
        parts = res.stdout.split(PROBE_MARK)[1:]
        if len(parts) != len(snippets):
            raise StepFailed("probe host state", self.mask(
                f"expected {len(snippets)} answers, got {len(parts)}: {res.stderr.strip()}"))
        return [part.split("\n", 1)[1] if "\n" in part else "" for part in parts]


def _probe_script(snippets: list[str]) -> str:
    """The script that runs ``snippets`` one after the other, each output after its mark."""
    return "".join(f"echo '{PROBE_MARK}{i}'\n{snippet}\n" for i, snippet in enumerate(snippets))


def ssh_exec(conn, command: str, stdin: str, wait: float) -> Result:
    """Run ``command`` on Fabric connection ``conn`` with ``stdin`` as its input: one round trip.

    Goes straight to a paramiko channel: Invoke's stdin pump feeds a byte per
    10 ms, far too slow for scripts. Raises ChannelTimeout when the host sends nothing
    for ``wait`` seconds.
    """
    conn.open()
    sock = conn.transport.sock
    if isinstance(sock, socket.socket) and not sock.getsockopt(socket.IPPROTO_TCP,
                                                                socket.TCP_NODELAY):
        # Without it, Nagle's algorithm and delayed ACKs cost ~40 ms per command.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    chan = conn.transport.open_session()
    chan.settimeout(wait)
    try:
        chan.exec_command(command)
        stderr = bytearray()

        def feed():
            chan.sendall(stdin.encode())
            chan.shutdown_write()

        def drain_stderr():
            with chan.makefile_stderr("rb") as f:
                stderr.extend(f.read())

        threads = [threading.Thread(target=feed, daemon=True),
                   threading.Thread(target=drain_stderr, daemon=True)]
        for t in threads:
            t.start()
        with chan.makefile("rb") as f:
            stdout = f.read()
        for t in threads:
            t.join()
        if not chan.status_event.wait(wait):
            raise ChannelTimeout
        code = chan.recv_exit_status()
    except TimeoutError as exc:
        raise ChannelTimeout from exc
    finally:
        chan.close()
    if code == -1 and _connection_lost(conn.transport):
        raise ConnectionLost("the SSH connection closed before the command finished")
    return Result(stdout.decode(errors="replace"), stderr.decode(errors="replace"), code)


class HeldCommand:
    """A command that runs as long as its SSH channel stays open (the host lock's holder).

    ``stdin`` is sent and left open: the command sees its end when the channel closes,
    by :meth:`close` or with the connection (fab killed, network gone).
    """

    def __init__(self, conn, command: str, stdin: str, wait: float):
        conn.open()
        self.chan = conn.transport.open_session()
        self.chan.settimeout(wait)
        self.chan.exec_command(command)
        self.chan.sendall(stdin.encode())
        self.out = self.chan.makefile("rb")

    def answer(self) -> str:
        """The command's first line of output ("" if none came)."""
        try:
            return self.out.readline().decode(errors="replace").strip()
        except (OSError, EOFError, SSHException):
            return ""

    def close(self) -> None:
        self.chan.close()


def _connection_lost(transport) -> bool:
    """True when ``transport`` died (a command without an exit status may have been killed).

    paramiko closes the channels before it marks the transport inactive, so wait for its
    thread to end; a live connection costs that wait, but only after a killed command.
    """
    transport.join(timeout=1)
    return not transport.is_active()


def _secret_forms(secrets: list[str]) -> set[str]:
    forms: set[str] = set()
    for secret in secrets:
        if len(secret) < 4:
            continue
        forms.update({secret, quote(secret, safe=""), shlex.quote(secret)})
    return forms


def check_host_keys(c) -> None:
    """Make ``c`` verify the server's host key (Fabric alone accepts any key).

    Known keys come from ~/.ssh/known_hosts and the ``UserKnownHostsFile`` of the
    host's ssh_config entry; an unknown or changed key refuses the connection.
    """
    client = getattr(c, "client", None)
    if client is None:
        return
    client.set_missing_host_key_policy(RejectPolicy())
    client.load_system_host_keys()
    for path in c.ssh_config.get("userknownhostsfile", "").split():
        path = os.path.expanduser(path)
        if os.path.isfile(path):
            client.load_host_keys(path)


@dataclass(frozen=True)
class Summary:
    """What a :func:`session` did to its host, in figures (a parallel run's table row)."""

    title: str
    changed: int
    ok: int
    failed: int
    seconds: float
    round_trips: int


_last = threading.local()  # .summary: the Summary of the thread's last session


def last_summary() -> Summary | None:
    """The :class:`Summary` of the last :func:`session` this thread ended (None: none)."""
    return getattr(_last, "summary", None)


def load_config(config) -> tuple[settings_mod.Settings, dict[str, inventory.HostEntry]]:
    """The settings (every template rendered with them once) and the inventory of Fabric
    configuration ``config``; a clear error (exit 2) if either is unusable."""
    cfg = config.get("fabstack", {})
    try:
        settings = settings_mod.load(cfg.get("env_file", ".env"))
        primitives.prerender(settings)
        hosts = inventory.load(config)
        if any(not entry.whole for entry in hosts.values()) and not settings["REDIS_PASSWORD"]:
            raise inventory.InventoryError(
                "REDIS_PASSWORD: missing in the settings; the inventory spreads the site over "
                "several hosts, where Redis listens on its private address and asks for it")
        if (len([e for e in hosts.values() if not e.whole and e.roles & {"web", "worker"}]) > 1
                and not settings["MEDIA_KEY"]):
            raise inventory.InventoryError(
                "MEDIA_KEY: missing in the settings; the inventory gives the site several web "
                "or worker hosts, which mount the db host's media folder with it (make one with "
                "ssh-keygen -t ed25519 -N '' -f PATH)")
    except (settings_mod.SettingsError, primitives.TemplateError,
            inventory.InventoryError) as exc:
        raise Exit(f"error: {exc}\nNothing was changed on any host.", code=2) from None
    return settings, hosts


@contextmanager
def session(c, title: str, check: bool = False, lock: bool = True):
    """Open a :class:`Host` for task ``title`` on connection ``c`` and print its report.

    Settings are loaded and validated first (before any connection is opened);
    failures become a non-zero exit with the step and reason named. Unless ``lock`` is
    false (tasks that only read) or in check mode, the run holds the host lock from its
    first command on. The thread's :func:`last_summary` is the run's when it ends.
    """
    if getattr(c, "host", None) is None:  # fab was given no host: an invoke Context
        raise Exit("error: no host to act on: give one with -H HOST, or declare the hosts in "
                   "fabric.yaml (fabstack.hosts)", code=2)
    _last.summary = None
    cfg = c.config.get("fabstack", {})
    check = check or bool(cfg.get("check", False))
    settings, hosts = load_config(c.config)
    check_host_keys(c)
    host = Host(c, settings, check=check,
                sudo_password=c.config.get("sudo", {}).get("password"),
                command_timeout=int(cfg.get("command_timeout", COMMAND_TIMEOUT)),
                probe_timeout=int(cfg.get("probe_timeout", PROBE_TIMEOUT)),
                lock=title if lock and not check else None,
                site=inventory.site_of(hosts, c.original_host or c.host))
    started = time.monotonic()
    failure = None
    try:
        yield host
    except StepFailed as exc:
        host.failed(exc.what, exc.message)
        failure = exc
    except (OSError, EOFError, SSHException) as exc:  # refused, unknown key, lost connection
        # a step that started names itself; before the first answer, the connection failed
        what = host.step if host.round_trips and host.step else "connection"
        host.failed(what, f"cannot talk to {host.name}: {exc or type(exc).__name__}")
        failure = exc
    finally:
        host.release_lock()
        seconds = time.monotonic() - started
        report = host.report
        say(report.summary(title, seconds, host.round_trips))
        _last.summary = Summary(title, report.count("changed"), report.count("ok"),
                                report.count("failed"), seconds, host.round_trips)
    if failure is not None:
        raise Exit(code=1)


@contextmanager
def peer(h: Host, role: str):
    """A :class:`Host` for a step of ``h``'s run on the site's host with ``role`` (``h``
    itself when it has the role), opened on a connection of its own with ``h``'s settings and
    options; its lines are reported under its name, its round trips counted in ``h``'s. It
    takes no lock: the step must be safe beside another run there (a dump is)."""
    if h.site.has(role):
        yield h
        return
    [entry] = h.site.holding(role)
    conn = Connection(entry.ssh, config=h.conn.config)
    check_host_keys(conn)
    other = Host(conn, h.settings, check=h.check, sudo_password=h.sudo_password, out=h.report.out,
                 command_timeout=h.command_timeout, probe_timeout=h.probe_timeout,
                 site=inventory.Site(entry, h.site.hosts))
    try:
        yield other
    finally:
        h.round_trips += other.round_trips
        conn.close()


def converging_task(title: str, **options):
    """Decorator: a Fabric task (``--check`` included) that converges the resources a
    function of the host declares, in a :func:`session` named ``title``::

        @converging_task("motd")
        def motd(h):
            '''Our message of the day.'''
            return [Packages(["figlet"]), File("/etc/motd", "Hello\\n")]

    The function's name and docstring are the task's; ``options`` go to Fabric's ``task``
    (``name``, ``default``...). Given several hosts, it converges them all at once
    (``tasks.executor.parallel``).
    """
    def make(resources):
        def converge(c, check=False):
            with session(c, title, check) as h:
                primitives.ensure(h, *resources(h))

        converge.__name__ = converge.__qualname__ = resources.__name__
        converge.__doc__, converge.__module__ = resources.__doc__, resources.__module__
        from .executor import parallel  # (which imports this module)

        return parallel(task(converge, help={"check": CHECK_HELP}, **options))

    return make
