"""The ``fab sandbox.*`` tasks: boot, tear down and show the sandbox; the demo on it; the same
for a cluster of sandboxes (``sandbox.cluster-*``).

``write_settings`` gives the library a complete ``.env`` for a running sandbox (the demo's,
the bench's) or cluster.
"""

from __future__ import annotations

import secrets
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dotenv import dotenv_values
from fabric import task
from invoke.exceptions import Exit

from tasks import settings

from . import pebble
from .cluster import DEFAULT_CLUSTER_MEMBERS, DEFAULT_CLUSTER_SUBNET, Cluster, ClusterInfo
from .container import DEFAULT_SUBNET, Sandbox, SandboxError, SandboxInfo

# -- settings for the library ---------------------------------------------------------------

# The demo deploys the example app of this repository.
SANDBOX_SETTINGS = {"DOMAIN": "ratemyderp.test", "ADMIN_EMAIL": "ops@ratemyderp.test",
                    "DEPLOY_REPO": str(Path(__file__).resolve().parent.parent),
                    "DEPLOY_SUBDIR": "example",
                    # Let's Encrypt cannot reach a sandbox: served over plain HTTP.
                    "ACME_SERVER": ""}


def settings_file(info: SandboxInfo) -> Path:
    """Where ``fab sandbox.up`` and ``fab sandbox.demo`` write the sandbox's settings."""
    return info.root.parent / "sandbox.env"


def dotenv_quote(value: str) -> str:
    """``value`` double-quoted as python-dotenv reads it back exactly (any characters)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def cluster_settings_file(info: ClusterInfo) -> Path:
    """Where ``fab sandbox.cluster-up`` writes the cluster's settings (beside its ssh_config)."""
    return info.ssh_config.parent / "cluster.env"


def write_settings(info: SandboxInfo | ClusterInfo, path: Path | None = None,
                   **overrides: str) -> Path:
    """Write a complete .env for the library to provision this sandbox (or every member of this
    cluster); return its path (by default :func:`settings_file`'s, for a sandbox).

    Proxy and CA come from the sandbox or cluster; secrets are random (kept when the file exists
    already, so re-running the demo does not rotate them); other keys keep their
    defaults; ``overrides`` win. The file is readable by root only.
    """
    path = path or settings_file(info)
    old = dotenv_values(path, interpolate=False) if path.exists() else {}
    values = {**SANDBOX_SETTINGS, "HTTP_PROXY": info.proxy_url,
              "EXTRA_CA_CERT": str(info.ca_bundle or ""), **overrides}
    if isinstance(info, ClusterInfo) and "MEDIA_KEY" not in values:
        values["MEDIA_KEY"] = str(ssh_key(path.with_name(f"{path.stem}-media_key")))
    for key in settings.KEYS:
        if key.secret and key.name not in values:
            values[key.name] = old.get(key.name) or secrets.token_urlsafe(48)
    path.touch(mode=0o600)
    path.write_text("# Settings for the sandbox hosts, written by `fab sandbox.up` or "
                    "`fab sandbox.cluster-up`.\n"
                    + "".join(f"{name}={dotenv_quote(value)}\n" for name, value in values.items()))
    return path


def ssh_key(path: Path) -> Path:
    """An SSH private key (ed25519, no passphrase) at ``path``, made by ssh-keygen unless it
    exists there; readable by its owner only."""
    if not path.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f",
                        str(path)], check=True, capture_output=True)
    return path


# -- fab tasks ----------------------------------------------------------------------------------

NAME_HELP = "sandbox name (default: fabstack); one per subnet"
SUBNET_HELP = ("first three octets of the /24 between this machine and the sandbox "
               f"(default: {DEFAULT_SUBNET}); give each sandbox its own")


def _down_command(name: str) -> str:
    return "fab sandbox.down" + ("" if name == "fabstack" else f" --name {name}")


@contextmanager
def _task_errors() -> Iterator[None]:
    """Show a SandboxError as a plain message and exit status 1 instead of a traceback."""
    try:
        yield
    except SandboxError as exc:
        raise Exit(f"sandbox: {exc}", code=1) from exc


@task(help={"name": NAME_HELP, "suite": "Debian suite: bookworm or trixie",
            "subnet": SUBNET_HELP,
            "fresh": "recreate the root from the image even if it is running"})
