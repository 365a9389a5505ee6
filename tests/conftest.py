import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tasks import settings as settings_mod
from tasks.host import Host
from tasks.sandbox import Sandbox
from tests.fake import FakeConnection

VALID = {"DOMAIN": "example.com", "ADMIN_EMAIL": "ops@example.com",
         "DB_PASSWORD": "unit-test-db-password", "DJANGO_SECRET_KEY": "unit-test-secret-key-" * 3}


def pytest_collection_modifyitems(items):
    """The real-host modules share one sandbox: the one that needs it fresh runs first."""
    items.sort(key=lambda item: item.path.name != "test_realhost_provision.py")


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
                  "DB_PASSWORD": "sandbox-db-password", "DJANGO_SECRET_KEY": "sandbox-key-" * 5}
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


@pytest.fixture(scope="session")
def testinfra_host(sandbox):
    import testinfra

    return testinfra.get_host(f"ssh://{sandbox.alias}", ssh_config=str(sandbox.ssh_config))


def changed_count(output: str) -> int:
    """The 'N changed' figure of the last summary line in fab's output."""
    summaries = re.findall(r"\] [\w.-]+: (\d+) (?:changed|would change),", output)
    assert summaries, f"no summary line in:\n{output}"
    return int(summaries[-1])
