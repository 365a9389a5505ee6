"""Several sandbox target hosts on one network: a cluster for multi-host tests and trials.

Every member is a :class:`~sandbox.container.Sandbox` (its own root, network namespace and veth
pair, booted as the single sandbox is) whose veth's host end joins one Linux bridge instead of
carrying an address:

* the bridge ``fsb-<cluster>`` has ``<subnet>.1/24``, where the cluster's one tinyproxy listens
  (``Allow <subnet>.0/24``): the members' only way out, as for the single sandbox;
* member *i* (in the order given) is the sandbox ``<cluster>-<member>`` at ``<subnet>.<11 + i>``,
  its alias and hostname its sandbox name; members reach each other directly on these addresses;
* ``<base_dir>/<cluster>.cluster/`` holds one ssh_config and known_hosts for every member, the
  cluster's proxy and its record (``cluster.json``: what up() boots, ``info.json``: what is up).

Python API (pytest, scripts)::

    info = Cluster(name="cl", members=("lb", "web1", "db"), subnet="10.213.70").up()
    info.members["web1"].ip      # 10.213.70.12; ssh -F info.ssh_config cl-web1
    Cluster(name="cl").down()    # every member, the bridge, the proxy (images and keys stay)

The members boot in parallel, a thread each. Needs what a Sandbox needs.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from .container import (
    DEFAULT_BASE_DIR,
    NAME_RE,
    PROXY_PORT,
    BootCancelled,
    Sandbox,
    SandboxError,
    SandboxInfo,
    _check_subnet,
    _extra_ca_bundle,
    _interfaces_with,
    _locked,
    _proxy_pids_in,
    _require_root,
    _run,
    _start_proxy,
    _stop_proxy,
    ssh_config_entry,
)

DEFAULT_CLUSTER_SUBNET = "10.213.70"
DEFAULT_CLUSTER_MEMBERS = ("lb", "web1", "web2", "worker", "db")
FIRST_MEMBER_HOST = 11  # member i is <subnet>.<FIRST_MEMBER_HOST + i>
# No dash in a cluster's name, so "<cluster>-<member>" names one member of one cluster only;
# "fsb-" + name must fit IFNAMSIZ (15), and the member's sandbox name NAME_RE (11).
CLUSTER_NAME_RE = re.compile(r"[a-z0-9]{1,9}")
MEMBER_RE = re.compile(r"[a-z0-9][a-z0-9-]*")

T = TypeVar("T")


@dataclass
class ClusterMember(Sandbox):
    """A sandbox of a :class:`Cluster`: the host end of its veth joins the cluster's bridge
    (which has host_ip, and the cluster's proxy); its address is ``<subnet>.<number>``."""

    bridge: str = ""
    number: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.alias = self.name
        self.ip = f"{self.subnet}.{self.number}"

    def _check_host_ip(self) -> None:
        """host_ip must be the bridge's (Cluster.up makes the bridge before any member)."""
        if _interfaces_with(self.host_ip) != [self.bridge]:
            raise SandboxError(f"{self.host_ip} is not the address of the cluster's bridge "
                               f"{self.bridge} (alone); boot members with Cluster.up()")

    def _join_host_end(self) -> None:
        """This machine's end of the veth joins the bridge, with no address of its own."""
        _run("ip", "link", "set", self.veth_host, "master", self.bridge)

    def _proxy_up(self) -> None:
        """None of its own: the cluster's proxy on the bridge serves every member (Cluster.up
        starts it before any member)."""


@dataclass(frozen=True)
class ClusterInfo:
    """Everything a test or a user needs to reach a running cluster."""

    name: str
    suite: str
    subnet: str
    bridge: str  # this machine's interface to the members
    host_ip: str  # the bridge's address (where the proxy listens)
    proxy_url: str  # the members' only way out; give it to the library as HTTP_PROXY
    ssh_config: Path  # every member's alias, for ssh -F / fab -S
    known_hosts: Path  # every member's host keys, pinned at creation
    ca_bundle: Path | None  # extra CA certificates this machine's egress needs, if any
    members: dict[str, SandboxInfo]  # by member name, in member order

    def to_json(self) -> str:
        fields = {key: str(value) if isinstance(value, Path) else value
                  for key, value in dataclasses.asdict(self).items() if key != "members"}
        fields["members"] = {member: json.loads(info.to_json())
                             for member, info in self.members.items()}
        return json.dumps(fields, indent=2)


def _each(members: list[ClusterMember], action: Callable[[ClusterMember], T]) -> list[T]:
    """``action(member)`` for every member at once, a thread each; their results in order.

    When one fails, or this thread is interrupted (Ctrl-C), the boots under way are cancelled
    (:attr:`Sandbox.cancel`: each up() then removes its member); once every thread has ended,
    the first error that is not a cancellation is raised, or the interruption.
    """
    with ThreadPoolExecutor(max_workers=max(len(members), 1),
                            thread_name_prefix="cluster") as pool:
        futures = [pool.submit(action, member) for member in members]
        try:
            wait(futures, return_when=FIRST_EXCEPTION)
        finally:
            if any(not future.done() or future.exception() for future in futures):
                for member in members:
                    member.cancel.set()
    errors = [future.exception() for future in futures if future.exception()]
    if errors:
        raise next((exc for exc in errors if not isinstance(exc, BootCancelled)), errors[0])
    return [future.result() for future in futures]


@dataclass
class Cluster:
    """Named sandbox hosts on one bridge of this machine. All methods that change anything
    need root."""

    name: str = "cl"
    members: tuple[str, ...] = DEFAULT_CLUSTER_MEMBERS
    suite: str = "bookworm"
    subnet: str = DEFAULT_CLUSTER_SUBNET  # first three octets of the bridge's /24
    base_dir: Path = DEFAULT_BASE_DIR

    def __post_init__(self) -> None:
        if not CLUSTER_NAME_RE.fullmatch(self.name):
            raise SandboxError(f"cluster name {self.name!r}: use 1-9 of [a-z0-9] (no dash)")
        _check_subnet(self.subnet, "cluster")
        self.members = tuple(self.members)
        if not self.members:
            raise SandboxError(f"cluster {self.name}: give at least one member")
        if len(self.members) > 255 - FIRST_MEMBER_HOST:
            raise SandboxError(f"cluster {self.name}: at most {255 - FIRST_MEMBER_HOST} members")
        for member in self.members:
            if not MEMBER_RE.fullmatch(member):
                raise SandboxError(f"cluster member {member!r}: use [a-z0-9-], starting with a "
                                   "letter or digit")
            if self.members.count(member) > 1:
                raise SandboxError(f"cluster member {member!r} is named twice")
            if not NAME_RE.fullmatch(f"{self.name}-{member}"):
                raise SandboxError(
                    f"cluster member {member!r}: its sandbox name {self.name}-{member} is too "
                    f"long (cluster and member names have at most 10 characters together)")
        self.base_dir = Path(self.base_dir)
        self.dir = self.base_dir / f"{self.name}.cluster"  # no sandbox's name has a dot
        self.bridge = f"fsb-{self.name}"
        self.host_ip = f"{self.subnet}.1"
        self.sandboxes = [self._member(member, index) for index, member in enumerate(self.members)]

    @classmethod
    def named(cls, name: str, base_dir: Path = DEFAULT_BASE_DIR) -> Cluster:
        """The cluster *name* as its last up() asked for it (suite, subnet, members), or with
        the defaults if it has no record."""
        cluster = cls(name=name, base_dir=base_dir)
        planned = cluster._planned()
        return cls(name=name, base_dir=base_dir, **planned) if planned else cluster

    # -- public API ---------------------------------------------------------------------------

    def info(self) -> ClusterInfo:
        """Where everything is (whether or not the cluster is running)."""
        bundle = self.dir / "extra-ca.pem"
        return ClusterInfo(
            name=self.name, suite=self.suite, subnet=self.subnet, bridge=self.bridge,
            host_ip=self.host_ip, proxy_url=f"http://{self.host_ip}:{PROXY_PORT}",
            ssh_config=self.dir / "ssh_config", known_hosts=self.dir / "known_hosts",
            ca_bundle=bundle if bundle.exists() else None,
            members={member: box.info() for member, box in zip(self.members, self.sandboxes,
                                                               strict=True)})

    def ssh_config(self) -> str:
        """The cluster's ssh_config: every member's alias, with the cluster's known_hosts."""
        known_hosts = self.dir / "known_hosts"
        return "\n".join(ssh_config_entry(box.alias, box.ip, box.key, known_hosts)
                         for box in self.sandboxes)

    def running(self) -> bool:
        """True while the cluster runs as this object describes it: its bridge, its proxy and
        every member (and no other) of its last complete up()."""
        return (self._booted() == self._plan() and self._bridge_exists()
                and bool(_proxy_pids_in(self.dir)) and all(box.running()
                                                           for box in self.sandboxes))

    def traces(self) -> list[str]:
        """What of this cluster is on this machine (all but the members' client keys and the
        shared image): network (the bridge), proxy, files, and each member's traces
        (:meth:`Sandbox.traces`) as ``<member sandbox> <trace>``."""
        found = {
            "network": self._bridge_exists(),
            "proxy": _proxy_pids_in(self.dir),
            "files": self.dir.exists(),
        }
        return [what for what, there in found.items() if there] + [
            f"{box.name} {trace}" for box in self._known_sandboxes() for trace in box.traces()]

    def up(self, fresh: bool = False) -> ClusterInfo:
        """Boot the cluster, or reuse it as it runs; return its info.

        Members that run and answer SSH are kept (a member that does not is recreated, as
        Sandbox.up does). The whole cluster is recreated from the image with ``fresh=True``, or
        when its last up() asked for another suite, subnet or members, or did not complete. A
        failed or interrupted up() leaves nothing of the cluster behind.
        """
        _require_root()
        with self._lock():
            if fresh or self._booted() != self._plan():
                self._teardown()
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                (self.dir / "cluster.json").write_text(json.dumps(self._plan(), indent=2) + "\n")
                self._network_up()
                _start_proxy(self.dir, self.host_ip, self.subnet)
                for box in self.sandboxes:
                    box.cancel.clear()
                _each(self.sandboxes, lambda box: box.up())
                _extra_ca_bundle(self.dir / "extra-ca.pem")
                (self.dir / "known_hosts").write_text(
                    "".join(box.info().known_hosts.read_text() for box in self.sandboxes))
                (self.dir / "ssh_config").write_text(self.ssh_config())
                info = self.info()
                (self.dir / "info.json").write_text(info.to_json() + "\n")
                return info
            except BaseException:
                self._teardown()
                raise

    def down(self) -> list[str]:
        """Stop and remove every member, the bridge, the proxy and the cluster's files; safe when
        nothing runs. The image and the members' client keys stay.

        Returns what there was to remove (:meth:`traces`), empty if nothing.
        """
        _require_root()
        with self._lock():
            found = self.traces()
            self._teardown()
            return found

    # -- internals ----------------------------------------------------------------------------

    def _member(self, member: str, index: int) -> ClusterMember:
        return ClusterMember(name=f"{self.name}-{member}", suite=self.suite, subnet=self.subnet,
                             base_dir=self.base_dir, bridge=self.bridge,
                             number=FIRST_MEMBER_HOST + index)

    def _plan(self) -> dict:
        return {"suite": self.suite, "subnet": self.subnet, "members": list(self.members)}

    def _planned(self) -> dict | None:
        """What the last up() set out to boot (recorded before it boots anything)."""
        try:
            return json.loads((self.dir / "cluster.json").read_text())
        except (OSError, ValueError):
            return None

    def _booted(self) -> dict | None:
        """What the last complete up() booted (None if none is recorded)."""
        try:
            booted = json.loads((self.dir / "info.json").read_text())
            return {"suite": booted["suite"], "subnet": booted["subnet"],
                    "members": list(booted["members"])}
        except (OSError, ValueError, KeyError):
            return None

    def _known_sandboxes(self) -> list[ClusterMember]:
        """This object's members and those of the last up() (whose names may differ)."""
        planned = (self._planned() or {}).get("members", [])
        extra = [member for member in planned if member not in self.members]
        return self.sandboxes + [self._member(member, len(self.members) + index)
                                 for index, member in enumerate(extra)]

    def _lock(self):
        return _locked(self.base_dir / f"{self.name}.cluster.lock")

    def _bridge_exists(self) -> bool:
        return Path(f"/sys/class/net/{self.bridge}").exists()

    def _network_up(self) -> None:
        """The bridge with host_ip/24 (kept while it exists)."""
        if self._bridge_exists():
            return
        if used := _interfaces_with(self.host_ip):
            raise SandboxError(f"{self.host_ip} is already on interface {used[0]}; "
                               "give this cluster another subnet")
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{self.host_ip}/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")

    def _teardown(self) -> None:
        """Remove every trace of the cluster but the members' client keys (and the image)."""
        _each(self._known_sandboxes(), lambda box: box.down())
        _stop_proxy(self.dir)
        _run("ip", "link", "del", self.bridge, check=False)
        if self.dir.is_dir():
            shutil.rmtree(self.dir)
