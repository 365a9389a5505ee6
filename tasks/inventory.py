"""The inventory: the hosts fabstack acts on when fab is given no ``-H``.

They are declared in Fabric's own configuration (the project's ``fabric.yaml``,
``~/.fabric.yaml`` or a file given with ``fab -f``), in the ``fabstack`` section::

    fabstack:
      hosts:
        web1:
          ssh: root@203.0.113.11        # [user@]host[:port], or a Host alias of ~/.ssh/config
        web2:
          ssh: deploy@203.0.113.12:2222

A host's name is how fab's output and ``-H`` name it (``fab -H web2 provision``); ``ssh``
defaults to the name itself. The inventory holds no secrets: the settings stay in ``.env``.
A host not in the inventory (``fab -H 198.51.100.7 provision``) is acted on as before.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# [user@]host[:port]: what Fabric's Connection takes as a host string
SSH_RE = re.compile(r"(?:[^@\s:]+@)?(?P<host>[^@\s:]+)(?::(?P<port>\d{1,5}))?")
KEYS = {"ssh"}


class InventoryError(ValueError):
    """The inventory in Fabric's configuration is malformed; the message says where."""


@dataclass(frozen=True)
class HostEntry:
    """One host of the inventory: its name and where SSH reaches it."""

    name: str
    ssh: str

    @property
    def host(self) -> str:
        """The host part of ``ssh`` (what a Connection to it calls its host)."""
        return SSH_RE.fullmatch(self.ssh)["host"]


def load(config) -> dict[str, HostEntry]:
    """The inventory of Fabric configuration ``config`` by name (empty when none is declared).

    Raises InventoryError naming the host and key that are wrong.
    """
    hosts = (config.get("fabstack") or {}).get("hosts") or {}
    if not isinstance(hosts, dict):
        raise InventoryError("fabstack.hosts: give a mapping of host names to their settings")
    entries: dict[str, HostEntry] = {}
    for name, values in hosts.items():
        where = f"fabstack.hosts.{name}"
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise InventoryError(f"{where}: a host's name is letters, digits, '.', '_' and '-'")
        values = values or {}
        if not isinstance(values, dict):
            raise InventoryError(f"{where}: give a mapping (ssh: ...)")
        if unknown := sorted(set(values) - KEYS):
            raise InventoryError(f"{where}: unknown key {', '.join(map(str, unknown))} "
                                 f"(known: {', '.join(sorted(KEYS))})")
        ssh = str(values.get("ssh") or name)
        match = SSH_RE.fullmatch(ssh)
        if not match or (match["port"] and not 0 < int(match["port"]) < 65536):
            raise InventoryError(f"{where}.ssh: {ssh!r} is not [user@]host[:port]")
        entries[name] = HostEntry(name, ssh)
    seen: dict[str, str] = {}
    for entry in entries.values():
        if entry.host in seen:
            raise InventoryError(f"fabstack.hosts: {seen[entry.host]} and {entry.name} are the "
                                 f"same host ({entry.host})")
        seen[entry.host] = entry.name
    return entries


def name_of(inventory: dict[str, HostEntry], host: str) -> str:
    """The inventory's name for the host a Connection calls ``host`` (``host`` if none)."""
    for entry in inventory.values():
        if entry.host == host:
            return entry.name
    return host
