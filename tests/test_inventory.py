"""tasks/inventory.py: the hosts of fabric.yaml's fabstack section, checked before any host."""

import pytest

from tasks.inventory import HostEntry, InventoryError, load, name_of


def inventory(hosts):
    return load({"fabstack": {"hosts": hosts}})


def test_no_inventory_is_empty():
    assert load({}) == {} and load({"fabstack": {}}) == {}


def test_hosts_by_name_with_their_ssh_address():
    entries = inventory({"web1": {"ssh": "root@203.0.113.11"}, "web2": {"ssh": "ops@web2:2222"},
                         "db": None})
    assert entries == {"web1": HostEntry("web1", "root@203.0.113.11"),
                       "web2": HostEntry("web2", "ops@web2:2222"), "db": HostEntry("db", "db")}
    assert [entry.host for entry in entries.values()] == ["203.0.113.11", "web2", "db"]
    assert name_of(entries, "203.0.113.11") == "web1"
    assert name_of(entries, "198.51.100.7") == "198.51.100.7"  # not in the inventory


@pytest.mark.parametrize("hosts, error", [
    (["web1"], "fabstack.hosts: give a mapping"),
    ({"web 1": {}}, "fabstack.hosts.web 1: a host's name"),
    ({"web1": "root@x"}, "fabstack.hosts.web1: give a mapping"),
    ({"web1": {"roles": ["web"]}}, "fabstack.hosts.web1: unknown key roles"),
    ({"web1": {"ssh": "root@x:99999"}}, r"fabstack.hosts.web1.ssh: 'root@x:99999' is not"),
    ({"web1": {"ssh": "a b"}}, "fabstack.hosts.web1.ssh: 'a b' is not"),
    ({"a": {"ssh": "root@10.0.0.5"}, "b": {"ssh": "10.0.0.5:2222"}},
     r"a and b are the same host \(10.0.0.5\)"),
])
def test_a_malformed_inventory_names_the_host_and_key(hosts, error):
    with pytest.raises(InventoryError, match=error):
        inventory(hosts)
