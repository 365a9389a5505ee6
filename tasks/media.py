"""The app's media: shared by a site's hosts, and ``fab restore-media``.

**Shared.** When the inventory gives a site several web or worker hosts (tasks/inventory.py),
the media folder lives on the db host's disk, which serves it over SFTP: its sshd gives the
app's account SFTP alone, into that folder, with the key of MEDIA_KEY, usable from the app
hosts' private addresses only. Each other web and worker host mounts it at the same path with
sshfs (``APP-media.service``: active once mounted, restarted when the db host is gone), checking
the db host's SSH key against the one this machine knows (its known_hosts); gunicorn and Celery
start after it. While nothing is mounted, the folder there is root's 0555: an upload fails
rather than lands on that host's own disk. Why sshfs: it needs no kernel module on either side
(an NFS server or client does, and some kernels have none), only sshd, which every host runs,
and its traffic is SSH's: encrypted and authenticated by keys.

**Restored.** ``fab restore-media`` puts uploads back from a media snapshot of the backup script.

Without ``--snapshot`` the task lists the snapshots (/opt/APP/backup/media/<UTC time>/). With
one, :data:`RESTORE_PY` on the host plans what would change in the media tree (or the part
``--path`` names), the task shows it and asks, and the same program applies it: each file it
copies back gets its bytes and times, each entry the mode and owner its snapshot recorded (an
older snapshot: the media folder's owner, 0644 files, 0755 folders); a file newer on the
host, and anything the snapshot lacks, stays unless ``--delete``. The README's "Backups"
section is the manual.
"""

from __future__ import annotations

import json
import posixpath
import re
import sys
from pathlib import Path

import paramiko
from fabric import Connection, task

from . import celery
from .host import StepFailed, session
from .primitives import (
    Change,
    Command,
    Directory,
    File,
    Ok,
    Packages,
    Service,
    host_notified,
    q,
    render,
)

# -- the media folder shared by a site's hosts ------------------------------------------------

def key_pair(s) -> tuple[str, str]:
    """MEDIA_KEY's private key file and its public key's known_hosts-style words."""
    path = Path(s["MEDIA_KEY"]).expanduser()
    try:
        key = paramiko.PKey.from_path(path)
    except (OSError, paramiko.SSHException, ValueError) as exc:
        raise StepFailed("media share", f"MEDIA_KEY {path}: not an SSH private key without a "
                         f"passphrase ({exc})") from None
    return path.read_text(), f"{key.get_name()} {key.get_base64()}"


def served_resources(h) -> list:
    """On the db host: the media folder served over SFTP to the site's other app hosts."""
    s, site = h.settings, h.site
    keys = f"/etc/ssh/fabstack-{s.app}-media.keys"
    clients = ",".join(site.others("web", "worker"))
    return [
        # root's, read by sshd: the account cannot change who may log in as it
        File(keys, f'restrict,from="{clients}" {key_pair(s)[1]} fabstack-{s.app}-media\n'),
        File(f"/etc/ssh/sshd_config.d/fabstack-{s.app}-media.conf",
             render("sshd-media.conf.j2", s, keys=keys), validate="/usr/sbin/sshd -t -f %s",
             notify=["ssh:reload"]),
        Service("ssh"),
    ]


def server_keys(h, entry) -> str:
    """known_hosts lines for the db host ``entry`` at its private address: its SSH host keys
    as this machine knows them (~/.ssh/known_hosts and the UserKnownHostsFile of the site's
    hosts' ssh_config entries), the ones fab checks when it connects there."""
    conn = Connection(entry.ssh, config=h.conn.config)
    known = paramiko.HostKeys()
    files = {"~/.ssh/known_hosts"} | {  # and those of the ssh_config entries of the site's hosts
        path for other in h.site.hosts for path in Connection(
            other.ssh, config=h.conn.config).ssh_config.get("userknownhostsfile", "").split()}
    for path in sorted(files):
        if Path(path).expanduser().is_file():
            known.load(str(Path(path).expanduser()))
    # as fab knows it (its port's entry), else the host's on SSH's port (the port given may
    # be out of reach: a host down, or a forwarded port), else its private address's
    name = conn.host if conn.port == 22 else f"[{conn.host}]:{conn.port}"
    found = known.lookup(name) or known.lookup(conn.host) or known.lookup(entry.private)
    if not found:
        raise StepFailed("media share", f"{entry.name}'s SSH host key ({name}) is not known "
                         "on this machine: connect to it once (fab -H "
                         f"{entry.name} status) before its media are mounted here")
    return "".join(f"{entry.private} {kind} {key.get_base64()}\n"
                   for kind, key in sorted(found.items()))


