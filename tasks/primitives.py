"""Idempotent building blocks: declare the state you want, :func:`ensure` makes it so.

Each resource is a small object with a read-only ``probe()`` shell snippet and a
``plan(state, host)`` that returns :class:`Ok` (already right, and why) or a
:class:`Change` (a message and the shell script that makes it right).
:func:`ensure` reads the state of *all* the resources it is given in one SSH
round trip, then applies only what differs, in order, re-reading the state of
the remaining resources after a change. In check mode it plans and reports,
and applies nothing.

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
"""

from __future__ import annotations

import base64
import difflib
import hashlib
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

import jinja2

STATE_DIR = "/var/lib/fabstack"
PENDING_DIR = f"{STATE_DIR}/pending"
APT_STAMP = f"{STATE_DIR}/apt-lists-updated"
UPGRADE_STAMP = f"{STATE_DIR}/upgrade-checked"
# What fabstack created on this host (users, groups, PostgreSQL roles and databases), one
# "KIND NAME" line each. Only these may be changed: an object of the same name that exists
# without a line here belongs to someone else and is refused (Resource.conflict). Hosts
# provisioned before the record existed need their lines added by hand.
OWNED = f"{STATE_DIR}/owned"
FILES_DIR = Path(__file__).resolve().parent.parent / "files"
DIFF_LIMIT = 64 * 1024

APT_GET = ("DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout=300 "
           "-o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold")

# dpkg killed mid-run (power cut, OOM, kill -9) leaves its journal in /var/lib/dpkg/updates
# or packages half-way: apt refuses to work ("dpkg was interrupted") until
# `dpkg --configure -a` finishes the job. A running dpkg shows the same signs: not counted.
DPKG_INTERRUPTED = (
    "! pidof dpkg >/dev/null 2>&1 && { ls /var/lib/dpkg/updates 2>/dev/null | grep -q '^[0-9]' || "
    "grep -Eq '^Status: .* (half-installed|unpacked|half-configured|triggers-awaited|"
    "triggers-pending)$' /var/lib/dpkg/status; }")
DPKG_PROBE = f"if {DPKG_INTERRUPTED}; then echo dpkg=interrupted; fi"
DPKG_RECOVER = ("DEBIAN_FRONTEND=noninteractive dpkg --configure -a --force-confdef "
                "--force-confold")
DPKG_RECOVERED = "finished dpkg's interrupted run (dpkg --configure -a)"

q = shlex.quote


@dataclass
class Ok:
    message: str


@dataclass
class Change:
    message: str
    script: str
    diff: str = ""


class Resource:
    """Base class: subclasses set ``what`` and implement ``probe`` and ``plan``.

    ``reads_host = False`` marks a resource whose plan needs nothing from the host: it is
    left out of the probe (a list of only such resources costs no round trip).
    Resources that share a ``joint`` (an object with ``probe(resources) -> str`` and
    ``split(output, n) -> list[str]``) are read together by one snippet it writes, e.g. one
    psql session for every PostgreSQL resource instead of one each.
    """

    what = "resource"
    reads_host = True
    joint = None
    claim: str | None = None  # "KIND NAME" of the object it creates, recorded in OWNED

    def probe(self) -> str:
        return ":"

    def plan(self, state: str, host) -> Ok | Change:
        raise NotImplementedError

    def exists(self, state: str) -> bool:
        """Whether the object of ``claim`` exists on the host, from the probe's ``state``."""
        return False

    def conflict(self, state: str, owned: set[str]) -> str | None:
        """Why this resource must not act on what its probe found (None: it may).

        By default: the object it claims exists and fabstack's record (OWNED) does not hold
        it, so it belongs to the system or to someone else.
        """
        if self.claim and self.claim not in owned and self.exists(state):
            return "exists on the host and was not created by fabstack"
        return None


def claim_script(claim: str) -> str:
    """Shell that records ``claim`` in OWNED; runs *before* the object is created, so a run
    killed in between leaves the line (and the next run creates the object) rather than an
    object of ours that is not recorded."""
    line = q(claim)
    return (f"mkdir -p {STATE_DIR}\n"
            f"grep -qxF -- {line} {OWNED} 2>/dev/null || echo {line} >> {OWNED}\n")


