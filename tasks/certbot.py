"""certbot: the site's TLS certificate from an ACME CA (ACME_SERVER), renewed by certbot.timer.

``fab certbot`` (``certbot.setup``) gets a certificate for the site's names from ACME_SERVER
with certbot's webroot authenticator only: certbot never edits NGINX's files, fabstack's own
template switches the site to HTTPS once the certificate exists (so the two never fight and a
second run changes nothing), and certbot's deploy hook reloads NGINX after a renewal.
``certbot.renew-dry-run`` rehearses a renewal against the CA. With ACME_SERVER empty there is
no certificate: the site stays on plain HTTP.
"""

from __future__ import annotations

import re

from fabric import task
from invoke.exceptions import Exit

from . import nginx
from .host import converging_task, session
from .primitives import (
    Change,
    Directory,
    File,
    Firewall,
    Note,
    Ok,
    Packages,
    Resource,
    Service,
    q,
    render,
)
from .settings import LETSENCRYPT_ACME

LETSENCRYPT = "/etc/letsencrypt"
HOOK_DIR = f"{LETSENCRYPT}/renewal-hooks/deploy"
HOOK = f"{HOOK_DIR}/fabstack-reload-nginx"
LOG = "/var/log/letsencrypt/letsencrypt.log"


class Certificate(Resource):
    """A certificate lineage ``name`` for ``domains`` from the ACME CA at ``server``.

    Obtained with certbot's webroot authenticator (``certonly``: NGINX's files are left
    alone) and renewed the same way by certbot.timer. Obtained again when the names, the
    CA or the renewal method differ from what is declared, or when it has expired.
    """

    def __init__(self, name: str, domains: list[str], email: str, server: str, webroot: str):
        self.name, self.domains, self.email = name, list(domains), email
        self.server, self.webroot = server, webroot
        self.what = f"certificate {name}"

    @property
    def cert(self) -> str:
        return f"{LETSENCRYPT}/live/{self.name}/cert.pem"

    @property
    def renewal(self) -> str:
        return f"{LETSENCRYPT}/renewal/{self.name}.conf"

    def probe(self) -> str:
        cert, conf = q(self.cert), q(self.renewal)
        return (f"if [ -s {cert} ] && [ -s {conf} ]; then\n"
                f"  grep -E '^(server|authenticator|installer|webroot_path) *=' {conf}\n"
                f"  openssl x509 -in {cert} -noout -enddate -ext subjectAltName\n"
                f"  openssl x509 -in {cert} -noout -checkend 0 >/dev/null"
                " && echo expired=no || echo expired=yes\n"
                "else echo missing; fi")

    def script(self, force: bool) -> str:
        args = ["certbot", "certonly", "--non-interactive", "--agree-tos", "--no-eff-email",
                "-m", self.email, "--server", self.server, "--webroot", "-w", self.webroot,
                "--cert-name", self.name]
        for domain in self.domains:
            args += ["-d", domain]
        if force:
            args.append("--force-renewal")
        why = (f"certbot could not get a certificate for {', '.join(self.domains)} from "
               f"{self.server}: each name must resolve to this host and its port 80 be "
               f"reachable from the CA; see {LOG} on the host")
        return (f"if ! {' '.join(q(a) for a in args)} >&2; then\n"
                f"  echo {q(why)} >&2\n  exit 1\nfi")

    def plan(self, state, host):
        names = ", ".join(self.domains)
        if state.strip() == "missing":
            return Change(f"obtained for {names} from {self.server}", self.script(force=False))
        params = dict(re.findall(r"^(\w+) *= *(.*?)\s*$", state, re.M))
        have = sorted(set(re.findall(r"DNS:([^,\s]+)", state)))
        until = re.search(r"^notAfter=(.*)$", state, re.M)
        fixes = []
        if have != sorted(d.lower() for d in self.domains):
            fixes.append(f"names {', '.join(have) or 'none'} -> {names}")
        if params.get("server") != self.server:
            fixes.append(f"CA {params.get('server', 'unknown')} -> {self.server}")
        if (params.get("authenticator") != "webroot"
                or params.get("installer", "None") not in ("None", "")
                or params.get("webroot_path", "").rstrip(",") != self.webroot):
            fixes.append("renewal by certbot's webroot authenticator, without an installer")
        if params.get("expired") == "yes":
            fixes.append("it had expired")
        if fixes:
            return Change("obtained again: " + "; ".join(fixes), self.script(force=True))
        return Ok(f"{names} from {self.server}, valid until "
                  f"{until[1] if until else 'unknown'}, renewed by certbot.timer")


def certbot_resources(h) -> list:
    """Everything ``certbot.setup`` declares, in order; NGINX's site switches to HTTPS last."""
    s = h.settings
    if not nginx.https_wanted(s):
        return [Note("certificate", "none: ACME_SERVER is empty, the site is served over "
                                    "plain HTTP")]
    return [
        Packages(["certbot"]),
        # The base step allows these already; declared here too so that `fab certbot` alone
        # never asks the CA to reach a closed port 80.
        Firewall(["OpenSSH", "80/tcp", "443/tcp"]),
        Directory(HOOK_DIR, "root", "root", 0o755),
        File(HOOK, render("certbot-deploy-hook.sh.j2", s), mode=0o755, validate="sh -n %s"),
        Certificate(s["DOMAIN"], s.site_names, s["ADMIN_EMAIL"], s["ACME_SERVER"],
                    nginx.ACME_WEBROOT),
        *nginx.site_resources(h),
        Service("certbot.timer"),
    ]


@converging_task("certbot", default=True)
def setup(h):
    """certbot: the site's certificate from ACME_SERVER (webroot), renewal timer, NGINX on HTTPS."""
    return certbot_resources(h)


@task(name="renew-dry-run")
def renew_dry_run(c):
    """Rehearse a renewal of the certificate with its CA (certbot renew --dry-run)."""
    with session(c, "certbot.renew-dry-run", lock=False) as h:
        domain, server = h.settings["DOMAIN"], h.settings["ACME_SERVER"]
        if not server:
            raise Exit("error: ACME_SERVER is empty: the site has no certificate to renew", code=2)
        # A dry run goes to Let's Encrypt's staging server unless told otherwise: right for
        # Let's Encrypt itself, wrong for any other CA.
        to = "" if server == LETSENCRYPT_ACME else f" --server {q(server)}"
        # Without a terminal certbot sleeps up to 8 minutes first (spreading the timer's load).
        res = h.run(f"certbot renew --dry-run --non-interactive --no-random-sleep-on-renew "
                    f"--cert-name {q(domain)}{to} 2>&1", what=f"certbot renew --dry-run {domain}")
        lines = [line.strip() for line in res.stdout.splitlines()
                 if re.search(r"[a-z]", line) and not line.startswith("Saving debug log")]
        said = next((line for line in lines if "succeeded" in line), lines[-1] if lines else "")
        h.ok(f"certbot renew --dry-run {domain}", said.rstrip(":") or "passed")
