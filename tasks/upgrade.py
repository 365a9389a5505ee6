"""``fab upgrade``: the host's pending package upgrades, on purpose, with the site serving.

It lists what will change, then upgrades while no maintainer script may start, stop or
restart a service (a ``policy-rc.d`` of its own for that run: files/upgrade.sh.j2), then
restarts one at a time what Debian's needrestart (installed by the task, set to list only)
names as running old libraries, the app's gunicorn last and then the site's health check
(files/upgrade-restart.sh.j2). PostgreSQL and Redis, whose restart fails the app's requests,
are named and left to the operator or to ``--reboot``. The README's "Upgrades" section is the
manual.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from fabric import task
from paramiko import SSHException

from . import status
from .deploy import health_check, restart_app
from .host import StepFailed, session
from .primitives import (
    DPKG_PROBE,
    AptUpdate,
    Directory,
    DistUpgrade,
    File,
    Packages,
    ensure,
    q,
    render,
)
from .scripts import script

POLICY = "/usr/sbin/policy-rc.d"
POLICY_MARK = "# fabstack: written by fab upgrade for its run only (tasks/upgrade.py)"
NEEDRESTART_CONF = "/etc/needrestart/conf.d/fabstack.conf"
RESTART_SCRIPTS = "/etc/needrestart/restart.d"  # needrestart's for what is no unit
NEEDRESTART = ("if command -v needrestart >/dev/null; then needrestart -b -r l; "
               "else echo NEEDRESTART-MISSING; fi")
MARK = "@@fabstack-upgrade@@"
RESTART_WAIT = 60  # seconds a restarted unit may take to be active again
REBOOT_TIMEOUT = 600  # seconds from the reboot until fab status must be clean
# Which boot this is: the kernel's boot id, and PID 1's start (a container's own reboot).
BOOT_IDENTITY = "cat /proc/sys/kernel/random/boot_id; cut -d' ' -f22 /proc/1/stat"
UNIT = re.compile(r"[A-Za-z0-9@._:\\-]+")
# needrestart's own list of units not to restart from a remote session (its override_rc):
# the system bus, logins, users' managers, terminals. A reboot restarts them.
FOR_REBOOT = re.compile(r"(dbus|dbus-broker|systemd-logind|user@\d+|(serial-)?getty@.*)"
                        r"\.service")
# Their restart fails the app's requests while they are down: the operator's call.
INTERRUPTING = re.compile(r"(postgresql(@.*)?|redis-server)\.service")
KERNEL = {"1": "ok", "2": "abi", "3": "version"}  # NEEDRESTART-KSTA: 0 is "unknown"
INST = re.compile(r"^(Inst|Remv) (\S+)(?: \[([^\]]*)\])?(?: \((\S+) (.*)\))?")


@dataclass
class Upgrade:
    """A package apt would change: ``old`` "" when new, ``new`` "" when removed."""

    package: str
    old: str
    new: str
    security: bool

    def describe(self) -> str:
        """"OLD -> NEW (security)", as the report shows it."""
        if not self.new:
            return f"{self.old} -> removed"
        return (f"{self.old or 'not installed'} -> {self.new}"
                + (" (security)" if self.security else ""))


def pending(simulation: str) -> list[Upgrade]:
    """The packages of ``apt-get -s dist-upgrade``'s output; StepFailed when apt refused."""
    errors = [line[3:] for line in simulation.splitlines() if line.startswith("E: ")]
    if errors:
        raise StepFailed("pending upgrades", "apt cannot plan the upgrade: "
                         + " ".join(errors))
    found = []
    for line in simulation.splitlines():
        m = INST.match(line)
        if m:
            found.append(Upgrade(m[2], m[3] or "", (m[4] or "") if m[1] == "Inst" else "",
                                 "-security" in (m[5] or "")))
    return found


@dataclass
class Needs:
    """needrestart's batch report (``needrestart -b``)."""

    installed: bool = True
    services: list[str] = field(default_factory=list)
    sessions: list[str] = field(default_factory=list)
    kernel: str = ""  # NEEDRESTART-KSTA: 0 unknown, 1 current, 2 ABI update, 3 newer version
    running: str = ""
    expected: str = ""

    @property
    def reboot(self) -> bool:
        """A newer kernel waits for a reboot."""
        return self.kernel in ("2", "3")


