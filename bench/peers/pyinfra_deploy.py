"""pyinfra deploy: the resources `fab provision` declares, with pyinfra's own operations.

The bench's peer for pyinfra 3.10. It reads the manifest that bench/manifest.py exported
(path in the environment variable FABSTACK_MANIFEST; the rendered files sit beside it under
files/) and declares every resource in provision's order with the operations a pyinfra user
would pick, each operation's name ending with "(#N)", N the manifest resource it serves, so
that bench/peers/pyinfra_peer.py (which builds the command line) can check from pyinfra's
results that every resource was covered. bench/peers/README.md, section "pyinfra", gives the
mapping and what it does differently.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from pathlib import Path

from pyinfra import host
from pyinfra.api import FactBase, QuoteString, StringCommand, operation
from pyinfra.operations import apt, files, postgres, server, systemd
from pyinfra.operations.util import any_changed

MANIFEST = Path(os.environ["FABSTACK_MANIFEST"])
BASE = MANIFEST.parent
RESOURCES = json.loads(MANIFEST.read_text())["resources"]
AS_POSTGRES = {"_sudo": True, "_sudo_user": "postgres"}
SERVICE_ACTIONS = ("restart", "reload")


# -- facts of our own (pyinfra has none for these) ---------------------------------------

class ShellTest(FactBase):
    """Whether a shell test succeeds on the host (for `creates` / `unless` guards)."""

    def command(self, test):
        return f"if ( {test} ) >/dev/null 2>&1; then echo yes; else echo no; fi"

    def process(self, output):
        return bool(output) and output[-1].strip() == "yes"


class PsqlValue(FactBase):
    """The rows of one SQL query (unaligned), run with psql; "" when there are none."""

    def command(self, sql):
        return StringCommand("psql", "-XAtc", QuoteString(sql))

    def process(self, output):
        return "\n".join(output).strip()


class UfwState(FactBase):
    """ufw's status and the rules added to it, as lines."""

    def command(self):
        return "ufw status verbose && ufw show added"

    def process(self, output):
        return [line.strip() for line in output]


def psql(sql: str) -> str:
    return host.get_fact(PsqlValue, sql=sql, **AS_POSTGRES) or ""


def sql_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def scram_matches(password: str, verifier: str) -> bool:
    """Whether ``verifier`` (pg_authid.rolpassword) is a SCRAM-SHA-256 one of ``password``."""
    try:
        method, rest = verifier.split("$", 1)
        params, keys = rest.split("$", 1)
        iterations, salt = params.split(":", 1)
        stored_key, server_key = keys.split(":", 1)
    except ValueError:
        return False
    if method != "SCRAM-SHA-256":
        return False
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(salt),
                                 int(iterations))
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    server = hmac.new(salted, b"Server Key", "sha256").digest()
    return (hmac.compare_digest(base64.b64encode(hashlib.sha256(client_key).digest()).decode(),
                                stored_key)
            and hmac.compare_digest(base64.b64encode(server).decode(), server_key))


# -- the resources -----------------------------------------------------------------------

RESOURCE = 0  # the manifest resource (from 1) whose operations are being declared


def tag(name: str) -> str:
    """An operation's name, ending with the resource it serves: pyinfra_peer.check() finds
    by these that the run covered every resource of the manifest."""
    return f"{name} (#{RESOURCE})"


def unit_of(target: str) -> str:
    return target if "." in target else f"{target}.service"


notified: dict[str, list] = {}   # "TARGET:ACTION" -> the file operations that notify it
file_ops: dict[str, object] = {}  # path -> its files.put / files.file operation
unit_files: list = []            # unit file operations since the last daemon reload


def take(marker: str) -> list:
    return notified.pop(marker, [])


