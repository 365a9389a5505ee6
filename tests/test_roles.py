"""What provision declares on each host of a site spread over hosts (tasks/inventory.py's
roles), over no connection: the app host's steps, the data host's, and their firewalls."""

from types import SimpleNamespace

import pytest

from tasks import provision
from tasks import settings as settings_mod
from tasks.inventory import Site, load, site_of
from tests.conftest import VALID, provision_declares

HOSTS = {"app": {"ssh": "a", "private": "10.0.0.11", "roles": ["lb", "web", "worker"]},
         "data": {"ssh": "d", "private": "10.0.0.12", "roles": ["db", "redis"]}}


def declared(monkeypatch, site) -> list[str]:
    """The ``what`` of every resource ``provision`` declares on the host of ``site``."""
    s = settings_mod.parse({**VALID, "REDIS_PASSWORD": "r" * 16})
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
