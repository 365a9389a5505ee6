"""The data tier on the real sandbox host: PostgreSQL, Redis, the app's environment, secrets."""

import base64
import re
from urllib.parse import quote, unquote, urlsplit

import pytest

from tasks import settings as settings_mod
from tests.conftest import MARKERS, SECRETS, ProcessSampler, changed_count

APP = "ratemyderp"
CONF = f"/opt/{APP}/conf/{APP}.conf"
CELERY_CONF = f"/opt/{APP}/conf/celery.conf"


def changed_whats(output: str) -> set[str]:
    return set(re.findall(r"\] (?:changed|would change) +(.+?): ", output))


def both_views(target, path: str) -> tuple[dict, dict]:
    """The environment a systemd unit gets from EnvironmentFile=path, and what sh's set -a gets."""
    script = (f"systemd-run --wait --pipe -q -p EnvironmentFile={path} /usr/bin/env -0 "
              f"| base64 -w0; echo; sh -c 'set -a; . {path}; env -0' | base64 -w0")
    views = []
    for encoded in target.sh(script).stdout.split():
        raw = base64.b64decode(encoded).decode()
        views.append(dict(item.split("=", 1) for item in raw.split("\0") if "=" in item))
    return views[0], views[1]


def app_env_expected(target) -> dict:
    return settings_mod.load(target.env_file).app_environment()


@pytest.fixture(scope="module")
def runs(target):
    """With the nasty secrets: check mode, then two provisions, a process sampler running."""
    target.write_env(**SECRETS)
    with ProcessSampler(target) as sampler:
        check = target.fab("provision", "--check")
        first = target.fab("provision")
        second = target.fab("provision")
    samples = sampler.text
    yield {"check": check, "first": first, "second": second, "samples": samples}
    target.write_env()


def test_second_provision_changes_nothing(runs):
    assert changed_count(runs["second"].stdout) == 0, runs["second"].stdout
    assert " 0 failed" in runs["second"].stdout


def test_no_secret_in_output_or_any_process_arguments(runs):
    assert "postgresql role" in runs["check"].stdout
    outputs = {name: res.stdout + res.stderr for name, res in runs.items() if name != "samples"}
    samples = runs["samples"]
    assert "/bin/sh -s" in samples and "psql -X" in samples, "the sampler saw nothing"
    for marker in MARKERS:
        for name, text in outputs.items():
            assert marker not in text, f"{marker} in the output of {name}"
        assert marker not in samples, f"{marker} in a process's arguments"
    for value in SECRETS.values():
        for form in (value, value.strip(), quote(value, safe="")):
            assert all(form not in text for text in outputs.values())
            assert form not in samples


def test_postgres_and_redis_listen_on_loopback_only(runs, target):
    lines = [line for line in target.sh("ss -ltnpH").stdout.splitlines()
             if '"postgres"' in line or '"redis-server"' in line]
    local = {line.split()[3] for line in lines}
    assert local == {"127.0.0.1:5432", "[::1]:5432", "127.0.0.1:6379", "[::1]:6379"}, lines


def test_role_logs_in_with_database_url_and_creates_a_table(runs, target):
    url = app_env_expected(target)["DATABASE_URL"]
    assert unquote(urlsplit(url).password) == SECRETS["DB_PASSWORD"]
    # On the host: DATABASE_URL from the shell's reading of the file; the password reaches
    # psql in its environment (never its arguments).
    script = f"""set -a; . {CONF}; set +a
python3 - <<'EOF'
import os, subprocess
from urllib.parse import unquote, urlsplit
u = urlsplit(os.environ["DATABASE_URL"])
env = dict(os.environ, PGPASSWORD=unquote(u.password))
sql = "CREATE TABLE IF NOT EXISTS fabstack_probe (n int); INSERT INTO fabstack_probe VALUES (1);"
sql += " SELECT current_user, count(*) FROM fabstack_probe;"
print(subprocess.run(["psql", "-X", "-At", "-h", u.hostname, "-p", str(u.port),
                      "-U", unquote(u.username), "-d", u.path[1:], "-c", sql],
                     env=env, capture_output=True, text=True, check=True).stdout)
EOF"""
    out = target.sh(script).stdout.split()
    assert out[-1].startswith(f"{APP}|"), out
    owner = target.sh("cd / && runuser -u postgres -- psql -X -At -d postgres -c "
                      f"\"SELECT pg_get_userbyid(datdba), pg_encoding_to_char(encoding) "
                      f"FROM pg_database WHERE datname = '{APP}'\"").stdout.strip()
    assert owner == f"{APP}|UTF8"