def ensure(host, *resources: Resource) -> int:
    """Bring ``resources`` to their state on ``host``; report each; return how many changed.

    Nothing is changed when any resource conflicts with what its probe found (see
    :meth:`Resource.conflict`): every conflict is named at once.
    """
    todo = list(resources)
    states = _read(host, todo)
    changed = 0
    for i, resource in enumerate(todo):
        outcome = resource.plan(states[i], host)
        if isinstance(outcome, Ok):
            host.ok(resource.what, outcome.message)
            continue
        changed += 1
        if host.check:
            host.changed(resource.what, outcome.message, outcome.diff)
            continue
        host.run("set -e\n" + outcome.script, what=resource.what)
        host.changed(resource.what, outcome.message, outcome.diff)
        if i + 1 < len(todo):
            states[i + 1:] = _probe(host, todo[i + 1:])
    return changed


def refuse_conflicts(host, resources: list[Resource]) -> None:
    """Read ``resources`` in one round trip and raise StepFailed if any conflicts, for a run
    whose first changes come before it declares them (:func:`ensure` checks its own)."""
    _read(host, list(resources))


def _read(host, resources: list[Resource]) -> list[str]:
    """Each resource's state (see :func:`_probe`), after checking that none conflicts."""
    if not any(r.claim for r in resources):
        return _probe(host, resources)
    *states, record = _probe(host, resources, [f"cat {OWNED} 2>/dev/null; true"])
    owned = set(record.splitlines())
    conflicts = [f"{r.what}: {why}" for r, state in zip(resources, states, strict=True)
                 if (why := r.conflict(state, owned))]
    if conflicts:
        from .host import StepFailed  # host imports this module

        raise StepFailed("ownership", "refusing to touch what fabstack did not create (choose "
                         "other names in the settings); nothing was changed:\n  "
                         + "\n  ".join(conflicts))
    return states


def _probe(host, resources: list[Resource], extra: list[str] | tuple = ()) -> list[str]:
    """Each resource's state (``""`` for those that read nothing), then the output of each
    ``extra`` snippet, read in one round trip."""
    snippets: list = []
    slots: list = []  # per resource: None, (snippet,) or (snippet, joint, place in joint)
    joints: dict = {}  # joint -> (snippet index, its resources)
    for r in resources:
        if not r.reads_host:
            slots.append(None)
        elif r.joint is None:
            slots.append((len(snippets),))
            snippets.append(r.probe())
        else:
            if r.joint not in joints:
                joints[r.joint] = (len(snippets), [])
                snippets.append(None)
            index, members = joints[r.joint]
            slots.append((index, r.joint, len(members)))
            members.append(r)
    for joint, (index, members) in joints.items():
        snippets[index] = joint.probe(members)
    outputs = host.probe(snippets + list(extra))
    parts = {joint: joint.split(outputs[index], len(members))
             for joint, (index, members) in joints.items()}
    return ["" if slot is None else outputs[slot[0]] if len(slot) == 1 else
            parts[slot[1]][slot[2]] for slot in slots] + outputs[len(snippets):]


class Note(Resource):
    """A line of the report for something deliberately not done, with the reason.

    It reads nothing and never changes anything: ``Note("certificate", "none: ACME_SERVER
    is empty")`` keeps a skipped part of a step visible in the report.
    """

    reads_host = False

    def __init__(self, what: str, message: str):
        self.what, self.message = what, message

    def plan(self, state, host):
        return Ok(self.message)


# -- templates -------------------------------------------------------------------

class TemplateError(Exception):
    """A template in files/ cannot be rendered; the message names file and line."""


_jinja = jinja2.Environment(loader=jinja2.FileSystemLoader(str(FILES_DIR)),
                            undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                            autoescape=False)


def render(name: str, settings, **extra) -> str:
    """Render ``files/<name>`` with the settings as ``s`` and ``env`` (and ``extra``)."""
    try:
        return _jinja.get_template(name).render(s=settings, env=settings.values, **extra)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"files/{exc.name or name}:{exc.lineno}: {exc.message}") from None
    except jinja2.TemplateError as exc:
        raise TemplateError(f"files/{name}: {exc}") from None


def prerender(settings) -> None:
    """Render every template once so a broken one fails before any host is touched."""
    for name in _jinja.list_templates(filter_func=lambda n: n.endswith(".j2")):
        render(name, settings)


# -- apt -------------------------------------------------------------------------

