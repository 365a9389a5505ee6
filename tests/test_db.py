"""db over the fake connection: resources as data, SCRAM, SQL quoting, the env-file format, PGDG."""

import io
import re
from types import SimpleNamespace
from urllib.parse import unquote, urlsplit

import pytest
from dotenv import dotenv_values

from sandbox.tasks import dotenv_quote
from tasks import db, inventory
from tasks import settings as settings_mod
from tasks.primitives import (
    AptUpdate,
    Change,
    Directory,
    File,
    Group,
    Ok,
    Packages,
    Service,
    User,
    ensure,
    render,
)
from tasks.primitives.templates import env_quote
from tests.conftest import VALID
from tests.fake import owned_answer

# Verifiers made by PostgreSQL 15 itself (ALTER ROLE ... PASSWORD with scram-sha-256) for
# passwords that take every path of SASLprep: ASCII as is, NFKC-normalised (U+2168 -> IX),
# mapped to nothing (soft hyphen) and prohibited (U+200E: used raw).
PG15_VERIFIERS = {
    "pencil": "SCRAM-SHA-256$4096:3cMh3aDNl38BYRVTtNUcBg==$OyIPU7qYtFOvA7aTRIuLUh4zDUxf8dNkSE"
              "PkPcTRHDg=:BWzIjB4hDy98uvVA64Xav04nJKoJBBkbJi3jsC74+q4=",
    "p\u00e4ssw\u00f6rd \u2168": "SCRAM-SHA-256$4096:tgFQlylg5qeasde6hDCf/Q==$iZDATO3XEZT4h/O1"
                                 "BJiC+UZwpfdYl2clXmz49ux2nJg=:Tjq/nNgXWi3dcbu470YFi0+DcwjOqZt"
                                 "MFmm98p7H2GM=",
    "soft\u00adhyphen x": "SCRAM-SHA-256$4096:s7Rrz5Q0kekPNEowpQw+mA==$oFTdUSftQagDVf5bU3m2sGo+"
                          "wyb/6dBwwa9XSPFewF0=:ixe57qrVxCcPpGDcKAezTCzKK214dgKlHxXLAC63SOk=",
    "a\u200eb": "SCRAM-SHA-256$4096:BW2MBTE6lWPtoPaQKS801g==$3ZGHcIjdTgXeUoGKymhXBDpd1ss5IHAog"
                "N4t75e8N7Y=:8rnPE0nmPpxh2Z5G47/UOLnkBCuyiy1HTvIVkPJ3j/I=",
}

# Every character the issue lists, plus a newline, non-ASCII and a trailing space.
NASTY = "it's \"q\" $HOME ${X} `id` $(id) \\n\\ #c %41 @h:p/x =v\nline2 \u00fc "


def make_settings(**overrides):
    return settings_mod.parse({**VALID, **overrides})


# -- SCRAM and SQL -------------------------------------------------------------------------

@pytest.mark.parametrize("password", PG15_VERIFIERS)
def test_scram_verification_agrees_with_postgresql(password):
    verifier = PG15_VERIFIERS[password]
    assert db.scram_matches(password, verifier)
    assert not db.scram_matches(password + "x", verifier)


def test_scram_verifier_round_trip_and_foreign_hashes():
    verifier = db.scram_verifier(NASTY)
    assert verifier.startswith("SCRAM-SHA-256$4096:")
    assert db.scram_matches(NASTY, verifier) and not db.scram_matches("other", verifier)
    assert db.scram_verifier(NASTY) != verifier  # a fresh salt every time
    assert not db.scram_matches("pencil", "md5a0e8c2b8e3cb7bd0c8e0ce4b0a4f1e11")
    assert not db.scram_matches("pencil", "")


def test_sql_quoting():
    assert db.sql_ident('we"ird') == '"we""ird"'
    assert db.sql_literal("it's") == "'it''s'"
    script = db.sql_script("SELECT 1;")
    assert "<<'FABSTACK_SQL'\nSELECT 1;\nFABSTACK_SQL\n" in script
    assert " -c " not in script and "runuser -u postgres -- psql -X" in script


