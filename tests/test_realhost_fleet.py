"""Several hosts at once, on a real cluster of two whole-stack hosts (sandbox/cluster.py).

``fab provision`` without ``-H`` provisions every host of the inventory (a runtime config file
given with ``fab -f``) in parallel and tables them; a second run changes nothing on any host;
a host that cannot be reached fails alone, after every other host was converged.

The cluster is this module's own: named like the suite's sandbox with an "f", on its subnet
with the second octet three up (test: testf on 10.216.50), apart from the suite's sandbox, its
smoke sandbox (one up) and the cluster test's (two up).
"""

import os
import re
import subprocess

import pytest
from invoke.util import yaml

from sandbox.cluster import Cluster
from tests.conftest import (
    FAB,
    REPO,
    TEST_SUITE,
    Target,
    changed_count,
    needs_root,
    suite_sandbox,
)

pytestmark = [pytest.mark.realhost, needs_root]
MEMBERS = ("a", "b")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    name, subnet = suite_sandbox()
    first, second, third = subnet.split(".")
    cluster = Cluster(name=f"{name}f", members=MEMBERS, suite=TEST_SUITE,
                      subnet=f"{first}.{int(second) + 3}.{third}")
    info = cluster.up(fresh=True)
    work = tmp_path_factory.mktemp("fleet")
    Target(info, work / ".env").write_env()
    hosts = {member: {"ssh": box.alias} for member, box in info.members.items()}
    yield info, work, hosts
    if not os.environ.get("FABSTACK_KEEP_SANDBOX"):
        cluster.down()


def fab(fleet, hosts, *args):
    info, work, _ = fleet
    config = work / "fabric.yaml"
    config.write_text(yaml.safe_dump({"fabstack": {"env_file": str(work / ".env"),
                                                   "hosts": hosts}}))
    return subprocess.run([FAB, "-S", str(info.ssh_config), "-f", str(config), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=1800)


def table(out: str) -> dict[str, list[str]]:
    """The rows of the table a parallel run ends with, by host."""
    head = out.rindex("  host ")
    return {line.split()[0]: line.split()[1:] for line in out[head:].splitlines()[1:]}


def test_provision_converges_every_host_of_the_inventory_at_once(fleet):
    _info, _work, hosts = fleet
    res = fab(fleet, hosts, "provision")
    assert res.returncode == 0, res.stdout + res.stderr
    rows = table(res.stdout)
    assert list(rows) == ["a", "b"] and all(int(row[0]) > 0 for row in rows.values()), rows
    for name in rows:  # each host's own lines and summary, under its inventory name
        assert f"[{name}] changed      firewall (ufw)" in res.stdout
    # at once: the whole run took less than the hosts' runs one after the other
    total = float(re.search(r"^provision on 2 hosts in ([\d.]+) s:$", res.stdout, re.M)[1])
    assert total < sum(float(row[3]) for row in rows.values()), res.stdout


def test_a_second_provision_changes_nothing_on_any_host(fleet):
    _info, _work, hosts = fleet
    res = fab(fleet, hosts, "provision")
    assert res.returncode == 0, res.stdout + res.stderr
    assert {name: row[0] for name, row in table(res.stdout).items()} == {"a": "0", "b": "0"}
    one = fab(fleet, hosts, "-H", "b", "provision")  # -H narrows to one host: as before
    assert one.returncode == 0 and changed_count(one.stdout) == 0, one.stdout
    assert "[b] provision: 0 changed" in one.stdout and "[a]" not in one.stdout
    assert "  host " not in one.stdout  # one host: no table


def test_a_host_out_of_reach_fails_alone(fleet):
    _info, _work, hosts = fleet
    res = fab(fleet, {**hosts, "gone": {"ssh": "root@127.0.0.1:1"}}, "provision")
    assert res.returncode == 1, res.stdout + res.stderr
    rows = table(res.stdout)
    assert rows["a"][0] == rows["b"][0] == "0"
    assert rows["gone"][:2] == ["cannot", "connect:"], rows
    assert "[gone] failed       connection: cannot connect" in res.stdout
    assert res.stderr.strip().splitlines()[-1] == "failed on 1 of 3 hosts: gone"