def mount_resources(h) -> list:
    """On a web or worker host other than the db host: the db host's media folder mounted
    over sshfs where the app's media folder is, before gunicorn and Celery start."""
    s, site = h.settings, h.site
    [db] = site.holding("db")
    media, unit = q(s.layout.media), f"{s.app}-media.service"
    key, known_hosts = f"{s.layout.conf}/media_key", f"{s.layout.conf}/media_known_hosts"
    remote = f"[{db.private}]" if ":" in db.private else db.private
    after = [f"/etc/systemd/system/{name}.d" for name in (
        *([f"{s.app}@.service"] if site.has("web") else []),
        *(celery.units(site) if site.has("worker") else []))]
    return [
        Packages(["sshfs"]),
        File(key, key_pair(s)[0], mode=0o600, secret=True),
        File(known_hosts, server_keys(h, db)),
        Command(f"mount point {s.layout.media}",
                f"mkdir -p -- {media} && chown root:root -- {media} && chmod 0555 -- {media}",
                unless=f"mountpoint -q -- {media} || [ \"$(stat -c %U:%a -- {media} "
                       "2>/dev/null)\" = root:555 ]",
                message="root's 0555 while nothing is mounted on it (an upload fails rather "
                        "than lands on this host's own disk)"),
        File(f"/etc/systemd/system/{unit}", render("media-mount.service.j2", s, server=db.name,
                                                  remote=remote, key=key,
                                                  known_hosts=known_hosts),
             notify=[f"{unit}:restart"]),
        *[resource for folder in after for resource in (
            Directory(folder, "root", "root", 0o755),
            File(f"{folder}/fabstack-media.conf", render("media-after.conf.j2", s)))],
        Mount(unit, s.layout.media, db.name),
    ]


MOUNT_WAIT = 10  # seconds provision waits for the media folder to be mounted


class Mount(Service):
    """The unit that mounts the db host's media folder (files/media-mount.service.j2: active
    once mounted) enabled, and the folder mounted. It is started without waiting for it
    (``--no-block``): on a site provisioned at once, the db host may serve the folder only a
    little later, and the unit retries every 2 s; provision waits up to MOUNT_WAIT s."""

    def __init__(self, unit: str, path: str, server: str):
        super().__init__(unit)  # its name, what and restart markers are a Service's
        self.path, self.server = path, server
        self.markers = self._markers

    def probe(self) -> str:
        unit, path = q(self.unit), q(self.path)
        # a retry under way (the db host did not serve the folder yet): its outcome, at most
        # MOUNT_WAIT s later
        return (f"systemctl show -p LoadState -p UnitFileState -p NeedDaemonReload -- {unit}\n"
                f"if ! mountpoint -q -- {path} && [ \"$(systemctl show -p ActiveState --value "
                f"-- {unit})\" = activating ]; then\n"
                f"    for i in $(seq {MOUNT_WAIT * 5}); do mountpoint -q -- {path} && break; "
                "sleep 0.2; done\nfi\n"
                f"mountpoint -q -- {path} && echo mounted=yes\n"
                f"for f in {self.markers}; do [ -e \"$f\" ] && echo pending=yes; done; true")

    def plan(self, state, host):
        props = dict(line.split("=", 1) for line in state.splitlines() if "=" in line)
        pending = "pending" in props or host_notified(host, f"{self.unit}@restart")
        cmds = []
        if props.get("LoadState") == "not-found" or props.get("NeedDaemonReload") == "yes":
            cmds.append("systemctl daemon-reload")
        if props.get("UnitFileState") != "enabled":
            cmds.append(f"systemctl enable --quiet -- {q(self.unit)}")
        if "mounted" in props and not pending:
            if not cmds:
                return Ok(f"enabled, {self.path} mounted from {self.server}")
            return Change("enabled", "\n".join(cmds))
        cmds += [f"systemctl {'restart' if pending else 'start'} --no-block -- {q(self.unit)}",
                 f"rm -f {self.markers}",
                 f"for i in $(seq {MOUNT_WAIT * 5}); do mountpoint -q -- {q(self.path)} && "
                 "break; sleep 0.2; done"]
        return Change(f"{'restarted' if pending else 'started'}: {self.path} mounted from "
                      f"{self.server} once it serves it (retried every 2 s; fab status says "
                      "when it is down)", "\n".join(cmds))


def mounted(site) -> bool:
    """True on a host that mounts the db host's media folder (a site's web or worker host
    other than the db host, when the site has several)."""
    return (site.shares_media and not site.has("db")
            and (site.has("web") or site.has("worker")))


def share_resources(h) -> list:
    """The host's part of the shared media folder (none on a site with one app host)."""
    if h.site.shares_media and h.site.has("db"):
        return served_resources(h)
    return mount_resources(h) if mounted(h.site) else []


