"""Idempotent building blocks: declare the state you want, :func:`ensure` makes it so.

Each resource is a small object with a read-only ``probe()`` shell snippet and a
``plan(state, host)`` that returns :class:`Ok` (already right, and why) or a
:class:`Change` (a message and the shell script that makes it right). :func:`ensure` reads
the state of all its resources in one SSH round trip and applies only what differs, in
order, each change in one round trip with the re-read of the resources after it; in check
mode it plans and reports, and applies nothing. A file that a service depends on leaves a
marker in ``/var/lib/fabstack/pending`` before it lands, and :class:`Service` restarts (or
reloads) the unit and clears it, so a run that dies in between still gets its restart on the
next run. One module per concern (:mod:`.engine`, :mod:`.templates`, :mod:`.apt`,
:mod:`.users`, :mod:`.files`, :mod:`.services`, :mod:`.commands`, :mod:`.firewall`); every
public name is importable from here, and the README's "Writing your own tasks" shows them
in use.
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
from .templates import (
    BACKGROUND_NICE,
    FILES_DIR,
    TemplateError,
    autogroup_nice,
    prerender,
    render,
)
from .users import Group, User

__all__ = [
    "APT_GET", "APT_STAMP", "BACKGROUND_NICE", "DIFF_LIMIT", "DPKG_INTERRUPTED", "DPKG_PROBE",
    "DPKG_RECOVER", "DPKG_RECOVERED", "FILES_DIR", "OWNED", "PENDING_DIR", "STATE_DIR",
    "UPGRADE_STAMP", "AptUpdate", "Change",
    "Command", "Directory", "DistUpgrade", "File", "Firewall", "Group", "Note", "Ok",
    "Packages", "ReleaseService", "Resource", "Service", "TemplateError", "User",
    "apt_repository", "autogroup_nice", "claim_script", "ensure", "host_notified", "one_apt_run",
    "prerender", "q", "refuse_conflicts", "render",
]
