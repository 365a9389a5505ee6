"""What provision declares on each host of a site spread over hosts (tasks/inventory.py's
roles), over no connection: the app host's steps, the data host's, and their firewalls."""

import re
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from tasks import media, provision
from tasks import settings as settings_mod
from tasks.inventory import Site, load, site_of
from tests.conftest import VALID, provision_declares

HOSTS = {"app": {"ssh": "a", "private": "10.0.0.11", "roles": ["lb", "web", "worker"]},
         "data": {"ssh": "d", "private": "10.0.0.12", "roles": ["db", "redis"]}}


SPREAD_SETTINGS = {**VALID, "REDIS_PASSWORD": "r" * 16}  # MEDIA_KEY: media_share's


@pytest.fixture(autouse=True)
def media_share(monkeypatch, tmp_path):
    """MEDIA_KEY (a new ed25519 key), and the db host's SSH key as this machine would know it
    (tasks/media.py reads known_hosts)."""
    key = tmp_path / "media_key"
    key.write_bytes(Ed25519PrivateKey.generate().private_bytes(
        Encoding.PEM, PrivateFormat.OpenSSH, NoEncryption()))
    monkeypatch.setitem(SPREAD_SETTINGS, "MEDIA_KEY", str(key))
    monkeypatch.setattr(media, "server_keys", lambda h, entry: f"{entry.private} ssh-ed25519 "
                                                                 "AAAAC3NzaC1lZDI1NTE5AAAA\n")


def declared(monkeypatch, site) -> list[str]:
    """The ``what`` of every resource ``provision`` declares on the host of ``site``."""
    s = settings_mod.parse(SPREAD_SETTINGS)
    host = SimpleNamespace(settings=s, check=False, site=site)
    return [r.what for r in provision_declares(monkeypatch, host)]


@pytest.fixture
def entries():
    return load({"fabstack": {"hosts": HOSTS}})


def test_the_data_host_gets_the_database_redis_and_dumps_only(monkeypatch, entries):
    whats = declared(monkeypatch, site_of(entries, "d"))
    assert "service postgresql.service" in whats and "service redis-server.service" in whats
    assert "pg_hba.conf lines: app hosts" in whats
    for absent in ("packages nginx", "file /etc/systemd/system/celery.service",
                   "file /etc/systemd/system/ratemyderp@.service",
                   "file /opt/ratemyderp/conf/ratemyderp.conf", "virtualenv "):
        assert not any(what.startswith(absent) for what in whats), absent


def test_the_app_host_gets_everything_but_the_database_and_redis(monkeypatch, entries):
    whats = declared(monkeypatch, site_of(entries, "a"))
    assert "service postgresql.service" not in whats and "service redis-server.service" not in whats
    assert "file /etc/redis/redis.conf" not in whats
    assert "file /opt/ratemyderp/conf/ratemyderp.conf" in whats
    assert "file /etc/systemd/system/celery.service" in whats
    assert any(what.startswith("virtualenv ") for what in whats)


def test_a_whole_stack_declares_what_it_did_before_roles(monkeypatch):
    whats = declared(monkeypatch, Site.alone("h"))
    for step in ("service postgresql.service", "service redis-server.service",
                 "service nginx.service", "file /etc/systemd/system/celery.service"):
        assert step in whats
    assert "pg_hba.conf lines: app hosts" not in whats


def test_firewalls_open_each_service_to_whom_needs_it(entries):
    def rules(host):
        return provision.firewall_rules(SimpleNamespace(site=site_of(entries, host)))

    assert rules("a") == ["OpenSSH", "80/tcp", "443/tcp"]
    assert rules("d") == ["OpenSSH", "5432/tcp from 10.0.0.11", "6379/tcp from 10.0.0.11"]
    assert provision.firewall_rules(SimpleNamespace(site=Site.alone("h"))) == [
        "OpenSSH", "80/tcp", "443/tcp"]


