"""NGINX and certbot on the real sandbox host, with a real ACME server (Pebble) on this machine.

provision gets a certificate from Pebble and serves the site over HTTPS (verified against
Pebble's issuing root), HTTP redirects, unknown names get nothing, static files come from
disk, a second provision changes nothing, a broken template never goes live, renewal works
and reloads NGINX.
"""

import os
import shutil
import socket
import ssl
import subprocess
import time
import uuid

import pytest

from tests.conftest import FAB, REPO, Target, changed_count

APP = "ratemyderp"
DOMAIN = "ratemyderp.test"
SITE = f"/etc/nginx/sites-enabled/{APP}.conf"
STATIC = f"/var/opt/{APP}/static"


@pytest.fixture(scope="module")
def web(sandbox, pebble_env, tmp_path_factory):
    """The shared target with settings of its own: ACME_SERVER is Pebble, its HTTPS CA trusted."""
    t = Target(sandbox, tmp_path_factory.mktemp("web") / ".env")
    t.write_env(**pebble_env)
    return t


def curl(sandbox, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", "10", "--noproxy", "*",
                           "--resolve", f"{DOMAIN}:443:{sandbox.ip}",
                           "--resolve", f"{DOMAIN}:80:{sandbox.ip}",
                           "--resolve", f"www.{DOMAIN}:443:{sandbox.ip}", *args],
                          capture_output=True, text=True, timeout=30)


def https_ok(sandbox, pebble, path: str = "/", host: str = DOMAIN) -> subprocess.CompletedProcess:
    """GET https://host/path, the chain verified against Pebble's issuing root."""
    res = curl(sandbox, "--cacert", str(pebble.issuing_root), "-D", "-",
               f"https://{host}{path}")
    assert res.returncode == 0, f"TLS or HTTP failed: {res.stderr}"
    return res


def served_serial(sandbox, pebble) -> int:
    context = ssl.create_default_context(cafile=str(pebble.issuing_root))
    with socket.create_connection((sandbox.ip, 443), timeout=10) as sock, \
            context.wrap_socket(sock, server_hostname=DOMAIN) as tls:
        return int(tls.getpeercert()["serialNumber"], 16)


def test_provision_gets_a_certificate_then_changes_nothing(web, pebble):
    first = web.fab("provision")
    assert f"certificate {DOMAIN}: obtained for {DOMAIN}, www.{DOMAIN} from {pebble.directory}" \
        in first.stdout, first.stdout
    assert f"changed      file {SITE}: content changed [HTTPS]" in first.stdout, first.stdout
    # Converged before any request reaches the app's port (no release is deployed yet).
    second = web.fab("provision")
    assert changed_count(second.stdout) == 0, second.stdout
    assert f"file {SITE}: up to date (root:root 0644) [HTTPS]" in second.stdout
    assert f"certificate {DOMAIN}: {DOMAIN}, www.{DOMAIN} from {pebble.directory}" in second.stdout
    assert "# Managed by fabstack" in web.sh(f"head -1 {SITE}").stdout


def test_https_with_a_chain_from_the_acme_server(web, sandbox, pebble):
    for host in (DOMAIN, f"www.{DOMAIN}"):
        answer = https_ok(sandbox, pebble, host=host)
        # no release deployed yet: 502 from NGINX is fine, what counts is the verified chain
        assert answer.stdout.startswith("HTTP/2 "), answer.stdout
        assert "\nserver: nginx\n" in answer.stdout.lower(), answer.stdout


def test_http_redirects_to_https(web, sandbox):
    res = curl(sandbox, "-o", "/dev/null", "-w", "%{http_code} %{redirect_url}",
               f"http://{DOMAIN}/some/page?x=1")
    assert res.stdout == f"301 https://{DOMAIN}/some/page?x=1", res.stdout + res.stderr


