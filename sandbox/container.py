"""Local throwaway Debian target host for the demo and the tests.

A sandbox is a debootstrapped Debian root booted with ``systemd-nspawn`` (systemd as PID 1, real
sshd) inside a network namespace of its own, reachable from this machine over a veth pair:

* host end ``<subnet>.1``, target ``<subnet>.2``; the target has no default route, so the only
  way out is the HTTP proxy (tinyproxy) this module runs on the host end. The target is *not*
  configured to use it: the library under test does that from its own settings (HTTP_PROXY).
* the Debian image is built once per suite in ``<base_dir>/images/<suite>`` and shared; each
  sandbox gets an overlayfs (or, where overlayfs is unavailable, a copied) root of its own in
  ``<base_dir>/<name>/root`` with fresh SSH host keys and a pinned ``known_hosts``.

Python API (pytest, scripts)::

    info = Sandbox().up()        # boot or reuse; SandboxInfo with ip, ssh_config, proxy_url...
    Sandbox().reboot()           # poweroff inside the target, then boot() the same root again
    Sandbox().down()             # tear everything down (the image and client key stay)

Several sandboxes on one bridge with one proxy are a cluster (``sandbox.cluster``: its members
are Sandboxes whose veth's host end joins the bridge; :meth:`Sandbox._join_host_end`).

Needs root, systemd-container, debootstrap, tinyproxy, iproute2 and openssh-client.
"""

from __future__ import annotations

import dataclasses
import fcntl
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import pebble

DEFAULT_BASE_DIR = Path("/var/tmp/fabstack-sandbox")
MIRROR = "http://deb.debian.org/debian"
IMAGE_PACKAGES = (
    "systemd", "systemd-sysv", "dbus", "openssh-server", "sudo", "python3", "ca-certificates",
    "iproute2",
)
DEFAULT_SUBNET = "10.213.46"  # make demo's
PROXY_PORT = 8888
BOOT_TIMEOUT = 60  # seconds until sshd must answer
STOP_TIMEOUT = 20  # seconds for an orderly shutdown before SIGKILL
EXTRA_CA_DIR = Path("/usr/local/share/ca-certificates")
KEY_FILES = ("id_ed25519", "id_ed25519.pub")  # the per-name client key survives down()
NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,10}")  # "fsh-" + name must fit IFNAMSIZ (15)


class SandboxError(RuntimeError):
    """A sandbox operation failed; the message says what (with a failed command's output)."""


class BootCancelled(SandboxError):
    """A boot was stopped from another thread (:attr:`Sandbox.cancel`)."""


def _run(*cmd: object, check: bool = True, timeout: float | None = None
         ) -> subprocess.CompletedProcess:
    """Run a command, capturing output; on failure raise SandboxError with its stderr."""
    argv = [str(part) for part in cmd]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise SandboxError(f"timed out after {timeout}s: {shlex.join(argv)}") from exc
    if check and proc.returncode != 0:
        output = (proc.stderr.strip() or proc.stdout.strip())[-3000:]
        raise SandboxError(f"command failed (exit {proc.returncode}): {shlex.join(argv)}\n{output}")
    return proc