class AptUpdate(Resource):
    """The apt package lists, refreshed when older than ``max_age`` seconds.

    ``apt-get update`` cannot be idempotent, so it is guarded by the age of the
    last successful refresh (and forced after a repository was added).
    """

    def __init__(self, max_age: int = 3600):
        self.max_age = max_age
        self.what = "apt lists"

    def probe(self) -> str:
        return (f"echo $(stat -c %Y {APT_STAMP} 2>/dev/null || echo 0) $(date +%s)"
                f" $(test -e {PENDING_DIR}/apt@update && echo due)")

    def plan(self, state, host):
        fields = state.split()
        stamp, now = int(fields[0]), int(fields[1])
        due = "due" in fields or host_notified(host, "apt@update")
        age = now - stamp
        if not due and age < self.max_age:
            return Ok(f"refreshed {age // 60} min ago")
        why = ("a repository changed" if due else
               "never refreshed by fabstack" if stamp == 0 else f"{age // 60} min old")
        return Change(f"refreshed ({why})",
                      "apt-get -q update -o APT::Update::Error-Mode=any\n"
                      f"mkdir -p {STATE_DIR} && touch {APT_STAMP}"
                      f" && rm -f {PENDING_DIR}/apt@update")


class Packages(Resource):
    """Debian packages ``present`` (installed), ``latest`` (and upgraded) or ``absent``.

    Installs are non-interactive and keep existing config files on upgrade.
    """

    def __init__(self, names: list[str] | str, state: str = "present"):
        self.names = names.split() if isinstance(names, str) else list(names)
        if state not in ("present", "latest", "absent"):
            raise ValueError(f"Packages state must be present, latest or absent, not {state!r}")
        self.state = state
        self.what = f"packages {' '.join(self.names)}" if len(self.names) <= 3 else \
            f"packages ({len(self.names)})"

    def probe(self) -> str:
        names = " ".join(q(n) for n in self.names)
        cmd = (f"dpkg-query -W -f='${{Package}} ${{db:Status-Abbrev}}\\n' -- {names} 2>/dev/null"
               f"\n{DPKG_PROBE}")
        if self.state == "latest":
            cmd += (f"\napt-get -s -o Debug::NoLocking=1 install --only-upgrade -- {names}"
                    " 2>/dev/null | grep '^Inst ' || true")
        return cmd

    def plan(self, state, host):
        lines = state.splitlines()
        installed = {line.split()[0].split(":")[0] for line in lines
                     if line.split()[1:2] == ["ii"]}
        upgradable = [line.split()[1] for line in lines if line.startswith("Inst ")]
        # An interrupted dpkg is finished first: apt does nothing until it is.
        interrupted = "dpkg=interrupted" in lines
        parts = [DPKG_RECOVERED] if interrupted else []
        cmds = [DPKG_RECOVER] if interrupted else []
        if self.state == "absent":
            present = [n for n in self.names if n in installed]
            if present:
                parts.append(f"removed {' '.join(present)}")
                cmds.append(f"{APT_GET} remove -- {' '.join(map(q, present))}")
            if not cmds:
                return Ok("none installed")
            return Change("; ".join(parts), "\n".join(cmds))
        missing = [n for n in self.names if n not in installed]
        todo = missing + [n for n in upgradable if n not in missing]
        if missing:
            parts.append(f"installed {' '.join(missing)}")
        if upgradable:
            parts.append(f"upgraded {' '.join(upgradable)}")
        if todo:
            cmds.append(f"{APT_GET} install -- {' '.join(map(q, todo))}")
        if not cmds:
            return Ok("all installed" + (", up to date" if self.state == "latest" else ""))
        return Change("; ".join(parts), "\n".join(cmds))