def test_systemd_and_the_shell_read_every_value_as_in_env(runs, target):
    expected = app_env_expected(target)
    assert expected["EXTRA_SECRET"] == SECRETS["APP_ENV_EXTRA_SECRET"]
    systemd, shell = both_views(target, CONF)
    for name, value in expected.items():
        assert systemd.get(name) == value, name
        assert shell.get(name) == value, name
    systemd, shell = both_views(target, CELERY_CONF)
    assert systemd["CELERYD_OPTS"] == shell["CELERYD_OPTS"] == "--time-limit=300 --concurrency=2"
    assert systemd["CELERYD_LOG_FILE"] == shell["CELERYD_LOG_FILE"] == "/var/log/celery/%n%I.log"


def test_files_and_who_may_read_them(runs, target):
    stat = target.sh(f"stat -c '%n %U %G %a' {CONF} {CELERY_CONF} /opt/{APP}/conf/pgpass "
                     "/etc/redis/redis.conf").stdout.splitlines()
    assert stat == [f"{CONF} root {APP} 640", f"{CELERY_CONF} root root 600",
                    f"/opt/{APP}/conf/pgpass root root 600",
                    "/etc/redis/redis.conf redis redis 640"]
    # systemd reads both for Celery's units (EnvironmentFile=); no account but the app's reads
    # the app's environment file
    for user in ("celery", "backups", "nobody"):
        assert target.sh(f"runuser -u {user} -- cat {CONF}", check=False).returncode != 0


def test_redis_settings(runs, target):
    got = target.sh("for k in bind protected-mode maxmemory maxmemory-policy; do "
                    "redis-cli --raw config get $k | tail -1; done").stdout.splitlines()
    assert got == ["127.0.0.1 ::1", "yes", str(256 * 1024 * 1024), "volatile-lru"]
    assert target.sh("systemctl is-enabled redis-server postgresql").stdout.split() == \
        ["enabled", "enabled"]


def pids(target) -> dict:
    out = target.sh("systemctl show -p MainPID --value redis-server; "
                    "head -1 /var/lib/postgresql/*/main/postmaster.pid").stdout.split()
    return {"redis": out[0], "postgres": out[1]}


def test_one_change_changes_exactly_what_depends_on_it(runs, target):
    before = pids(target)
    target.write_env(**{**SECRETS, "DB_PASSWORD": "Mk6new db pw'\"$\\#%@:/= "})
    res = target.fab("provision")
    assert changed_whats(res.stdout) == {f"postgresql role {APP}", f"file {CONF}",
                                         f"file /opt/{APP}/conf/pgpass",
                                         "file /var/lib/backups/.pgpass"}, res.stdout
    assert "Mk6new" not in res.stdout + res.stderr
    assert pids(target) == before

    target.write_env(**{**SECRETS, "DB_PASSWORD": "Mk6new db pw'\"$\\#%@:/= ",
                        "DJANGO_SECRET_KEY": "Mk7" + "n" * 60})
    res = target.fab("provision")
    assert changed_whats(res.stdout) == {f"file {CONF}"}, res.stdout

    target.write_env(**{**SECRETS, "DB_PASSWORD": "Mk6new db pw'\"$\\#%@:/= ",
                        "DJANGO_SECRET_KEY": "Mk7" + "n" * 60, "REDIS_MAXMEMORY": "128mb"})
    res = target.fab("provision")
    assert changed_whats(res.stdout) == {"file /etc/redis/redis.conf",
                                         "service redis-server.service"}, res.stdout
    assert "restarted (its configuration changed)" in res.stdout
    after = pids(target)
    assert after["redis"] != before["redis"] and after["postgres"] == before["postgres"]
    assert target.sh("redis-cli --raw config get maxmemory | tail -1").stdout.strip() == \
        str(128 * 1024 * 1024)
    assert changed_count(target.fab("provision").stdout) == 0


def test_password_changed_by_hand_is_set_back(runs, target):
    target.sh("cd / && runuser -u postgres -- psql -X -q -d postgres <<'EOF'\n"
              f"ALTER ROLE {APP} PASSWORD 'changed-by-hand';\nEOF")
    res = target.fab("provision")
    assert changed_whats(res.stdout) == {f"postgresql role {APP}"}, res.stdout
    assert f"postgresql role {APP}: password set (SCRAM)" in res.stdout
    login = target.sh(f"env PGPASSFILE=/opt/{APP}/conf/pgpass psql -X -At -h localhost "
                      f"-U {APP} -d {APP} -c 'SELECT current_user'")
    assert login.stdout.strip() == APP


def test_db_tasks_are_listed(target):
    res = target.fab("--list")
    for name in ("db.setup", "db.psql", "db.redis-cli"):
        assert name in res.stdout
