"""Backups that restore: the backup layout and script, ``fab backup-db``, ``fab restore-db``.

``fab backup`` (``backup.setup``, part of ``fab provision``) lays out /opt/APP/backup,
installs the backup script ``/usr/local/sbin/APP-backup`` (files/backup.py.j2), its systemd
timer and, with OFFSITE_PUBKEY, the read-only ``offsite`` pull account. Every dump (the
timer's, ``fab backup-db``'s, a deploy's before it migrates, ``fab restore-db``'s safety dump)
is made by that one script as the ``backups`` user and named only once ``pg_restore --list``
has read it. The README's "Backups" section is the manual.
"""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

from fabric import task
from invoke import Collection

from .db import pgpass_line
from .host import StepFailed, converging_task, session
from .layout import BACKUPS_HOME as BACKUP_HOME
from .primitives import Command, Directory, File, Group, Packages, Service, User, q, render
from .scripts import script

BACKUP_USER = "backups"
BACKUP_GROUP = "backups"
OFFSITE_USER = "offsite"
OFFSITE_HOME = "/var/lib/offsite"
RRSYNC = "/usr/bin/rrsync"
FOLDERS = ("daily", "weekly", "monthly", "previous-deploy", "manual", "uploads", "media")
DUMP_FOLDERS = ("manual", "previous-deploy", "daily", "weekly", "monthly", "uploads")

def human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


# -- provisioning --------------------------------------------------------------------------

def authorized_keys_line(pubkey: str, backup_dir: str) -> str:
    """The off-site key, limited to a read-only rsync of ``backup_dir`` and nothing else."""
    return f'restrict,command="{RRSYNC} -ro {backup_dir}" {pubkey.strip()}\n'


def offsite_resources(h) -> list:
    s = h.settings
    keys = f"{OFFSITE_HOME}/.ssh/authorized_keys"
    pub = s["OFFSITE_PUBKEY"]
    if not pub:  # no account wanted: make sure no key opens it
        return [File(keys, present=False)]
    return [
        Group(OFFSITE_USER),
        # A shell is needed to run the forced command; the key allows nothing else.
        User(OFFSITE_USER, group=OFFSITE_USER, home=OFFSITE_HOME, shell="/bin/sh",
             groups=[BACKUP_GROUP]),
        Directory(OFFSITE_HOME, "root", OFFSITE_USER, 0o750),
        Directory(f"{OFFSITE_HOME}/.ssh", "root", OFFSITE_USER, 0o750),
        # root-owned: the account cannot change its own key or its restrictions.
        File(keys, authorized_keys_line(Path(pub).expanduser().read_text(), s.layout.backup),
             owner="root", group=OFFSITE_USER, mode=0o640),
    ]


def backup_resources(h) -> list:
    """Everything ``backup.setup`` declares, in order."""
    s, site = h.settings, h.site
    d = s.layout.backup
    unit = f"{s.app}-backup"
    dumps = site.has("db")
    return [
        Packages(["rsync"]),
        Group(BACKUP_GROUP),
        User(BACKUP_USER, group=BACKUP_GROUP, home=BACKUP_HOME),
        Directory(BACKUP_HOME, BACKUP_USER, BACKUP_GROUP, 0o700),
        *([File(f"{BACKUP_HOME}/.pgpass", pgpass_line(s.db_user, s.db_name, s["DB_PASSWORD"]),
                owner=BACKUP_USER, group=BACKUP_GROUP, mode=0o600, secret=True)]
          if dumps else []),
        Directory(d, "root", BACKUP_GROUP, 0o750),
        *[Directory(f"{d}/{name}", BACKUP_USER, BACKUP_GROUP, 0o750) for name in FOLDERS],
        # the database's dumps where it runs, the media's snapshots where they are stored
        File(s.layout.backup_script, render("backup.py.j2", s, dumps=dumps,
                                            media=site.media_here),
             mode=0o755, validate="python3 -m py_compile %s"),
        File(f"/etc/systemd/system/{unit}.service", render("backup.service.j2", s)),
        File(f"/etc/systemd/system/{unit}.timer", render("backup.timer.j2", s),
             notify=[f"{unit}.timer:restart"]),
        Command("systemd units", "systemctl daemon-reload",
                unless=f"test \"$(systemctl show -p NeedDaemonReload --value {unit}.service)\" "
                       "!= yes", message=f"reloaded ({unit}.service changed)"),
        Service(f"{unit}.timer"),
        *offsite_resources(h),
    ]