def needs(text: str) -> Needs:
    """Parse ``needrestart -b -r l`` (NEEDRESTART-SVC, -SESS, -KSTA, -KCUR, -KEXP lines)."""
    found = Needs(installed="NEEDRESTART-MISSING" not in text)
    for line in text.splitlines():
        key, _, value = line.partition(": ")
        value = value.strip()
        if key == "NEEDRESTART-SVC":
            found.services.append(value)
        elif key == "NEEDRESTART-SESS":
            found.sessions.append(value)
        elif key == "NEEDRESTART-KSTA":
            found.kernel = value
        elif key == "NEEDRESTART-KCUR":
            found.running = value
        elif key == "NEEDRESTART-KEXP":
            found.expected = value
    return found


def restart_plan(s, services: list[str], stopped: list[str]
                 ) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """The units to restart as (kind, unit) in order, and those left alone with the reason.

    systemd first (needrestart's names for the system's and the users' managers, done by its
    own scripts: daemon-reexec), then every other unit by name, NGINX, and the app's gunicorn
    last; a unit the upgrade stopped is started whatever it is.
    """
    # the app's gunicorn: an instance, or the one behind APP.socket of a host deployed before
    apps = {f"{s.app}@{color}.service" for color in s.layout.colors} | {f"{s.app}.service"}
    first, middle, last, left = [], [], [], {}
    for unit in sorted(set(services) | set(stopped)):
        if UNIT.fullmatch(unit) and "." not in unit:  # systemd-manager, systemd-user
            first.append(("script", unit))
        elif not UNIT.fullmatch(unit):
            left[unit] = "not a unit name fabstack can restart"
        elif unit in stopped:
            middle.append(("start", unit))
        elif unit in apps:
            last.append(("app", unit))
        elif unit == "nginx.service":
            middle.append(("nginx", unit))
        elif FOR_REBOOT.fullmatch(unit):
            left[unit] = "needrestart leaves it to a reboot (fab upgrade --reboot)"
        elif INTERRUPTING.fullmatch(unit):
            left[unit] = ("its restart fails the app's requests while it is down: restart it "
                          f"at a quiet moment (systemctl restart {unit}) or fab upgrade --reboot")
        else:
            middle.append(("restart", unit))
    nginx = [item for item in middle if item[0] == "nginx"]
    return first + [item for item in middle if item[0] != "nginx"] + nginx + last, left


def needrestart_resources(s) -> list:
    """needrestart, told to list only: fab upgrade restarts, one unit at a time."""
    return [Directory("/etc/needrestart/conf.d"),
            File(NEEDRESTART_CONF, render("needrestart.conf.j2", s)),
            Packages(["needrestart"])]


def report_pending(h, upgrades: list[Upgrade], chosen: list[Upgrade]) -> None:
    for u in upgrades:
        h.report.add("pending" if u in chosen else "left", f"package {u.package}",
                     u.describe() + ("" if u in chosen else
                                     ": not from a security archive (--security)"))


def report_needs(h, found: Needs, left: dict[str, str], planned: tuple = ()) -> None:
    """What still runs old code after the restarts (but those ``planned`` in check mode), and
    whether a reboot is needed."""
    if not found.installed:
        h.ok("needrestart", "not installed yet: fab upgrade installs it (--check installs "
             "nothing)")
        return
    for unit in (u for u in found.services if u not in planned):
        h.report.add("warning", f"service {unit}", "still runs old libraries: " + left.get(
            unit, "restarted, but processes it does not stop with it run old code (for "
            "ssh.service: the log-in sessions, this one included, until they end)"))
    if not [u for u in found.services if u not in planned]:
        h.ok("needrestart", "no service runs old libraries"
             + (" once those above are restarted" if planned else ""))
    if found.sessions:
        h.ok("sessions", f"{len(found.sessions)} log-in sessions still run old libraries "
             f"({'; '.join(found.sessions)}): they end when their users log out")
    if found.reboot:
        h.report.add("warning", "kernel", f"running {found.running}, {found.expected} is "
                     "installed: a reboot is needed (fab upgrade --reboot)")
    elif found.kernel == "1":
        h.ok("kernel", f"running {found.running}, the newest installed")
    elif found.kernel:
        h.report.add("warning", "kernel", "needrestart cannot tell whether a newer one is "
                     "installed")
    else:
        h.ok("kernel", "not checked: needrestart does not in a container (it runs its host's)")