def up(c, name="fabstack", suite="bookworm", subnet=DEFAULT_SUBNET, fresh=False):
    """Boot the sandbox target host (or reuse the running one) and print how to reach it."""
    started = time.monotonic()
    with _task_errors():
        box = Sandbox(name=name, suite=suite, subnet=subnet)
        pid = box._nspawn_pid()
        info = box.up(fresh=fresh)
        reused = pid is not None and box._nspawn_pid() == pid
        env_file = settings_file(info)
        if not (reused and env_file.exists()):  # a running one keeps them (the demo's ACME CA)
            write_settings(info)
    how = ("was up already (--fresh recreates it)" if reused
           else f"is up (booted in {time.monotonic() - started:.0f} s)")
    print(f"{info.alias} {how}: root@{info.ip}, Debian {info.suite}")
    print(f"  ssh:   ssh -F {info.ssh_config} {info.alias}")
    print(f"  fab:   fab -S {info.ssh_config} -H {info.alias} <task>")
    print(f"  proxy: {info.proxy_url} (the target's only way out: HTTP_PROXY)")
    if info.ca_bundle:
        print(f"  CA:    {info.ca_bundle} (extra CA certificates the egress needs)")
    print(f"  info:  {info.root.parent / 'info.json'}")
    print(f"  settings for the library: {env_file}; provision it with:\n"
          f"    FABRIC_FABSTACK_ENV_FILE={env_file} fab -S {info.ssh_config} -H {info.alias} "
          "provision")


@task(help={"name": NAME_HELP})
def down(c, name="fabstack"):
    """Stop the sandbox target host and delete its root (the cached image stays)."""
    with _task_errors():
        removed = Sandbox(name=name).down()
    print(f"{name}-sandbox is down "
          + (f"(removed: {', '.join(removed)})" if removed else "(nothing of it was here)"))


@task(help={"name": NAME_HELP})
def status(c, name="fabstack"):
    """Say whether the sandbox target host is running, and where."""
    with _task_errors():
        box = Sandbox(name=name)
        info_file = box.dir / "info.json"
        if box.running() and info_file.exists():
            print(f"{name}-sandbox is running:\n{info_file.read_text()}", end="")
        elif traces := box.traces():
            print(f"{name}-sandbox is not running, but its {', '.join(traces)} are here (an up "
                  f"still booting, or an interrupted one: {_down_command(name)} removes them)")
        else:
            print(f"{name}-sandbox is not running")


@task(help={"name": NAME_HELP, "suite": "Debian suite: bookworm or trixie",
            "subnet": SUBNET_HELP})
def demo(c, name="fabstack", suite="bookworm", subnet=DEFAULT_SUBNET):
    """Boot the sandbox, then provision and deploy the example app over HTTPS (local ACME CA)."""
    started = time.monotonic()
    with _task_errors():
        box = Sandbox(name=name, suite=suite, subnet=subnet)
        info = box.up()
        acme = pebble.Pebble(info.host_ip, info.ip, box.dir / "pebble")
        if not pebble.recorded_pids(acme.workdir):
            try:
                acme.start()
            except pebble.PebbleError as exc:
                raise SandboxError(str(exc)) from exc
    # certbot must trust Pebble's HTTPS certificate; pip and apt, the egress CA.
    bundle = box.dir / "demo-ca.pem"
    bundle.write_text("".join(p.read_text().rstrip("\n") + "\n" for p in
                              [info.ca_bundle, acme.https_ca] if p))
    env_file = write_settings(info, ACME_SERVER=acme.directory, EXTRA_CA_CERT=str(bundle))
    fab = f"{shlex.quote(sys.executable)} -m fabric -S {shlex.quote(str(info.ssh_config))} " \
          f"-H {info.alias}"
    env = {"FABRIC_FABSTACK_ENV_FILE": str(env_file)}
    repo = Path(__file__).resolve().parent.parent
    for step in ("provision", "deploy"):
        print(f"\n== fab {step} ==", flush=True)
        c.run(f"cd {shlex.quote(str(repo))} && {fab} {step}", env=env, pty=False)
    domain = SANDBOX_SETTINGS["DOMAIN"]
    print(f"\nThe example app is served by {info.alias} ({time.monotonic() - started:.0f} s):\n"
          f"  https://{domain}/ at {info.ip} (this machine only)\n"
          f"  Its certificate comes from the local ACME CA (Pebble); trust its root to verify:\n"
          f"    curl --cacert {acme.issuing_root} --resolve {domain}:443:{info.ip} "
          f"https://{domain}/\n"
          f"  settings: {env_file}\n  tear down: {_down_command(name)}")