def service_handlers(unit: str) -> None:
    """Restart/reload ``unit`` if a file that notifies it changed in this run."""
    markers = {action: [m for m in list(notified) if m.rpartition(":")[2] == action
                        and unit_of(m.rpartition(":")[0]) == unit] for action in SERVICE_ACTIONS}
    restart = [op for m in markers["restart"] for op in take(m)]
    reload_ = [op for m in markers["reload"] for op in take(m)]
    if restart:
        systemd.service(name=tag(f"Restart {unit} (its files changed)"), service=unit,
                        restarted=True, _if=any_changed(*restart))
    if reload_:
        restarted = any_changed(*restart) if restart else (lambda: False)
        changed = any_changed(*reload_)
        systemd.service(name=tag(f"Reload {unit} (its files changed)"), service=unit, reloaded=True,
                        _if=lambda: changed() and not restarted())


def daemon_reload(name: str) -> None:
    if unit_files:
        systemd.daemon_reload(name=tag(name), _if=any_changed(*unit_files))
        unit_files.clear()


def do_file(r: dict) -> None:
    path = r["path"]
    if r["present"]:
        op = files.put(name=tag(f"File {path}"), src=str(BASE / r["src"]), dest=path,
                       user=r["owner"], group=r["group"], mode=r["mode"])
        if r["validate"]:
            server.shell(name=tag(f"Check {path}"), commands=[r["validate"].replace("%s", path)],
                         _if=op.did_change)
    else:
        # force without backup: the path may be a symlink (nginx's sites-enabled/default)
        op = files.file(name=tag(f"No file {path}"), path=path, present=False, force=True,
                        force_backup=False)
    file_ops[path] = op
    for marker in r["notify"]:
        notified.setdefault(marker, []).append(op)
    if path.startswith("/etc/systemd/system/"):
        unit_files.append(op)


def do_command(r: dict) -> None:
    script, unless, creates = r["script"], r["unless"], r["creates"]
    if script.strip() == "systemctl daemon-reload" and unit_files:
        daemon_reload(r["what"])
        return
    # fabstack records "file changed, action pending" markers under /var/lib/fabstack; in
    # pyinfra the same thing is an _if on the operations of the files that notify it
    handled = [m for m in list(notified)
               if unless and f"/pending/{m.replace(':', '@')}" in unless]
    body = "\n".join(line for line in script.splitlines() if "/var/lib/fabstack/" not in line)
    if handled:
        server.shell(name=tag(r["what"]), commands=[f"set -e\n{body}"],
                     _if=any_changed(*[op for m in handled for op in take(m)]))
        return
    guards = []
    if creates:
        guards.append(lambda: not host.get_fact(ShellTest, test=f"test -e {creates}"))
    if unless:
        guards.append(lambda: not host.get_fact(ShellTest, test=unless))
    server.shell(name=tag(r["what"]), commands=[f"set -e\n{body}"], _if=guards)


@operation()
def ufw(allow: list[str], default_incoming: str = "deny"):
    """ufw allows ``allow`` (rule specs), sets the incoming policy and is enabled.

    pyinfra has no ufw operation; this is the one a user writes (pyinfra's "Writing
    operations"): the state is read once, when the operation runs, and only the commands
    for what it lacks are yielded.
    """
    state = host.get_fact(UfwState)
    for spec in allow:
        if f"ufw allow {spec}" not in state:
            yield f"ufw allow {spec}"
    if not any(line.startswith(f"Default: {default_incoming} (incoming)") for line in state):
        yield f"ufw default {default_incoming} incoming"
    if "Status: active" not in state:
        yield "ufw --force enable"


def do_pg_setting(r: dict) -> None:
    name, value = r["name"], r["value"]
    alter = postgres.sql(
        name=tag(f"PostgreSQL {name} = {value}"),
        sql=f"ALTER SYSTEM SET {name} = {sql_literal(value)}", **AS_POSTGRES,
        _if=lambda: psql(f"SELECT setting FROM pg_settings WHERE name = {sql_literal(name)}")
        != value)
    systemd.service(name=tag(f"Restart postgresql.service ({name} changed)"),
                    service="postgresql.service", restarted=True, _if=alter.did_change)


