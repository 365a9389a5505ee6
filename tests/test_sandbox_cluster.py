"""The sandbox cluster: naming, addresses and the ssh_config offline, then one real cluster.

The real-host tests boot a cluster of their own (tests/conftest.py's cluster_sandbox: named
like the suite's sandbox, on its subnet with the second octet two up), so they never touch the
suite's sandbox, its smoke sandbox, the demo's, or another suite's.
"""

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from sandbox.cluster import FIRST_MEMBER_HOST, Cluster, _each
from sandbox.container import BootCancelled, SandboxError
from tests.conftest import TEST_SUITE, cluster_sandbox, needs_root

MEMBERS = ("lb", "web", "db")


@pytest.mark.parametrize("name", ["much2long1", "a-b", "Cl", ""])
def test_a_cluster_name_is_short_without_dashes(name):
    with pytest.raises(SandboxError, match="cluster name"):
        Cluster(name=name)


@pytest.mark.parametrize("members, message", [
    (("web", "Web2"), "member 'Web2'"),
    (("web", "-a"), "member '-a'"),
    (("web", "a_b"), "member 'a_b'"),
    (("web", ""), "member ''"),
    (("web", "db", "web"), "'web' is named twice"),
    ((), "at least one member"),
    (("worker1",), "cl1234-worker1 is too long"),
])
def test_bad_members_are_refused(members, message):
    with pytest.raises(SandboxError, match=message):
        Cluster(name="cl1234", members=members)


@pytest.mark.parametrize("subnet", ["10.213", "10.213.70.0", "10.213.256", "ten.213.70", ""])
def test_a_cluster_subnet_is_three_octets(subnet):
    with pytest.raises(SandboxError, match="cluster subnet .* first three octets"):
        Cluster(subnet=subnet)


def test_members_have_fixed_addresses_and_names_that_fit(tmp_path):
    cluster = Cluster(name="cl", members=("lb", "web1", "web2"), subnet="10.9.8",
                      base_dir=tmp_path)
    info = cluster.info()
    assert [(member, box.alias, box.ip) for member, box in info.members.items()] == [
        ("lb", "cl-lb", "10.9.8.11"), ("web1", "cl-web1", "10.9.8.12"),
        ("web2", "cl-web2", "10.9.8.13")]
    assert {box.host_ip for box in info.members.values()} == {"10.9.8.1"}
    assert {box.proxy_url for box in info.members.values()} == {"http://10.9.8.1:8888"}
    assert (info.bridge, info.host_ip, info.proxy_url) == (
        "fsb-cl", "10.9.8.1", "http://10.9.8.1:8888")
    assert info.ssh_config == tmp_path / "cl.cluster" / "ssh_config"
    assert info == Cluster(name="cl", members=("lb", "web1", "web2"), subnet="10.9.8",
                           base_dir=tmp_path).info()
    # The longest names allowed still fit IFNAMSIZ (15 characters with the NUL: 15 visible).
    longest = Cluster(name="c" * 9, members=("m",), base_dir=tmp_path)
    [box] = longest.sandboxes
    assert max(len(n) for n in (longest.bridge, box.netns, box.veth_host, box.veth_target)) <= 15
    many = Cluster(members=tuple(f"m{i}" for i in range(255 - FIRST_MEMBER_HOST)))
    assert many.sandboxes[-1].ip == "10.213.70.254"
    with pytest.raises(SandboxError, match="at most"):
        Cluster(members=tuple(f"m{i}" for i in range(256 - FIRST_MEMBER_HOST)))


def test_the_ssh_config_covers_every_member(tmp_path):
    cluster = Cluster(name="cl", members=("lb", "web1", "db"), subnet="10.9.8",
                      base_dir=tmp_path)
    blocks = {}
    for block in cluster.ssh_config().strip().split("\n\n"):
        head, *options = block.splitlines()
        blocks[head.removeprefix("Host ")] = dict(line.split() for line in options)
    assert list(blocks) == ["cl-lb", "cl-web1", "cl-db"]
    for box in cluster.sandboxes:
        assert blocks[box.alias] == {
            "HostName": box.ip, "User": "root", "IdentityFile": str(box.key),
            "IdentitiesOnly": "yes", "UserKnownHostsFile": str(tmp_path / "cl.cluster/known_hosts"),
            "StrictHostKeyChecking": "yes"}


def test_named_finds_the_members_of_the_last_up(tmp_path):
    assert Cluster.named("cl", base_dir=tmp_path) == Cluster(name="cl", base_dir=tmp_path)
    cluster = Cluster(name="cl", members=("a", "b"), subnet="10.9.8", suite="trixie",
                      base_dir=tmp_path)
    cluster.dir.mkdir()
    (cluster.dir / "cluster.json").write_text(json.dumps(cluster._plan()))
    assert Cluster.named("cl", base_dir=tmp_path) == cluster