# -- resources as data: probe output in, change or ok out ----------------------------------

ROLE_OK = f"t|{PG15_VERIFIERS['pencil']}"


@pytest.mark.parametrize("resource, state, expect", [
    (db.PostgresSetting("listen_addresses", "localhost"), "localhost|f|localhost\n",
     Ok("'localhost'")),
    (db.PostgresSetting("listen_addresses", "localhost"), "*|f|*\n",
     "'*' -> 'localhost' (restarted)"),
    (db.PostgresSetting("listen_addresses", "localhost"), "localhost|t|localhost\n",
     "restarted (a change of it was pending)"),
    (db.PostgresSetting("listen_addresses", "localhost"), "localhost|t|*\n",
     "'*' was waiting for a restart: set back to 'localhost' (no restart)"),
    (db.PostgresSetting("listen_addresses", "localhost"), "unavailable\n",
     "unknown, PostgreSQL not running -> 'localhost' (restarted)"),
    (db.PostgresRole("app", "pencil"), ROLE_OK, Ok("can log in, SCRAM password up to date")),
    (db.PostgresRole("app", "pencil"), "", "created (login, SCRAM password)"),
    (db.PostgresRole("app", "pencil"), "unavailable\n", "created (login, SCRAM password)"),
    (db.PostgresRole("app", "pencil2"), ROLE_OK, "password set (SCRAM)"),
    (db.PostgresRole("app", "pencil"), "t|md5a0e8c2b8e3cb7bd0c8e0ce4b0a4f1e11",
     "password set (SCRAM)"),
    (db.PostgresRole("app", "pencil"), "f|" + PG15_VERIFIERS["pencil"], "login enabled"),
    (db.PostgresRole("app", "pencil"), "f|", "login enabled, password set (SCRAM)"),
    (db.PostgresDatabase("app", "app"), "app|UTF8\n", Ok("UTF8, owner app")),
    (db.PostgresDatabase("app", "app"), "", "created (UTF8, owner app)"),
    (db.PostgresDatabase("app", "app"), "postgres|UTF8\n", "owner postgres -> app"),
    (db.PostgresDatabase("app", "app"), "app|SQL_ASCII\n",
     "has encoding SQL_ASCII, not UTF8: cannot fix (dump, recreate and restore it)"),
])
def test_resource_case(resource, state, expect):
    outcome = resource.plan(state, SimpleNamespace(check=False))
    if isinstance(expect, Ok):
        assert outcome == expect
    else:
        assert isinstance(outcome, Change) and outcome.message == expect


def test_role_sql_carries_a_verifier_never_the_password():
    password = "pw'; DROP ROLE x; --\"$"
    change = db.PostgresRole('we"ird', password).plan("", None)
    assert password not in change.script
    sql = re.search(r"<<'FABSTACK_SQL'\n(.*)\nFABSTACK_SQL", change.script, re.S)[1]
    m = re.fullmatch(r"CREATE ROLE \"we\"\"ird\" LOGIN PASSWORD '(SCRAM-SHA-256\$[^']+)';", sql)
    assert m and db.scram_matches(password, m[1])
    change = db.PostgresDatabase("d'b", 'o"wn').plan("", None)
    assert "CREATE DATABASE \"d'b\" OWNER \"o\"\"wn\" ENCODING 'UTF8' TEMPLATE template0;" \
        in change.script
    probe = db.PostgresRole("o'k", "x").probe()
    assert "WHERE rolname = 'o''k';" in probe and probe.endswith("|| echo unavailable")


# -- the env-file format ---------------------------------------------------------------------

def read_double_quoted(line: str) -> tuple[str, str]:
    """A model of how both systemd's EnvironmentFile= and sh read NAME="...": a backslash
    escapes \\ " $ ` and is kept before anything else; an unescaped $ or ` would make the
    readers differ (sh expands, systemd does not), so the model refuses it."""
    name, rest = line.split("=", 1)
    assert rest[0] == '"' and rest[-1] == '"', line
    body, out, i = rest[1:-1], [], 0
    while i < len(body):
        c = body[i]
        if c == "\\" and i + 1 < len(body):
            nxt = body[i + 1]
            out.append(nxt if nxt in '\\"$`' else c + nxt)
            i += 2
            continue
        assert c not in '"$`', f"unescaped {c!r} in {line!r}"
        out.append(c)
        i += 1
    return name, "".join(out)