def do_pg_role(r: dict) -> None:
    name, password = r["name"], r["password"]
    postgres.role(name=tag(f"PostgreSQL role {name}"), role=name, login=r["login"], **AS_POSTGRES)
    postgres.role(
        name=tag(f"PostgreSQL role {name}: password"), role=name, login=r["login"],
        password=password, **AS_POSTGRES,
        _if=lambda: not scram_matches(password, psql(
            f"SELECT coalesce(rolpassword, '') FROM pg_authid WHERE rolname = "
            f"{sql_literal(name)}")))


def do_pg_membership(r: dict) -> None:
    member, role = r["member"], r["role"]
    postgres.sql(
        name=tag(f"PostgreSQL role {member} in {role}"), sql=f'GRANT "{role}" TO "{member}"',
        **AS_POSTGRES,
        _if=lambda: psql(
            "SELECT count(*) FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.roleid "
            f"JOIN pg_roles u ON u.oid = m.member WHERE r.rolname = {sql_literal(role)} "
            f"AND u.rolname = {sql_literal(member)}") != "1")


for RESOURCE, r in enumerate(RESOURCES, 1):  # noqa: B007 (tag() reads it)
    kind = r["type"]
    if kind == "apt_update":
        apt.update(name=tag("apt lists"), cache_time=r["max_age"])
    elif kind == "dist_upgrade":
        if r["mode"] != "all":  # pyinfra can upgrade all or nothing
            raise ValueError(f"the bench's hosts set UPGRADE=all, the manifest says {r['mode']}")
        apt.dist_upgrade(name=tag("System upgrade"))
    elif kind == "packages":
        apt.packages(name=tag(f"Packages {' '.join(r['names'])}"), packages=r["names"])
    elif kind == "group":
        server.group(name=tag(f"Group {r['name']}"), group=r["name"], system=r["system"])
    elif kind == "user":
        server.user(name=tag(f"User {r['name']}"), user=r["name"], group=r["group"],
                    groups=r["groups"], home=r["home"], shell=r["shell"], system=r["system"])
    elif kind == "directory":
        files.directory(name=tag(f"Directory {r['path']}"), path=r["path"], user=r["owner"],
                        group=r["group"], mode=r["mode"])
    elif kind == "file":
        do_file(r)
    elif kind == "service":
        daemon_reload(f"Reload systemd units (before {r['name']})")
        systemd.service(name=tag(f"Service {r['name']}"), service=r["name"], running=r["running"],
                        enabled=r["enabled"])
        service_handlers(r["name"])
    elif kind == "command":
        do_command(r)
    elif kind == "tmpfiles":
        op = file_ops[r["path"]]
        for marker in [m for m, ops in notified.items()
                       if op in ops and m.rpartition(":")[2] not in SERVICE_ACTIONS]:
            take(marker)
        server.shell(name=tag(f"systemd-tmpfiles --create {r['path']}"),
                     commands=[f"systemd-tmpfiles --create {r['path']}"], _if=op.did_change)
    elif kind == "firewall":
        ufw(name=tag(f"Firewall allows {', '.join(r['allow'])}, denies other incoming"),
            allow=r["allow"])
    elif kind == "pg_setting":
        do_pg_setting(r)
    elif kind == "pg_role":
        do_pg_role(r)
    elif kind == "pg_database":
        postgres.database(name=tag(f"PostgreSQL database {r['name']}"), database=r["name"],
                          owner=r["owner"], encoding=r["encoding"], **AS_POSTGRES)
    elif kind == "pg_membership":
        do_pg_membership(r)
    else:
        raise ValueError(f"manifest resource type {kind!r} has no pyinfra mapping")

# notifications with no service resource after them: act on them at the end
daemon_reload("Reload systemd units")
for unit in sorted({unit_of(m.rpartition(":")[0]) for m in notified
                    if m.rpartition(":")[2] in SERVICE_ACTIONS}):
    service_handlers(unit)
if notified:
    raise ValueError(f"notifications with nothing acting on them: {sorted(notified)}")
