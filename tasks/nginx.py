"""NGINX in front of the app: its site, static and media files, and a 444 default server.

``fab nginx`` (``nginx.setup``) installs NGINX, removes the distro's default site and writes
two files in ``/etc/nginx/sites-enabled/``: ``fabstack-default.conf`` (requests for any other
name closed with 444 on port 80, TLS handshakes refused on 443) and ``APP.conf`` (the site:
proxy to the gunicorn instance that serves, upstream ``APP_live`` in
``/etc/nginx/conf.d/fabstack-APP-upstream.conf``, with Host, X-Forwarded-For and X-Forwarded-Proto,
``/static/`` and ``/media/`` from disk, ACME challenges from certbot's webroot). The site
comes in two versions: plain HTTP until the certificate exists, then HTTPS with HTTP
redirecting (``fab certbot`` gets the certificate).

Every file is tested *in context* before it goes live: ``fabstack-nginx-check`` (installed on
the host) runs ``nginx -t`` on a copy of nginx.conf that includes the candidate file in place
of the live one, so a broken file never lands, never reaches a reload, and the running
configuration keeps serving. NGINX reloads only when a file changed.

On a site spread over hosts (tasks/inventory.py), an lb host without the web role proxies
everything to the web hosts (upstream ``APP_web`` in ``/etc/nginx/conf.d/fabstack-APP-web.conf``,
each on its private address, the next one tried when one fails), holds the certificate and
serves no file itself; a web host behind it serves HTTP to it alone, takes the client's
address from its X-Forwarded-For and hands its X-Forwarded-Proto to the app.
"""

from __future__ import annotations

from .host import converging_task
from .primitives import Directory, File, Ok, Packages, Resource, Service, q, render

SITES = "/etc/nginx/sites-enabled"
CHECKER = "/usr/local/sbin/fabstack-nginx-check"
DEFAULT_SITE = f"{SITES}/fabstack-default.conf"
ACME_WEBROOT = "/var/www/letsencrypt"  # also in files/nginx-site*.conf.j2
LIVE_DIR = "/etc/letsencrypt/live"
MAINTENANCE_PAGE = "fabstack-maintenance.html"


def site_path(s) -> str:
    return f"{SITES}/{s.app}.conf"


def maintenance_page(s) -> str:
    """The maintenance page (``fab maintenance``); while it exists the site serves it."""
    return f"{s.layout.maintenance}/{MAINTENANCE_PAGE}"


def certificate_files(s) -> tuple[str, str]:
    """The certificate chain and key the TLS site uses (certbot's lineage named DOMAIN)."""
    return f"{LIVE_DIR}/{s['DOMAIN']}/fullchain.pem", f"{LIVE_DIR}/{s['DOMAIN']}/privkey.pem"


def https_wanted(s) -> bool:
    return bool(s["ACME_SERVER"])


def config_file(path: str, content: str) -> File:
    """An NGINX file that goes live only when nginx -t passes with it in place; then a reload."""
    return File(path, content, validate=f"{CHECKER} {path} %s", notify=["nginx:reload"])


class Site(Resource):
    """The app's site: the HTTPS version once the certificate exists, the HTTP version before.

    Which one is decided on the host, in the same probe that reads the file, so the choice
    costs no extra round trip and follows the certificate within a run (certbot's step
    obtains it, then this resource is planned again and switches to HTTPS). The same goes
    for the maintenance page (``fab maintenance``): while it exists, each version shows it.
    """

    def __init__(self, s, maintenance: bool | None = None, **place):
        self.page = maintenance_page(s)
        self.forced = maintenance  # None: follow the page; fab maintenance off says False

        def version(template: str, maintenance: bool) -> File:
            return config_file(site_path(s), render(template, s, maintenance=maintenance,
                                                    **place))

        self.http = version("nginx-site.conf.j2", False)
        self.tls = version("nginx-site-tls.conf.j2", False)
        # While the maintenance page exists (fab maintenance on), the site shows it.
        self.http_maintenance = version("nginx-site.conf.j2", True)
        self.tls_maintenance = version("nginx-site-tls.conf.j2", True)
        self.wanted = https_wanted(s) and "lb" not in place  # behind an lb: HTTP to it
        self.files = certificate_files(s)
        self.what = self.http.what

    def _pick(self, on: File, off: File) -> str:
        return (f"if [ -e {q(self.page)} ]; then echo maintenance\n{on.probe()}\n"
                f"else\n{off.probe()}\nfi")

    def probe(self) -> str:
        http = "echo http\n" + self._pick(self.http_maintenance, self.http)
        if not self.wanted:
            return http
        chain, key = (q(f) for f in self.files)
        return (f"if [ -s {chain} ] && [ -s {key} ]; then echo tls\n"
                f"{self._pick(self.tls_maintenance, self.tls)}\nelse {http}\nfi")

    def plan(self, state, host):
        version, _, rest = state.partition("\n")
        tls = version.strip() == "tls"
        maintenance = rest.startswith("maintenance\n")
        if maintenance:
            rest = rest.split("\n", 1)[1]
        if self.forced is not None:
            maintenance = self.forced
        files = {(False, False): self.http, (True, False): self.tls,
                 (False, True): self.http_maintenance, (True, True): self.tls_maintenance}
        outcome = files[tls, maintenance].plan(rest, host)
        kind = "HTTPS" if tls else "HTTP only"
        if self.wanted and not tls:
            kind += ", until the certificate exists"
        if maintenance:
            kind += "; maintenance page on"
        outcome.message = f"{outcome.message} [{kind}]"
        return outcome


