"""apt: package lists, packages, upgrades, third-party repositories (and dpkg's recovery)."""

from __future__ import annotations

from .commands import Command
from .engine import PENDING_DIR, STATE_DIR, Change, Ok, Resource, host_notified, q
from .files import File

APT_STAMP = f"{STATE_DIR}/apt-lists-updated"
UPGRADE_STAMP = f"{STATE_DIR}/upgrade-checked"

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

    Installs are non-interactive and keep existing config files on upgrade. ``also``
    (state present only): packages that later resources of the same run declare, installed in
    this resource's apt run when they are missing (see :func:`one_apt_run`).
    """

    def __init__(self, names: list[str] | str, state: str = "present", also: list[str] = ()):
        self.names = names.split() if isinstance(names, str) else list(names)
        if state not in ("present", "latest", "absent"):
            raise ValueError(f"Packages state must be present, latest or absent, not {state!r}")
        if also and state != "present":
            raise ValueError("Packages' also goes with state present only")
        self.state = state
        self.also = [n for n in dict.fromkeys(also) if n not in self.names]
        self.what = f"packages {' '.join(self.names)}" if len(self.names) <= 3 else \
            f"packages ({len(self.names)})"

    def probe(self) -> str:
        names = " ".join(q(n) for n in self.names + self.also)
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
        # check mode: installed by an earlier change this run planned
        installed |= {n for n in self.names + self.also if host_notified(host, f"{n}@install")}
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
        later = [n for n in self.also if n not in installed]
        todo = missing + [n for n in upgradable if n not in missing] + later
        if missing:
            parts.append(f"installed {' '.join(missing)}")
        if upgradable:
            parts.append(f"upgraded {' '.join(upgradable)}")
        if later:
            parts.append(f"installed in the same apt run, for later steps: {' '.join(later)}")
        if todo:
            cmds.append(f"{APT_GET} install -- {' '.join(map(q, todo))}")
        if not cmds:
            return Ok("all installed" + (", up to date" if self.state == "latest" else ""))
        return Change("; ".join(parts), "\n".join(cmds),
                      notify=tuple(f"{n}@install" for n in missing + later))


def one_apt_run(resources: list[Resource]) -> list[Resource]:
    """``resources``, with the first :class:`Packages` (state present) also installing the
    packages of the Packages resources (state present) after it, in its apt run: apt, dpkg
    and their triggers run once instead of once per step. The later resources stay (they find
    their packages installed). Packages declared after an apt source that a resource adds
    (a file that notifies ``apt:update``) are left to their own resource: they may come from
    that source.
    """
    present = [i for i, r in enumerate(resources)
               if isinstance(r, Packages) and r.state == "present"]
    if not present:
        return list(resources)
    first = present[0]
    later: list[str] = []
    for r in resources[first + 1:]:
        if "apt@update" in getattr(r, "markers", ()):
            break
        if isinstance(r, Packages) and r.state == "present":
            later += r.names
    head = resources[first]
    out = [*resources[:first], Packages(head.names, also=head.also + later),
           *resources[first + 1:]]
    # an upgrade just before them (no apt source between) installs them all with its own
    for i in range(first - 1, -1, -1):
        r = out[i]
        if "apt@update" in getattr(r, "markers", ()):
            break
        if isinstance(r, DistUpgrade):
            names = dict.fromkeys([*r.also, *head.names, *head.also, *later])
            out[i] = DistUpgrade(r.record, r.mode, r.provisioned, also=list(names))
            break
    return out


class DistUpgrade(Resource):
    """Installed packages upgraded when any are pending, as ``mode`` says: ``all`` (``apt-get
    dist-upgrade``), ``security`` (only those from a security archive, ``apt-get install
    --only-upgrade``), ``off`` (report them, install nothing) or ``first`` (security on a first
    provision, off after: the host counts as provisioned once the ``provisioned`` shell test
    succeeds).

    ``also``: packages that later resources declare; when the plan is a security upgrade
    (``security``, or ``first`` on a first provision), those missing are installed in its apt
    run, with the upgrades (see :func:`one_apt_run`): dpkg's runs and triggers are shared.

    So that a no-op run does not pay for a simulation every time, the probe simulates the
    upgrade only when the apt lists or the installed packages changed since the last
    simulation that found nothing to do (recorded in /var/lib/fabstack unless ``record`` is
    false, as in check mode).
    """

    what = "system upgrade"
    MODES = ("all", "security", "off", "first")

    def __init__(self, record: bool = True, mode: str = "all", provisioned: str = "false",
                 also: list[str] = ()):
        if mode not in self.MODES:
            raise ValueError(f"DistUpgrade mode must be one of {', '.join(self.MODES)}")
        self.record, self.mode, self.provisioned = record, mode, provisioned
        self.also = list(also)

    def probe(self) -> str:
        save = (f"mkdir -p {STATE_DIR} && printf '%s' \"$key\" > {UPGRADE_STAMP}"
                if self.record else ":")
        first = (f"( {self.provisioned} ) >/dev/null 2>&1 || echo first-provision\n"
                 if self.mode == "first" else "")
        if self.also:
            first += ("dpkg-query -W -f='installed ${Package} ${db:Status-Abbrev}\\n' -- "
                      f"{' '.join(map(q, self.also))} 2>/dev/null || true\n")
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
        installed = {line[1] for line in lines if line[0] == "installed" and line[2:] == ["ii"]}
        installed |= {n for n in self.also if host_notified(host, f"{n}@install")}
        lines = [line for line in lines if line[0] != "installed"]
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
        later: list[str] = []
        if mode == "security":
            message = f"upgraded {len(security)} security packages: {_some(security)}"
            script = f"{APT_GET} install --only-upgrade -- {' '.join(map(q, security))}"
            if len(security) < len(pending):
                message += f" ({len(pending) - len(security)} other upgrades left: {why})"
            later = [n for n in self.also if n not in installed]
            if later:
                message += f"; installed in the same apt run, for later steps: {_some(later)}"
                script = _upgrade_and_install(security, later)
        else:
            message = f"upgraded {len(pending)} packages: {_some(pending)}"
            script = f"{APT_GET} dist-upgrade"
        if "dpkg=interrupted" in flags:  # apt would refuse to start
            message, script = f"{DPKG_RECOVERED}; {message}", f"{DPKG_RECOVER}\n{script}"
        return Change(message, script, notify=tuple(f"{n}@install" for n in later))


def _upgrade_and_install(upgrades: list[str], install: list[str]) -> str:
    """One apt run that upgrades the installed packages of ``upgrades`` (as ``install
    --only-upgrade`` would) and installs ``install``; what apt had installed as a dependency
    stays marked so (naming a package to ``apt-get install`` marks it manual)."""
    return (f"up=$(for p in {' '.join(map(q, upgrades))}; do if dpkg-query -W "
            "-f='${db:Status-Abbrev}' -- \"$p\" 2>/dev/null | grep -q '^ii'; then echo \"$p\"; "
            "fi; done)\n"
            'auto=$(if [ -n "$up" ]; then apt-mark showauto $up; fi)\n'
            f"{APT_GET} install -- $up {' '.join(map(q, install))}\n"
            'if [ -n "$auto" ]; then apt-mark auto $auto >/dev/null; fi')


def _some(names: list[str], shown: int = 8) -> str:
    return " ".join(names[:shown]) + (f" and {len(names) - shown} more"
                                      if len(names) > shown else "")


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