def parse_env_file(text: str) -> dict[str, str]:
    """Split the file into NAME="..." assignments (values may span lines) and read each."""
    assignments = re.findall(r'^([A-Za-z_][A-Za-z0-9_]*="(?:[^"\\]|\\.)*")$', text, re.M | re.S)
    return dict(read_double_quoted(a) for a in assignments)


@pytest.mark.parametrize("value", [NASTY, "", " ", "\\", '"', "'", "$", "#", "=", "a\\", "x "])
def test_env_quote_reads_back_the_same_in_both_readers(value):
    assert read_double_quoted("K=" + env_quote(value)) == ("K", value)


def test_app_env_file_holds_every_value_as_is():
    s = make_settings(DB_PASSWORD=NASTY, DJANGO_SECRET_KEY=NASTY * 3, MAILGUN_API_KEY=NASTY,
                      INFLUX_TOKEN=NASTY, APP_ENV_SENTRY_DSN=NASTY, APP_ENV_EMPTY="")
    text = render("app.conf.j2", s)
    parsed = parse_env_file(text)
    expected = s.app_environment()
    assert parsed == expected
    assert set(expected) == set(settings_mod.MANAGED_ENV) | {"SENTRY_DSN", "EMPTY"}
    assert expected["DJANGO_ALLOWED_HOSTS"] == "example.com,www.example.com"
    assert expected["PYTHONPATH"] == "/opt/ratemyderp/app"


def test_database_url_percent_encodes_every_part():
    s = make_settings(DB_PASSWORD=NASTY, DB_USER="app_user", DB_NAME="app-db")
    url = urlsplit(s.database_url())
    assert (url.scheme, url.hostname, url.port, url.path, url.query) == (
        "postgres", "localhost", 5432, "/app-db", "")
    assert unquote(url.username) == "app_user" and unquote(url.password) == NASTY
    assert s.database_url().count("@") == 1 and s.database_url().count(":") == 3
    s = make_settings(APP_NAME="shop")
    assert s.database_url().startswith("postgres://shop:") and s.database_url().endswith("/shop")
    remote = urlsplit(s.database_url("10.0.0.13"))  # another host's: over TLS
    assert (remote.hostname, remote.query) == ("10.0.0.13", "sslmode=require")


def test_redis_urls_carry_the_password_on_a_spread_site():
    s = make_settings(REDIS_PASSWORD=NASTY, APP_NAME="shop")
    assert s.redis_url(0) == "redis://localhost:6379/0"
    url = urlsplit(s.redis_url(1, "10.0.0.13", auth=True))
    assert (url.hostname, url.port, url.path) == ("10.0.0.13", 6379, "/1")
    assert (unquote(url.username), unquote(url.password)) == ("shop", NASTY)


def test_a_spread_site_points_the_app_at_its_database_and_redis_hosts():
    entries = inventory.load({"fabstack": {"hosts": {
        "app": {"ssh": "a", "private": "10.0.0.11", "roles": ["lb", "web", "worker"]},
        "data": {"ssh": "d", "private": "10.0.0.13", "roles": ["db", "redis"]}}}})
    s = make_settings(REDIS_PASSWORD="r" * 16)
    env = s.app_environment(inventory.site_of(entries, "a"))
    assert env["DATABASE_URL"] == s.database_url("10.0.0.13")
    assert env["CELERY_BROKER_URL"] == s.redis_url(0, "10.0.0.13", auth=True)
    assert env["REDIS_URL"] == s.redis_url(1, "10.0.0.13", auth=True)
    whole = s.app_environment(inventory.Site.alone("a"))
    assert whole == s.app_environment() and whole["REDIS_URL"] == "redis://localhost:6379/1"