class DistUpgrade(Resource):
    """Installed packages upgraded (``apt-get dist-upgrade``) when any are pending, as ``mode``
    says: ``all``, ``security`` (only those from a security archive), ``off`` (report them,
    install nothing) or ``first`` (security on a first provision, off after: the host counts
    as provisioned once the ``provisioned`` shell test succeeds).

    Simulating an upgrade costs the host most of a second, so the probe skips it
    while neither the apt lists nor the installed packages changed since the
    last simulation that found nothing to do (recorded in /var/lib/fabstack
    unless ``record`` is false, as in check mode).
    """

    what = "system upgrade"
    MODES = ("all", "security", "off", "first")

    def __init__(self, record: bool = True, mode: str = "all", provisioned: str = "false"):
        if mode not in self.MODES:
            raise ValueError(f"DistUpgrade mode must be one of {', '.join(self.MODES)}")
        self.record, self.mode, self.provisioned = record, mode, provisioned

    def probe(self) -> str:
        save = (f"mkdir -p {STATE_DIR} && printf '%s' \"$key\" > {UPGRADE_STAMP}"
                if self.record else ":")
        first = (f"( {self.provisioned} ) >/dev/null 2>&1 || echo first-provision\n"
                 if self.mode == "first" else "")
        return ("key=$(stat -c %Y /var/lib/dpkg/status /var/lib/apt/lists | tr '\\n' ' ')\n"
                f"if [ \"$key\" != \"$(cat {UPGRADE_STAMP} 2>/dev/null)\" ]; then\n"
                # apt's refusal (broken dependencies) is no "nothing pending", nor recorded
                "  if out=$(apt-get -s -o Debug::NoLocking=1 dist-upgrade 2>&1); then\n"
                "    p=$(printf '%s\\n' \"$out\""
                " | awk '/^Inst /{print $2 ($0 ~ /-security/ ? \" security\" : \"\")}')\n"
                f"    if [ -z \"$p\" ]; then {save}; else echo \"$p\"; fi\n"
                "  else echo \"apt-error $(printf '%s\\n' \"$out\" | grep '^E: ' "
                "| tr '\\n' ' ')\"; fi\n"
                f"fi\n{first}{DPKG_PROBE}")

    def plan(self, state, host):
        lines = [line.split() for line in state.splitlines() if line.strip()]
        flags = {line[0] for line in lines if line[0] in ("dpkg=interrupted", "first-provision")}
        errors = [" ".join(line[1:]) or "no reason given" for line in lines
                  if line[0] == "apt-error"]
        if errors and "dpkg=interrupted" not in flags:  # (apt waits for dpkg's recovery)
            why = errors[0]
            return Change(f"apt cannot plan the upgrade: {why}",
                          f"echo {q('apt-get dist-upgrade refuses: ' + why)} >&2; exit 1")
        lines = [line for line in lines if line[0] != "apt-error"]
        pending = [line[0] for line in lines if line[0] not in flags]
        security = [line[0] for line in lines if line[1:] == ["security"]]
        if not pending:
            return Ok("no upgrades pending")
        mode = self.mode
        if mode == "first":
            mode = "security" if "first-provision" in flags else "off"
        why = f"UPGRADE={self.mode if self.mode != 'first' else 'empty'}"
        if mode == "off":
            return Ok(f"{len(pending)} upgrades pending, not installed ({why}): "
                      f"{_some(pending)}")
        if mode == "security" and not security:
            return Ok(f"{len(pending)} upgrades pending, none from a security archive: not "
                      f"installed ({why})")
        if mode == "security":
            message = f"upgraded {len(security)} security packages: {_some(security)}"
            script = f"{APT_GET} install --only-upgrade -- {' '.join(map(q, security))}"
            if len(security) < len(pending):
                message += f" ({len(pending) - len(security)} other upgrades left: {why})"
        else:
            message = f"upgraded {len(pending)} packages: {_some(pending)}"
            script = f"{APT_GET} dist-upgrade"
        if "dpkg=interrupted" in flags:  # apt would refuse to start
            message, script = f"{DPKG_RECOVERED}; {message}", f"{DPKG_RECOVER}\n{script}"
        return Change(message, script)


def _some(names: list[str], shown: int = 8) -> str:
    return " ".join(names[:shown]) + (f" and {len(names) - shown} more"
                                      if len(names) > shown else "")


# -- users and groups ------------------------------------------------------------

class Group(Resource):
    """A (system) group."""

    def __init__(self, name: str, system: bool = True):
        self.name, self.system = name, system
        self.what = f"group {name}"
        self.claim = f"group {name}"

    def probe(self) -> str:
        return f"getent group {q(self.name)}"

    def exists(self, state):
        return bool(state.strip())

    def plan(self, state, host):
        if self.exists(state):
            return Ok("exists")
        return Change("created", claim_script(self.claim)
                      + f"groupadd {'--system ' if self.system else ''}{q(self.name)}")


