import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from invoke.util import yaml

from sandbox.container import Sandbox
from sandbox.pebble import Pebble
from sandbox.tasks import dotenv_quote
from tasks import settings as settings_mod
from tasks.host import Host
from tests.fake import FakeConnection
from tests.load import Load, release_served

VALID = {"DOMAIN": "example.com", "ADMIN_EMAIL": "ops@example.com",
         "DB_PASSWORD": "unit-test-db-password", "DJANGO_SECRET_KEY": "unit-test-secret-key-" * 3}


# The real-host modules share one sandbox, so they run in the order a server lives: provision
# needs it fresh, Celery's module wants no release yet, web wants no certificate yet, then the
# modules that deploy; the audits read the whole stack, and the faults break it last.
REALHOST_ORDER = ("provision", "db", "celery", "web", "deploy", "static", "backup", "status",
                  "daytwo", "badinput", "audit", "faults")


def pytest_collection_modifyitems(items):
    """Mark every test that needs the sandbox ``realhost`` (``make unit`` leaves them out), and
    order the real-host modules like a server's life."""
    for item in items:
        if "sandbox" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.realhost)

    def rank(item):
        name = item.path.stem.removeprefix("test_realhost_")
        return REALHOST_ORDER.index(name) if name in REALHOST_ORDER else -1

    items.sort(key=rank)  # stable: unit tests first, in their own order


@pytest.fixture
def settings():
    return settings_mod.parse(dict(VALID))


def provision_declares(monkeypatch, host) -> list:
    """Every resource ``fab provision`` declares on ``host`` (a stand-in with ``settings``,
    ``site`` and ``check``), in order, over no connection."""
    from contextlib import nullcontext

    from tasks import provision

    seen: list = []
    monkeypatch.setattr(provision, "session", lambda c, title, check: nullcontext(host))
    monkeypatch.setattr(provision.python, "facts", lambda h, v: ({"ID": "debian"}, True))
    monkeypatch.setattr(provision, "ensure", lambda h, *resources: seen.extend(resources))
    monkeypatch.setattr(provision, "refuse_conflicts", lambda h, resources: None)
    provision.all.body(None)
    return seen


@pytest.fixture
def make_host(settings, capsys):
    def make(answers=(), failing=(), check=False, user="root", **kw):
        conn = FakeConnection(answers=list(answers), failing=list(failing), user=user)
        return Host(conn, settings, check=check, executor=conn.exec_script, **kw), conn
    return make


# -- real-host tests: the sandbox Debian target ------------------------------------------

REPO = Path(__file__).resolve().parent.parent
TEST_SUITE = os.environ.get("FABSTACK_TEST_SUITE", "bookworm")
FAB = str(Path(sys.executable).parent / "fab")


# For the tests that boot sandboxes of their own (the smoke test's, the cluster test's).
needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(tool) for tool in (
        "systemd-nspawn", "debootstrap", "tinyproxy", "ip", "ssh")),
    reason="needs root and systemd-nspawn, debootstrap, tinyproxy, iproute2, openssh-client")


def suite_sandbox() -> tuple[str, str]:
    """The suite's sandbox as (name, subnet): FABSTACK_TEST_SANDBOX=NAME:SUBNET, default
    test:10.213.50."""
    name, subnet = os.environ.get("FABSTACK_TEST_SANDBOX", "test:10.213.50").split(":")
    return name, subnet


def smoke_sandbox() -> tuple[str, str]:
    """The smoke test's own sandbox (tests/test_sandbox_smoke.py boots and breaks it): NAME-smoke
    on the suite's subnet with its second octet one up (test-smoke on 10.214.50 by default), so
    suites on neighbouring subnets (10.213.63, 10.213.64) never meet each other's smoke test.
    NAME has at most 5 characters."""
    name, subnet = suite_sandbox()
    first, second, third = subnet.split(".")
    return f"{name}-smoke", f"{first}.{int(second) + 1}.{third}"


