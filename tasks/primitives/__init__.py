"""Idempotent building blocks: declare the state you want, :func:`ensure` makes it so.

Each resource is a small object with a read-only ``probe()`` shell snippet and a
``plan(state, host)`` that returns :class:`Ok` (already right, and why) or a
:class:`Change` (a message and the shell script that makes it right).
:func:`ensure` reads the state of *all* the resources it is given in one SSH
round trip, then applies only what differs, in order; each change re-reads the
state of the remaining resources in its own round trip, after the change
succeeded. In check mode it plans and reports, and applies nothing.

Restarts survive failures: a file that a service depends on leaves a marker in
``/var/lib/fabstack/pending`` *before* it is moved into place, and the
:class:`Service` resource restarts (or reloads) the unit and clears the
marker. A run that dies in between leaves the marker, so the next run still
restarts the unit.

These are public: your own tasks can use them the same way the library's do::

    ensure(host,
           Packages(["nginx"]),
           File("/etc/nginx/conf.d/x.conf", render("x.conf.j2", host.settings),
                validate="nginx -t", notify=["nginx.service:reload"]),
           Service("nginx"))

One module per concern, as pyinfra splits its operations: :mod:`.engine` (resources,
plans, :func:`ensure`, the batched probe, ownership), :mod:`.templates`, :mod:`.apt`,
:mod:`.users`, :mod:`.files`, :mod:`.services`, :mod:`.commands` and :mod:`.firewall`.
Every public name is importable from here.
"""

from __future__ import annotations

from .apt import (
    APT_GET,
    APT_STAMP,
    DPKG_INTERRUPTED,
    DPKG_PROBE,
    DPKG_RECOVER,
    DPKG_RECOVERED,
    UPGRADE_STAMP,
    AptUpdate,
    DistUpgrade,
    Packages,
    apt_repository,
    one_apt_run,
)
from .commands import Command
from .engine import (
    OWNED,
    PENDING_DIR,
    STATE_DIR,
    Change,
    Note,
    Ok,
    Resource,
    claim_script,
    ensure,
    host_notified,
    q,
    refuse_conflicts,
)
from .files import DIFF_LIMIT, Directory, File
from .firewall import Firewall
from .services import ReleaseService, Service
from .templates import FILES_DIR, TemplateError, prerender, render
from .users import Group, User

__all__ = [
    "APT_GET", "APT_STAMP", "DIFF_LIMIT", "DPKG_INTERRUPTED", "DPKG_PROBE", "DPKG_RECOVER",
    "DPKG_RECOVERED", "FILES_DIR", "OWNED", "PENDING_DIR", "STATE_DIR", "UPGRADE_STAMP",
    "AptUpdate", "Change",
    "Command", "Directory", "DistUpgrade", "File", "Firewall", "Group", "Note", "Ok",
    "Packages", "ReleaseService", "Resource", "Service", "TemplateError", "User",
    "apt_repository", "claim_script", "ensure", "host_notified", "one_apt_run", "prerender", "q",
    "refuse_conflicts", "render",
]
