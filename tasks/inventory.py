"""The inventory: the hosts fabstack acts on when fab is given no ``-H``, and their roles.

They are declared in Fabric's own configuration (the project's ``fabric.yaml``,
``~/.fabric.yaml`` or a file given with ``fab -f``), in the ``fabstack`` section::

    fabstack:
      hosts:
        web1:
          ssh: root@203.0.113.11        # [user@]host[:port], or a Host alias of ~/.ssh/config
          private: 10.0.0.11            # the address the other hosts reach it on
          roles: [web, worker]
        db1:
          ssh: deploy@203.0.113.12:2222
          private: 10.0.0.12
          roles: [db, redis]

A host's name is how fab's output and ``-H`` name it (``fab -H db1 provision``); ``ssh``
defaults to the name itself. A host without ``roles`` has every role: a whole stack of its
own, as a host not in the inventory (``fab -H 198.51.100.7 provision``) is. When some host
has only some roles, the inventory is one site spread over its hosts (a :class:`Site`): every
host has ``private``, one host holds each of ``db``, ``redis`` and ``lb``, and at least one
each of ``web`` and ``worker``. The lb host may hold ``web`` too when it is the site's only
web host; with several, it holds no ``web`` (it proxies to every web host alike). The first
worker host in the inventory's order runs Celery's beat, the others workers only. The
inventory holds no secrets: the settings stay in ``.env``.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

ROLES = ("lb", "web", "worker", "db", "redis")
SOLE_ROLES = ("lb", "db", "redis")  # exactly one host of a site holds each
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# [user@]host[:port]: what Fabric's Connection takes as a host string
SSH_RE = re.compile(r"(?:[^@\s:]+@)?(?P<host>[^@\s:]+)(?::(?P<port>\d{1,5}))?")
KEYS = {"ssh", "private", "roles"}


def host_part(ssh: str) -> str:
    """The host of an ``[user@]host[:port]`` string."""
    match = SSH_RE.fullmatch(ssh)
    return match["host"] if match else ssh


class InventoryError(ValueError):
    """The inventory in Fabric's configuration is malformed; the message says where."""


@dataclass(frozen=True)
class HostEntry:
    """One host of the inventory: its name, where SSH reaches it, where the other hosts
    reach it, and its roles."""

    name: str
    ssh: str
    private: str | None = None
    roles: frozenset[str] = frozenset(ROLES)

    @property
    def host(self) -> str:
        """The host part of ``ssh`` (what a Connection to it calls its host)."""
        return host_part(self.ssh)

    @property
    def whole(self) -> bool:
        """True for a host with every role (a whole stack)."""
        return self.roles == frozenset(ROLES)


@dataclass(frozen=True)
class Site:
    """The hosts one site spans, as one of them (``me``) sees them.

    A whole-stack host's site is that host alone; each role's hosts are reached on
    ``address``: loopback on the host itself, else its private address.
    """

    me: HostEntry
    hosts: tuple[HostEntry, ...]

    @classmethod
    def alone(cls, name: str) -> Site:
        """The site of a whole-stack host (one not in the inventory, or with every role)."""
        me = HostEntry(name, name)
        return cls(me, (me,))

    @property
    def spread(self) -> bool:
        """True when the site spans several hosts."""
        return len(self.hosts) > 1

    def has(self, role: str) -> bool:
        return role in self.me.roles

    def holding(self, role: str) -> list[HostEntry]:
        """The site's hosts with ``role``, in inventory order."""
        return [entry for entry in self.hosts if role in entry.roles]

    def address(self, entry: HostEntry) -> str:
        """Where this host reaches ``entry``: ``localhost`` if it is this host."""
        return "localhost" if entry == self.me else entry.private

    def address_of(self, role: str) -> str:
        """Where this host reaches the one host that holds ``role`` (db, redis, lb)."""
        [entry] = self.holding(role)
        return self.address(entry)

    @property
    def beat(self) -> HostEntry:
        """The host that runs Celery's beat: the first worker host in inventory order."""
        return self.holding("worker")[0]

    @property
    def fronted(self) -> bool:
        """True on a web host behind a load balancer of its own (the lb proxies to it)."""
        return self.has("web") and not self.has("lb")

    @property
    def shares_media(self) -> bool:
        """True when several hosts run the app (web, worker): they share the db host's media
        folder (tasks/media.py)."""
        return len([e for e in self.hosts if e.roles & {"web", "worker"}]) > 1

    @property
    def media_here(self) -> bool:
        """True on the host whose disk holds the media: the db host when they are shared, else
        the web host."""
        return self.has("db") if self.shares_media else self.has("web")

    def others(self, *roles: str) -> list[str]:
        """The private addresses of the other hosts with any of ``roles``."""
        return [entry.private for entry in self.hosts
                if entry != self.me and entry.roles & set(roles)]


