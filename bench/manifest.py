"""What `fab provision` declares for a host, as data the peer tools converge to.

The benchmark's Ansible playbook and pyinfra deploy do the same work as our `provision`
only if they declare the same packages, users, directories, files, units, database
objects and firewall rules. Rather than keeping three hand-written copies in step, this
module runs provision's own steps against the host with `ensure` recording instead of
converging (the host is read for the few facts the steps ask; nothing is changed) and
writes what they declared:

    OUT/manifest.json   {"resources": [{"type": ..., "what": ..., ...}, ...], "notes": [...]}
                        in provision's order
    OUT/files/NNN       the content of each rendered file (mode 0600: some hold secrets)

Every resource has "what", the name fab's report gives it (the bench checks that each run
covered every resource by it); "notes" are the whats of provision's report lines that
declare nothing (Note: a part deliberately skipped, with the reason). Resource types and
their other fields:

    apt_update      max_age (seconds)
    dist_upgrade    mode (all, security, off, first: see tasks.primitives.DistUpgrade)
    packages        names
    group           name, system
    user            name, group, home, shell, system, groups
    directory       path, owner, group, mode ("0750")
    file            path, present, src (under OUT), owner, group, mode, validate
                    (command, %s = new file) or null, secret, notify: "UNIT:restart" or
                    "UNIT:reload" when the file changed, or a marker that a later command or
                    tmpfiles resource acts on ("ca-certificates:update", "celery-tmpfiles:create")
    service         name (unit), enabled, running
    command         what, script, creates, unless (a shell test: skip when it succeeds)
    tmpfiles        path (systemd-tmpfiles --create PATH when the file changed)
    firewall        allow (ufw rule specs), incoming policy deny
    pg_setting      name, value (ALTER SYSTEM; restart PostgreSQL when changed)
    pg_role         name, password (clear text: bench secrets only), login
    pg_database     name, owner, encoding
    pg_membership   member, role

Usage (as root, against a converged sandbox): python bench/manifest.py ENV_FILE SSH_CONFIG
HOST OUT_DIR.
"""

from __future__ import annotations

import io
import json
import sys
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

from fabric import Config, Connection

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import tasks  # noqa: E402
from tasks import (  # noqa: E402
    celery,
    certbot,
    db,
    deploy,
    monitoring,
    nginx,
    primitives,
    provision,
)

P = primitives


def _file(r: P.File, out: Path, n: int) -> dict:
    src = None
    if r.present:
        src = f"files/{n:03d}"
        path = out / src
        path.touch(mode=0o600)
        path.write_bytes(r.content)
    notify = [m.replace("@", ":") for m in r.markers]
    return {"type": "file", "path": r.path, "present": r.present, "src": src, "owner": r.owner,
            "group": r.group, "mode": f"{r.mode:04o}", "validate": r.validate,
            "notify": notify, "secret": r.secret}


def describe(r: P.Resource, out: Path, n: int) -> dict:
    """One declared resource as manifest data (rendered file content written under ``out``)."""
    return {"what": r.what, **_fields(r, out, n)}