class User(Resource):
    """A user with primary ``group``, ``home``, ``shell``, a locked password and exactly the
    supplementary ``groups`` given (it is taken out of any other: least privilege).

    The home directory is not created here: declare it as a :class:`Directory`.
    """

    def __init__(self, name: str, group: str, home: str, shell: str = "/usr/sbin/nologin",
                 system: bool = True, groups: list[str] | tuple = ()):
        self.name, self.group, self.home, self.shell = name, group, home, shell
        self.system, self.groups = system, sorted(groups)
        self.what = f"user {name}"
        self.claim = f"user {name}"

    def probe(self) -> str:
        n = q(self.name)
        return (f"getent passwd {n}; echo \"groups $(id -Gn {n} 2>/dev/null)\"; "
                f"echo \"gid $(getent group {q(self.group)} | cut -d: -f3)\"; "
                f"echo \"password $(getent shadow {n} | cut -d: -f2 | cut -c1)\"")

    def exists(self, state):
        lines = state.splitlines()
        return bool(lines) and lines[0].count(":") == 6

    def plan(self, state, host):
        lines = state.splitlines()
        info = dict(line.split(" ", 1) if " " in line else (line, "") for line in lines[1:])
        passwd = lines[0].split(":") if self.exists(state) else None
        if passwd is None:
            extra = f" --groups {q(','.join(self.groups))}" if self.groups else ""
            return Change(f"created (group {self.group}, home {self.home}, shell {self.shell})",
                          claim_script(self.claim)
                          + f"useradd {'--system ' if self.system else ''}--gid {q(self.group)} "
                          f"--home-dir {q(self.home)} --no-create-home --shell {q(self.shell)}"
                          f"{extra} {q(self.name)}")
        fixes, args = [], []
        if passwd[3] != info.get("gid", "").strip():
            fixes.append(f"primary group -> {self.group}")
            args.append(f"--gid {q(self.group)}")
        if passwd[5] != self.home:
            fixes.append(f"home {passwd[5]} -> {self.home}")
            args.append(f"--home {q(self.home)}")
        if passwd[6] != self.shell:
            fixes.append(f"shell {passwd[6]} -> {self.shell}")
            args.append(f"--shell {q(self.shell)}")
        # id -Gn: the primary group, then the supplementary ones
        have = set(info.get("groups", "").split()) - {self.group}
        missing = [g for g in self.groups if g not in have]
        extra = sorted(have - set(self.groups))
        if missing:
            fixes.append(f"added to {', '.join(missing)}")
        if extra:
            fixes.append(f"removed from {', '.join(extra)}")
        if missing or extra:
            args.append(f"--groups {q(','.join(self.groups))}")
        if info.get("password", "").strip() not in ("!", "*"):
            fixes.append("password login locked")
            args.append("--lock")
        if not fixes:
            return Ok("exists as declared")
        return Change("; ".join(fixes), f"usermod {' '.join(args)} {q(self.name)}")


# -- files and directories -------------------------------------------------------

def _stat_snippet(path: str) -> str:
    return f"stat -c '%F|%U|%G|%a' -- {q(path)} 2>/dev/null || echo missing"


def _fix_meta(path: str, meta: str, owner: str, group: str, mode: int) -> tuple[list, list]:
    _kind, have_owner, have_group, have_mode = meta.split("|")
    fixes, cmds = [], []
    if (have_owner, have_group) != (owner, group):
        fixes.append(f"owner {have_owner}:{have_group} -> {owner}:{group}")
        cmds.append(f"chown {q(owner)}:{q(group)} -- {q(path)}")
    if int(have_mode, 8) != mode:
        fixes.append(f"mode {int(have_mode, 8):04o} -> {mode:04o}")
        cmds.append(f"chmod {mode:04o} -- {q(path)}")
    return fixes, cmds


class Directory(Resource):
    """A directory with ``owner``, ``group`` and ``mode`` (parents are created as needed)."""

    def __init__(self, path: str, owner: str = "root", group: str = "root", mode: int = 0o755):
        self.path, self.owner, self.group, self.mode = path, owner, group, mode
        self.what = f"directory {path}"

    def probe(self) -> str:
        return _stat_snippet(self.path)

    def plan(self, state, host):
        state = state.strip()
        if state == "missing":
            return Change(f"created ({self.owner}:{self.group} {self.mode:04o})",
                          f"mkdir -p -- {q(self.path)}\n"
                          f"chown {q(self.owner)}:{q(self.group)} -- {q(self.path)}\n"
                          f"chmod {self.mode:04o} -- {q(self.path)}")
        if not state.startswith("directory|"):
            return Change(f"is a {state.split('|')[0]}, not a directory: cannot fix",
                          f"echo {q(self.path)} is not a directory >&2; exit 1")
        fixes, cmds = _fix_meta(self.path, state, self.owner, self.group, self.mode)
        if not fixes:
            return Ok(f"{self.owner}:{self.group} {self.mode:04o}")
        return Change("; ".join(fixes), "\n".join(cmds))