def upgrade_host(h, security: bool = False, reboot: bool = False) -> None:
    s = h.settings
    ensure(h, AptUpdate(int(s["APT_CACHE_MAX_AGE"])), *needrestart_resources(s))
    sim, nr, policy, release = h.probe([
        f"apt-get -s -o Debug::NoLocking=1 dist-upgrade 2>&1\n{DPKG_PROBE}",
        NEEDRESTART,
        f"if [ -e {POLICY} ]; then grep -qxF {q(POLICY_MARK)} {POLICY} && echo ours || "
        "echo foreign; fi",
        f"readlink -- {q(s.layout.current)}; true",
    ])
    if "dpkg=interrupted" in sim.splitlines():
        raise StepFailed("system upgrade", "dpkg's last run was interrupted: fab provision.base "
                         "finishes it (dpkg --configure -a); then run fab upgrade again")
    upgrades = pending(sim)
    chosen = [u for u in upgrades if u.security or not security]
    report_pending(h, upgrades, chosen)
    if policy.strip() == "ours":  # a fab upgrade killed with SIGKILL left it
        if not h.check:
            h.run(f"rm -f -- {POLICY}", what="policy-rc.d")
        h.changed("policy-rc.d", "removed: a fab upgrade that was killed left it (packages "
                  "could not restart services since)")
    found, stopped = needs(nr), []
    if not chosen:
        h.ok("system upgrade", "no upgrades pending" if not upgrades else
             f"{len(upgrades)} pending, none from a security archive (--security)")
    elif policy.strip() == "foreign":
        raise StepFailed("policy-rc.d", f"{POLICY} exists and is not fabstack's: it decides "
                         "which services packages may restart; nothing was upgraded (remove "
                         "it, or upgrade by hand)")
    elif h.check:
        h.changed("system upgrade", f"would upgrade {len(chosen)} packages; which services "
                  "then need a restart is known after it (needrestart)")
    else:
        outcome = DistUpgrade(mode="security" if security else "all").plan(
            "".join(f"{u.package}{' security' if u.security else ''}\n" for u in chosen), h)
        res = h.run("(\n" + script("upgrade.sh.j2", s, upgrade=outcome.script, mark=POLICY_MARK)
                    + f")\nstatus=$?\necho {MARK}\n{NEEDRESTART}\nexit $status",
                    what="system upgrade", check=False)
        out, _, nr_after = res.stdout.partition(f"{MARK}\n")
        if not res.ok:
            raise StepFailed("system upgrade", h.mask(
                f"exit {res.exited}: {(res.stderr.strip() or out.strip())[-1500:]}"))
        h.changed("system upgrade", outcome.message)
        stopped = [line.split()[1] for line in out.splitlines() if line.startswith("stopped ")]
        found = needs(nr_after)
    plan, left = restart_plan(s, found.services, stopped)
    if plan and h.check:
        for kind, unit in plan:
            h.changed(f"service {unit}", f"restart ({kind}): it runs old libraries")
    elif plan:
        restart(h, plan, found, release.strip().rsplit("/", 1)[-1])
        found = needs(h.probe([NEEDRESTART])[0])
    report_needs(h, found, left, tuple(unit for _, unit in plan) if h.check else ())
    maybe_reboot(h, found, list(left), reboot)


