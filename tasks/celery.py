"""Celery: the app's workers (``celery.service``) and its scheduler (``celerybeat.service``).

``fab celery`` (``celery.setup``) installs both systemd units, the tmpfiles.d entries for
/run/celery and /var/log/celery, and enables the units so they come back after a reboot. They
run as the ``celery`` user (made by the db step, home /var/lib/celery, which also holds beat's
schedule file) with the settings of /opt/APP/conf/celery.conf and the app's environment file,
sandboxed by systemd (the system read-only but for their run, log and home directories).

Before the first deploy there is no code to run (/opt/APP/app is missing): the units are
installed and enabled but left stopped. Once a release exists they are started, and restarted
once when a unit file, celery.conf or the app's environment changed. ``fab celery.restart``
restarts both and waits for them; a deploy, once it switched releases, queues their restart.
A stop is Celery's warm shutdown: running tasks finish first.

On a site spread over hosts (tasks/inventory.py) the worker runs on every worker host and beat
on one of them (the first in the inventory): a beat a host ran before it lost that place is
stopped and its unit removed, or two would schedule every periodic task twice.
"""

from __future__ import annotations

from fabric import task

from .host import converging_task, session
from .layout import CELERY_LOGS as LOG_DIR
from .layout import CELERY_RUN as RUN_DIR
from .primitives import (
    PENDING_DIR,
    Change,
    Command,
    File,
    Ok,
    ReleaseService,
    Resource,
    host_notified,
    q,
    render,
)
from .scripts import script

WORKER, BEAT = "celery.service", "celerybeat.service"
BEAT_UNIT = f"/etc/systemd/system/{BEAT}"
TMPFILES = "/etc/tmpfiles.d/celery.conf"
TMPFILES_MARKER = "celery-tmpfiles@create"
# The directories tmpfiles.d makes, as `stat -c '%U:%G %a'` shows them when right.
TMPFILES_DIRS = {RUN_DIR: "celery:celery 755", LOG_DIR: "celery:celery 750"}
RESTART_WAIT = 15  # seconds a restarted unit has to be active


class TmpfilesApplied(Resource):
    """The directories of a tmpfiles.d file exist as it declares them.

    ``systemd-tmpfiles --create FILE`` runs when the file changed (its :class:`File`
    notifies ``marker``), in this run or an interrupted earlier one, or when a directory is
    missing or differs; at boot systemd applies the file by itself. The directories' owner
    ``user`` must exist already (it is not made here).
    """

    def __init__(self, path: str, dirs: dict[str, str], marker: str, user: str):
        self.path, self.dirs, self.marker, self.user = path, dirs, marker, user
        self.what = f"tmpfiles {path}"

    def probe(self) -> str:
        stats = "".join(f"echo \"{d} $(stat -c '%U:%G %a' -- {q(d)} 2>/dev/null || "
                        f"echo missing)\"\n" for d in self.dirs)
        return (f"{stats}test -e {PENDING_DIR}/{q(self.marker)} && echo pending\n"
                f"getent passwd {q(self.user)} >/dev/null || echo no-user; true")

    def plan(self, state, host):
        lines = state.splitlines()
        have = dict(line.split(" ", 1) for line in lines if line.startswith("/"))
        wrong = [d for d, want in self.dirs.items() if have.get(d) != want]
        pending = "pending" in lines or host_notified(host, self.marker)
        if "no-user" in lines and not host.check:
            return Change(f"cannot apply: user {self.user} missing (the db step makes it: run "
                          "fab provision, or fab db, first)",
                          f"echo user {q(self.user)} missing >&2; exit 1")
        if not wrong and not pending:
            return Ok(", ".join(f"{d} {want}" for d, want in self.dirs.items()))
        why = ", ".join(f"{d} {have.get(d, 'missing')}" for d in wrong) or "file changed"
        return Change(f"applied ({why})",
                      f"systemd-tmpfiles --create {q(self.path)}\n"
                      f"rm -f {PENDING_DIR}/{q(self.marker)}")


def units(site) -> tuple[str, ...]:
    """The Celery units a host of ``site`` (an inventory.Site) runs: the worker on a worker
    host, and beat too on the one that runs it."""
    if not site.has("worker"):
        return ()
    return (WORKER, BEAT) if site.beat == site.me else (WORKER,)


def celery_resources(h) -> list:
    """Everything ``celery.setup`` declares, in order."""
    s = h.settings
    release = s.layout.current
    beat = BEAT in units(h.site)
    return [
        File(TMPFILES, render("celery-tmpfiles.conf.j2", s),
             notify=[TMPFILES_MARKER.replace("@", ":")]),
        TmpfilesApplied(TMPFILES, TMPFILES_DIRS, TMPFILES_MARKER, "celery"),
        File(f"/etc/systemd/system/{WORKER}", render("celery.service.j2", s),
             notify=[f"{WORKER}:restart"]),
        File(BEAT_UNIT, render("celerybeat.service.j2", s), notify=[f"{BEAT}:restart"])
        if beat else Command(f"service {BEAT}", f"systemctl disable --now --quiet {BEAT}\n"
                             f"rm -f -- {BEAT_UNIT} {PENDING_DIR}/{BEAT}@*\n"
                             "systemctl daemon-reload", unless=f"test ! -e {BEAT_UNIT}",
                             message=f"stopped and removed: beat runs on {h.site.beat.name}"),
        ReleaseService(WORKER, release),
        *([ReleaseService(BEAT, release)] if beat else []),
    ]


def restart_celery(h, reason: str = "(asked for)", wait: bool = True) -> None:
    """Restart the worker and beat, and report it.

    A restart also satisfies any restart still pending from a configuration change, so those
    markers are cleared. With ``wait``, fails (StepFailed) when a unit is not active
    afterwards. Without (a deploy, once it switched releases), the restart is only queued:
    the worker's warm shutdown lets its running tasks finish, which can take up to the task
    time limit, and a deploy does not sit through that; ``fab status`` shows the units.
    """
    if not h.check:
        h.run(script("celery-restart.sh.j2", h.settings, *units(h.site), pending=PENDING_DIR,
                     wait=RESTART_WAIT if wait else 0), what="restart celery")
    for unit in units(h.site):
        h.changed(f"service {unit}", f"restarted {reason}" if wait else
                  f"restart queued {reason}" + ("; its running tasks finish first" * (
                      unit == WORKER)))


@converging_task("celery", default=True)
def setup(h):
    """Celery worker and beat units: installed, enabled, running once a release exists."""
    return celery_resources(h)


@task(help={"check": "Show what would be done and do nothing."})
def restart(c, check=False):
    """Restart the Celery worker and beat (they pick up the current release)."""
    with session(c, "celery.restart", check) as h:
        restart_celery(h)