def test_dotenv_quote_of_the_sandbox_settings_round_trips():
    """sandbox.write_settings and the tests' .env files quote so (a single quote broke the
    sandbox's file before)."""
    values = [NASTY, "", "\\", '"', "it's", "${HOME} $x #no comment"]
    text = "".join(f"K{i}={dotenv_quote(v)}\n" for i, v in enumerate(values))
    assert list(dotenv_values(stream=io.StringIO(text), interpolate=False).values()) == values


# -- settings: the APP_ENV_ convention and the new keys -------------------------------------

def test_extras_convention():
    s = make_settings(APP_ENV_SENTRY_DSN="https://k@sentry.example.com/1", APP_ENV_X="")
    assert s.extras == {"SENTRY_DSN": "https://k@sentry.example.com/1", "X": ""}
    assert "https://k@sentry.example.com/1" in s.secrets
    with pytest.raises(settings_mod.SettingsError) as err:
        make_settings(**{"APP_ENV_DATABASE_URL": "x", "APP_ENV_BAD-NAME": "y"})
    assert "APP_ENV_DATABASE_URL: DATABASE_URL is set by fabstack itself" in str(err.value)
    assert "APP_ENV_BAD-NAME: 'BAD-NAME' is not a valid" in str(err.value)


@pytest.mark.parametrize("key, value", [
    ("DB_PASSWORD", "short"), ("DJANGO_SECRET_KEY", "x" * 49), ("DB_NAME", "Bad Name"),
    ("POSTGRES_VERSION", "9"), ("REDIS_MAXMEMORY", "lots"), ("REDIS_MAXMEMORY_POLICY", "lru"),
    ("DJANGO_ADMIN_URL", "/admin"), ("DJANGO_SECURE_SSL_REDIRECT", "maybe"),
    ("MAILGUN_DOMAIN", "nodots"), ("INFLUX_URL", "influx:8086"), ("CELERY_CONCURRENCY", "0"),
    ("DB_PASSWORD", "sixteen-chars-\0x"),
])
def test_bad_values_are_named(key, value):
    with pytest.raises(settings_mod.SettingsError, match=f"{key}:"):
        make_settings(**{key: value})


def test_secret_keys_are_masked():
    s = make_settings(MAILGUN_API_KEY="mg-key-123", INFLUX_TOKEN="influx-token-1")
    assert {VALID["DB_PASSWORD"], VALID["DJANGO_SECRET_KEY"], "mg-key-123",
            "influx-token-1"} <= set(s.secrets)


# -- the step over the fake connection --------------------------------------------------------

def converged(resource) -> str:
    """What the probe of ``resource`` prints on a host where it is already right."""
    if isinstance(resource, AptUpdate):
        return "100 100"
    if isinstance(resource, Packages):
        return "".join(f"{name} ii \n" for name in resource.names)
    if isinstance(resource, Service):
        return "LoadState=loaded\nUnitFileState=enabled\nActiveState=active\nNeedDaemonReload=no\n"
    if isinstance(resource, db.PostgresSetting):
        return f"{resource.value}|f\n"
    if isinstance(resource, db.PostgresRole):
        return f"t|{db.scram_verifier(resource.password)}\n"
    if isinstance(resource, db.PostgresDatabase):
        return f"{resource.owner}|UTF8\n"
    if isinstance(resource, File):
        return f"regular file|{resource.owner}|{resource.group}|{resource.mode:o}\n" \
               f"{resource.digest}\n\n"
    if isinstance(resource, Group):
        return f"{resource.name}:x:990:\n"
    if isinstance(resource, User):
        return (f"{resource.name}:x:990:990::{resource.home}:{resource.shell}\n"
                f"groups {resource.group} {' '.join(resource.groups)}\ngid 990\npassword !\n")
    if isinstance(resource, Directory):
        return f"directory|{resource.owner}|{resource.group}|{resource.mode:o}\n"
    raise AssertionError(f"no converged state for {resource!r}")