def host_notified(host, marker: str) -> bool:
    """True when this check-mode run planned a change that would notify ``marker``."""
    return marker in getattr(host, "notified", set())


class File(Resource):
    """A file with exactly ``content``, ``owner``, ``group`` and ``mode`` (or absent).

    The new content is written to a temporary file in the same directory, owned
    and chmod-ed *before* the content lands (so a secret is never readable by
    others), checked with ``validate`` (``%s`` is the temporary path) when given,
    then moved into place atomically. ``notify`` names units to act on when the
    file changes, as ``"UNIT:restart"`` or ``"UNIT:reload"``. ``secret=True``
    keeps the content out of diffs.
    """

    def __init__(self, path: str, content: str | bytes = b"", owner: str = "root",
                 group: str = "root", mode: int = 0o644, validate: str | None = None,
                 notify: list[str] | tuple = (), secret: bool = False, present: bool = True):
        self.path, self.owner, self.group, self.mode = path, owner, group, mode
        self.content = content.encode() if isinstance(content, str) else content
        self.digest = hashlib.sha256(self.content).hexdigest()
        self.validate, self.secret, self.present = validate, secret, present
        self.markers = [n.replace(":", "@") for n in notify]
        self.what = f"file {path}"

    def probe(self) -> str:
        p = q(self.path)
        if not self.present:
            return f"test -e {p} && echo present"
        dump = "" if self.secret else (
            f"  [ \"$h\" != {self.digest} ] && [ $(stat -c %s -- {p}) -le {DIFF_LIMIT} ]"
            f" && base64 -w0 -- {p}; echo\n")
        return (f"if [ -f {p} ]; then\n  {_stat_snippet(self.path)}\n"
                f"  h=$(sha256sum -- {p} | cut -c1-64); echo \"$h\"\n{dump}"
                "else echo missing; fi")

    def plan(self, state, host):
        if not self.present:
            if state.strip() == "present":
                return Change("removed", f"rm -f -- {q(self.path)}\n" + self._touch_markers())
            return Ok("absent")
        lines = state.splitlines() + ["", "", ""]
        if lines[0] == "missing":
            diff = "" if self.secret else self._diff(b"", "/dev/null")
            return self._write(f"created ({self.owner}:{self.group} {self.mode:04o})", diff, host)
        meta, digest, old = lines[0], lines[1].strip(), lines[2].strip()
        if digest != self.digest:
            if self.secret:
                return self._write("content changed (holds secrets: diff not shown)", "", host)
            diff = self._diff(base64.b64decode(old), self.path) if old else ""
            return self._write("content changed", diff, host)
        fixes, cmds = _fix_meta(self.path, meta, self.owner, self.group, self.mode)
        if not fixes:
            return Ok(f"up to date ({self.owner}:{self.group} {self.mode:04o})")
        return Change("; ".join(fixes), "\n".join(cmds + [self._touch_markers()]))

    def _touch_markers(self) -> str:
        if not self.markers:
            return ""
        return (f"mkdir -p {PENDING_DIR}\n"
                + "".join(f"touch {PENDING_DIR}/{q(m)}\n" for m in self.markers))

    def _diff(self, old: bytes, old_name: str) -> str:
        try:
            a = old.decode().splitlines(keepends=True)
            b = self.content.decode().splitlines(keepends=True)
        except UnicodeDecodeError:
            return "(binary content)"
        return "".join(difflib.unified_diff(a, b, old_name, self.path, n=1))

    def _write(self, message: str, diff: str, host) -> Change:
        if host is not None and host.check:
            host.notified = getattr(host, "notified", set()) | set(self.markers)
        directory = os.path.dirname(self.path) or "/"
        body = base64.encodebytes(self.content).decode()
        validate = ""
        if self.validate:
            check_cmd = self.validate.replace("%s", '"$tmp"')
            validate = (f"if ! {check_cmd} >&2; then\n"
                        f"  echo 'validation failed ({self.validate}): "
                        f"{self.path} left unchanged' >&2; exit 3\nfi\n")
        return Change(message,
                      f"umask 077\ntmp=$(mktemp {q(directory)}/.fabstack.XXXXXX)\n"
                      "trap 'rm -f \"$tmp\"' EXIT\n"
                      f"base64 -d > \"$tmp\" <<'FABSTACK_EOF'\n{body}FABSTACK_EOF\n"
                      f"chown {q(self.owner)}:{q(self.group)} \"$tmp\"\n"
                      f"chmod {self.mode:04o} \"$tmp\"\n{validate}"
                      f"{self._touch_markers()}mv -f \"$tmp\" {q(self.path)}\ntrap - EXIT",
                      diff)


