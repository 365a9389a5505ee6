"""nginx and certbot over the fake connection: templates, validation, the HTTPS switch."""

import base64
import hashlib
import re
import shutil
import subprocess
from types import SimpleNamespace

import pytest

from tasks import certbot, nginx
from tasks import settings as settings_mod
from tasks.primitives import FILES_DIR, Change, File, Ok, ensure, render
from tests.conftest import VALID

PEBBLE = "https://10.0.0.1:14000/dir"


def make_settings(**overrides):
    return settings_mod.parse({**VALID, **overrides})


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def file_state(content: str, meta: str = "regular file|root|root|644") -> str:
    return f"{meta}\n{digest(content)}\n\n"


# -- templates ------------------------------------------------------------------------------

def test_http_site_from_settings_alone():
    s = make_settings(APP_NAME="shop", DOMAIN="shop.example.org", NGINX_CLIENT_MAX_BODY_SIZE="25m")
    site = render("nginx-site.conf.j2", s)
    assert "server_name shop.example.org www.shop.example.org;" in site
    assert "client_max_body_size 25m;" in site
    assert "alias /var/opt/shop/static/;" in site and "alias /var/opt/shop/media/;" in site
    # the instance that serves is named by the upstream file, not the site
    assert "proxy_pass http://shop_live;" in site and "upstream shop_live {" not in site
    for header in ("Host $host", "X-Forwarded-For $proxy_add_x_forwarded_for",
                   "X-Forwarded-Proto $scheme"):
        assert f"proxy_set_header {header};" in site
    assert f"location ^~ /.well-known/acme-challenge/ {{\n        root {nginx.ACME_WEBROOT};" \
        in site
    assert "ssl" not in site and "return 301" not in site
    assert "ratemyderp" not in site


def test_tls_site_redirects_and_owns_the_tls_server_block():
    s = make_settings(APP_NAME="shop", DOMAIN="shop.example.org", WWW_ALIAS="False")
    site = render("nginx-site-tls.conf.j2", s)
    assert site.count("server_name shop.example.org;") == 2
    assert "return 301 https://$host$request_uri;" in site
    assert "listen 443 ssl http2;" in site and "listen [::]:443 ssl http2;" in site
    chain, key = nginx.certificate_files(s)
    assert f"ssl_certificate {chain};" in site and f"ssl_certificate_key {key};" in site
    assert chain == "/etc/letsencrypt/live/shop.example.org/fullchain.pem"
    # the challenge location comes before the redirect, in the port-80 server
    port80 = site.split("listen 443")[0]
    assert port80.index("acme-challenge") < port80.index("return 301")
    assert f"root {nginx.ACME_WEBROOT};" in port80
    assert "proxy_pass http://shop_live;" in site.split("listen 443")[1]


def test_the_upstream_file_names_one_instance_or_the_socket_unit_of_before():
    s = make_settings(APP_NAME="shop")
    for color in ("blue", "green"):
        conf = render("nginx-upstream.conf.j2", s, color=color)
        assert f"upstream shop_live {{\n    server unix:/run/shop/{color}/gunicorn.sock;\n}}" \
            in conf
    assert "server 127.0.0.1:8000;" in render("nginx-upstream.conf.j2", s, color="legacy")


@pytest.mark.parametrize("found, names", [("new", "blue/gunicorn.sock"),
                                          ("legacy", "127.0.0.1:8000")])
def test_the_upstream_file_is_written_once(make_host, capsys, found, names):
    """Missing: it names instance blue (or, on a host of APP.socket, that socket's port);
    present: the deploys' switch owns it and provision leaves it as it is."""
    host, conn = make_host()
    upstream = nginx.Upstream(host.settings)
    conn.answers = [(r"fabstack-ratemyderp-upstream\.conf \]; then echo present",
                     f"{found}\nmissing\n")]
    assert ensure(host, upstream) == 1
    [write] = conn.applied
    assert f"{nginx.CHECKER} /etc/nginx/conf.d/" in write
    assert f"+    server {'unix:/run/ratemyderp/' * (found == 'new')}{names};" in \
        capsys.readouterr().out
    conn.answers = [(r"fabstack-ratemyderp-upstream\.conf \]; then echo present",
                     "present\nunix:/run/ratemyderp/green/gunicorn.sock;\n")]
    assert ensure(host, upstream) == 0
    assert "names unix:/run/ratemyderp/green/gunicorn.sock" in host.report.lines[-1][2]


def test_default_server_closes_unknown_names_without_a_certificate():
    conf = render("nginx-default.conf.j2", make_settings())
    for listen in ("80 default_server", "[::]:80 default_server", "443 ssl default_server",
                   "[::]:443 ssl default_server"):
        assert f"listen {listen};" in conf
    assert "return 444;" in conf and "ssl_reject_handshake on;" in conf
    assert "ssl_certificate" not in conf


