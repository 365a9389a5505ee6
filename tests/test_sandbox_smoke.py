"""The sandbox target host: image fix-up and naming offline, then one real boot cycle (root only).

The real-host test uses a sandbox of its own (tests/conftest.py's smoke_sandbox: the suite's
FABSTACK_TEST_SANDBOX name with "-smoke", the subnet's second octet one up) so that it never
touches the suite's sandbox, the demo's, or another suite's.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sandbox.container import STOP_TIMEOUT, Sandbox, SandboxError, _wait_gone, fix_image
from tests.conftest import REPO, TEST_SUITE, needs_root, smoke_sandbox


def test_names_must_fit_interface_names():
    with pytest.raises(SandboxError):
        Sandbox(name="much-too-long")
    with pytest.raises(SandboxError):
        Sandbox(name="No_Caps")
    assert Sandbox(name="a-1").alias == "a-1-sandbox"


@pytest.mark.parametrize("subnet", ["10.213", "10.213.46.0", "10.213.256", "ten.213.46", ""])
def test_a_subnet_is_three_octets(subnet):
    with pytest.raises(SandboxError, match="first three octets"):
        Sandbox(subnet=subnet)


def test_the_smoke_sandbox_sits_beside_the_suites(monkeypatch):
    monkeypatch.setenv("FABSTACK_TEST_SANDBOX", "sb:10.213.63")
    assert smoke_sandbox() == ("sb-smoke", "10.214.63")
    monkeypatch.delenv("FABSTACK_TEST_SANDBOX")
    assert smoke_sandbox() == ("test-smoke", "10.214.50")


def test_info_describes_the_addresses(tmp_path):
    info = Sandbox(name="t", subnet="10.9.8", base_dir=tmp_path).info()
    assert (info.ip, info.host_ip, info.proxy_url) == ("10.9.8.2", "10.9.8.1", "http://10.9.8.1:8888")
    assert info.ssh_config == tmp_path / "t" / "ssh_config"
    assert info.root == tmp_path / "t" / "root"


def test_fix_image_makes_a_plain_debian_server(tmp_path):
    for sub in ("etc/apt/sources.list.d", "etc/ssh/sshd_config.d", "var/cache/apt/archives"):
        (tmp_path / sub).mkdir(parents=True)
    (tmp_path / "etc/apt/sources.list").write_text("deb http://deb.debian.org/debian trixie main\n")
    (tmp_path / "etc/ssh/ssh_host_ed25519_key").write_text("secret")
    (tmp_path / "etc/machine-id").write_text("0123\n")
    (tmp_path / "var/cache/apt/archives/x.deb").write_text("")

    fix_image(tmp_path, "trixie")

    sources = (tmp_path / "etc/apt/sources.list.d/debian.sources").read_text()
    assert "Suites: trixie trixie-updates\n" in sources
    assert "Suites: trixie-security\n" in sources
    assert "Proxy" not in sources
    assert not (tmp_path / "etc/apt/sources.list").exists()
    assert not list((tmp_path / "etc/ssh").glob("ssh_host_*"))
    assert (tmp_path / "etc/machine-id").read_text() == ""
    assert "PermitRootLogin prohibit-password" in (
        tmp_path / "etc/ssh/sshd_config.d/sandbox.conf").read_text()
    assert not list((tmp_path / "var/cache/apt/archives").iterdir())


@pytest.mark.realhost
@needs_root
def test_up_reboot_crash_down():
    name, subnet = smoke_sandbox()
    box = Sandbox(name=name, subnet=subnet, suite=TEST_SUITE)

    def ssh(command):
        info = box.info()
        return subprocess.run(["ssh", "-F", str(info.ssh_config), "-o", "BatchMode=yes",
                               info.alias, command],
                              capture_output=True, text=True, timeout=60, check=True).stdout

    try:
        info = box.up(fresh=True)
        assert box.running()
        assert ssh("systemctl is-system-running").strip() == "running"
        assert ssh("hostname").strip() == info.alias
        assert "127.0.0.1\tlocalhost" in ssh("cat /etc/hosts")
        # The proxy answers on the host end; nothing else is reachable from the target.
        ssh(f"python3 -c 'import socket; socket.create_connection((\"{info.host_ip}\", 8888), 5)'")
        # and it asks the resolver again after 1 s, not glibc's 5 s
        [proxy] = box._proxy_pids()
        environ = Path(f"/proc/{proxy}/environ").read_bytes().split(b"\0")
        assert b"RES_OPTIONS=timeout:1 attempts:5" in environ
        assert ssh("ip route").split()[0] != "default"

        # A reboot keeps the disk; up() on a running sandbox reuses it.
        ssh("touch /root/marker")
        box.reboot()
        assert box.up() == info
        ssh("test -e /root/marker")

        # A crash (nspawn and the proxy killed) is cleaned up by the next up().
        crashed = box._nspawn_pids() + box._proxy_pids()
        for pid in crashed:
            os.kill(pid, signal.SIGKILL)
        assert _wait_gone(crashed, 5)
        assert not box.running()
        box.up()
        assert ssh("systemctl is-system-running").strip() == "running"
        assert {"container", "proxy", "network", "files"} <= set(box.down())
    finally:
        box.down()
    assert box.down() == []  # a second down finds nothing to remove
    assert not box.running()
    assert sorted(p.name for p in box.dir.iterdir()) == ["id_ed25519", "id_ed25519.pub"]


@pytest.mark.realhost
@needs_root
def test_an_interrupted_up_leaves_nothing_and_a_killed_one_is_removed_by_down():
    name, subnet = smoke_sandbox()
    box = Sandbox(name=name, subnet=subnet, suite=TEST_SUITE)
    try:
        # Ctrl-C while the target boots: up() stops and removes what it started, at once (a
        # systemd too young to take nspawn's shutdown request used to hold it STOP_TIMEOUT).
        booting = box._wait_ready

        def interrupted():
            assert box.running() and "network" in box.traces()
            raise KeyboardInterrupt

        box._wait_ready = interrupted
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            box.up(fresh=True)
        assert time.monotonic() - started < STOP_TIMEOUT / 2
        box._wait_ready = booting
        assert box.traces() == []

        # up killed outright while the target boots: its container, proxy, network and root
        # stay, and down() removes them.
        script = (f"from sandbox.container import Sandbox; "
                  f"Sandbox(name={name!r}, suite={TEST_SUITE!r}, subnet={subnet!r}).up()")
        up = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
        deadline = time.monotonic() + 120  # a first run builds the image
        while not box.running():
            assert up.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        up.kill()
        up.wait()
        assert {"container", "proxy", "network", "files"} <= set(box.traces())
        started = time.monotonic()
        assert {"container", "proxy", "network", "files"} <= set(box.down())
        assert time.monotonic() - started < STOP_TIMEOUT / 2
        assert box.traces() == []
    finally:
        box.down()