def _fields(r: P.Resource, out: Path, n: int) -> dict:
    if isinstance(r, nginx.Site):
        return _file(r.tls if r.wanted else r.http, out, n)
    if isinstance(r, P.File):
        return _file(r, out, n)
    if isinstance(r, P.AptUpdate):
        return {"type": "apt_update", "max_age": r.max_age}
    if isinstance(r, P.DistUpgrade):
        return {"type": "dist_upgrade", "mode": r.mode}
    if isinstance(r, P.Packages):
        return {"type": "packages", "names": list(r.names)}
    if isinstance(r, P.Group):
        return {"type": "group", "name": r.name, "system": r.system}
    if isinstance(r, P.User):
        return {"type": "user", "name": r.name, "group": r.group, "home": r.home,
                "shell": r.shell, "system": r.system, "groups": list(r.groups)}
    if isinstance(r, P.Directory):
        return {"type": "directory", "path": r.path, "owner": r.owner, "group": r.group,
                "mode": f"{r.mode:04o}"}
    if isinstance(r, P.Service):  # a ReleaseService too: the bench host has a release
        return {"type": "service", "name": r.unit, "enabled": r.enabled, "running": r.running}
    if isinstance(r, nginx.Upstream):  # written once, then the deploys' (as `creates`)
        return {"type": "command", "what": r.what, "creates": r.path, "unless": None,
                "script": f"cat > {r.path} <<'EOF'\n{r.new.content.decode()}EOF"}
    if isinstance(r, deploy.LiveInstance):  # the instance the upstream file names runs
        unit = f"{r.s.app}@$c.service"
        return {"type": "command", "what": r.what, "creates": None, "script": "exit 1",
                "unless": nginx.live_color(r.s) + f"[ \"$c\" != legacy ] && systemctl "
                          f"is-active --quiet {unit}"}
    if isinstance(r, P.Command):
        return {"type": "command", "what": r.what, "script": r.script, "creates": r.creates,
                "unless": r.unless}
    if isinstance(r, P.Firewall):
        return {"type": "firewall", "allow": list(r.allow)}
    if isinstance(r, celery.TmpfilesApplied):
        return {"type": "tmpfiles", "path": r.path}
    if isinstance(r, db.PostgresSetting):
        return {"type": "pg_setting", "name": r.name, "value": r.value}
    if isinstance(r, db.PostgresRole):
        return {"type": "pg_role", "name": r.name, "password": r.password, "login": True}
    if isinstance(r, db.PostgresDatabase):
        return {"type": "pg_database", "name": r.name, "owner": r.owner, "encoding": "UTF8"}
    if isinstance(r, monitoring.PostgresMembership):
        return {"type": "pg_membership", "member": r.member, "role": r.role}
    if isinstance(r, certbot.Certificate):
        raise SystemExit("the bench compares plain-HTTP hosts: set ACME_SERVER empty")
    raise SystemExit(f"manifest: no description for {type(r).__name__} ({r.what})")


@contextmanager
def recording(declared: list):
    """Make every task module's ``ensure`` record its resources instead of converging."""
    def record(host, *resources):
        declared.extend(resources)
        return 0

    modules = [m for m in vars(tasks).values()
               if getattr(m, "__name__", "").startswith("tasks.") and hasattr(m, "ensure")]
    saved = {m: m.ensure for m in modules}
    for m in modules:
        m.ensure = record
    try:
        yield
    finally:
        for m, original in saved.items():
            m.ensure = original


def export(env_file: Path, ssh_config: Path, host: str, out: Path) -> Path:
    """Write ``out``/manifest.json (and files/) for a provision of ``host``; return its path."""
    config = Config(runtime_ssh_path=str(ssh_config),
                    overrides={"fabstack": {"env_file": str(env_file), "check": True}})
    config.load_ssh_config()
    declared: list = []
    (out / "files").mkdir(parents=True, exist_ok=True)
    # The session's report would only say that nothing was converged: shown on failure only.
    report = io.StringIO()
    try:
        with Connection(host, config=config) as c, recording(declared), redirect_stdout(report):
            provision.all.body(c)
    except BaseException:
        print(report.getvalue(), end="")
        raise
    manifest = out / "manifest.json"
    manifest.write_text(json.dumps(
        {"resources": [describe(r, out, n) for n, r in enumerate(declared)
                       if not isinstance(r, P.Note)],
         "notes": [r.what for r in declared if isinstance(r, P.Note)]}, indent=1))
    manifest.chmod(0o600)
    return manifest


if __name__ == "__main__":
    env_file, ssh_config, host, out = sys.argv[1:5]
    print(export(Path(env_file), Path(ssh_config), host, Path(out)))