# -- dumps -----------------------------------------------------------------------------------

def dump_database(h, kind: str) -> tuple[str, int]:
    """A checked dump into ``backup/<kind>`` by the backup script; its path and size.

    Raises StepFailed("database dump", ...) when the dump or its check fails.
    """
    script = h.settings.layout.backup_script
    res = h.run(f"test -x {q(script)} || {{ echo '{script} is missing: run fab backup (part of "
                f"fab provision) first' >&2; exit 1; }}\n{q(script)} dump {q(kind)}",
                what="database dump", check=False)
    last = res.stdout.strip().splitlines()[-1:] if res.ok else []
    if not last or len(last[0].rsplit(" ", 1)) != 2:
        raise StepFailed("database dump", h.mask(
            (res.stderr.strip() or res.stdout.strip() or f"exit {res.exited}")[-1500:]))
    path, size = last[0].rsplit(" ", 1)
    return path, int(size)


def row_counts(h) -> dict[str, int]:
    """Exact row counts per table of the app's database, read as the app's role."""
    res = h.run(script("backup-db.sh.j2", h.settings, action="counts"), what="row counts")
    counts = {}
    for line in res.stdout.splitlines():
        table, _, count = line.rpartition("|")
        if table:
            counts[table] = int(count or 0)
    return counts


def counts_table(before: dict[str, int], after: dict[str, int]) -> str:
    """``table: before -> after`` lines, every table of either side."""
    width = max((len(t) for t in {*before, *after}), default=0)
    return "".join(f"{t:<{width}}  {before.get(t, '-'):>8} -> {after.get(t, '-')}\n"
                   for t in sorted({*before, *after}))


def find_dump(h, name: str) -> str:
    """The path of dump ``name`` (a file name, or KIND/NAME) in the backup folders."""
    s = h.settings
    if name.startswith("/"):
        name = name.removeprefix(s.layout.backup + "/")
    parts = name.split("/")
    if ".." in parts or len(parts) > 2 or not name.endswith(".dump"):
        raise StepFailed("find dump", f"{name!r}: give a dump's file name (….dump) or "
                         "FOLDER/NAME.dump from the backup folder")
    candidates = [f"{s.layout.backup}/{name}"] if len(parts) == 2 else [
        f"{s.layout.backup}/{folder}/{name}" for folder in DUMP_FOLDERS]
    found = h.probe([f"for f in {' '.join(q(c) for c in candidates)}; do "
                     "[ -f \"$f\" ] && echo \"$f\"; done; true"])[0].split()
    if not found:
        listing = h.probe([f"cd {q(s.layout.backup)} && ls -1t */*.dump 2>/dev/null | head -n 8"])
        raise StepFailed("find dump", f"no dump {name} in {s.layout.backup}; newest: "
                         f"{', '.join(listing[0].split()) or 'none'}")
    return found[0]


def upload_dump(h, local: str) -> str:
    """Copy the local dump ``local`` into backup/uploads/ on the host; its path there."""
    path = Path(local).expanduser()
    if not path.is_file():
        raise StepFailed("upload dump", f"{local}: no such file here")
    s = h.settings
    name = path.name if path.name.endswith(".dump") else path.name + ".dump"
    dest = f"{s.layout.backup}/uploads/{name}"
    tmp = h.upload(str(path), name, "upload dump")
    h.run(f"install -o {BACKUP_USER} -g {BACKUP_GROUP} -m 0640 {q(tmp)} {q(dest)}\n"
          f"rc=$?; {h.drop_upload(tmp)}; exit $rc", what="upload dump")
    h.changed("upload dump", f"{path} -> {dest}")
    return dest


def download_dump(h, path: str, local_dir: str = ".") -> Path:
    """Fetch the dump at ``path`` to ``local_dir`` on this machine (Fabric's get)."""
    local = Path(local_dir).expanduser() / Path(path).name
    if h.conn.user == "root":
        h.conn.get(path, local=str(local))
    else:  # the dump is readable by root and the backups group only: hand over a copy
        tmp = f"/tmp/fabstack-{uuid.uuid4().hex}.dump"
        h.run(f"install -o {q(h.conn.user)} -m 0600 {q(path)} {q(tmp)}", what="download dump")
        try:
            h.conn.get(tmp, local=str(local))
        finally:
            h.run(f"rm -f {q(tmp)}", what="download dump")
    h.round_trips += 1
    local.chmod(0o600)
    return local


# -- restore ---------------------------------------------------------------------------------