# -- a cluster of sandboxes -------------------------------------------------------------------

CLUSTER_NAME_HELP = "cluster name (default: cl): 1-9 of [a-z0-9]; one per subnet"
MEMBERS_OPTION = ",".join(DEFAULT_CLUSTER_MEMBERS)


def _cluster_down_command(name: str) -> str:
    return "fab sandbox.cluster-down" + ("" if name == "cl" else f" --name {name}")


@task(help={"name": CLUSTER_NAME_HELP,
            "members": "member names, comma-separated, in address order (default: "
                       f"{MEMBERS_OPTION})",
            "suite": "Debian suite: bookworm or trixie",
            "subnet": "first three octets of the members' /24 (default: "
                      f"{DEFAULT_CLUSTER_SUBNET}); give each cluster and sandbox its own",
            "fresh": "recreate every member from the image even if the cluster is running"})
def cluster_up(c, name="cl", members=MEMBERS_OPTION, suite="bookworm",
               subnet=DEFAULT_CLUSTER_SUBNET, fresh=False):
    """Boot a cluster of sandbox hosts on one bridge (or reuse it) and print how to reach them."""
    started = time.monotonic()
    with _task_errors():
        cluster = Cluster(name=name, members=tuple(members.split(",")),
                          suite=suite, subnet=subnet)
        pids = [box._nspawn_pid() for box in cluster.sandboxes]
        info = cluster.up(fresh=fresh)
        reused = None not in pids and [box._nspawn_pid() for box in cluster.sandboxes] == pids
        env_file = write_settings(info, cluster_settings_file(info))
    how = ("was up already (--fresh recreates it)" if reused
           else f"is up (booted in {time.monotonic() - started:.0f} s)")
    print(f"cluster {name} {how}: {len(info.members)} Debian {info.suite} hosts on "
          f"{info.bridge} ({info.subnet}.0/24)")
    width = max(len(member.alias) for member in info.members.values())
    for member in info.members.values():
        print(f"  {member.alias:<{width}}  root@{member.ip}")
    aliases = ",".join(member.alias for member in info.members.values())
    first = next(iter(info.members.values())).alias
    print(f"  ssh:   ssh -F {info.ssh_config} {first}")
    print(f"  fab:   fab -S {info.ssh_config} -H {aliases} <task>")
    print(f"  proxy: {info.proxy_url} (the members' only way out: HTTP_PROXY)")
    if info.ca_bundle:
        print(f"  CA:    {info.ca_bundle} (extra CA certificates the egress needs)")
    print(f"  info:  {info.ssh_config.parent / 'info.json'}")
    print(f"  settings for the library: {env_file}; provision a member with:\n"
          f"    FABRIC_FABSTACK_ENV_FILE={env_file} fab -S {info.ssh_config} -H {first} "
          "provision")
    print(f"  tear down: {_cluster_down_command(name)}")


@task(help={"name": CLUSTER_NAME_HELP})
def cluster_down(c, name="cl"):
    """Stop every host of the cluster and delete their roots, bridge, proxy and files."""
    with _task_errors():
        removed = Cluster.named(name).down()
    print(f"cluster {name} is down "
          + (f"(removed: {', '.join(removed)})" if removed else "(nothing of it was here)"))


@task(help={"name": CLUSTER_NAME_HELP})
def cluster_status(c, name="cl"):
    """Say whether the cluster runs, and its hosts' aliases and addresses."""
    with _task_errors():
        cluster = Cluster.named(name)
        if cluster.running():
            info = cluster.info()
            print(f"cluster {name} is running on {info.bridge} (proxy {info.proxy_url}), "
                  f"ssh -F {info.ssh_config} ALIAS:")
            for member, box in info.members.items():
                print(f"  {box.alias:<12} {box.ip:<15} {member}")
        elif traces := cluster.traces():
            print(f"cluster {name} is not running, but its {', '.join(traces)} are here (an up "
                  f"still booting, or an interrupted one: {_cluster_down_command(name)} "
                  "removes them)")
        else:
            print(f"cluster {name} is not running")
