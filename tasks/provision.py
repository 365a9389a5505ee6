"""Provisioning: ``fab provision`` takes a bare server to the whole stack, in order.

Each step is also a task of its own (``fab provision.base``). Re-running is safe:
every step reads the host's state first and changes only what differs.
"""

from __future__ import annotations

from pathlib import Path

from fabric import task

from . import backup, celery, certbot, db, deploy, media, monitoring, nginx, python
from .executor import parallel
from .host import CHECK_HELP, converging_task, session
from .primitives import (
    AptUpdate,
    Command,
    Directory,
    DistUpgrade,
    File,
    Firewall,
    Group,
    Packages,
    User,
    ensure,
    one_apt_run,
    q,
    refuse_conflicts,
    render,
)
from .scripts import script
from .settings import is_true, url_credentials

EXTRA_CA_PATH = "/usr/local/share/ca-certificates/fabstack-extra.crt"
CA_MARKER = "/var/lib/fabstack/pending/ca-certificates@update"
AUTO_UPGRADES = "/etc/apt/apt.conf.d/20auto-upgrades"
# update-ca-certificates links each certificate into /etc/ssl/certs and rehashes what it added.
# The extra CA changed or removed (its link there exists) needs --fresh, which links every
# certificate again and rehashes them all: new content at the same path would keep a stale
# hash link, a removed file a dangling one. Its first addition (a fresh host) is a plain run:
# the same /etc/ssl/certs, without relinking the system's ~150 certificates (0.5 s of a fresh
# provision on the sandbox).
CA_UPDATE = (f"if [ -L /etc/ssl/certs/{Path(EXTRA_CA_PATH).stem}.pem ]; "
             "then update-ca-certificates --fresh >/dev/null; "
             "else update-ca-certificates >/dev/null; fi")


def network_resources(h) -> list:
    """Proxy for apt and pip, and the extra CA every TLS client on the host trusts."""
    s = h.settings
    # root's only: the proxy's URL may hold a password (apt and pip run as root here)
    secret = bool(url_credentials(s["HTTP_PROXY"]))
    resources = [
        File("/etc/apt/apt.conf.d/80fabstack-proxy", render("apt-proxy.conf.j2", s),
             mode=0o600, secret=secret, present=bool(s["HTTP_PROXY"])),
        File("/etc/pip.conf", render("pip.conf.j2", s), mode=0o600, secret=secret),
    ]
    extra_ca = s["EXTRA_CA_CERT"]
    return resources + [
        File(EXTRA_CA_PATH, Path(extra_ca).expanduser().read_text() if extra_ca else "",
             present=bool(extra_ca), notify=["ca-certificates:update"]),
        Command("CA bundle", f"{CA_UPDATE}\nrm -f {CA_MARKER}",
                unless=f"test ! -e {CA_MARKER}", message="rebuilt (extra CA changed)"),
    ]


def media_readable(media_dir: str) -> Command:
    """Everything in the media tree readable by all (NGINX and the backups account read it).

    The app makes it so (its unit's UMask); this puts right what an earlier, stricter UMask
    left (folders 0750 the backups account can no longer enter without the app's group).
    """
    hidden = (f"find {q(media_dir)} \\( -type d ! -perm -o=rx -o ! -type d ! -type l "
              "! -perm -o=r \\)")
    return Command(f"media {media_dir}", f"{hidden} -exec chmod o+rX -- {{}} +",
                   unless=f"test -z \"$({hidden} -print -quit)\"",
                   message="made readable by all (NGINX and backups read it)")


def static_owned(s) -> Command:
    """The static folder the app's user's, as collectstatic runs as it: one an earlier fabstack
    left root's is given with all it holds (files/static-owner.sh.j2, which the deploy runs too,
    before collectstatic)."""
    static, owner = q(s.layout.static), q(f"{s.app}:{s.app}")
    return Command(f"static folder {s.layout.static}", script("static-owner.sh.j2", s),
                   unless=f"test ! -d {static} || test \"$(stat -c %U:%G -- {static})\" = {owner}",
                   message=f"given to {s.app} with all it holds (collected as root before)")