def app_units(s) -> list[str]:
    """The units that use the database: gunicorn's instances (and the socket and service of a
    host deployed before them), Celery's beat and worker (stopped by one systemctl command:
    systemd orders the stops, not this list)."""
    return [*(f"{s.app}@{color}.service" for color in s.layout.colors), f"{s.app}.socket",
            f"{s.app}.service", "celerybeat.service", "celery.service"]


def restore_database(h, path: str) -> None:
    """Stop the app and Celery, take a safety dump, pg_restore ``path``, start them again."""
    s = h.settings
    res = h.run(f"pg_restore --list {q(path)} >/dev/null", what="check dump", check=False)
    if not res.ok:
        raise StepFailed("check dump", f"{path} is not a dump pg_restore can read: "
                         f"{res.stderr.strip()[-500:]}")
    units = " ".join(q(u) for u in app_units(s))
    res = h.run(f"for u in {units}; do systemctl is-active --quiet -- \"$u\" && echo \"$u\"; "
                "done; true", what="stop the app")
    active = res.stdout.split()
    if active:
        h.run(f"systemctl stop -- {' '.join(q(u) for u in active)}", what="stop the app")
        h.changed("stop the app", f"stopped {', '.join(active)} (nothing writes meanwhile)")
    try:
        before = row_counts(h)
        safety, size = dump_database(h, "manual")
        h.changed("safety dump", f"the database as it was: {safety} ({human(size)})")
        res = h.run(script("backup-db.sh.j2", s, action="restore", dump=path),
                    what="restore", check=False)
        if not res.ok:
            raise StepFailed("restore", f"pg_restore failed, the database is unchanged (one "
                             f"transaction): {res.stderr.strip()[-1500:]}\n"
                             f"safety dump: {safety}")
        h.changed("restore", f"{path} restored into {s.db_name} as role {s.db_user}")
        after = row_counts(h)  # before anything runs again: what the dump gave back
    finally:
        if active:
            h.run(f"systemctl start -- {' '.join(q(u) for u in reversed(active))}",
                  what="start the app")
            h.changed("start the app", f"started {', '.join(reversed(active))}")
    h.ok("row counts", "per table, before -> after the restore:\n"
         + counts_table(before, after).rstrip("\n"))


# -- tasks -----------------------------------------------------------------------------------

@converging_task("backup", default=True)
def setup(h):
    """Backup layout, the backup script, its daily timer, and the off-site pull account."""
    return backup_resources(h)


@task(name="backup-db", help={"download": "Also fetch the dump to this machine",
                              "to": "Local folder --download writes to (default: .)"})
def backup_db(c, download=False, to="."):
    """Dump the app's database now (checked with pg_restore --list); print its path and size."""
    with session(c, "backup-db") as h:
        path, size = dump_database(h, "manual")
        h.changed("database dump", f"{path} ({human(size)}), checked with pg_restore --list")
        if download:
            local = download_dump(h, path, to)
            h.changed("download", f"{path} -> {local}")


@task(name="restore-db", help={"dump": "Name of a dump on the host (NAME.dump or FOLDER/NAME.dump)",
                               "upload": "A dump on this machine to upload and restore",
                               "yes": "Do not ask for confirmation"})
def restore_db(c, dump=None, upload=None, yes=False):
    """Restore a dump into the app's database (a safety dump is taken first); row counts."""
    if bool(dump) == bool(upload):
        from invoke.exceptions import Exit
        raise Exit("error: give exactly one of --dump NAME or --upload LOCALFILE", code=2)
    with session(c, "restore-db") as h:
        s = h.settings
        if h.site.spread:  # the app to stop runs on another host than the database
            raise StepFailed("restore", "not built yet for a site spread over several hosts: "
                             "nothing was changed (stop the app and Celery on the app host, "
                             "then pg_restore on the db host by hand)")
        if not yes:
            source = dump or upload
            print(f"Restore {source} into database {s.db_name} on {h.name}? Its current data "
                  "is replaced (a safety dump is taken first); the app and Celery stop "
                  "meanwhile.", flush=True)
            answer = input("Type yes to go on: ") if sys.stdin.isatty() else ""
            if answer.strip().lower() != "yes":
                raise StepFailed("restore", "not confirmed: nothing was changed "
                                 "(--yes skips the question)")
        path = upload_dump(h, upload) if upload else find_dump(h, dump)
        restore_database(h, path)


# The ``backup`` namespace holds setup only: backup-db and restore-db live at the root.
ns = Collection("backup", setup)
