import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tasks import settings as settings_mod
from tasks.host import Host
from tasks.pebble import Pebble
from tasks.sandbox import Sandbox
from tests.fake import FakeConnection

VALID = {"DOMAIN": "example.com", "ADMIN_EMAIL": "ops@example.com",
         "DB_PASSWORD": "unit-test-db-password", "DJANGO_SECRET_KEY": "unit-test-secret-key-" * 3}


# The real-host modules share one sandbox, so they run in the order a server lives: provision
# needs it fresh, Celery's module wants no release yet, web wants no certificate yet, then the
# modules that deploy; the audits read the whole stack, and the faults break it last.
REALHOST_ORDER = ("provision", "db", "celery", "web", "deploy", "backup", "status",
                  "badinput", "audit", "faults")


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.stem.removeprefix("test_realhost_")
        return REALHOST_ORDER.index(name) if name in REALHOST_ORDER else -1

    items.sort(key=rank)  # stable: unit tests first, in their own order


@pytest.fixture
def settings():
    return settings_mod.parse(dict(VALID))


@pytest.fixture
def make_host(settings, capsys):
    def make(answers=(), failing=(), check=False, user="root", **kw):
        conn = FakeConnection(answers=list(answers), failing=list(failing), user=user)
        return Host(conn, settings, check=check, executor=conn.exec_script, **kw), conn
    return make


# -- real-host tests: the sandbox Debian target ------------------------------------------

REPO = Path(__file__).resolve().parent.parent
FAB = str(Path(sys.executable).parent / "fab")


@pytest.fixture(scope="session")
def sandbox():
    """A fresh sandbox Debian host, booted once per test session and torn down after.

    Set FABSTACK_KEEP_SANDBOX=1 to leave it running for a look afterwards, and
    FABSTACK_TEST_SANDBOX=NAME:SUBNET (default test:10.213.50) to run beside another suite.
    """
    if os.geteuid() != 0:
        pytest.skip("real-host tests boot a systemd-nspawn target and need root")
    name, subnet = os.environ.get("FABSTACK_TEST_SANDBOX", "test:10.213.50").split(":")
    box = Sandbox(name=name, subnet=subnet)
    info = box.up(fresh=True)
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
                  "ACME_SERVER": ""}
        values.update(overrides)
        self.env_file.write_text("".join(f"{k}={dotenv_quote(v)}\n" for k, v in values.items()))
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


def dotenv_quote(value: str) -> str:
    """``value`` double-quoted as python-dotenv reads it back exactly (any characters)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


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


@pytest.fixture(scope="session")
def pebble(sandbox, tmp_path_factory):
    """Pebble and its DNS on the sandbox's host address, every name resolving to the target."""
    server = Pebble(sandbox.host_ip, sandbox.ip, tmp_path_factory.mktemp("pebble"))
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