def test_the_cluster_test_sits_beside_the_suites(monkeypatch):
    monkeypatch.setenv("FABSTACK_TEST_SANDBOX", "sb:10.213.63")
    assert cluster_sandbox() == ("sb", "10.215.63")
    monkeypatch.delenv("FABSTACK_TEST_SANDBOX")
    assert cluster_sandbox() == ("test", "10.215.50")


def test_a_failed_member_cancels_the_others_and_its_error_is_raised():
    class Member:
        def __init__(self):
            self.cancel = threading.Event()

    def boot(member):
        if member is failing:
            raise SandboxError("no sshd today")
        if not member.cancel.wait(10):
            return "booted"
        raise BootCancelled("cancelled")

    members = [Member(), Member(), Member()]
    failing = members[1]
    started = time.monotonic()
    with pytest.raises(SandboxError, match="no sshd today"):
        _each(members, boot)
    assert time.monotonic() - started < 5
    assert all(member.cancel.is_set() for member in members)
    assert _each([Member(), Member()], lambda member: "booted") == ["booted", "booted"]


# -- a real cluster -------------------------------------------------------------------------


def ssh(info, alias, command):
    return subprocess.run(["ssh", "-F", str(info.ssh_config), "-o", "BatchMode=yes", alias,
                           command], capture_output=True, text=True, timeout=60,
                          check=True).stdout.strip()


def reaches(info, alias, ip, port):
    """True if *alias* opens a TCP connection to ip:port."""
    return subprocess.run(
        ["ssh", "-F", str(info.ssh_config), "-o", "BatchMode=yes", alias,
         f"python3 -c 'import socket; socket.create_connection((\"{ip}\", {port}), 3)'"],
        capture_output=True, timeout=60).returncode == 0


def assert_gone(cluster):
    assert cluster.traces() == [] and not cluster.running()
    assert not Path(f"/sys/class/net/{cluster.bridge}").exists()
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for box in cluster.sandboxes:
        assert box.veth_host not in links and box.netns not in namespaces.split()
        assert sorted(p.name for p in box.dir.iterdir()) == ["id_ed25519", "id_ed25519.pub"]
    assert not cluster.dir.exists()


@pytest.mark.realhost
@needs_root
def test_cluster_up_reuse_down():
    name, subnet = cluster_sandbox()
    cluster = Cluster(name=name, members=MEMBERS, subnet=subnet, suite=TEST_SUITE)
    try:
        started = time.monotonic()
        info = cluster.up(fresh=True)
        print(f"\n{len(MEMBERS)} members up in {time.monotonic() - started:.1f} s")
        assert cluster.running()
        assert [box.ip for box in info.members.values()] == [
            f"{subnet}.{FIRST_MEMBER_HOST + i}" for i in range(len(MEMBERS))]
        for box in info.members.values():
            assert ssh(info, box.alias, "hostname") == box.alias
            assert ssh(info, box.alias, "systemctl is-system-running") == "running"
            # No way out but the proxy, which every member reaches on the bridge.
            assert "default" not in ssh(info, box.alias, "ip route")
            assert reaches(info, box.alias, info.host_ip, 8888)
        lb, web, db = info.members.values()
        # Members reach each other directly, on their addresses.
        assert reaches(info, lb.alias, web.ip, 22) and reaches(info, lb.alias, db.ip, 22)
        assert reaches(info, db.alias, lb.ip, 22)

        # up() again reuses every member: no reboot (same nspawn, /run kept).
        for box in info.members.values():
            ssh(info, box.alias, "touch /run/cluster-test-marker")
        pids = [box._nspawn_pid() for box in cluster.sandboxes]
        started = time.monotonic()
        assert cluster.up() == info
        assert time.monotonic() - started < 5
        assert [box._nspawn_pid() for box in cluster.sandboxes] == pids
        for box in info.members.values():
            ssh(info, box.alias, "test -e /run/cluster-test-marker")

        removed = set(cluster.down())
        assert {"network", "proxy", "files"} <= removed
        assert {f"{box.name} container" for box in cluster.sandboxes} <= removed
        assert_gone(cluster)
    finally:
        cluster.down()
    assert cluster.down() == []  # a second down finds nothing to remove
    assert_gone(cluster)


@pytest.mark.realhost
@needs_root
def test_a_failed_or_interrupted_up_leaves_nothing():
    name, subnet = cluster_sandbox()
    cluster = Cluster(name=name, members=MEMBERS, subnet=subnet, suite=TEST_SUITE)
    try:
        # One member's boot fails: the others are cancelled, the error is that member's.
        def no_sshd():
            raise SandboxError("no sshd today")

        cluster.sandboxes[1]._wait_ready = no_sshd
        with pytest.raises(SandboxError, match="no sshd today"):
            cluster.up(fresh=True)
        assert_gone(cluster)
        del cluster.sandboxes[1]._wait_ready

        # Ctrl-C while the members boot.
        timer = threading.Timer(1, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            cluster.up()
            time.sleep(5)  # an up() faster than the timer fails the test, not the next one
        timer.join()
        print(f"\ninterrupted up() cleaned up in {time.monotonic() - started - 1:.1f} s")
        assert_gone(cluster)
    finally:
        cluster.down()