def unattended_resources(h) -> list:
    """Debian's unattended-upgrades (security updates between runs, its own defaults), or its
    daily run turned off (UNATTENDED_UPGRADES)."""
    on = is_true(h.settings["UNATTENDED_UPGRADES"])
    periodic = File(AUTO_UPGRADES, render("auto-upgrades.j2", h.settings, on=on))
    return [Packages(["unattended-upgrades"]), periodic] if on else [periodic]


def base_resources(h) -> list:
    """The base system: packages, the app's user and directories, the firewall."""
    s = h.settings
    app = s.app
    return [
        *network_resources(h),
        AptUpdate(int(s["APT_CACHE_MAX_AGE"])),
        # UPGRADE empty: a host whose app user exists was provisioned before.
        DistUpgrade(record=not h.check, mode=s["UPGRADE"] or "first",
                    provisioned=f"getent passwd {q(app)}"),
        Packages(s["BASE_PACKAGES"].split() + ["ca-certificates", "curl", "ufw"]),
        *unattended_resources(h),
        Group(app),
        User(app, group=app, home=s.layout.home),
        Directory(s.layout.code, "root", "root", 0o755),
        Directory(s.layout.conf, "root", app, 0o750),
        Directory(s.layout.home, app, app, 0o755),
        static_owned(s),
        Directory(s.layout.static, app, app, 0o755),
        # (where the db host's media are mounted, the mount point is tasks/media.py's)
        *([Directory(s.layout.media, app, app, 0o755), media_readable(s.layout.media)]
          if not media.mounted(h.site) else []),
        Directory(s.layout.logs, app, app, 0o750),
        Firewall(firewall_rules(h)),
    ]


def firewall_rules(h) -> list[str]:
    """ufw's rules for the host's roles: SSH; HTTP and HTTPS on the lb (a whole stack's too);
    on a site spread over hosts, HTTP on a web host from the lb only, PostgreSQL and Redis from
    the app's hosts only."""
    site = h.site
    clients = site.others("web", "worker")
    return ["OpenSSH", *(["80/tcp", "443/tcp"] if site.has("lb") else []),
            *([f"80/tcp from {site.address_of('lb')}"] if site.fronted else []),
            *([f"5432/tcp from {client}" for client in clients] if site.has("db") else []),
            *([f"6379/tcp from {client}" for client in clients] if site.has("redis") else [])]


@parallel
@task(default=True, help={"check": CHECK_HELP})
def all(c, check=False):  # noqa: A001 - "provision.all" reads best
    """Provision the stack in order, from the base system to monitoring (the host's roles')."""
    with session(c, "provision", check) as h:
        # Everything is declared (and every setting checked) before anything changes, and
        # read in one probe round trip: the steps' later decisions (the site's switch to
        # HTTPS once certbot has the certificate) are made on the host by the re-probes.
        # The steps of the host's roles (tasks/inventory.py; a whole stack has them all).
        site = h.site
        app = site.has("web") or site.has("worker")  # the app's code runs here
        rest = [*db.db_resources(h), *media.share_resources(h),
                *(celery.celery_resources(h) if site.has("worker") else []),
                *(nginx.nginx_resources(h) if site.has("lb") or site.has("web") else []),
                *(deploy.app_resources(h) if site.has("web") else []),
                *backup.backup_resources(h),
                *(certbot.certbot_resources(h) if site.has("lb") else []),
                *monitoring.monitoring_resources(h)]
        if not app:  # no Python of ours on an lb, db or redis host: one ensure, one apt run
            ensure(h, *one_apt_run([*base_resources(h), *rest]))
            return
        release, candidate = python.facts(h, h.settings["PYTHON_VERSION"])
        if candidate:
            first = [*base_resources(h), *python.python_resources(h, release, candidate)]
        else:  # no apt lists yet (or a PPA is needed): the base system first, then look again
            refuse_conflicts(h, [*base_resources(h), *rest])  # before the base system changes
            ensure(h, *base_resources(h))
            ensure(h, *python.ready_resources(h))
            first = []
        # every package the steps install from the sources apt has, in one apt run
        ensure(h, *one_apt_run([*first, *rest]))


@converging_task("provision.base")
def base(h):
    """Base system only: apt, upgrades, base packages, app user and directories, ufw."""
    return base_resources(h)