# -- fab restore-media ------------------------------------------------------------------------

SNAPSHOT_RE = re.compile(r"^\d{8}T\d{6}Z$")  # as in files/backup.py.j2
META_NAME = ".fabstack-media-meta"  # as in files/backup.py.j2
SHOWN = 20  # entries of a plan listed in the report

# Runs as root on the host: python3 - JSON. Compares (and with "apply" restores) the snapshot's
# entries below "path" with the media folder's; prints one JSON object: what it did or would do.
RESTORE_PY = r'''
import filecmp, grp, json, os, pwd, shutil, sys
a = json.loads(sys.argv[1])
snap, media, rel, delete, apply = a["snapshot"], a["media"], a["path"], a["delete"], a["apply"]
try:
    with open(os.path.join(snap, a["meta_name"])) as f:
        meta = json.load(f)
except (OSError, ValueError):
    meta = None
top = os.stat(media)
out = {"restored": [], "newer": [], "deleted": [], "same": 0, "meta": meta is not None}

def wanted(p, is_dir):
    if meta is not None and p in meta:
        mode, owner, group = meta[p]
        try:
            return mode, pwd.getpwnam(owner).pw_uid, grp.getgrnam(group).gr_gid
        except KeyError:
            pass
    return (0o755 if is_dir else 0o644), top.st_uid, top.st_gid

def fix(p, dst, src):
    mode, uid, gid = wanted(p, os.path.isdir(src))
    st = os.lstat(dst)
    if (st.st_mode & 0o7777, st.st_uid, st.st_gid) != (mode, uid, gid):
        if apply:
            os.chown(dst, uid, gid)
            os.chmod(dst, mode)
        return True
    return False

def entries(root):
    if os.path.isfile(root):
        yield ""
        return
    yield ""
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(dirs + files):
            p = os.path.relpath(os.path.join(folder, name), root)
            if p != a["meta_name"]:
                yield p

src_root, dst_root = os.path.join(snap, rel), os.path.join(media, rel)
parts = rel.split("/")[:-1] if rel else []
for i in range(len(parts)):  # folders above --path that are gone come back first
    p = "/".join(parts[:i + 1])
    if not os.path.isdir(os.path.join(media, p)):
        out["restored"].append(p + "/")
        if apply:
            os.mkdir(os.path.join(media, p))
            fix(p, os.path.join(media, p), os.path.join(snap, p))
for sub in entries(src_root):
    src = os.path.join(src_root, sub) if sub else src_root
    dst = os.path.join(dst_root, sub) if sub else dst_root
    p = os.path.normpath(os.path.join(rel, sub)) if rel or sub else ""
    p = "" if p == "." else p
    if os.path.islink(src):
        continue
    if os.path.isdir(src):
        if not os.path.isdir(dst):
            out["restored"].append(p + "/")
            if apply:
                os.makedirs(dst, exist_ok=True)
        if (fix(p, dst, src) if os.path.isdir(dst) else False) and p + "/" not in out["restored"]:
            out["restored"].append(p + "/")
        continue
    if os.path.isfile(dst) and filecmp.cmp(src, dst, shallow=False):
        if fix(p, dst, src):
            out["restored"].append(p)
        else:
            out["same"] += 1
        continue
    if os.path.isfile(dst) and os.stat(dst).st_mtime > os.stat(src).st_mtime and not delete:
        out["newer"].append(p)
        continue
    out["restored"].append(p)
    if apply:
        tmp = os.path.join(os.path.dirname(dst), ".fabstack-restore." + os.path.basename(dst))
        shutil.copyfile(src, tmp)
        shutil.copystat(src, tmp)
        os.replace(tmp, dst)
        fix(p, dst, src)
if delete and os.path.isdir(dst_root) and os.path.isdir(src_root):
    for folder, dirs, files in os.walk(dst_root, topdown=False):
        for name in files + dirs:
            dst = os.path.join(folder, name)
            src = os.path.join(src_root, os.path.relpath(dst, dst_root))
            if not os.path.lexists(src):
                out["deleted"].append(os.path.relpath(dst, media))
                if apply:
                    if os.path.isdir(dst) and not os.path.islink(dst):
                        shutil.rmtree(dst)
                    else:
                        os.unlink(dst)
print(json.dumps(out))
'''


def clean_path(path: str) -> str:
    """``--path`` as a relative path inside the media folder; StepFailed when it leaves it."""
    rel = posixpath.normpath(path.strip().lstrip("/"))
    if rel.startswith("media/"):
        rel = rel[len("media/"):]
    if not path.strip() or rel in (".", "") or rel == ".." or rel.startswith("../"):
        raise StepFailed("restore-media", f"--path {path!r}: give a file or folder inside "
                         "the media folder, e.g. uploads/2026/photo.jpg")
    return rel