# -- services --------------------------------------------------------------------

class Service(Resource):
    """A systemd unit, ``enabled`` at boot and ``running`` (or not).

    Reloads systemd when the unit's file changed, and restarts or reloads the
    unit once when a :class:`File` notified it (in this run or an earlier,
    interrupted one).
    """

    OK_ENABLED = ("enabled", "static", "alias", "indirect", "generated", "enabled-runtime")

    def __init__(self, name: str, enabled: bool = True, running: bool = True):
        self.unit = name if "." in name else f"{name}.service"
        self.enabled, self.running = enabled, running
        self.what = f"service {self.unit}"

    def probe(self) -> str:
        return (f"systemctl show -p LoadState -p UnitFileState -p ActiveState "
                f"-p NeedDaemonReload -- {q(self.unit)} 2>/dev/null\n"
                f"for f in {self._markers}; do [ -e \"$f\" ] && echo \"pending=${{f##*@}}\";"
                " done; true")

    @property
    def _markers(self) -> str:
        """Marker globs: a File may notify "nginx" or "nginx.service"."""
        names = {self.unit, self.unit.removesuffix(".service")}
        return " ".join(f"{PENDING_DIR}/{q(n)}@*" for n in sorted(names))

    def plan(self, state, host):
        props = dict(line.split("=", 1) for line in state.splitlines() if "=" in line)
        pending = {m.split("@")[1] for m in getattr(host, "notified", set())
                   if m.split("@")[0] in (self.unit, self.unit.removesuffix(".service"))}
        pending |= {line.split("=", 1)[1] for line in state.splitlines()
                    if line.startswith("pending=")}
        u = q(self.unit)
        cmds, done = [], []
        if props.get("LoadState") == "not-found" or props.get("NeedDaemonReload") == "yes":
            cmds.append("systemctl daemon-reload")
            done.append("unit files reloaded")
        if self.enabled and props.get("UnitFileState") not in self.OK_ENABLED:
            cmds.append(f"systemctl enable -- {u}")
            done.append("enabled")
        elif not self.enabled and props.get("UnitFileState") == "enabled":
            cmds.append(f"systemctl disable -- {u}")
            done.append("disabled")
        active = props.get("ActiveState") == "active"
        if self.running and not active:
            cmds.append(f"systemctl start -- {u}")
            done.append("started")
        elif self.running and "restart" in pending:
            cmds.append(f"systemctl restart -- {u}")
            done.append("restarted (its configuration changed)")
        elif self.running and "reload" in pending:
            cmds.append(f"systemctl reload -- {u}")
            done.append("reloaded (its configuration changed)")
        elif not self.running and active:
            cmds.append(f"systemctl stop -- {u}")
            done.append("stopped")
        if pending and cmds:  # a stopped unit keeps them: starting it later clears them
            cmds.append(f"rm -f {self._markers}")
        if not cmds:
            return Ok(("enabled, " if self.enabled else "") +
                      ("running" if self.running else "stopped"))
        return Change(", ".join(done), "\n".join(cmds))


class ReleaseService(Service):
    """A :class:`Service` that runs only once ``release_dir`` exists (a release is deployed).

    Whether it does is read by the same probe as the unit's state, so deciding costs no
    round trip of its own.
    """

    def __init__(self, name: str, release_dir: str):
        super().__init__(name, enabled=True, running=True)
        self.release_dir = release_dir

    def probe(self) -> str:
        return f"test -d {q(self.release_dir)} && echo release=yes\n" + super().probe()

    def plan(self, state, host):
        self.running = "release=yes" in state.splitlines()
        outcome = super().plan(state, host)
        if not self.running:
            outcome.message += f" (no release deployed yet: {self.release_dir} missing)"
        return outcome


# -- commands --------------------------------------------------------------------