def fresh(resource) -> str:
    """What the probe of ``resource`` prints on a host that has none of it yet."""
    if isinstance(resource, (AptUpdate, Service, db.PostgresSetting)):
        return converged(resource)  # lists fresh, units running, defaults of a new cluster
    if isinstance(resource, (File, Directory)):
        return "missing\n"
    return ""


def answers_for(resources, **states):
    """Fake answers: each probe (or query, read in the joint psql session) gets its converged
    state, or ``states[what]``."""
    return [(re.escape(r.sql) if isinstance(r, db.PostgresResource)
             else "^" + re.escape(r.probe()) + "$", states.get(r.what, converged(r)))
            for r in resources] + [owned_answer(resources)]


def host_for(make_host, settings, answers=(), check=False):
    host, conn = make_host(answers, check=check)
    host.settings = settings
    host._secrets = sorted(settings.secrets, key=len, reverse=True)
    return host, conn


def test_converged_host_one_round_trip_no_change(make_host, settings):
    host, conn = host_for(make_host, settings)
    resources = db.db_resources(host)
    conn.answers = answers_for(resources)
    assert ensure(host, *resources) == 0
    assert host.round_trips == 1 and conn.applied == []


def test_fresh_host_order_secrets_and_one_redis_restart(make_host, capsys):
    s = make_settings(DB_PASSWORD=NASTY, DJANGO_SECRET_KEY=NASTY * 3)
    host, conn = host_for(make_host, s)
    resources = db.db_resources(host)
    conn.answers = answers_for(resources, **{r.what: fresh(r) for r in resources})
    conn.answers.insert(0, (r"redis-server\.service", "LoadState=loaded\nUnitFileState="
                            "enabled\nActiveState=active\npending=restart\n"))
    ensure(host, *resources)
    assert set(conn.commands) == {"timeout -k 5 300 nice -n 10 /bin/sh -s",
                                 "timeout -k 5 1800 nice -n 10 /bin/sh -s"}
    applied = "\n".join(conn.applied)
    assert applied.count("systemctl restart -- redis-server.service") == 1
    assert "apt-get -q -y" in applied and "install -- postgresql redis-server" in applied
    for secret in (NASTY, NASTY.strip()):
        assert secret not in applied  # files travel base64-encoded, the role as a verifier
    out = capsys.readouterr().out
    assert "line2" not in out and "$(id)" not in out
    assert "ratemyderp.conf: created (root:ratemyderp 0640)\n[" in out  # no diff: secret
    assert "changed      file /opt/ratemyderp/conf/celery.conf: created" in out


def test_check_mode_shows_no_secret(make_host, capsys):
    s = make_settings(DB_PASSWORD="check-mode-password-1", MAILGUN_API_KEY="mailgun-key-1")
    host, conn = host_for(make_host, s, check=True)
    resources = db.db_resources(host)
    conn.answers = answers_for(resources, **{r.what: fresh(r) for r in resources})
    assert ensure(host, *resources) > 5 and conn.applied == []
    out = capsys.readouterr().out
    assert "would change postgresql role ratemyderp: created" in out
    assert "check-mode-password-1" not in out and "mailgun-key-1" not in out
    assert "check-mode-password-1".replace("-", "%2D") not in out


def test_pgdg_repository_with_signed_by_key(make_host):
    s = make_settings(POSTGRES_VERSION="16")
    host, conn = host_for(make_host, s)
    conn.answers = [(r"^cat /etc/os-release$", "ID=debian\nVERSION_CODENAME=bookworm\n")]
    resources = db.db_resources(host)
    names = [r.what for r in resources]
    assert names[:4] == ["apt key pgdg", "file /etc/apt/sources.list.d/pgdg.sources", "apt lists",
                         "packages postgresql-16 redis-server"]
    conn.answers += [(r"keyrings/pgdg\.asc", ""), (r"pgdg\.sources", "missing\n"),
                     (r"apt-lists-updated", "100 100 due"), (r"dpkg-query", "")]
    ensure(host, *resources[:4])
    applied = "\n".join(conn.applied)
    assert "apt-helper download-file https://www.postgresql.org/media/keys/ACCC4CF8.asc " \
           "/etc/apt/keyrings/pgdg.asc.part" in applied
    source = resources[1].content.decode()
    assert source == ("Types: deb\nURIs: https://apt.postgresql.org/pub/repos/apt\n"
                      "Suites: bookworm-pgdg\nComponents: main\n"
                      "Signed-By: /etc/apt/keyrings/pgdg.asc\n")
    assert "apt-get -q update" in applied
    assert "install -- postgresql-16 redis-server" in applied
    assert " postgresql redis-server" not in applied


