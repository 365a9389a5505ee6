"""``fab status``: one screen per host, read in one SSH round trip; non-zero exit when unhealthy.

It reads, changing nothing: whether each service is active, the listening TCP ports, the
current release and when it was deployed, the newest dump below /opt/APP/backup, the
certificate's expiry, the disk use of the app's data, the database and the backups, and
whether the maintenance page is on. A service down, a certificate within CERT_WARN_DAYS of its
expiry, a newest dump older than BACKUP_MAX_AGE or a filesystem at DISK_MAX_USE % or more is
named and makes the exit status 1 (no release, no dump at all, no certificate and the
maintenance page are warnings), so the task can run from cron or CI; with several hosts every
one is reported first (tasks/executor.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from fabric import task
from invoke.exceptions import Exit

from . import celery, media
from .executor import every_host
from .host import session
from .nginx import live_color, maintenance_page
from .primitives import q
from .primitives.services import STARTING_JOBS

CERT_WARN_DAYS = 14  # a certificate closer than this to its expiry is a problem
BACKUP_MAX_AGE = 48 * 3600  # seconds: an older newest dump is a problem
DISK_MAX_USE = 90  # percent of a filesystem in use that is a problem


def services(s, site) -> list[tuple[str, str]]:
    """(unit, what it is) for every service the host should run for its roles (``site``: an
    inventory.Site) but gunicorn (the instance that serves is read on the host:
    :func:`snippets`)."""
    units = [(unit, what) for unit, what in (
        (celery.WORKER, "Celery worker"), (celery.BEAT, "Celery beat"))
        if unit in celery.units(site)]
    units += [(unit, what) for roles, unit, what in (
        (("lb", "web"), "nginx.service", "web server"), (("db",), "postgresql.service", "database"),
        (("redis",), "redis-server.service", "broker and cache"))
        if any(site.has(role) for role in roles)]
    if media.mounted(site):
        units.append((f"{s.app}-media.service", "the db host's media folder, mounted"))
    if s.monitoring:
        units.append(("telegraf.service", "metrics"))
    return units


def snippets(s, site) -> list[str]:
    """The read-only probe, one snippet per part of the report."""
    current = s.layout.current
    cert = f"/etc/letsencrypt/live/{s['DOMAIN']}/fullchain.pem"
    folders = " ".join(q(p) for p in (s.layout.home, "/var/lib/postgresql", s.layout.backup))
    return [
        "date +%s",
        # the gunicorn instance the upstream file names ("app UNIT STATE"), then the others
        # (after a unit's state, the type of systemd's job on it when one is under way)
        live_color(s) + f"echo app {q(s.app)}@$c.service $(systemctl is-active -- "
        f"{q(s.app)}@$c.service 2>/dev/null)\n"
        + "".join(f"echo {q(unit)} $(systemctl is-active -- {q(unit)} 2>/dev/null) "
                  f"$(systemctl list-jobs --no-legend -- {q(unit)} | awk '{{print $3}}')\n"
                  for unit, _ in services(s, site)) + "true",
        "ss -ltnH 2>/dev/null | awk '{print $4}'",
        f"if [ -L {q(current)} ]; then readlink -- {q(current)}; "
        f"stat -c %Y -- {q(current)}; fi",
        f"find {q(s.layout.backup)} -type f -name '*.dump' -printf '%T@ %s %p\\n' 2>/dev/null"
        " | sort -n | tail -n 1",
        f"if [ -f {q(cert)} ]; then end=$(openssl x509 -enddate -noout -in {q(cert)} "
        "| cut -d= -f2); date -d \"$end\" +%s; else echo none; fi",
        f"du -sh -- {folders} 2>/dev/null; true",
        f"df -P -- / {q(s.layout.code)} {q(s.layout.home)} 2>/dev/null "
        "| awk 'NR > 1 {print $5, $6}'"
        " | sort -u",
        f"stat -c %Y -- {q(maintenance_page(s))} 2>/dev/null; true",
    ]


def ago(seconds: float) -> str:
    """A duration as people say it: 45 s, 12 min, 5 h, 3 days."""
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 3 * 86400:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} days"


def when(epoch: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(epoch))


def ports(ss_out: str) -> str:
    """``ss -ltnH`` local addresses as "22 (0.0.0.0, [::]), 5432 (127.0.0.1)"."""
    by_port: dict[int, list[str]] = {}
    for addr in ss_out.split():
        host, _, port = addr.rpartition(":")
        if port.isdigit():
            hosts = by_port.setdefault(int(port), [])
            if host not in hosts:
                hosts.append(host)
    return ", ".join(f"{port} ({', '.join(hosts)})" for port, hosts in sorted(by_port.items()))


@dataclass
class Line:
    status: str  # ok, warning or failed
    what: str
    message: str


def assess(s, site, answers: list[str]) -> list[Line]:
    """The report's lines for the host's roles from the probe's ``answers`` (see
    :func:`snippets`)."""
    now_s, units, ss_out, release, dump, cert, du, df, maintenance = answers
    now = int(now_s.strip() or time.time())
    lines: list[Line] = []
    state = dict(line.split(" ", 1) if " " in line else (line, "unknown")
                 for line in units.splitlines() if line.strip())
    app_unit, _, active = state.get("app", "").partition(" ")
    if f"{s.app}@legacy." in app_unit or not app_unit:
        lines.append(Line("failed", "gunicorn", "NGINX's upstream file names no instance (a "
                          "host deployed before blue/green: the next deploy moves the app to "
                          "its two instances)"))
    else:
        lines.append(Line("ok" if active.strip() == "active" else "failed",
                          f"service {app_unit}",
                          f"{active.strip() or 'unknown'} (gunicorn, the instance that serves)"))
    for unit, role in services(s, site):
        active, _, job = (state.get(unit, "").strip() or "unknown").partition(" ")
        if active != "active" and job in STARTING_JOBS:  # e.g. a deploy's restart of Celery
            lines.append(Line("warning", f"service {unit}", f"{active}: systemd's {job} job "
                              f"is under way ({role})"))
        else:
            lines.append(Line("ok" if active == "active" else "failed", f"service {unit}",
                              f"{active} ({role})"))
    lines.append(Line("ok", "listening", ports(ss_out) or "nothing"))

    if maintenance.strip().isdigit():
        since = int(maintenance.strip())
        lines.append(Line("warning", "maintenance", f"on since {when(since)} ({ago(now - since)} "
                          "ago): the app's visitors get the maintenance page (fab maintenance "
                          "off)"))

    rel = release.split()
    if len(rel) == 2 and rel[1].isdigit():
        lines.append(Line("ok", "release", f"{rel[0].rsplit('/', 1)[-1]}, deployed "
                          f"{when(int(rel[1]))} ({ago(now - int(rel[1]))} ago)"))
    else:
        lines.append(Line("warning", "release", f"none deployed ({s.layout.current} missing)"))

    parts = dump.split(" ", 2)
    if len(parts) == 3:
        stamp, size, path = int(float(parts[0])), int(parts[1]), parts[2].strip()
        age = now - stamp
        status = "ok" if age <= BACKUP_MAX_AGE else "failed"
        lines.append(Line(status, "last backup", f"{path} ({size / 1e6:.1f} MB), made "
                          f"{when(stamp)} ({ago(age)} ago)"
                          + ("" if status == "ok" else
                             f": older than {BACKUP_MAX_AGE // 3600} h")))
    else:
        lines.append(Line("warning", "last backup", f"none (no *.dump below {s.layout.backup})"))

    cert = cert.strip()
    if cert.isdigit():
        days = (int(cert) - now) // 86400
        status = "ok" if days >= CERT_WARN_DAYS else "failed"
        lines.append(Line(status, "certificate", f"{s['DOMAIN']}: expires in {days} days"
                          + ("" if status == "ok" else
                             f" (less than {CERT_WARN_DAYS}: is renewal working?)")))
    else:
        lines.append(Line("ok" if not s["ACME_SERVER"] else "warning", "certificate",
                          f"none for {s['DOMAIN']}"
                          + (" (plain HTTP: ACME_SERVER is empty)" if not s["ACME_SERVER"]
                             else "")))

    sizes = [line.split("\t", 1) for line in du.splitlines() if "\t" in line]
    lines.append(Line("ok", "disk use", ", ".join(f"{path} {size}" for size, path in sizes)
                      or "unknown"))
    for line in df.splitlines():
        use, _, mount = line.partition(" ")
        if use.rstrip("%").isdigit():
            full = int(use.rstrip("%"))
            lines.append(Line("ok" if full < DISK_MAX_USE else "failed", f"filesystem {mount}",
                              f"{use} used"))
    return [line for line in lines
            if not (roles := roles_of(s, line.what)) or any(site.has(r) for r in roles)]


def roles_of(s, what: str) -> tuple[str, ...]:
    """The roles whose hosts report the line ``what`` (none: every host reports it)."""
    if what == "gunicorn" or what.startswith(f"service {s.app}@"):
        return ("web",)
    return {"release": ("web", "worker"), "last backup": ("db",),
            "certificate": ("lb",)}.get(what, ())


@every_host
@task
def status(c):
    """One screen on the host's health; exits 1 naming what is wrong (for cron or CI)."""
    problems: list[str] = []
    with session(c, "status", lock=False) as h:
        s = h.settings
        answers = h.probe(snippets(s, h.site))
        for line in assess(s, h.site, answers):
            h.report.add(line.status, line.what, h.mask(line.message))
            if line.status == "failed":
                problems.append(f"{line.what}: {line.message}")
    if problems:
        raise Exit(f"[{h.name}] UNHEALTHY, {len(problems)} problem"
                   f"{'s' if len(problems) > 1 else ''}:\n  " + "\n  ".join(problems), code=1)
    print(f"[{h.name}] healthy", flush=True)