def live_color(s) -> str:
    """The first lines of a shell program that needs to know which gunicorn instance serves:
    ``live_color`` (files/live-color.sh.j2) defined and its answer in ``$c`` (a color, or
    ``legacy`` when the upstream file names none). Without the file's comments: a probe
    carries no prose (and a peer of the bench that wraps it in its own quoting no quote)."""
    return "".join(line for line in render("live-color.sh.j2", s).splitlines(keepends=True)
                   if not line.lstrip().startswith("#")) + "c=$(live_color)\n"


class Upstream(Resource):
    """NGINX's upstream ``APP_live`` in a file of its own (``settings.layout.upstream``): the
    gunicorn instance that serves. Written once, naming instance blue (on a host deployed
    before the two instances: gunicorn behind ``APP.socket``, port 8000); from then on the
    deploy's switch rewrites it (files/app-instance.sh.j2), so provision leaves it as it is.
    """

    def __init__(self, s):
        def version(color: str) -> File:
            return config_file(s.layout.upstream, render("nginx-upstream.conf.j2", s,
                                                         color=color))

        self.path, self.legacy_unit = s.layout.upstream, f"/etc/systemd/system/{s.app}.socket"
        self.new, self.legacy = version(s.layout.colors[0]), version("legacy")
        self.what = self.new.what

    def probe(self) -> str:
        return (f"if [ -e {q(self.path)} ]; then echo present\n"
                f"sed -n 's/^ *server *//p' -- {q(self.path)}\n"
                f"elif [ -e {q(self.legacy_unit)} ]; then echo legacy\n{self.legacy.probe()}\n"
                f"else echo new\n{self.new.probe()}\nfi")

    def plan(self, state, host):
        kind, _, rest = state.partition("\n")
        if kind.strip() == "present":
            return Ok(f"names {rest.strip().rstrip(';') or 'no server'} (the deploys' to change)")
        outcome = (self.legacy if kind.strip() == "legacy" else self.new).plan(rest, host)
        if kind.strip() == "legacy":
            outcome.message += (" [gunicorn behind the app's socket unit, until the next "
                                "deploy moves it to its two instances]")
        return outcome


def place(h) -> dict:
    """What the site's files say of the host's place in its site (tasks/inventory.py): on an
    lb host of its own, the web hosts it proxies to (``webs``); on a web host behind it, the
    lb's address (``lb``) and the scheme it serves the site over (``proto``); nothing on a
    host that is both (a whole stack)."""
    site = h.site
    if site.has("lb") and not site.has("web"):
        return {"webs": [f"[{web.private}]" if ":" in web.private else web.private
                         for web in site.holding("web")]}
    if site.fronted:
        return {"lb": site.address_of("lb"),
                "proto": "https" if https_wanted(h.settings) else "http"}
    return {}


def site_resources(h) -> list:
    """The app's site and NGINX's reload: also planned again by certbot's step."""
    return [Site(h.settings, **place(h)), Service("nginx")]


def web_upstream(h, down: tuple[str, ...] = ()) -> File:
    """On an lb host of its own: the upstream of the web hosts, those named in ``down``
    (inventory names) marked down (a rolling deploy's, while it switches them)."""
    s, site = h.settings, h.site
    out = [address for entry, address in zip(site.holding("web"), place(h)["webs"],
                                                         strict=True)
           if entry.name in down]
    return config_file(s.layout.web_upstream, render("nginx-web-upstream.conf.j2", s,
                                                     down=out, **place(h)))


def upstream_resources(h) -> list:
    """Where the site sends the app's requests: the gunicorn instance that serves, on a web
    host; the web hosts, on an lb host of its own."""
    return [Upstream(h.settings)] if h.site.has("web") else [web_upstream(h)]


def nginx_resources(h) -> list:
    """Everything ``nginx.setup`` declares, in order."""
    s = h.settings
    return [
        Packages(["nginx"]),
        File(CHECKER, render("nginx-check.sh.j2", s), mode=0o755, validate="sh -n %s"),
        # Before our default server: two default_server entries cannot pass nginx -t.
        File(f"{SITES}/default", present=False, notify=["nginx:reload"]),
        Directory(ACME_WEBROOT, "root", "root", 0o755),
        config_file(DEFAULT_SITE, render("nginx-default.conf.j2", s)),
        *upstream_resources(h),  # before the site, which names it
        *site_resources(h),
    ]


@converging_task("nginx", default=True)
def setup(h):
    """NGINX: the app's site (HTTP, or HTTPS once certified), static/media, 444 default server."""
    return nginx_resources(h)