def snapshots(h) -> list[tuple[str, str, str]]:
    """The media snapshots on the host, oldest first: (name, files, size)."""
    base = h.settings.layout.media_snapshots
    (listing,) = h.probe([f"for d in {q(base)}/*/; do [ -d \"$d\" ] || continue; "
                          "n=$(basename \"$d\"); "
                          "echo \"$n $(find \"$d\" -type f ! -name "
                          f"{META_NAME} | wc -l) $(du -sh \"$d\" | cut -f1)\"; done"])
    rows = [tuple(line.split()) for line in listing.splitlines() if len(line.split()) == 3]
    return sorted(row for row in rows if SNAPSHOT_RE.match(row[0]))


def plan(h, snapshot: str, rel: str, delete: bool, apply: bool) -> dict:
    s = h.settings
    args = {"snapshot": f"{s.layout.media_snapshots}/{snapshot}",
            "media": s.layout.media.rstrip("/"),
            "path": rel, "delete": delete, "apply": apply, "meta_name": META_NAME}
    res = h.run(f"python3 - {q(json.dumps(args))} <<'FABSTACK_EOF'\n{RESTORE_PY}FABSTACK_EOF",
                what="restore-media")
    return json.loads(res.stdout.strip().splitlines()[-1])


def listed(items: list[str]) -> str:
    more = f" and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
    return ", ".join(items[:SHOWN]) + more


@task(name="restore-media",
      help={"snapshot": "Name of a media snapshot (without it: list them)",
            "path": "A file or folder inside the media folder (default: all of it)",
            "delete": "Also delete what the snapshot does not have (newer uploads!)",
            "yes": "Do not ask for confirmation"})
def restore_media(c, snapshot=None, path=None, delete=False, yes=False):
    """Put uploads back from a media snapshot (lists the snapshots without --snapshot)."""
    with session(c, "restore-media") as h:
        rel = clean_path(path) if path is not None else ""
        if snapshot is not None and not SNAPSHOT_RE.match(snapshot):
            raise StepFailed("restore-media", f"--snapshot {snapshot!r}: a snapshot's name is "
                             "its UTC time, e.g. 20261130T031500Z (fab restore-media lists them)")
        found = snapshots(h)
        if snapshot is None:
            for name, files, size in found:
                h.ok(f"snapshot {name}", f"{files} files, {size}")
            if not found:
                h.ok("snapshots", f"none in {h.settings.layout.media_snapshots}")
            return
        if snapshot not in [row[0] for row in found]:
            raise StepFailed("restore-media", f"no snapshot {snapshot} (there are: "
                             f"{', '.join(r[0] for r in found) or 'none'})")
        s = h.settings
        where = f"{s.layout.media}/{rel}" if rel else s.layout.media
        res = h.run(f"test -e {q(f'{s.layout.media_snapshots}/{snapshot}/{rel}')}",
                    what="restore-media", check=False) if rel else None
        if res is not None and not res.ok:
            raise StepFailed("restore-media", f"snapshot {snapshot} has no {rel}")
        todo = plan(h, snapshot, rel, delete, apply=False)
        if todo["newer"]:
            h.ok("newer on the host", f"kept: {listed(todo['newer'])} (--delete puts the "
                 "snapshot's version back)")
        if not todo["restored"] and not todo["deleted"]:
            h.ok(f"media {where}", f"as in snapshot {snapshot} ({todo['same']} files the same)")
            return
        summary = (f"{len(todo['restored'])} to put back from {snapshot}: "
                   f"{listed(todo['restored'])}"
                   + (f"; {len(todo['deleted'])} to delete: {listed(todo['deleted'])}"
                      if todo["deleted"] else ""))
        if not yes:
            print(f"[{h.name}] restore-media into {where}: {summary}", flush=True)
            answer = input("Type yes to go on: ") if sys.stdin.isatty() else ""
            if answer.strip().lower() != "yes":
                raise StepFailed("restore-media", "not confirmed: nothing was changed "
                                 "(--yes skips the question)")
        done = plan(h, snapshot, rel, delete, apply=True)
        owners = "" if done["meta"] else " (the snapshot has no record of modes and owners: " \
            "the media folder's owner, 0644 files, 0755 folders)"
        h.changed(f"media {where}", f"put back {len(done['restored'])} from {snapshot}: "
                  f"{listed(done['restored'])}{owners}")
        if done["deleted"]:
            h.changed(f"media {where}", f"deleted {len(done['deleted'])} the snapshot does not "
                      f"have: {listed(done['deleted'])}")