def restart(h, plan: list[tuple[str, str]], found: Needs, release: str) -> None:
    """Restart ``plan``'s units one at a time (files/upgrade-restart.sh.j2), the app last and
    then its health check through NGINX."""
    s = h.settings
    res = h.run(script("upgrade-restart.sh.j2", s, plan="\n".join(f"{k} {u}" for k, u in plan),
                       app_restart=restart_app(s), wait=RESTART_WAIT, scripts=RESTART_SCRIPTS),
                what="restarts", check=False)
    why = {unit: "ran old libraries" for unit in found.services}
    for line in res.stdout.splitlines():
        word, _, rest = line.partition(" ")
        if word == "restarted":
            unit, ms = rest.split()
            kind = dict((u, k) for k, u in plan)[unit]
            how = {"nginx": "new master on the same sockets",
                   "app": "as a deploy switches: now in the other instance",
                   "script": f"{RESTART_SCRIPTS}/{unit}", "start": "the upgrade had stopped it"}
            h.changed(f"service {unit}", f"restarted ({why.get(unit, 'stopped')}; "
                      f"{how.get(kind, 'systemctl restart')}), "
                      f"{'done' if kind == 'app' else 'active'} after {int(ms) / 1000:.1f} s")
    if not res.ok:
        failed = [line.split()[1] for line in res.stdout.splitlines()
                  if line.startswith("failed ")]
        raise StepFailed(f"service {failed[0] if failed else 'restarts'}", h.mask(
            f"not active again within {RESTART_WAIT} s, the units after it were not "
            f"restarted: {res.stderr.strip()[-1500:]}"))
    if any(kind == "app" for kind, _ in plan) and release:
        healthy, detail = health_check(h, release)
        if not healthy:
            raise StepFailed("health check", f"after the app's restart: {detail}")
        h.ok("health check", detail)


def maybe_reboot(h, found: Needs, left: list[str], asked: bool) -> None:
    """Reboot (``--reboot``) when a newer kernel waits or services left alone (``left``:
    PostgreSQL, Redis, what needrestart leaves to a reboot) still run old libraries."""
    why = ([f"kernel {found.expected} installed"] if found.reboot else []) + \
        [f"{unit} runs old libraries" for unit in found.services if unit in left]
    if not asked:
        return
    if not why:
        h.ok("reboot", "not needed: nothing runs old code")
        return
    if h.check:
        h.changed("reboot", f"would reboot ({'; '.join(why)}) and wait for fab status")
        return
    reboot_and_wait(h, "; ".join(why))


def reboot_and_wait(h, why: str, timeout: int = REBOOT_TIMEOUT) -> None:
    """Reboot the host, wait until it is back (another boot) and fab status's checks pass."""
    s = h.settings
    before = h.run(BOOT_IDENTITY, what="reboot").stdout
    h.run("systemd-run --quiet --on-active=2 systemctl reboot", what="reboot")
    h.changed("reboot", f"rebooting ({why})")
    started = time.monotonic()
    h.release_lock()
    h.conn.close()
    h.conn.connect_timeout = 10
    problems = "the host did not answer SSH"
    while time.monotonic() - started < timeout:
        time.sleep(2)
        try:
            h.conn.close()
            identity, nr, *answers = h.probe([BOOT_IDENTITY, NEEDRESTART,
                                              *status.snippets(s, h.site)])
        except (OSError, EOFError, SSHException, StepFailed):
            continue
        if identity == before:
            continue  # not down yet
        lines = status.assess(s, h.site, answers)
        failed = [f"{line.what}: {line.message}" for line in lines if line.status == "failed"]
        if not failed:
            for line in lines:
                h.report.add(line.status, line.what, h.mask(line.message))
            h.ok("reboot", f"back and fab status clean after {time.monotonic() - started:.0f} s")
            report_needs(h, needs(nr), {})
            return
        problems = "fab status names " + "; ".join(failed)
    raise StepFailed("reboot", h.mask(f"not back within {timeout} s of the reboot: {problems}"))


@task(help={"check": "Report what would change (packages, restarts, reboot); change nothing.",
            "security": "Install only the upgrades from a security archive.",
            "reboot": "Reboot when something still runs old code (a newer kernel, services left "
                      "alone) and wait until fab status is clean."})
def upgrade(c, check=False, security=False, reboot=False):
    """Upgrade packages on purpose: report, upgrade, restart services one at a time, app last."""
    with session(c, "upgrade", check) as h:
        upgrade_host(h, security, reboot)
