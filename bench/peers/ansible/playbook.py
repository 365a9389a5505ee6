"""Turn bench/manifest.py's manifest into an Ansible playbook that declares the same state.

    python bench/peers/ansible/playbook.py MANIFEST_JSON OUT_DIR

writes OUT_DIR/site.yml (the play, one task per declared resource, in provision's order,
with handlers for restarts and reloads) and OUT_DIR/secrets.yml (the PostgreSQL role
passwords, mode 0600, read with vars_files). The playbook is what one would write by hand
for these resources with Ansible's own modules; it is generated only so it never drifts
from what `fab provision` declares. Rendered files are copied from the manifest's files/.
Each task's name ends with the manifest resources it serves, "(#5 #6)", so that
bench/peers/ansible_peer.py can check a run's coverage. bench/peers/README.md, section
"Ansible", gives the mapping of each manifest type and what it does differently.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

PENDING = "/var/lib/fabstack/pending/"
UNIT_DIRS = ("/etc/systemd/system/", "/lib/systemd/system/", "/usr/lib/systemd/system/")
DAEMON_RELOAD = "reload systemd units"
PG_PREREQ = "python3-psycopg2"  # community.postgresql's driver, on the target
PG_BECOME = {"become": True, "become_user": "postgres"}
PLAIN = re.compile(r"[A-Za-z/][A-Za-z0-9_./@+, -]*[A-Za-z0-9_./@+-]|[A-Za-z]")
YAML_WORDS = {"y", "n", "yes", "no", "true", "false", "on", "off", "null"}


# -- a small YAML writer (the bench's Python has no PyYAML; the output is plain YAML) ------

class Unsafe(str):
    """A string Ansible must not template (it may hold '{{')."""


def _scalar(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    text = str(value)
    if isinstance(value, Unsafe):
        return f"!unsafe {json.dumps(text)}"
    if PLAIN.fullmatch(text) and ": " not in text and " #" not in text \
            and text.lower() not in YAML_WORDS:
        return text
    return json.dumps(text)


def to_yaml(value, indent: int = 0) -> str:
    pad = " " * indent
    if isinstance(value, dict):
        out = []
        for key, item in value.items():
            if isinstance(item, dict | list) and item:
                out.append(f"{pad}{key}:\n{to_yaml(item, indent + 2)}")
            elif (isinstance(item, str) and "\n" in item and not isinstance(item, Unsafe)
                  and not item.startswith((" ", "\n"))):
                body = "".join(f"{pad}  {ln}\n" if ln else "\n"
                               for ln in item.rstrip("\n").split("\n"))
                out.append(f"{pad}{key}: |\n{body.rstrip(chr(10))}")
            else:
                text = "[]" if item == [] else "{}" if item == {} else _scalar(item)
                out.append(f"{pad}{key}: {text}")
        return "\n".join(out)
    if isinstance(value, list):
        out = []
        for item in value:
            if isinstance(item, dict | list) and item:
                inner = to_yaml(item, indent + 2)
                out.append(f"{pad}- {inner[indent + 2:]}")
            else:
                out.append(f"{pad}- {_scalar(item)}")
        return "\n".join(out)
    return pad + _scalar(value)


def _safe(text: str) -> str:
    return Unsafe(text) if ("{{" in text or "{%" in text or "{#" in text) else text


# -- handlers --------------------------------------------------------------------------

def unit_of(name: str) -> str:
    return name if "." in name else f"{name}.service"


def handler_name(marker: str) -> str:
    """'nginx:reload' -> 'reload nginx.service'; 'ca-certificates:update' -> 'update ...'."""
    target, _, action = marker.partition(":")
    if action in ("restart", "reload"):
        return f"{action} {unit_of(target)}"
    return f"{action} {target}"


def marker_of_guard(unless: str | None) -> str | None:
    """The marker a command consumes when its guard is 'test ! -e PENDING/NAME@ACTION'."""
    m = re.fullmatch(r"test ! -e " + re.escape(PENDING) + r"(\S+)", (unless or "").strip())
    return m[1].replace("@", ":") if m else None


# -- tasks -----------------------------------------------------------------------------

class Builder:
    def __init__(self, manifest: Path):
        self.root = manifest.parent
        self.resources = json.loads(manifest.read_text())["resources"]
        self.tasks: list[dict] = []
        self.handlers: dict[str, dict] = {}   # name -> handler task, in first-use order
        self.marker_handlers: dict[str, dict] = {}
        self.unit_handlers: dict[str, dict] = {}
        self.passwords: dict[str, str] = {}
        self.daemon_reload = False
        self.serving: list[int] = []  # the resources (from 1) the next task serves
        self.by_handler: list[int] = []  # resources served by a handler only
        first_pg = next((i for i, r in enumerate(self.resources)
                         if r["type"].startswith("pg_")), None)
        self.psycopg_at = None
        if first_pg is not None:
            self.psycopg_at = max((i for i, r in enumerate(self.resources[:first_pg])
                                   if r["type"] == "packages"), default=None)
        self._consumers()

    def _consumers(self) -> None:
        """Handlers for the markers a command (pending-marker guard) or tmpfiles acts on."""
        for r in self.resources:
            marker = marker_of_guard(r.get("unless")) if r["type"] == "command" else None
            if marker:
                self.marker_handlers[marker] = {
                    "name": handler_name(marker),
                    "ansible.builtin.shell": _safe(r["script"])}
            if r["type"] == "tmpfiles":
                for f in self.resources:
                    if f["type"] == "file" and f["path"] == r["path"]:
                        for m in f["notify"]:
                            if m.partition(":")[2] not in ("restart", "reload"):
                                self.marker_handlers[m] = {
                                    "name": handler_name(m),
                                    "ansible.builtin.command":
                                        f"systemd-tmpfiles --create {r['path']}"}

    def notify(self, markers: list[str]) -> list[str]:
        names = []
        for m in markers:
            target, _, action = m.partition(":")
            if action in ("restart", "reload"):
                unit = unit_of(target)
                self.unit_handlers.setdefault(f"{action} {unit}", {
                    "name": f"{action} {unit}",
                    "ansible.builtin.systemd_service": {
                        "name": unit, "state": "restarted" if action == "restart"
                        else "reloaded"}})
            elif m not in self.marker_handlers:
                raise SystemExit(f"ansible playbook: nothing acts on marker {m!r}")
            names.append(handler_name(m))
        return names

    def add(self, task: dict) -> None:
        """Add ``task``, its name ending with the resources it serves: "(#5 #6)"."""
        task["name"] += " (" + " ".join(f"#{n}" for n in self.serving) + ")"
        self.tasks.append(task)

    def pg_prereq(self) -> None:
        """python3-psycopg2 before the first PostgreSQL task, when no packages task took it."""
        if self.psycopg_at is None:
            self.psycopg_at = -1
            self.add({"name": f"packages {PG_PREREQ} (for community.postgresql)",
                      "ansible.builtin.apt": {"name": [PG_PREREQ], "state": "present"}})

    def build(self) -> None:
        rs, i = self.resources, 0
        while i < len(rs):
            r = rs[i]
            nxt = rs[i + 1] if i + 1 < len(rs) else {}
            if r["type"] == "apt_update" and nxt.get("type") in ("dist_upgrade", "packages"):
                self.serving = [i + 1, i + 2]
                self.apt(nxt, i + 1, cache=r["max_age"])
                i += 2
                continue
            self.serving = [i + 1]
            if r["type"] in ("apt_update", "dist_upgrade", "packages"):
                self.apt(r, i)
            else:
                getattr(self, r["type"])(r)
            i += 1

    # apt
    def apt(self, r: dict, index: int, cache: int | None = None) -> None:
        args: dict = {}
        names = []
        if r["type"] == "apt_update":
            cache = r["max_age"]
        if cache is not None:
            args.update(update_cache=True, cache_valid_time=cache)
        if r["type"] == "dist_upgrade":
            if r["mode"] != "all":  # the apt module upgrades all or nothing
                raise SystemExit(f"ansible playbook: the bench's hosts set UPGRADE=all, the "
                                 f"manifest says {r['mode']}")
            args["upgrade"] = "dist"
        if r["type"] == "packages":
            names = list(r["names"])
            if index == self.psycopg_at:
                names.append(PG_PREREQ)
            args.update(name=names, state="present")
        what = {"apt_update": "apt lists", "dist_upgrade": "system upgrade",
                "packages": f"packages {' '.join(names)}"}[r["type"]]
        if cache is not None and r["type"] != "apt_update":
            what = f"apt lists, {what}"
        self.add({"name": what, "ansible.builtin.apt": args})

    # users, directories, files
    def group(self, r: dict) -> None:
        self.add({"name": f"group {r['name']}",
                  "ansible.builtin.group": {"name": r["name"], "system": r["system"]}})

    def user(self, r: dict) -> None:
        args = {"name": r["name"], "group": r["group"], "home": r["home"], "shell": r["shell"],
                "system": r["system"], "create_home": False, "password_lock": True}
        if r["groups"]:
            args.update(groups=list(r["groups"]), append=True)
        self.add({"name": f"user {r['name']}", "ansible.builtin.user": args})

    def directory(self, r: dict) -> None:
        self.add({"name": f"directory {r['path']}", "ansible.builtin.file": {
            "path": r["path"], "state": "directory", "owner": r["owner"], "group": r["group"],
            "mode": r["mode"]}})

    def file(self, r: dict) -> None:
        notify = self.notify(r["notify"])
        if r["present"] and r["path"].startswith(UNIT_DIRS):
            notify.insert(0, DAEMON_RELOAD)
            self.daemon_reload = True
        if r["present"]:
            args = {"src": str(self.root / r["src"]), "dest": r["path"], "owner": r["owner"],
                    "group": r["group"], "mode": r["mode"]}
            if r["validate"]:
                args["validate"] = _safe(r["validate"])
            task = {"name": f"file {r['path']}", "ansible.builtin.copy": args}
        else:
            task = {"name": f"file {r['path']} absent",
                    "ansible.builtin.file": {"path": r["path"], "state": "absent"}}
        if r.get("secret"):
            task["no_log"] = True
        if notify:
            task["notify"] = notify
        self.add(task)

    def service(self, r: dict) -> None:
        self.add({"name": f"service {r['name']}", "ansible.builtin.systemd_service": {
            "name": r["name"], "enabled": r["enabled"],
            "state": "started" if r["running"] else "stopped"}})

    def command(self, r: dict) -> None:
        if marker_of_guard(r["unless"]):
            self.by_handler += self.serving  # see _consumers: run when the file changed
            return
        name = f"command {r['what']}"
        if r["unless"]:
            script = (f"if ( {r['unless']} ) >/dev/null 2>&1; then exit 0; fi\nset -e\n"
                      f"{r['script'].rstrip()}\necho ansible-bench-changed\n")
            task = {"name": name, "ansible.builtin.shell": _safe(script),
                    "register": "guarded",
                    "changed_when": "'ansible-bench-changed' in guarded.stdout"}
            if r["creates"]:
                task["args"] = {"creates": r["creates"]}
        elif r["creates"]:
            task = {"name": name, "ansible.builtin.shell": {"cmd": _safe(r["script"]),
                                                            "creates": r["creates"]}}
        else:
            task = {"name": f"{name} (no guard: runs every time)",
                    "ansible.builtin.shell": _safe(r["script"])}
        self.add(task)

    def tmpfiles(self, r: dict) -> None:
        """A handler only (made in _consumers); nothing to do as a task."""
        self.by_handler += self.serving

    def firewall(self, r: dict) -> None:
        rules = []
        for spec in r["allow"]:
            if "/" in spec:
                port, proto = spec.split("/", 1)
                rules.append({"port": port, "proto": proto})
            else:
                rules.append({"name": spec})
        self.add({"name": "firewall allows " + ", ".join(r["allow"]),
                  "community.general.ufw": {
                      "rule": "allow", "name": "{{ item.name | default(omit) }}",
                      "port": "{{ item.port | default(omit) }}",
                      "proto": "{{ item.proto | default(omit) }}"},
                  "loop": rules})
        self.add({"name": "firewall: incoming denied by default, enabled",
                  "community.general.ufw": {"state": "enabled", "default": "deny",
                                            "direction": "incoming"}})

    # PostgreSQL (as the postgres superuser, through its local socket)
    def pg_setting(self, r: dict) -> None:
        self.pg_prereq()
        self.unit_handlers.setdefault("restart postgresql.service", {
            "name": "restart postgresql.service",
            "ansible.builtin.systemd_service": {"name": "postgresql.service",
                                                "state": "restarted"}})
        self.add({"name": f"postgresql {r['name']}",
                  "community.postgresql.postgresql_alter_system": {
                      "param": r["name"], "value": r["value"]}, **PG_BECOME,
            "notify": ["restart postgresql.service"]})

    def pg_role(self, r: dict) -> None:
        self.pg_prereq()
        self.passwords[r["name"]] = r["password"]
        self.add({"name": f"postgresql role {r['name']}",
                  "community.postgresql.postgresql_user": {
                      "name": r["name"],
                      "password": f"{{{{ pg_passwords['{r['name']}'] }}}}",
                      "role_attr_flags": "LOGIN" if r["login"] else "NOLOGIN"},
                  **PG_BECOME, "no_log": True})

    def pg_database(self, r: dict) -> None:
        self.pg_prereq()
        self.add({"name": f"postgresql database {r['name']}",
                  "community.postgresql.postgresql_db": {
                      "name": r["name"], "owner": r["owner"], "encoding": r["encoding"],
                      "template": "template0"}, **PG_BECOME})

    def pg_membership(self, r: dict) -> None:
        self.pg_prereq()
        self.add({"name": f"postgresql role {r['member']} in {r['role']}",
                  "community.postgresql.postgresql_membership": {
                      "groups": [r["role"]], "target_roles": [r["member"]],
                      "state": "present"}, **PG_BECOME})

    def play(self) -> list[dict]:
        handlers = []
        if self.daemon_reload:
            handlers.append({"name": DAEMON_RELOAD,
                             "ansible.builtin.systemd_service": {"daemon_reload": True}})
        handlers += list(self.marker_handlers.values())
        # Unit handlers in the order the units are declared (postgresql first, nginx late).
        order = [unit_of(r["name"]) for r in self.resources if r["type"] == "service"]
        handlers += sorted(self.unit_handlers.values(),
                           key=lambda h: order.index(h["name"].split(" ", 1)[1])
                           if h["name"].split(" ", 1)[1] in order else len(order))
        return [{"name": "the state fab provision declares (bench/manifest.py)",
                 "hosts": "all", "gather_facts": False, "vars_files": ["secrets.yml"],
                 "tasks": self.tasks, "handlers": handlers}]


def plan(manifest: Path) -> Builder:
    """The play for ``manifest``: its tasks, and the resources only a handler serves."""
    b = Builder(manifest)
    b.build()
    return b


def write(manifest: Path, out: Path) -> Path:
    """Write ``out``/site.yml and ``out``/secrets.yml for ``manifest``; return site.yml."""
    b = plan(manifest)
    out.mkdir(parents=True, exist_ok=True)
    secrets = out / "secrets.yml"
    secrets.touch(mode=0o600)
    secrets.chmod(0o600)
    secrets.write_text("# PostgreSQL role passwords from the bench manifest (bench secrets).\n"
                       + to_yaml({"pg_passwords": {k: Unsafe(v)
                                                   for k, v in b.passwords.items()}})
                       + "\n")
    site = out / "site.yml"
    site.write_text(f"# Generated by bench/peers/ansible/playbook.py from {manifest}.\n"
                    f"# {len(b.resources)} resources -> {len(b.tasks)} tasks.\n"
                    + to_yaml(b.play()) + "\n")
    return site


if __name__ == "__main__":
    print(write(Path(sys.argv[1]), Path(sys.argv[2])))