@pytest.mark.skipif(not shutil.which("sh"), reason="needs sh")
@pytest.mark.parametrize("name", ["nginx-check.sh.j2", "certbot-deploy-hook.sh.j2"])
def test_shell_scripts_parse(name, tmp_path):
    script = tmp_path / "script.sh"
    script.write_text(render(name, make_settings()))
    assert subprocess.run(["sh", "-n", str(script)]).returncode == 0
    assert (FILES_DIR / name).read_text().startswith("#!/bin/sh\n")


# -- resources ------------------------------------------------------------------------------

def test_every_nginx_file_is_checked_in_context_and_reloads_nginx(make_host):
    host, _conn = make_host()
    files = [r for r in nginx.nginx_resources(host) if isinstance(r, File) and r.present
             and r.path.startswith("/etc/nginx/")]
    files += [nginx.Site(host.settings).http, nginx.Site(host.settings).tls]
    assert {f.path for f in files} == {nginx.DEFAULT_SITE, "/etc/nginx/sites-enabled/"
                                       "ratemyderp.conf"}
    for f in files:
        assert f.validate == f"{nginx.CHECKER} {f.path} %s"
        assert f.markers == ["nginx@reload"]


def test_distro_default_site_goes_before_ours(make_host):
    host, _conn = make_host()
    paths = [getattr(r, "path", None) for r in nginx.nginx_resources(host)]
    assert paths.index("/etc/nginx/sites-enabled/default") < paths.index(nginx.DEFAULT_SITE)


def test_site_is_https_once_the_certificate_exists(settings):
    site = nginx.Site(settings)
    assert "fullchain.pem" in site.probe() and "privkey.pem" in site.probe()
    tls_content = render("nginx-site-tls.conf.j2", settings)
    outcome = site.plan("tls\n" + file_state(tls_content), SimpleNamespace(check=False))
    assert isinstance(outcome, Ok) and outcome.message.endswith("[HTTPS]")
    http_content = render("nginx-site.conf.j2", settings)
    outcome = site.plan("tls\n" + file_state(http_content), SimpleNamespace(check=False))
    assert isinstance(outcome, Change) and outcome.message.startswith("content changed")
    assert base64_payload(outcome.script) == tls_content
    outcome = site.plan("http\n" + file_state(http_content), SimpleNamespace(check=False))
    assert outcome.message.endswith("[HTTP only, until the certificate exists]")


def test_site_without_acme_server_stays_on_http(settings):
    s = make_settings(ACME_SERVER="")
    site = nginx.Site(s)
    assert "fullchain" not in site.probe()
    outcome = site.plan("http\nmissing\n", SimpleNamespace(check=False))
    assert base64_payload(outcome.script) == render("nginx-site.conf.j2", s)
    assert outcome.message.endswith("[HTTP only]")


def base64_payload(script: str) -> str:
    body = re.search(r"<<'FABSTACK_EOF'\n(.*?)FABSTACK_EOF", script, re.S)[1]
    return base64.b64decode(body).decode()


# -- certbot --------------------------------------------------------------------------------

RENEWAL = ("server = {server}\nauthenticator = webroot\nwebroot_path = /var/www/letsencrypt,\n"
           "notAfter=Nov 26 23:58:00 2031 GMT\n"
           "X509v3 Subject Alternative Name: \n    DNS:{names}\nexpired=no\n")


def cert_state(server=PEBBLE, names="example.com, DNS:www.example.com", **replace):
    state = RENEWAL.format(server=server, names=names)
    for old, new in replace.items():
        state = state.replace(old, new)
    return state


def certificate(**kw):
    args = dict(name="example.com", domains=["example.com", "www.example.com"],
                email="ops@example.com", server=PEBBLE, webroot="/var/www/letsencrypt")
    return certbot.Certificate(**(args | kw))


@pytest.mark.parametrize("state, expect", [
    (cert_state(), Ok("example.com, www.example.com from https://10.0.0.1:14000/dir, valid "
                      "until Nov 26 23:58:00 2031 GMT, renewed by certbot.timer")),
    ("missing\n", "obtained for example.com, www.example.com from https://10.0.0.1:14000/dir"),
    (cert_state(names="example.com"),
     "obtained again: names example.com -> example.com, www.example.com"),
    (cert_state(server="https://acme-staging-v02.api.letsencrypt.org/directory"),
     "obtained again: CA https://acme-staging-v02.api.letsencrypt.org/directory -> "
     "https://10.0.0.1:14000/dir"),
    (cert_state(**{"authenticator = webroot": "authenticator = nginx\ninstaller = nginx"}),
     "obtained again: renewal by certbot's webroot authenticator, without an installer"),
    (cert_state(**{"expired=no": "expired=yes"}), "obtained again: it had expired"),
])
def test_certificate_cases(state, expect):
    outcome = certificate().plan(state, SimpleNamespace(check=False))
    if isinstance(expect, Ok):
        assert outcome == expect
    else:
        assert isinstance(outcome, Change) and outcome.message == expect
        assert ("--force-renewal" in outcome.script) == (state != "missing\n")