def cluster_sandbox(suffix: str = "", up: int = 2) -> tuple[str, str]:
    """A test module's own cluster as (name, subnet): named NAME (so NAME has no dash) and
    ``suffix``, on the suite's subnet with its second octet ``up`` up. The cluster test's
    (tests/test_sandbox_cluster.py) is two up (test on 10.215.50 by default), the spread site's
    three (tests on 10.216.50): beside the suite's sandbox and its smoke sandbox (one up), and
    apart from every other suite's, as long as suites differ in their subnet's third octet."""
    name, subnet = suite_sandbox()
    first, second, third = subnet.split(".")
    return name + suffix, f"{first}.{int(second) + up}.{third}"


@dataclass
class Fleet:
    """A booted cluster as a test drives it: fab on an inventory (a runtime configuration file
    given with fab -f), shell commands on a member, a .env."""

    info: object  # sandbox.cluster.ClusterInfo
    work: Path

    @property
    def env_file(self) -> Path:
        return self.work / ".env"

    def write_env(self, **overrides) -> Path:
        return Target(self.info, self.env_file).write_env(**overrides)

    def fab(self, hosts: dict, *args) -> subprocess.CompletedProcess:
        """fab ARGS with the inventory ``hosts`` (fabstack.hosts)."""
        config = self.work / "fabric.yaml"
        config.write_text(yaml.safe_dump({"fabstack": {"env_file": str(self.env_file),
                                                       "hosts": hosts}}))
        return subprocess.run([FAB, "-S", str(self.info.ssh_config), "-f", str(config), *args],
                              cwd=REPO, capture_output=True, text=True, timeout=1800)

    def sh(self, member: str, command: str, stdin: str = "") -> subprocess.CompletedProcess:
        return subprocess.run(["ssh", "-F", str(self.info.ssh_config),
                               self.info.members[member].alias, command], input=stdin,
                              capture_output=True, text=True, timeout=300)


def table(out: str) -> dict[str, list[str]]:
    """The rows of the table a parallel run ends with, by host."""
    head = out.rindex("  host ")
    return {line.split()[0]: line.split()[1:] for line in out[head:].splitlines()[1:]}


@pytest.fixture(scope="session")
def sandbox():
    """A fresh sandbox Debian host, booted once per test session and torn down after.

    Set FABSTACK_KEEP_SANDBOX=1 to leave it running for a look afterwards,
    FABSTACK_TEST_SANDBOX=NAME:SUBNET (default test:10.213.50) to run beside another suite
    (:func:`suite_sandbox`; the smoke test's own is :func:`smoke_sandbox`), and
    FABSTACK_REUSE_SANDBOX=1 to run on that sandbox as it is when it is up (to iterate on one
    module; a full run wants a fresh host).
    """
    if os.geteuid() != 0:
        pytest.skip("real-host tests boot a systemd-nspawn target and need root")
    name, subnet = suite_sandbox()
    box = Sandbox(name=name, subnet=subnet, suite=TEST_SUITE)
    info = box.up(fresh=not os.environ.get("FABSTACK_REUSE_SANDBOX"))
    yield info
    if not os.environ.get("FABSTACK_KEEP_SANDBOX"):
        box.down()