def _require_root() -> None:
    if os.geteuid() != 0:
        raise SandboxError("the sandbox needs root (network namespaces, mounts, systemd-nspawn); "
                           "run it with sudo")


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on *path* (serialises concurrent builds/boots of one thing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _pids(program: str, needle: str) -> list[int]:
    """Pids of running *program* processes with *needle* among their arguments."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if os.path.basename(argv[0]).decode() == program and needle.encode() in argv:
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    """True while *pid* exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(_alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _kill(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _stop(pids: list[int], timeout: float) -> None:
    """SIGTERM *pids* once a second for *timeout* seconds, then SIGKILL what is left.

    For systemd-nspawn the first SIGTERM is a shutdown request to the target's systemd (which
    drops it in the first moments of a boot, before it has its handlers), the second an order
    to end the container at once: a target that is thrown away gets a second to shut down.
    """
    deadline = time.monotonic() + timeout
    while True:
        _kill(pids, signal.SIGTERM)
        if _wait_gone(pids, min(1, max(deadline - time.monotonic(), 0))):
            return
        if time.monotonic() >= deadline:
            break
    _kill(pids, signal.SIGKILL)
    _wait_gone(pids, 5)


def _mounts_under(path: Path) -> list[str]:
    """Mount points at or below *path*, deepest first."""
    prefix = str(path)
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
        if point == prefix or point.startswith(prefix + "/"):
            points.append(point)
    return sorted(points, key=len, reverse=True)


def _unmount_under(path: Path) -> None:
    """Unmount everything at or below *path* (lazily if busy), so rmtree never crosses a mount."""
    for point in _mounts_under(path):
        if _run("umount", point, check=False).returncode != 0:
            _run("umount", "--lazy", point)


def _extra_ca_bundle(dest: Path) -> Path | None:
    """Concatenate this machine's locally added CA certificates into *dest* (None if none)."""
    certs = sorted(EXTRA_CA_DIR.glob("**/*.crt"))
    if not certs:
        return None
    dest.write_text("".join(cert.read_text().rstrip("\n") + "\n" for cert in certs))
    return dest


def _interfaces_with(address: str) -> list[str]:
    """The interfaces of this machine that have the IPv4 *address*."""
    return [line.split()[1] for line in
            _run("ip", "-o", "-4", "addr", "show", "to", address).stdout.splitlines()]


def _check_subnet(subnet: str, what: str) -> None:
    """Raise SandboxError unless *subnet* is the first three octets of a /24."""
    try:
        ipaddress.IPv4Network(f"{subnet}.0/24")
    except ValueError:
        raise SandboxError(f"{what} subnet {subnet!r}: give the first three octets of a /24, "
                           "such as 10.213.46") from None


def ssh_config_entry(alias: str, ip: str, key: Path, known_hosts: Path) -> str:
    """The ssh_config block that reaches root@*ip* as *alias*, its host keys pinned."""
    return (f"Host {alias}\n"
            f"    HostName {ip}\n"
            "    User root\n"
            f"    IdentityFile {key}\n"
            "    IdentitiesOnly yes\n"
            f"    UserKnownHostsFile {known_hosts}\n"
            "    StrictHostKeyChecking yes\n")


def _proxy_pids_in(workdir: Path) -> list[int]:
    """Pids of the tinyproxy started by :func:`_start_proxy` with *workdir*."""
    return _pids("tinyproxy", str(workdir / "tinyproxy.conf"))


def _start_proxy(workdir: Path, listen: str, subnet: str) -> None:
    """Start tinyproxy on *listen* for ``<subnet>.0/24`` unless it runs, with a config, pid file
    and logs of its own in *workdir* (no daemon-wide config touched)."""
    if _proxy_pids_in(workdir):
        return
    conf = workdir / "tinyproxy.conf"
    conf.write_text(
        f"Port {PROXY_PORT}\nListen {listen}\nAllow {subnet}.0/24\n"
        "Timeout 600\nMaxClients 50\nDisableViaHeader Yes\nLogLevel Info\n"
        f"PidFile \"{workdir / 'tinyproxy.pid'}\"\nLogFile \"{workdir / 'tinyproxy.log'}\"\n")
    # -d: stay in the foreground, so the pid is ours and errors land in our log file.
    # tinyproxy resolves the name of every request: a resolver that drops a query now and
    # then costs glibc's 5 s timeout each time (seen here: 1 lookup in 20, 10-30 s per
    # provision); ask again after 1 s instead.
    with open(workdir / "tinyproxy.out", "w") as out:
        proc = subprocess.Popen(["tinyproxy", "-d", "-c", str(conf)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True,
                                env={**os.environ, "RES_OPTIONS": "timeout:1 attempts:5"})
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection((listen, PROXY_PORT), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                log = (workdir / "tinyproxy.out").read_text()[-2000:]
                raise SandboxError(f"tinyproxy did not start on {listen}:{PROXY_PORT}:"
                                   f"\n{log}") from None
            time.sleep(0.1)


def _stop_proxy(workdir: Path) -> None:
    """Stop the tinyproxy of *workdir* (:func:`_start_proxy`)."""
    _stop(_proxy_pids_in(workdir), 5)
    (workdir / "tinyproxy.pid").unlink(missing_ok=True)


def build_image(image: Path, suite: str) -> None:
    """Debootstrap *suite* into ``<image>.tmp``, fix it up and rename it to *image* when complete.

    A leftover ``.tmp`` (a crashed build) is thrown away first, never reused.
    """
    tmp = image.with_name(image.name + ".tmp")
    if tmp.exists():
        _unmount_under(tmp)  # debootstrap mounts proc/sys inside while it runs
        shutil.rmtree(tmp)
    _run("debootstrap", "--variant=minbase", "--include=" + ",".join(IMAGE_PACKAGES),
         suite, tmp, MIRROR)
    fix_image(tmp, suite)
    tmp.rename(image)


def fix_image(root: Path, suite: str) -> None:
    """Make a fresh debootstrap look like an ordinary Debian server (instance-independent parts)."""
    etc = root / "etc"
    # The apt sources of a real server, in the deb822 form of Debian's own cloud images. The
    # security archive (deb.debian.org/debian-security) was checked to be reachable through the
    # sandbox proxy from this machine. No proxy is configured: that is the library's job.
    (etc / "apt/sources.list").unlink(missing_ok=True)
    keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
    (etc / "apt/sources.list.d/debian.sources").write_text(
        f"Types: deb\nURIs: {MIRROR}\nSuites: {suite} {suite}-updates\nComponents: main\n"
        f"Signed-By: {keyring}\n\n"
        f"Types: deb\nURIs: http://deb.debian.org/debian-security\nSuites: {suite}-security\n"
        f"Components: main\nSigned-By: {keyring}\n")
    # Host keys and machine-id are per instance (see Sandbox._create_instance).
    for key in (etc / "ssh").glob("ssh_host_*"):
        key.unlink()
    (etc / "machine-id").write_text("")
    (etc / "ssh/sshd_config.d/sandbox.conf").write_text(
        "# fabstack sandbox: root logs in with its key only\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\n")
    for deb in (root / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()


@dataclass(frozen=True)
class SandboxInfo:
    """Everything a test or a user needs to reach a running sandbox."""

    name: str
    suite: str
    alias: str  # ssh_config Host alias, also the target's hostname
    ip: str  # the target's address
    host_ip: str  # this machine's end of the veth (where the proxy listens)
    proxy_url: str  # the target's only way out; give it to the library as HTTP_PROXY
    ssh_key: Path  # private key for root@target
    known_hosts: Path  # the target's host keys, pinned at creation
    ssh_config: Path  # for ssh -F / fab -S
    ca_bundle: Path | None  # extra CA certificates this machine's egress needs, if any
    root: Path  # the target's root directory as seen from this machine

    def to_json(self) -> str:
        return json.dumps({key: str(value) if isinstance(value, Path) else value
                           for key, value in dataclasses.asdict(self).items()}, indent=2)


@dataclass
class Sandbox:
    """One named sandbox target host. All methods that change anything need root."""

    name: str = "fabstack"
    suite: str = "bookworm"
    subnet: str = DEFAULT_SUBNET  # first three octets of the /24 between host and target
    base_dir: Path = DEFAULT_BASE_DIR

    def __post_init__(self) -> None:
        if not NAME_RE.fullmatch(self.name):
            raise SandboxError(f"sandbox name {self.name!r}: use 1-11 of [a-z0-9-]")
        _check_subnet(self.subnet, "sandbox")
        self.base_dir = Path(self.base_dir)
        self.dir = self.base_dir / self.name
        self.image = self.base_dir / "images" / self.suite
        self.root = self.dir / "root"
        self.upper = self.dir / "upper"  # overlay mode only
        self.alias = f"{self.name}-sandbox"
        self.ip = f"{self.subnet}.2"
        self.host_ip = f"{self.subnet}.1"
        self.netns = f"fs-{self.name}"
        self.veth_host = f"fsh-{self.name}"
        self.veth_target = f"fst-{self.name}"  # renamed to eth0 inside the namespace
        self.key = self.dir / "id_ed25519"
        self.nspawn_pidfile = self.dir / "nspawn.pid"
        self.console_log = self.dir / "console.log"
        # Set from another thread to stop a boot under way: up() then fails and removes it.
        self.cancel = threading.Event()

    # -- public API ---------------------------------------------------------------------------

    def info(self) -> SandboxInfo:
        """Where everything is (whether or not the sandbox is running)."""
        bundle = self.dir / "extra-ca.pem"
        return SandboxInfo(
            name=self.name, suite=self.suite, alias=self.alias, ip=self.ip, host_ip=self.host_ip,
            proxy_url=f"http://{self.host_ip}:{PROXY_PORT}", ssh_key=self.key,
            known_hosts=self.dir / "known_hosts", ssh_config=self.dir / "ssh_config",
            ca_bundle=bundle if bundle.exists() else None, root=self.root)

    def running(self) -> bool:
        """True while systemd-nspawn runs this sandbox's root."""
        return self._nspawn_pid() is not None

    def traces(self) -> list[str]:
        """What of this sandbox is on this machine (all but its client key and the shared image):
        some of container, proxy, ACME CA, network, root (mounted), files."""
        found = {
            "container": self._nspawn_pids() or self._netns_pids(),
            "proxy": self._proxy_pids(),
            "ACME CA": pebble.recorded_pids(self.dir / "pebble"),
            "network": self._netns_exists() or Path(f"/sys/class/net/{self.veth_host}").exists(),
            "root": _mounts_under(self.dir),
            "files": self.dir.is_dir() and any(entry.name not in KEY_FILES
                                               for entry in self.dir.iterdir()),
        }
        return [what for what, there in found.items() if there]

    def up(self, fresh: bool = False) -> SandboxInfo:
        """Return the running sandbox if it answers SSH; else clear leftovers, create and boot it.

        ``fresh=True`` always recreates the root from the image, even if the sandbox is running
        (as does asking for another suite or subnet than the running one's).
        """
        _require_root()
        with self._lock():
            reusable = not fresh and self.running() and self._booted() == (self.suite, self.ip)
            if reusable and self._ssh_ok():
                self._proxy_up()  # restarts a proxy that died on its own
                return self.info()
            self._teardown()
            try:
                self._ensure_image()
                self._create_instance()
                return self._boot()
            except BaseException:
                # Failed or interrupted (Ctrl-C): nothing is left half-booted on the subnet. The
                # error says why (a failed boot shows the tail of the console).
                self._teardown()
                raise

    def boot(self) -> SandboxInfo:
        """Boot the existing root again (after poweroff() or ``poweroff`` inside the target)."""
        _require_root()
        with self._lock():
            if self.running():
                raise SandboxError(f"{self.alias} is already running")
            if not (self.upper.is_dir() or (self.root / "etc").is_dir()):
                raise SandboxError(f"{self.alias} has no root to boot; use up()")
            self._stop_processes()  # strays of a crash: container processes, proxy
            return self._boot()

    def poweroff(self) -> None:
        """Shut the target down from inside (``systemctl poweroff``); the root keeps its state."""
        _require_root()
        with self._lock():
            pid = self._nspawn_pid()
            if pid is None:
                return
            # The ssh session dies with the target, so its exit status says nothing.
            self._ssh("systemctl", "poweroff", check=False)
            if not _wait_gone([pid], STOP_TIMEOUT):
                _stop([pid], 5)
            self._stop_processes()

    def reboot(self) -> SandboxInfo:
        """poweroff() then boot(): a reboot of the target with its disk state kept.

        (``reboot`` inside the target ends systemd-nspawn like ``poweroff`` does; boot() it again.)
        """
        self.poweroff()
        return self.boot()

    def down(self) -> list[str]:
        """Stop and remove the sandbox; safe when nothing runs. The image and client key stay.

        Returns what there was to remove (:meth:`traces`), empty if nothing.
        """
        _require_root()
        with self._lock():
            found = self.traces()
            self._teardown()
            return found

    # -- image and instance -------------------------------------------------------------------

    def _booted(self) -> tuple[str, str] | None:
        """The suite and address of the last complete boot (None if none is recorded)."""
        try:
            booted = json.loads((self.dir / "info.json").read_text())
            return booted["suite"], booted["ip"]
        except (OSError, ValueError, KeyError):
            return None

    def _lock(self):
        return _locked(self.base_dir / f"{self.name}.lock")

    def _ensure_image(self) -> None:
        with _locked(self.image.with_name(self.image.name + ".lock")):
            if not self.image.is_dir():
                print(f"building the Debian {self.suite} image in {self.image} (once, about a "
                      "minute)", file=sys.stderr)
                build_image(self.image, self.suite)

    def _create_instance(self) -> None:
        """A root of this sandbox's own from the image, with its own identity and keys."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.upper.mkdir()
        (self.dir / "work").mkdir()
        self.root.mkdir()
        if not self._mount_overlay():
            shutil.rmtree(self.upper)
            shutil.rmtree(self.dir / "work")
            self.root.rmdir()
            _run("cp", "-a", self.image, self.root)
        etc = self.root / "etc"
        (etc / "hostname").write_text(self.alias + "\n")
        (etc / "hosts").write_text(
            f"127.0.0.1\tlocalhost\n127.0.1.1\t{self.alias}\n\n"
            "::1\tlocalhost ip6-localhost ip6-loopback\nff02::1\tip6-allnodes\n"
            "ff02::2\tip6-allrouters\n")
        (etc / "machine-id").write_text(uuid.uuid4().hex + "\n")
        for key in (etc / "ssh").glob("ssh_host_*"):
            key.unlink()
        _run("ssh-keygen", "-A", "-f", self.root)
        if not self.key.exists():
            _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{self.alias}-client",
                 "-f", self.key)
        ssh_dir = self.root / "root/.ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        (ssh_dir / "authorized_keys").write_text(self.key.with_suffix(".pub").read_text())
        (ssh_dir / "authorized_keys").chmod(0o600)
        info = self.info()
        # Pin the host keys just generated: no trust on first use.
        info.known_hosts.write_text("".join(
            f"{self.alias},{self.ip} {' '.join(pub.read_text().split()[:2])}\n"
            for pub in sorted((etc / "ssh").glob("ssh_host_*_key.pub"))))
        info.ssh_config.write_text(
            ssh_config_entry(self.alias, self.ip, self.key, info.known_hosts))
        _extra_ca_bundle(self.dir / "extra-ca.pem")

    def _mount_overlay(self) -> bool:
        """Mount image + upper as the root unless already mounted; False if overlayfs fails here."""
        if _mounts_under(self.root):
            return True
        return _run("mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={self.image},upperdir={self.upper},workdir={self.dir / 'work'}",
                    self.root, check=False).returncode == 0

    # -- boot ---------------------------------------------------------------------------------

    def _check_cancel(self) -> None:
        if self.cancel.is_set():
            raise BootCancelled(f"booting {self.alias} was cancelled")

    def _boot(self) -> SandboxInfo:
        self._check_cancel()
        if self.upper.is_dir() and not self._mount_overlay():
            raise SandboxError(f"cannot mount the overlay root {self.root}")
        self._network_up()
        self._proxy_up()
        self._start_nspawn()
        self._wait_ready()
        info = self.info()
        (self.dir / "info.json").write_text(info.to_json() + "\n")
        return info

    def _network_up(self) -> None:
        """Namespace + veth pair: the host end joined to this machine (:meth:`_join_host_end`),
        ip/24 on eth0 inside (kept across reboots)."""
        if self._netns_exists() and Path(f"/sys/class/net/{self.veth_host}").exists():
            return
        self._network_down()
        self._check_host_ip()
        ns = ("ip", "-n", self.netns)
        _run("ip", "netns", "add", self.netns)
        _run("ip", "link", "add", self.veth_host, "type", "veth", "peer", "name", self.veth_target)
        _run("ip", "link", "set", self.veth_target, "netns", self.netns)
        _run(*ns, "link", "set", self.veth_target, "name", "eth0")
        self._join_host_end()
        _run("ip", "link", "set", self.veth_host, "up")
        _run(*ns, "addr", "add", f"{self.ip}/24", "dev", "eth0")
        _run(*ns, "link", "set", "eth0", "up")
        _run(*ns, "link", "set", "lo", "up")

    def _check_host_ip(self) -> None:
        """host_ip must be free here: this sandbox's veth takes it."""
        if used := _interfaces_with(self.host_ip):
            raise SandboxError(f"{self.host_ip} is already on interface {used[0]}; "
                               "give this sandbox another subnet")

    def _join_host_end(self) -> None:
        """This machine's end of the veth gets host_ip/24."""
        _run("ip", "addr", "add", f"{self.host_ip}/24", "dev", self.veth_host)

    def _netns_exists(self) -> bool:
        return self.netns in _run("ip", "netns", "list").stdout.split()

    def _netns_pids(self) -> list[int]:
        """Processes in this sandbox's network namespace (the container's)."""
        if not self._netns_exists():
            return []
        return [int(pid) for pid in _run("ip", "netns", "pids", self.netns).stdout.split()]

    def _network_down(self) -> None:
        _run("ip", "link", "del", self.veth_host, check=False)
        _run("ip", "netns", "del", self.netns, check=False)

    def _proxy_up(self) -> None:
        """Start this sandbox's proxy on host_ip unless it runs."""
        _start_proxy(self.dir, self.host_ip, self.subnet)

    def _start_nspawn(self) -> None:
        cmd = [
            "systemd-nspawn", "-D", str(self.root), "-b", "-M", self.alias,
            # no machined/systemd on this host to register with or to create a scope
            "--register=no", "--keep-unit",
            f"--network-namespace-path=/run/netns/{self.netns}",
            "--capability=CAP_NET_ADMIN,CAP_NET_RAW",  # ufw, ping inside the target
            # like a real server, the target owns its resolv.conf and timezone
            "--resolv-conf=off", "--timezone=off",
            # output only, through a pty of nspawn's own: works without a terminal
            "--console=read-only",
            # FUSE, as a server has it (sshfs: the shared media folder of a site's hosts)
            *(["--bind=/dev/fuse"] if Path("/dev/fuse").exists() else []),
        ]
        with open(self.console_log, "w") as log:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.nspawn_pidfile.write_text(f"{proc.pid}\n")
        # Popen returns once exec began, but /proc/PID/cmdline names nspawn a moment later (seen
        # under load): until then running() would call the sandbox stopped.
        deadline = time.monotonic() + 5
        while proc.pid not in self._nspawn_pids() and proc.poll() is None:
            if time.monotonic() > deadline:
                raise SandboxError(f"systemd-nspawn (pid {proc.pid}) did not start")
            time.sleep(0.01)

    def _wait_ready(self) -> None:
        """Wait for sshd, then for systemd to finish booting; raise with the console tail if not."""
        deadline = time.monotonic() + BOOT_TIMEOUT
        while not self._ssh_ok():
            self._check_cancel()
            if not self.running():
                raise SandboxError(f"systemd-nspawn exited while booting {self.alias}\n"
                                   + self._console_tail())
            if time.monotonic() > deadline:
                raise SandboxError(f"{self.alias} did not answer SSH on {self.ip} within "
                                   f"{BOOT_TIMEOUT}s\n" + self._console_tail())
            time.sleep(0.5)
        state = self._ssh("systemctl", "is-system-running", "--wait", check=False,
                          timeout=max(deadline - time.monotonic(), 10)).stdout.strip()
        if state != "running":
            failed = self._ssh("systemctl", "--failed", "--no-legend", check=False).stdout
            raise SandboxError(f"{self.alias} booted into state {state!r}; failed units:\n{failed}")

    def _console_tail(self) -> str:
        try:
            lines = self.console_log.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "(no console log)"
        return "--- console.log (tail) ---\n" + "\n".join(lines[-30:])

    def _ssh(self, *command: str, check: bool = True, timeout: float = 30
             ) -> subprocess.CompletedProcess:
        return _run("ssh", "-F", self.dir / "ssh_config", "-o", "BatchMode=yes",
                    "-o", "ConnectTimeout=3", self.alias, *command, check=check, timeout=timeout)

    def _ssh_ok(self) -> bool:
        try:
            return self._ssh("true", check=False, timeout=10).returncode == 0
        except SandboxError:  # timed out
            return False

    # -- teardown -----------------------------------------------------------------------------

    def _nspawn_pid(self) -> int | None:
        """The nspawn process of this root, per the pid file (checked against its command line)."""
        try:
            pid = int(self.nspawn_pidfile.read_text())
        except (OSError, ValueError):
            return None
        return pid if pid in self._nspawn_pids() and _alive(pid) else None

    def _nspawn_pids(self) -> list[int]:
        return _pids("systemd-nspawn", str(self.root))

    def _proxy_pids(self) -> list[int]:
        return _proxy_pids_in(self.dir)

    def _stop_processes(self) -> None:
        """Stop nspawn (:func:`_stop`: a second to shut the target down, then at once), the
        proxy, and any process still in the namespace: the container of an nspawn killed with
        -9, which nothing can shut down cleanly any more (its PID 1 ignores SIGTERM), so it
        gets SIGKILL."""
        _stop(self._nspawn_pids(), STOP_TIMEOUT)
        orphans = self._netns_pids()
        _kill(orphans, signal.SIGKILL)
        _wait_gone(orphans, 5)
        _stop_proxy(self.dir)
        self.nspawn_pidfile.unlink(missing_ok=True)

    def _teardown(self) -> None:
        """Remove every trace of this sandbox except the client key (and the shared image)."""
        pebble.stop_recorded(self.dir / "pebble")
        self._stop_processes()
        self._network_down()
        if self.dir.is_dir():
            _unmount_under(self.dir)
            for entry in self.dir.iterdir():
                if entry.name in KEY_FILES:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()