SPREAD = {"lb": {"ssh": "l", "private": "10.0.0.10", "roles": ["lb"]},
          "web1": {"ssh": "w1", "private": "10.0.0.11", "roles": ["web"]},
          "web2": {"ssh": "w2", "private": "10.0.0.12", "roles": ["web"]},
          "worker": {"ssh": "k", "private": "10.0.0.13", "roles": ["worker"]},
          "worker2": {"ssh": "k2", "private": "10.0.0.15", "roles": ["worker"]},
          "data": {"ssh": "d", "private": "10.0.0.14", "roles": ["db", "redis"]}}


@pytest.fixture
def spread():
    return load({"fabstack": {"hosts": SPREAD}})


def files(monkeypatch, site) -> dict[str, str]:
    """The content of every file ``provision`` declares on the host of ``site``, by path."""
    s = settings_mod.parse({**SPREAD_SETTINGS, "ACME_SERVER": "https://acme.example/dir"})
    host = SimpleNamespace(settings=s, check=False, site=site)
    found = {}
    for r in provision_declares(monkeypatch, host):
        for f in ([r.http, r.tls] if hasattr(r, "tls") else [r]):
            if getattr(f, "present", False) and getattr(f, "content", None) is not None:
                content = f.content
                found.setdefault(f.path, content.decode() if isinstance(content, bytes)
                                 else content)
    return found


def test_an_lb_of_its_own_proxies_to_every_web_host_and_serves_no_file(monkeypatch, spread):
    whats = declared(monkeypatch, site_of(spread, "l"))
    assert "service nginx.service" in whats and any(w.startswith("certificate ") for w in whats)
    for absent in ("file /etc/systemd/system/celery.service", "virtualenv ",
                   "file /etc/systemd/system/ratemyderp@.service", "gunicorn instance",
                   "file /opt/ratemyderp/conf/ratemyderp.conf"):
        assert not any(what.startswith(absent) for what in whats), absent
    found = files(monkeypatch, site_of(spread, "l"))
    upstream = found["/etc/nginx/conf.d/fabstack-ratemyderp-web.conf"]
    assert re.findall(r"server (\S+) max_fails=1 fail_timeout=10s;", upstream) == [
        "10.0.0.11:80", "10.0.0.12:80"]
    site = found["/etc/nginx/sites-enabled/ratemyderp.conf"]
    assert "proxy_pass http://ratemyderp_web;" in site and "alias " not in site
    assert "proxy_next_upstream error timeout http_502 http_503;" in site
    assert "/etc/nginx/conf.d/fabstack-ratemyderp-upstream.conf" not in found
    assert provision.firewall_rules(SimpleNamespace(site=site_of(spread, "l"))) == [
        "OpenSSH", "80/tcp", "443/tcp"]


def test_a_web_host_behind_the_lb_serves_it_alone_over_http(monkeypatch, spread):
    whats = declared(monkeypatch, site_of(spread, "w1"))
    assert "gunicorn instance" in whats and not any(w.startswith("certificate ") for w in whats)
    assert "file /etc/systemd/system/celery.service" not in whats
    found = files(monkeypatch, site_of(spread, "w1"))
    site = found["/etc/nginx/sites-enabled/ratemyderp.conf"]
    assert "listen 443" not in site and "acme-challenge" not in site
    assert "set_real_ip_from 10.0.0.10;" in site and "    10.0.0.10 1;" in site
    assert "proxy_set_header X-Forwarded-Proto $http_x_forwarded_proto;" in site
    assert "\n# X-Forwarded-Proto https\n" in site  # what its own checks say (ask-site.sh.j2)
    assert "alias /var/opt/ratemyderp/static/;" in site
    assert provision.firewall_rules(SimpleNamespace(site=site_of(spread, "w1"))) == [
        "OpenSSH", "80/tcp from 10.0.0.10"]
    env = found["/opt/ratemyderp/conf/ratemyderp.conf"]
    assert "@10.0.0.14:5432/" in env and "@10.0.0.14:6379/" in env