def test_unknown_names_get_no_answer(web, sandbox, pebble):
    res = curl(sandbox, "-H", "Host: not-ours.test", f"http://{sandbox.ip}/")
    assert res.returncode == 52 and "Empty reply from server" in res.stderr, res  # 444
    res = curl(sandbox, "--cacert", str(pebble.issuing_root), "--resolve",
               f"not-ours.test:443:{sandbox.ip}", "https://not-ours.test/")
    assert res.returncode == 35, res  # handshake refused: ssl_reject_handshake
    res = curl(sandbox, "-k", f"https://{sandbox.ip}/")
    assert res.returncode == 35, res  # no SNI at all: refused too


def test_static_and_media_files_come_from_disk(web, sandbox, pebble):
    token = uuid.uuid4().hex
    web.sh(f"echo {token} > {STATIC}/fabstack-web-test.txt; "
           f"echo media-{token} > /var/opt/{APP}/media/fabstack-web-test.txt")
    try:
        assert https_ok(sandbox, pebble, "/static/fabstack-web-test.txt").stdout \
            .endswith(f"\n\n{token}\n")
        assert https_ok(sandbox, pebble, "/media/fabstack-web-test.txt").stdout \
            .endswith(f"\n\nmedia-{token}\n")
    finally:
        web.sh(f"rm -f {STATIC}/fabstack-web-test.txt /var/opt/{APP}/media/fabstack-web-test.txt")


def test_broken_template_never_goes_live(web, sandbox, pebble, tmp_path):
    """An operator's bad edit of a template: nginx -t refuses it, the old config keeps serving."""
    copy = tmp_path / "fabstack"
    copy.mkdir()
    for name in ("tasks", "sandbox", "files"):
        shutil.copytree(REPO / name, copy / name)
    shutil.copy(REPO / "fabfile.py", copy)
    partial = copy / "files" / "nginx-app.conf.j2"
    partial.write_text(partial.read_text().replace(
        "    server_tokens off;\n", "    server_tokens off;\n    fabstack_not_a_directive on;\n"))
    state = (f"sha256sum {SITE}; systemctl show -p MainPID nginx; "
             "ls -A /var/lib/fabstack/pending 2>/dev/null; true")
    before = web.sh(state).stdout
    res = subprocess.run([FAB, "-S", str(sandbox.ssh_config), "-H", sandbox.alias, "nginx"],
                         cwd=copy, env=dict(os.environ, FABRIC_FABSTACK_ENV_FILE=str(web.env_file)),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stdout + res.stderr
    assert (f'failed       file {SITE}: exit 3: ' in res.stdout
            and f'unknown directive "fabstack_not_a_directive" in {SITE} (new version)'
            in res.stdout and f"{SITE} left unchanged" in res.stdout), res.stdout
    after = web.sh(state + "; ls -a /etc/nginx | grep -c fabstack-check || true").stdout
    assert after == before + "0\n", "the live file changed, NGINX reloaded or scratch files left"
    https_ok(sandbox, pebble)
    assert changed_count(web.fab("nginx").stdout) == 0


def test_renewal_rehearsal_passes_and_the_timer_is_on(web):
    res = web.fab("certbot.renew-dry-run")
    assert "all simulated renewals succeeded" in res.stdout, res.stdout
    assert web.sh("systemctl is-enabled certbot.timer; systemctl is-active certbot.timer") \
        .stdout.split() == ["enabled", "active"]


def test_renewal_reloads_nginx_through_the_deploy_hook(web, sandbox, pebble):
    before = served_serial(sandbox, pebble)
    web.sh("certbot renew --force-renewal --no-random-sleep-on-renew -q")
    # `systemctl reload nginx` returns once the master has the signal; new workers follow.
    deadline = time.monotonic() + 10
    while served_serial(sandbox, pebble) == before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert served_serial(sandbox, pebble) != before, "NGINX still serves the old certificate"
    https_ok(sandbox, pebble)
    assert changed_count(web.fab("certbot").stdout) == 0