class Command(Resource):
    """A command that cannot be idempotent by itself, guarded where a guard exists.

    ``creates``: skip when this path exists. ``unless``: skip when this read-only
    shell test succeeds. With neither, it runs every time and says so.
    """

    def __init__(self, what: str, script: str, creates: str | None = None,
                 unless: str | None = None, message: str = "done"):
        self.what, self.script, self.creates, self.unless = what, script, creates, unless
        self.message = message

    def probe(self) -> str:
        tests = []
        if self.creates:
            tests.append(f"test -e {q(self.creates)}")
        if self.unless:
            tests.append(f"( {self.unless} ) >/dev/null 2>&1")
        if not tests:
            return ":"
        return f"if {' && '.join(tests)}; then echo skip; fi"

    def plan(self, state, host):
        if state.strip() == "skip":
            return Ok("already done" + (f" ({self.creates} exists)" if self.creates else ""))
        if not (self.creates or self.unless):
            return Change(f"{self.message} (not idempotent: runs every time)", self.script)
        return Change(self.message, self.script)


# -- firewall --------------------------------------------------------------------

class Firewall(Resource):
    """ufw: incoming denied by default, ``allow`` rules present, firewall enabled.

    ``allow`` holds ufw rule specs: application profiles ("OpenSSH") or
    "PORT/PROTO" ("443/tcp"). The rules are added before ufw is enabled, so
    enabling it never cuts the SSH session doing it. Rules added by others are
    left alone and listed.
    """

    what = "firewall (ufw)"

    def __init__(self, allow: list[str] | tuple = ("OpenSSH", "80/tcp", "443/tcp")):
        self.allow = list(allow)

    def probe(self) -> str:
        return ("grep -h '^ENABLED=' /etc/ufw/ufw.conf 2>/dev/null\n"
                "grep -h '^DEFAULT_INPUT_POLICY=' /etc/default/ufw 2>/dev/null\n"
                "grep -h '^### tuple ###' /etc/ufw/user.rules 2>/dev/null; true")

    @staticmethod
    def _matches(spec: str, rule: list[str]) -> bool:
        # rule: action proto dport dst sport src [dapp sapp] direction
        if rule[0] != "allow":
            return False
        if "/" in spec:
            port, proto = spec.split("/", 1)
            return rule[1] == proto and rule[2] == port and len(rule) == 7
        return len(rule) == 9 and rule[6] == spec

    def plan(self, state, host):
        lines = state.splitlines()
        enabled = "ENABLED=yes" in lines
        policy_ok = 'DEFAULT_INPUT_POLICY="DROP"' in lines
        rules = [line.split()[3:] for line in lines if line.startswith("### tuple ###")]
        missing = [s for s in self.allow if not any(self._matches(s, r) for r in rules)]
        extra = [" ".join(r[:3]) for r in rules
                 if not any(self._matches(s, r) for s in self.allow)]
        cmds, done = [f"ufw allow {q(s)} >/dev/null" for s in missing], []
        if missing:
            done.append(f"allowed {', '.join(missing)}")
        if not policy_ok:
            cmds.append("ufw default deny incoming >/dev/null")
            done.append("incoming denied by default")
        if not enabled:
            cmds.append("ufw --force enable >/dev/null")
            done.append("enabled")
        note = f" (other rules left alone: {'; '.join(extra)})" if extra else ""
        if not cmds:
            return Ok(f"enabled, deny incoming, allows {', '.join(self.allow)}{note}")
        return Change(", ".join(done) + note, "\n".join(cmds))


def apt_repository(name: str, uri: str, suites: str, components: str, key_url: str,
                   architectures: str | None = None) -> list[Resource]:
    """Resources for a third-party apt repository whose key is pinned with ``signed-by``.

    The key is fetched on the host with apt's own downloader (so apt's proxy and
    CA settings apply) into /etc/apt/keyrings/NAME.asc, the source is written
    as /etc/apt/sources.list.d/NAME.sources (deb822), and the lists refreshed.
    """
    keyring = f"/etc/apt/keyrings/{name}.asc"
    arch = f"Architectures: {architectures}\n" if architectures else ""
    source = (f"Types: deb\nURIs: {uri}\nSuites: {suites}\nComponents: {components}\n"
              f"{arch}Signed-By: {keyring}\n")
    return [
        Command(f"apt key {name}", creates=keyring, message=f"downloaded {key_url}",
                script=(f"install -d -m 0755 /etc/apt/keyrings\n"
                        f"/usr/lib/apt/apt-helper download-file {q(key_url)} {q(keyring)}.part\n"
                        f"chmod 0644 {q(keyring)}.part\nmv -f {q(keyring)}.part {q(keyring)}")),
        File(f"/etc/apt/sources.list.d/{name}.sources", source, notify=["apt:update"]),
        AptUpdate(),
    ]