def test_worker_hosts_run_celery_and_beat_runs_on_the_first_alone(monkeypatch, spread):
    first, second = (declared(monkeypatch, site_of(spread, host)) for host in ("k", "k2"))
    for whats in (first, second):
        assert "service celery.service" in whats and "gunicorn instance" not in whats
        assert not any(what.startswith(("packages nginx", "file /etc/nginx")) for what in whats)
    assert "service celerybeat.service" in first and "service celerybeat.service" in second
    beat = {"k": None, "k2": None}
    for host in beat:
        s = settings_mod.parse(SPREAD_SETTINGS)
        h = SimpleNamespace(settings=s, check=False, site=site_of(spread, host))
        beat[host] = next(r for r in provision_declares(monkeypatch, h)
                          if r.what == "service celerybeat.service")
    assert type(beat["k"]).__name__ == "ReleaseService"
    assert beat["k2"].message == "stopped and removed: beat runs on worker"
    assert provision.firewall_rules(SimpleNamespace(site=site_of(spread, "k"))) == ["OpenSSH"]
    assert provision.firewall_rules(SimpleNamespace(site=site_of(spread, "d"))) == [
        "OpenSSH", *(f"{port}/tcp from 10.0.0.{n}" for port in (5432, 6379)
                     for n in (11, 12, 13, 15))]


def test_several_app_hosts_share_the_db_hosts_media_folder_over_sftp(monkeypatch, spread):
    served = files(monkeypatch, site_of(spread, "d"))
    keys = served["/etc/ssh/fabstack-ratemyderp-media.keys"]
    assert keys.startswith('restrict,from="10.0.0.11,10.0.0.12,10.0.0.13,10.0.0.15" '
                           "ssh-ed25519 AAAA"), keys
    sshd = served["/etc/ssh/sshd_config.d/fabstack-ratemyderp-media.conf"]
    assert "Match User ratemyderp\n" in sshd
    assert "ForceCommand internal-sftp -d /var/opt/ratemyderp/media -u 0022" in sshd
    assert "\nMEDIA = True\n" in served["/usr/local/sbin/ratemyderp-backup"]
    for host in ("w1", "k"):
        mounted = files(monkeypatch, site_of(spread, host))
        unit = mounted["/etc/systemd/system/ratemyderp-media.service"]
        assert ("ratemyderp@10.0.0.14:/var/opt/ratemyderp/media /var/opt/ratemyderp/media'"
                in unit), unit
        assert mounted["/opt/ratemyderp/conf/media_known_hosts"].startswith("10.0.0.14 ")
        assert "/etc/systemd/system/celery.service.d/fabstack-media.conf" in mounted or (
            host == "w1")
        whats = declared(monkeypatch, site_of(spread, host))
        assert "service ratemyderp-media.service" in whats
        assert "directory /var/opt/ratemyderp/media" not in whats  # the mount point's
    assert "\nMEDIA = False\n" in files(monkeypatch, site_of(spread, "w1"))[
        "/usr/local/sbin/ratemyderp-backup"]


def test_one_app_host_keeps_its_media_on_its_own_disk(monkeypatch, entries):
    whats = declared(monkeypatch, site_of(entries, "a"))
    assert "directory /var/opt/ratemyderp/media" in whats
    assert not any("media" in what for what in declared(monkeypatch, site_of(entries, "d"))
                   if what.startswith(("file /etc/ssh", "service ratemyderp-media")))


@pytest.mark.parametrize("state, outcome", [
    ("LoadState=loaded\nUnitFileState=enabled\nNeedDaemonReload=no\nmounted=yes\n",
     "ok: enabled, /m mounted from data"),
    ("LoadState=loaded\nUnitFileState=enabled\nNeedDaemonReload=no\n",
     "systemctl start --no-block -- x-media.service"),
    ("LoadState=loaded\nUnitFileState=enabled\nNeedDaemonReload=no\nmounted=yes\npending=yes\n",
     "systemctl restart --no-block -- x-media.service"),
    ("LoadState=not-found\nUnitFileState=\nNeedDaemonReload=no\n",
     "systemctl daemon-reload\nsystemctl enable --quiet -- x-media.service\n"
     "systemctl start --no-block"),
])
def test_the_media_mount_is_started_without_waiting_for_the_db_host(state, outcome):
    plan = media.Mount("x-media.service", "/m", "data").plan(state, SimpleNamespace(
        check=False, report=SimpleNamespace(notified=set())))
    said = f"ok: {plan.message}" if not hasattr(plan, "script") else plan.script
    assert outcome in said, said