@dataclass
class Target:
    """The sandbox as a test drives it: fab runs, shell commands, a .env file."""

    info: object
    env_file: Path

    def write_env(self, **overrides) -> Path:
        values = {"DOMAIN": "ratemyderp.test", "ADMIN_EMAIL": "ops@ratemyderp.test",
                  "HTTP_PROXY": self.info.proxy_url,
                  "EXTRA_CA_CERT": str(self.info.ca_bundle or ""),
                  "DB_PASSWORD": "sandbox-db-password", "DJANGO_SECRET_KEY": "sandbox-key-" * 5,
                  # Let's Encrypt is out of reach: plain HTTP unless a test brings Pebble.
                  "ACME_SERVER": "",
                  # apt's daily timers would take dpkg's lock at moments no test chooses (seen:
                  # apt-daily-upgrade at 06:08 under the faults module); tests/test_realhost_daytwo
                  # turns unattended-upgrades on and checks it.
                  "UNATTENDED_UPGRADES": "False"}
        values.update(overrides)  # a key given as None is left out
        self.env_file.write_text("".join(f"{k}={dotenv_quote(v)}\n" for k, v in values.items()
                                         if v is not None))
        return self.env_file

    def fab(self, *args, check=True, env_file=None) -> subprocess.CompletedProcess:
        env = dict(os.environ, FABRIC_FABSTACK_ENV_FILE=str(env_file or self.env_file))
        res = subprocess.run([FAB, "-S", str(self.info.ssh_config), "-H", self.info.alias, *args],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
        if check and res.returncode != 0:
            raise AssertionError(f"fab {' '.join(args)} failed ({res.returncode}):\n"
                                 f"{res.stdout}\n{res.stderr}")
        return res

    def sh(self, command: str, check=True) -> subprocess.CompletedProcess:
        res = subprocess.run(["ssh", "-F", str(self.info.ssh_config), self.info.alias, command],
                             capture_output=True, text=True, timeout=300)
        if check and res.returncode != 0:
            raise AssertionError(f"{command!r} failed ({res.returncode}): {res.stderr}")
        return res


# Everything a run of fab may change on the host, as text (compare two with state_changes):
# every path with mode, owner, size and mtime; packages; firewall rules; PostgreSQL's roles and
# databases; the stack's processes (a restart or reload is a change). Left out: what moves by
# itself on an idle host (logs, caches, PostgreSQL's and Redis's data files, Celery beat's
# schedule, what the daily backup timer writes below /opt/APP/backup, the journal, /run and
# /tmp) and the probe's own SSH session. Taken once systemd has no job left (up to a minute): a
# deploy's Celery restart is queued, not waited for.
STATE = r"""
i=0
while [ -n "$(systemctl list-jobs --no-legend)" ] && [ "$i" -lt 120 ]; do
  sleep 0.5; i=$((i + 1))
done
find / -xdev \( -path /proc -o -path /sys -o -path /run -o -path /tmp -o -path /dev \
  -o -path /var/log -o -path /var/cache -o -path /var/lib/systemd -o -path /root/.cache \
  -o -path '/var/lib/postgresql/*/main' -o -path /var/lib/redis -o -path /var/lib/celery \
  -o -path '/opt/*/backup/*' \) -prune -o -printf 'file %p %m %u %g %s %T@\n' | sort
dpkg-query -W -f 'package ${Package} ${Version} ${Status}\n'
ls -la --time-style=+%s /var/log | grep -v -e ' journal$' -e '^total ' | sed 's/^/log /'
for save in iptables-save ip6tables-save; do
  command -v $save >/dev/null && $save | grep -v '^#' | sed "s/\[[0-9]*:[0-9]*\]//; s/^/$save /"
done
command -v psql >/dev/null && (cd / && runuser -u postgres -- psql -XAt -d postgres -c \
  "SELECT 'role ' || rolname || ' ' || md5(coalesce(rolpassword, '')) || ' ' || rolcanlogin
   FROM pg_authid UNION ALL SELECT 'database ' || datname FROM pg_database ORDER BY 1") \
  2>/dev/null
head -qn1 /var/lib/postgresql/*/main/postmaster.pid 2>/dev/null | sed 's/^/postmaster /'
ps -eo pid=,user=,comm= | grep -E ' (nginx|gunicorn|redis-server|celery|python3[.0-9]*)$' \
  | sed 's/^/process/'
true
"""


def host_state(target) -> str:
    """The host's state (:data:`STATE`) now."""
    return target.sh(STATE).stdout


def failed_deploy(target, app_repo, message: str, changes: dict[str, str]):
    """Commit ``changes`` to the app, deploy them under a request stream, take them back.

    Checks what every failed deploy must do (exit 1, every request answered by the release
    that was current, which still is, the new release's directory gone) and returns fab's
    result for the test's own checks.
    """
    ip = target.info.ip
    before = release_served(ip)
    releases = target.sh("ls /opt/ratemyderp/releases").stdout.split()
    commit(app_repo, message, changes)
    try:
        with Load(ip) as load:
            res = target.fab("deploy", check=False)
    finally:
        revert(app_repo)
    print(f"\n{message}: {load.summary()}")
    assert res.returncode == 1, res.stdout
    assert "the current release keeps serving" in res.stdout, res.stdout
    assert load.sent >= 5 and load.failed == [], (load.summary(), load.failed[:5], res.stdout)
    assert set(load.releases) == {before}, load.summary()
    assert release_served(ip) == before
    assert target.sh("ls /opt/ratemyderp/releases").stdout.split() == releases
    return res


def live_unit(target, app: str = "ratemyderp") -> str:
    """The gunicorn instance that serves (the one NGINX's upstream file names), as a unit."""
    color = target.sh(f"sed -n 's|.*unix:/run/{app}/\\([a-z]*\\)/.*|\\1|p' "
                      f"/etc/nginx/conf.d/fabstack-{app}-upstream.conf").stdout.strip()
    assert color in ("blue", "green"), color
    return f"{app}@{color}.service"


def state_changes(before: str, after: str) -> list[str]:
    """The lines of two :func:`host_state` texts that differ (- before, + after)."""
    old, new = set(before.splitlines()), set(after.splitlines())
    return sorted([f"- {line}" for line in old - new] + [f"+ {line}" for line in new - old],
                  key=lambda line: line[2:])


# Each secret holds every character the issue lists, a unique marker (so any encoding that
# keeps it readable is found) and a trailing space.
SECRETS = {
    "DB_PASSWORD": "Mk1db pw'\"$HOME\\#%@:/=x ",
    "DJANGO_SECRET_KEY": "Mk2sk '\"$(id)`id`\\#%@:/= " + "k" * 50 + " ",
    "MAILGUN_API_KEY": "Mk3mg-'\"$x\\#%@:/ ",
    "INFLUX_TOKEN": "Mk4in tok'\"$\\#%@:/= ",
    "APP_ENV_EXTRA_SECRET": "Mk5ex '\"$\\#%@:/= ",
    "MONITORING_DB_PASSWORD": "Mk8mo pw'\"$\\#%@:/= ",
}
MARKERS = tuple(value[:5] for value in SECRETS.values())

SAMPLER = "/root/fabstack-ps-sampler"
# Every process's arguments, new ones written as they appear, until the flag file goes.
SAMPLER_PY = r"""
import os, sys
seen, out = set(), open(sys.argv[1], "w")
while os.path.exists(sys.argv[2]):
    for pid in os.listdir("/proc"):
        try:
            args = open(f"/proc/{pid}/cmdline", "rb").read()
            group = open(f"/proc/{pid}/autogroup").read().split()
        except OSError:
            continue
        # Empty for a process in the kernel's default group (never in a session of its own).
        group = group[-1] if group else "none"
        if args and args not in seen:
            seen.add(args)
            out.write(args.replace(b"\0", b" ").decode(errors="replace")
                      + f" [autogroup nice {group}]\n")
            out.flush()
"""


@dataclass
class ProcessSampler:
    """A context manager: the arguments of every process on the host while it is open.

    A transient unit polls /proc without pause; on exit it stops and is removed, and
    ``text`` holds every distinct command line it saw, a line each, each followed by its
    process's autogroup niceness (``[autogroup nice N]``).
    """

    target: "Target"
    text: str = field(default="", init=False)

    def __enter__(self) -> "ProcessSampler":
        self.target.sh(f"cat > {SAMPLER}.py <<'EOF'\n{SAMPLER_PY}\nEOF\ntouch {SAMPLER}.on; "
                       f"systemd-run -q --unit=fabstack-ps-sampler python3 {SAMPLER}.py "
                       f"{SAMPLER}.out {SAMPLER}.on")
        return self

    def __exit__(self, *exc) -> None:
        health = self.target.sh("systemctl is-active -q fabstack-ps-sampler && echo alive || "
                                "journalctl -q -o cat -u fabstack-ps-sampler | tail -20").stdout
        self.target.sh(f"rm -f {SAMPLER}.on; sleep 1; systemctl stop fabstack-ps-sampler "
                       "2>/dev/null; systemctl reset-failed fabstack-ps-sampler 2>/dev/null; true")
        self.text = self.target.sh(f"cat {SAMPLER}.out; rm -f {SAMPLER}.py {SAMPLER}.out").stdout
        # A sampler that died early would pass every "no secret seen" check: it must have lived.
        assert health == "alive\n", f"the process sampler died before the end:\n{health}"


SUDO_USER, SUDO_PASSWORD = "deploy", "Pa ss$#1"


def ensure_sudo_user(target) -> None:
    """Make the sandbox's ``deploy`` user: SSH key login, sudo with SUDO_PASSWORD."""
    target.sh(f"id {SUDO_USER} >/dev/null 2>&1 || useradd -m -s /bin/bash {SUDO_USER}; "
              f"echo '{SUDO_USER}:{SUDO_PASSWORD}' | chpasswd; "
              f"echo '{SUDO_USER} ALL=(ALL:ALL) ALL' > /etc/sudoers.d/{SUDO_USER}; "
              f"install -d -o {SUDO_USER} -g {SUDO_USER} -m 700 /home/{SUDO_USER}/.ssh; "
              f"install -o {SUDO_USER} -g {SUDO_USER} -m 600 /root/.ssh/authorized_keys "
              f"/home/{SUDO_USER}/.ssh/")


@pytest.fixture(scope="session")
def target(sandbox, tmp_path_factory):
    t = Target(sandbox, tmp_path_factory.mktemp("target") / ".env")
    t.write_env()
    return t


@pytest.fixture(scope="module")
def app_repo(tmp_path_factory):
    """A clone of this repository (its example app is what gets deployed) to commit changes to."""
    path = tmp_path_factory.mktemp("app") / "repo"
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(REPO), str(path)], check=True)
    for key, value in (("user.name", "fabstack tests"), ("user.email", "tests@fabstack.test")):
        subprocess.run(["git", "-C", str(path), "config", key, value], check=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def commit(repo, message: str, changes: dict[str, str]) -> str:
    """Write ``changes`` (path in ``repo``: text) and commit them; return the new commit."""
    for name, text in changes.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(text)
    subprocess.run(["git", "-C", str(repo), "add", "-A"], check=True)
    subprocess.run(["git", "-C", str(repo), "commit", "-qm", message], check=True)
    return subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()


def revert(repo) -> str:
    """Commit the revert of ``repo``'s last commit; return the new commit."""
    subprocess.run(["git", "-C", str(repo), "revert", "--no-edit", "HEAD"], check=True,
                   capture_output=True)
    return subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def stack(target, app_repo, pebble_env):
    """The converged stack: provisioned, the example app deployed over HTTPS; its settings."""
    values = {"DEPLOY_REPO": str(app_repo), "DEPLOY_SUBDIR": "example", **pebble_env}
    target.write_env(**values)
    target.fab("provision")
    target.fab("deploy")
    return values


@pytest.fixture(scope="session")
def pebble(sandbox):
    """Pebble and its DNS on the sandbox's host address, every name resolving to the target.

    Its files are the sandbox's own (as the demo's): a Pebble left by a killed session is
    stopped by the next session's fresh sandbox, or by this start."""
    name, subnet = suite_sandbox()
    workdir = Sandbox(name=name, subnet=subnet, suite=TEST_SUITE).dir / "pebble"
    server = Pebble(sandbox.host_ip, sandbox.ip, workdir)
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def pebble_env(sandbox, pebble, tmp_path_factory):
    """Settings that get the certificate from Pebble: its directory, its HTTPS CA trusted."""
    bundle = tmp_path_factory.mktemp("pebble-ca") / "extra-ca.pem"
    certs = [sandbox.ca_bundle] if sandbox.ca_bundle else []
    bundle.write_text("".join(p.read_text().rstrip("\n") + "\n" for p in [*certs, pebble.https_ca]))
    return {"ACME_SERVER": pebble.directory, "EXTRA_CA_CERT": str(bundle)}


@pytest.fixture(scope="session")
def testinfra_host(sandbox):
    import testinfra

    return testinfra.get_host(f"ssh://{sandbox.alias}", ssh_config=str(sandbox.ssh_config))


def changed_count(output: str) -> int:
    """The 'N changed' figure of the last summary line in fab's output."""
    summaries = re.findall(r"\] [\w.-]+: (\d+) (?:changed|would change),", output)
    assert summaries, f"no summary line in:\n{output}"
    return int(summaries[-1])