def test_certbot_only_obtains_with_the_webroot():
    script = certificate(email="o'ps@example.com").plan("missing\n", None).script
    command = script.splitlines()[0]
    assert "certbot certonly --non-interactive --agree-tos --no-eff-email" in command
    assert "--webroot -w /var/www/letsencrypt" in command
    assert "-m 'o'\"'\"'ps@example.com'" in command
    assert f"--server {PEBBLE}" in command and "--cert-name example.com" in command
    assert "-d example.com -d www.example.com" in command
    assert "--nginx" not in script and "--installer" not in script
    assert "port 80 be reachable" in script


def test_certbot_step_switches_the_site_to_https_after_the_certificate(make_host):
    s = make_settings(ACME_SERVER=PEBBLE)
    host, _conn = make_host()
    host.settings = s
    kinds = [type(r).__name__ for r in certbot.certbot_resources(host)]
    assert kinds.index("Firewall") < kinds.index("Certificate") < kinds.index("Site")
    assert kinds[-1] == "Service"


def test_no_acme_server_no_certificate(make_host, capsys):
    host, conn = make_host()
    host.settings = make_settings(ACME_SERVER="")
    ensure(host, *certbot.certbot_resources(host))
    assert conn.scripts == []
    assert "ACME_SERVER is empty" in capsys.readouterr().out


def web_tier_answers(s, distro_site: str = "") -> list[tuple[str, str]]:
    """Fake answers: every nginx and certbot resource already right, the distro's default
    site as ``distro_site`` says ("": absent, "present\n": still there)."""
    site_tls = render("nginx-site-tls.conf.j2", s)
    return [
        (r"dpkg-query", "nginx ii \ncertbot ii \n"),
        (r"fullchain\.pem.*then echo tls", "tls\n" + file_state(site_tls)),
        (rf"-- {re.escape(nginx.CHECKER)}\b", file_state(render("nginx-check.sh.j2", s),
                                                        "regular file|root|root|755")),
        (r"^test -e /etc/nginx/sites-enabled/default && echo present$", distro_site),
        (r"fabstack-ratemyderp-upstream\.conf \]; then echo present",
         "present\nunix:/run/ratemyderp/blue/gunicorn.sock;\n"),
        (rf"-- {re.escape(nginx.DEFAULT_SITE)}\b",
         file_state(render("nginx-default.conf.j2", s))),
        (rf"-- {re.escape(certbot.HOOK)}\b",
         file_state(render("certbot-deploy-hook.sh.j2", s), "regular file|root|root|755")),
        (r"stat -c", "directory|root|root|755\n"),
        (r"renewal/example\.com\.conf", cert_state(
            server=settings_mod.LETSENCRYPT_ACME)),
        (r"systemctl show", "LoadState=loaded\nUnitFileState=enabled\nActiveState=active\n"),
        (r"ufw", 'ENABLED=yes\nDEFAULT_INPUT_POLICY="DROP"\n'
                 "### tuple ### allow any 22 0.0.0.0/0 any 0.0.0.0/0 OpenSSH - in\n"
                 "### tuple ### allow tcp 80 0.0.0.0/0 any 0.0.0.0/0 in\n"
                 "### tuple ### allow tcp 443 0.0.0.0/0 any 0.0.0.0/0 in\n"),
    ]


def test_converged_web_tier_changes_nothing(make_host):
    """Every nginx and certbot resource, already right: one probe each, nothing applied."""
    host, conn = make_host()
    conn.answers = web_tier_answers(host.settings)
    assert ensure(host, *nginx.nginx_resources(host)) == 0
    assert ensure(host, *certbot.certbot_resources(host)) == 0
    assert conn.applied == [] and host.round_trips == 2


def test_the_distro_default_site_is_removed_and_nginx_marked_for_reload(make_host):
    host, conn = make_host()
    conn.answers = web_tier_answers(host.settings, distro_site="present\n")
    assert ensure(host, *nginx.nginx_resources(host)) == 1
    [removal] = conn.applied
    assert "rm -f -- /etc/nginx/sites-enabled/default\n" in removal
    assert "touch /var/lib/fabstack/pending/nginx@reload" in removal


# -- settings -------------------------------------------------------------------------------

@pytest.mark.parametrize("line", [
    "NGINX_CLIENT_MAX_BODY_SIZE=10 m", "NGINX_CLIENT_MAX_BODY_SIZE=1t",
    "NGINX_CLIENT_MAX_BODY_SIZE=", "ACME_SERVER=http://ca.local/dir", "ACME_SERVER=ca.local",
    "WWW_ALIAS=maybe"])
def test_bad_web_settings_are_refused(line):
    name, value = line.split("=", 1)
    with pytest.raises(settings_mod.SettingsError) as err:
        make_settings(**{name: value})
    assert f"{name}:" in str(err.value)


def test_web_settings_defaults():
    s = make_settings()
    assert s["ACME_SERVER"] == "https://acme-v02.api.letsencrypt.org/directory"
    assert s["NGINX_CLIENT_MAX_BODY_SIZE"] == "10m"
    assert s.site_names == ["example.com", "www.example.com"]
    assert make_settings(WWW_ALIAS="no").site_names == ["example.com"]
    assert make_settings(ACME_SERVER="")["ACME_SERVER"] == ""