def load(config) -> dict[str, HostEntry]:
    """The inventory of Fabric configuration ``config`` by name (empty when none is declared).

    Raises InventoryError naming the host and key that are wrong.
    """
    hosts = (config.get("fabstack") or {}).get("hosts") or {}
    if not isinstance(hosts, dict):
        raise InventoryError("fabstack.hosts: give a mapping of host names to their settings")
    entries = {name: _entry(name, values) for name, values in hosts.items()}
    seen: dict[str, str] = {}
    for entry in entries.values():
        for address in filter(None, (entry.host, entry.private)):
            if address in seen and seen[address] != entry.name:
                raise InventoryError(f"fabstack.hosts: {seen[address]} and {entry.name} are "
                                     f"the same host ({address})")
            seen[address] = entry.name
    if any(not entry.whole for entry in entries.values()):
        _check_site(list(entries.values()))
    return entries


def _entry(name, values) -> HostEntry:
    where = f"fabstack.hosts.{name}"
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InventoryError(f"{where}: a host's name is letters, digits, '.', '_' and '-'")
    values = values or {}
    if not isinstance(values, dict):
        raise InventoryError(f"{where}: give a mapping (ssh, private, roles)")
    if unknown := sorted(map(str, set(values) - KEYS)):
        raise InventoryError(f"{where}: unknown key {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(KEYS))})")
    ssh = str(values.get("ssh") or name)
    match = SSH_RE.fullmatch(ssh)
    if not match or (match["port"] and not 0 < int(match["port"]) < 65536):
        raise InventoryError(f"{where}.ssh: {ssh!r} is not [user@]host[:port]")
    private = values.get("private")
    if private is not None:
        try:
            private = str(ipaddress.ip_address(str(private)))
        except ValueError:
            raise InventoryError(f"{where}.private: {private!r} is not an IP address") from None
    roles = values.get("roles", list(ROLES))
    if not isinstance(roles, list) or not roles or not all(role in ROLES for role in roles):
        raise InventoryError(f"{where}.roles: give a list of roles among {', '.join(ROLES)}")
    return HostEntry(name, ssh, private, frozenset(roles))


def _check_site(entries: list[HostEntry]) -> None:
    """A site spread over several hosts: each reachable on its private address, each sole
    role on one host, web and worker on at least one, the lb with web only as the one web
    host."""
    for entry in entries:
        if entry.private is None:
            raise InventoryError(f"fabstack.hosts.{entry.name}.private: the hosts of a site "
                                 "spread over several hosts each need the address the others "
                                 "reach them on")
    for role in ROLES:
        holders = [entry.name for entry in entries if role in entry.roles]
        if role in SOLE_ROLES and len(holders) != 1:
            raise InventoryError(f"fabstack.hosts: one host holds role {role}, not "
                                 f"{len(holders)}{': ' if holders else ''}{', '.join(holders)}")
        if not holders:
            raise InventoryError(f"fabstack.hosts: no host holds role {role}")
    webs = [entry.name for entry in entries if "web" in entry.roles]
    for entry in entries:
        if {"lb", "web"} <= entry.roles and len(webs) > 1:
            raise InventoryError(
                f"fabstack.hosts.{entry.name}.roles: the lb holds web only as the site's one "
                f"web host; with several ({', '.join(webs)}) it proxies to them all: give it "
                "a host without web")


def site_of(inventory: dict[str, HostEntry], host: str) -> Site:
    """The site of the host a Connection calls ``host`` (its ``ssh`` host, or its private
    address: the same machine), as that host sees it."""
    for entry in inventory.values():
        if host in (entry.host, entry.private):
            return Site(entry, (entry,) if entry.whole else tuple(inventory.values()))
    return Site.alone(host)