def test_redis_and_celery_conf_render_from_settings():
    s = make_settings(REDIS_MAXMEMORY="1gb", REDIS_MAXMEMORY_POLICY="allkeys-lru",
                      CELERY_CONCURRENCY="4", CELERY_TIME_LIMIT="60")
    redis = render("redis.conf.j2", s)
    for line in ("bind 127.0.0.1 ::1", "protected-mode yes", "maxmemory 1gb",
                 "maxmemory-policy allkeys-lru"):
        assert line in redis.splitlines()
    celery = parse_env_file(render("celery.conf.j2", s))
    assert celery["CELERYD_OPTS"] == "--time-limit=60 --concurrency=4"
    assert celery["CELERY_BIN"] == "/opt/ratemyderp/venv/bin/celery"
    assert celery["CELERY_APP"] == "config.celery_app"


def test_pgpass_line_escapes_colons_and_backslashes():
    assert db.pgpass_line("u", "d", "a:b\\c") == "localhost:*:d:u:a\\:b\\\\c\n"


def test_postgres_resources_are_read_in_one_psql_session(make_host, settings):
    host, conn = host_for(make_host, settings)
    resources = [db.PostgresRole("app", "pencil"), Directory("/opt/a"),
                 db.PostgresDatabase("app", "app"), db.PostgresSetting("listen_addresses", "lo")]
    conn.answers = answers_for(resources)
    assert ensure(host, *resources) == 0
    assert conn.scripts[0].count("psql") == 1 and host.round_trips == 1


def test_joint_psql_reads_unanswered_queries_as_unavailable():
    joint = db.JointPsql()
    # the second query failed (psql stopped, the snippet said so), the third never ran
    out = f"{joint.MARK}0\nt|x\n{joint.MARK}1\nunavailable\n"
    assert joint.split(out, 3) == ["t|x\n", "unavailable\n", "unavailable\n"]
    assert joint.split("unavailable\n", 2) == ["unavailable\n"] * 2  # server down


def test_pg_hba_lines_live_between_markers_at_the_end():
    s = make_settings(APP_NAME="shop")
    lines = db.hba_lines(s, ["10.0.0.11", "10.0.0.12"])
    assert lines == ('hostssl "shop" "shop" 10.0.0.11/32 scram-sha-256\n'
                     'hostssl "shop" "shop" 10.0.0.12/32 scram-sha-256\n')
    hba = db.PgHba("app hosts", lines)
    path = "/etc/postgresql/15/main/pg_hba.conf"
    stock = "local all postgres peer\nhost all all 127.0.0.1/32 scram-sha-256\n"
    ours = f"{stock}{hba.begin}\n{lines}{hba.end}\n"
    host = SimpleNamespace(check=False)
    written = hba.plan(f"{path}|f|{stock}", host)
    assert isinstance(written, Change) and written.message == f"written in {path} (2 lines)"
    assert "pg_reload_conf()" in written.script and "pg_hba_file_rules" in written.script
    assert hba.plan(f"{path}|f|{ours}", host).message == f"2 in {path}"
    assert hba.plan(f"{path}|t|{ours}", host).message.startswith("written again")
    changed = db.PgHba("app hosts", lines.splitlines(keepends=True)[0]).plan(
        f"{path}|f|{ours}", host)
    assert changed.message == f"changed in {path} (1 line)"
    removed = db.PgHba("app hosts", "").plan(f"{path}|f|{ours}", host)
    assert removed.message == f"removed from {path}"
    assert db.PgHba("app hosts", "").plan(f"{path}|f|{stock}", host).message == "none"
