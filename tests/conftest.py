import pytest

from tasks import settings as settings_mod
from tasks.host import Host
from tests.fake import FakeConnection

VALID = {"DOMAIN": "example.com", "ADMIN_EMAIL": "ops@example.com"}


@pytest.fixture
def settings():
    return settings_mod.parse(dict(VALID))


@pytest.fixture
def make_host(settings, capsys):
    def make(answers=(), failing=(), check=False, user="root", **kw):
        conn = FakeConnection(answers=list(answers), failing=list(failing), user=user)
        return Host(conn, settings, check=check, **kw), conn
    return make
