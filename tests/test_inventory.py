"""tasks/inventory.py: the hosts of fabric.yaml's fabstack section, checked before any host."""

import pytest

from tasks.inventory import ROLES, HostEntry, InventoryError, Site, load, site_of


def inventory(hosts):
    return load({"fabstack": {"hosts": hosts}})


SITE = {"app": {"ssh": "root@203.0.113.11", "private": "10.0.0.11",
                "roles": ["lb", "web", "worker"]},
        "cache": {"ssh": "root@203.0.113.12", "private": "10.0.0.12", "roles": ["redis"]},
        "data": {"ssh": "ops@203.0.113.13:2222", "private": "10.0.0.13", "roles": ["db"]}}


def test_no_inventory_is_empty():
    assert load({}) == {} and load({"fabstack": {}}) == {}


def test_hosts_by_name_with_their_ssh_address_and_every_role():
    entries = inventory({"shop-eu": {"ssh": "root@203.0.113.11"}, "shop-us": None})
    assert entries == {"shop-eu": HostEntry("shop-eu", "root@203.0.113.11"),
                       "shop-us": HostEntry("shop-us", "shop-us")}
    assert [entry.host for entry in entries.values()] == ["203.0.113.11", "shop-us"]
    assert entries["shop-eu"].roles == frozenset(ROLES)
    site = site_of(entries, "203.0.113.11")  # a whole stack: its own site
    assert (site.me.name, site.hosts, site.spread) == ("shop-eu", (entries["shop-eu"],), False)
    assert site.address_of("db") == "localhost" and site.others("web") == []
    assert site_of(entries, "198.51.100.7") == Site.alone("198.51.100.7")


def test_a_site_spread_over_hosts_as_each_host_sees_it():
    entries = inventory(SITE)
    app = site_of(entries, "203.0.113.11")
    assert app.spread and app.has("worker") and not app.has("db")
    assert [entry.name for entry in app.holding("web")] == ["app"]
    assert (app.address_of("db"), app.address_of("redis")) == ("10.0.0.13", "10.0.0.12")
    assert site_of(entries, "10.0.0.11") == app  # by its private address: the same host
    data = site_of(entries, "203.0.113.13")
    assert data.address_of("db") == "localhost" and data.address_of("redis") == "10.0.0.12"
    assert data.others("web", "worker") == ["10.0.0.11"]


def test_lb_web_and_worker_hosts_of_their_own_and_beat_on_the_first_worker():
    entries = inventory({
        "lb": {"ssh": "l", "private": "10.0.0.10", "roles": ["lb"]},
        "web1": {"ssh": "w1", "private": "10.0.0.11", "roles": ["web"]},
        "web2": {"ssh": "w2", "private": "10.0.0.12", "roles": ["web", "worker"]},
        "worker": {"ssh": "k", "private": "10.0.0.13", "roles": ["worker"]},
        "data": {"ssh": "d", "private": "10.0.0.14", "roles": ["db", "redis"]}})
    web1, web2, lb = (site_of(entries, host) for host in ("w1", "w2", "l"))
    assert web1.fronted and web2.fronted and not lb.fronted
    assert web1.beat.name == web2.beat.name == "web2"  # the first worker host, web or not
    assert [entry.private for entry in lb.holding("web")] == ["10.0.0.11", "10.0.0.12"]
    assert not site_of(inventory(SITE), "203.0.113.11").fronted  # lb and web on one host


@pytest.mark.parametrize("hosts, error", [
    (["web1"], "fabstack.hosts: give a mapping"),
    ({"web 1": {}}, "fabstack.hosts.web 1: a host's name"),
    ({"web1": "root@x"}, "fabstack.hosts.web1: give a mapping"),
    ({"web1": {"role": ["web"]}}, "fabstack.hosts.web1: unknown key role"),
    ({"web1": {"ssh": "root@x:99999"}}, r"fabstack.hosts.web1.ssh: 'root@x:99999' is not"),
    ({"web1": {"ssh": "a b"}}, "fabstack.hosts.web1.ssh: 'a b' is not"),
    ({"web1": {"private": "10.0.0.300"}}, "fabstack.hosts.web1.private: '10.0.0.300' is not"),
    ({"web1": {"roles": ["web", "cache"]}}, "fabstack.hosts.web1.roles: give a list"),
    ({"web1": {"roles": []}}, "fabstack.hosts.web1.roles: give a list"),
    ({"a": {"ssh": "root@10.0.0.5"}, "b": {"ssh": "10.0.0.5:2222"}},
     r"a and b are the same host \(10.0.0.5\)"),
    ({**SITE, "cache": {**SITE["cache"], "private": "10.0.0.11"}},
     r"app and cache are the same host \(10.0.0.11\)"),
    ({**SITE, "cache": {"ssh": "root@203.0.113.12", "roles": ["redis"]}},
     "fabstack.hosts.cache.private: the hosts of a site"),
    ({**SITE, "cache": {**SITE["cache"], "roles": ["redis", "db"]}},
     "one host holds role db, not 2: cache, data"),
    ({**SITE, "app": {**SITE["app"], "roles": ["web", "worker"]}},
     "one host holds role lb, not 0$"),
    ({**SITE, "app": {**SITE["app"], "roles": ["lb", "web"]}}, "no host holds role worker"),
    ({**SITE, "cache": {**SITE["cache"], "roles": ["redis", "web"]}},
     r"fabstack.hosts.app.roles: the lb holds web only as the site's one web host; with "
     r"several \(app, cache\)"),
    ({**SITE, "extra": {"ssh": "root@203.0.113.14", "private": "10.0.0.14"}},
     "one host holds role lb, not 2: app, extra"),  # a whole stack cannot join a site
])
def test_a_malformed_inventory_names_the_host_and_key(hosts, error):
    with pytest.raises(InventoryError, match=error):
        inventory(hosts)
