"""Data tier: PostgreSQL, Redis and the app's environment files (/opt/APP/conf).

``fab db`` (``db.setup``) installs PostgreSQL (the distro's, or POSTGRES_VERSION from the
PostgreSQL apt repository) on localhost only, with the app's UTF-8 database owned by its login
role; Redis on loopback with protected mode and a memory limit; the ``celery`` account; the
app's environment file and Celery's. No secret is on a command line: SQL reaches ``psql`` on
its standard input, and the role's password goes as a SCRAM verifier computed here. The
password of .env is checked against the verifier PostgreSQL stores, so a password changed in
.env or on the host is set again on the next run, and only then. ``db.psql`` and
``db.redis-cli`` open a session for ad hoc work.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import os
import re
import stringprep
import unicodedata

from fabric import task

from .celery import units as celery_units
from .host import converging_task, session
from .layout import CELERY_HOME
from .primitives import (
    AptUpdate,
    Change,
    Directory,
    File,
    Group,
    Ok,
    Packages,
    Resource,
    Service,
    User,
    apt_repository,
    claim_script,
    q,
    render,
)
from .python import os_release

PGDG_URI = "https://apt.postgresql.org/pub/repos/apt"
PGDG_KEY = "https://www.postgresql.org/media/keys/ACCC4CF8.asc"
SCRAM_ITERATIONS = 4096


# -- SQL over stdin ----------------------------------------------------------------------

def sql_ident(name: str) -> str:
    """``name`` as a quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def sql_literal(value: str) -> str:
    """``value`` as a quoted SQL string literal (standard_conforming_strings, always on)."""
    return "'" + value.replace("'", "''") + "'"


def sql_script(sql: str, options: str = "-q -v ON_ERROR_STOP=1") -> str:
    """Shell that runs ``sql`` as the postgres superuser, the SQL on psql's stdin (a heredoc)."""
    return (f"( cd / && runuser -u postgres -- psql -X {options} -d postgres <<'FABSTACK_SQL'\n"
            f"{sql}\nFABSTACK_SQL\n)")


def psql_probe(sql: str) -> str:
    """A probe snippet: the rows of ``sql`` (unaligned, ``|``-separated), or ``unavailable``."""
    return sql_script(sql, "-At -v ON_ERROR_STOP=1") + " 2>/dev/null || echo unavailable"


class JointPsql:
    """Reads several :class:`PostgresResource` in one psql session (a ``joint`` probe).

    Each query's rows follow a marker line; a query psql did not answer (the server is down,
    or an earlier query failed) reads as ``unavailable``, as it does alone.
    """

    MARK = "@@fabstack-sql@@"

    def probe(self, resources) -> str:
        return psql_probe("".join(f"\\echo {self.MARK}{i}\n{r.sql}\n"
                                  for i, r in enumerate(resources)))

    def split(self, output: str, n: int) -> list[str]:
        answers = {}
        for part in output.split(self.MARK)[1:]:
            index, _, rows = part.partition("\n")
            answers[int(index)] = rows
        return [answers.get(i, "unavailable\n") for i in range(n)]


class PostgresResource(Resource):
    """A resource read with one SQL query, ``sql``, run by the postgres superuser.

    In one :func:`ensure`, all of them are read in a single psql session.
    """

    joint = JointPsql()
    sql: str  # the query; its rows are the state plan() reads

    def probe(self) -> str:
        return psql_probe(self.sql)

    def exists(self, state: str) -> bool:
        """A row answered: the object exists (PostgreSQL not running reads as missing)."""
        return state.strip() not in ("", "unavailable")


# -- SCRAM-SHA-256 verifiers, as PostgreSQL stores them ------------------------------------

def _prohibited(c: str) -> bool:
    return any(check(c) for check in (
        stringprep.in_table_c12, stringprep.in_table_c21, stringprep.in_table_c22,
        stringprep.in_table_c3, stringprep.in_table_c4, stringprep.in_table_c5,
        stringprep.in_table_c6, stringprep.in_table_c7, stringprep.in_table_c8,
        stringprep.in_table_c9, stringprep.in_table_a1))


def saslprep(password: str) -> bytes:
    """The password bytes SCRAM hashes, normalised like PostgreSQL's pg_saslprep (RFC 4013).

    ASCII passes as it is; a password SASLprep prohibits is used raw, as PostgreSQL does.
    """
    raw = password.encode()
    if password.isascii():
        return raw
    mapped = "".join("" if stringprep.in_table_b1(c) else " " if stringprep.in_table_c12(c)
                     else c for c in password)
    text = unicodedata.ucd_3_2_0.normalize("NFKC", mapped)
    if not text or any(_prohibited(c) for c in text):
        return raw
    if any(stringprep.in_table_d1(c) for c in text) and (
            any(stringprep.in_table_d2(c) for c in text)
            or not (stringprep.in_table_d1(text[0]) and stringprep.in_table_d1(text[-1]))):
        return raw
    return text.encode()


def scram_verifier(password: str, salt: bytes | None = None,
                   iterations: int = SCRAM_ITERATIONS) -> str:
    """``SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`` for ``password``."""
    salt = os.urandom(16) if salt is None else salt
    salted = hashlib.pbkdf2_hmac("sha256", saslprep(password), salt, iterations)
    stored = hashlib.sha256(hmac.new(salted, b"Client Key", "sha256").digest()).digest()
    server = hmac.new(salted, b"Server Key", "sha256").digest()
    b64 = [base64.b64encode(part).decode() for part in (salt, stored, server)]
    return f"SCRAM-SHA-256${iterations}:{b64[0]}${b64[1]}:{b64[2]}"


def scram_matches(password: str, verifier: str) -> bool:
    """True when ``verifier`` (from pg_authid.rolpassword) is a SCRAM verifier of ``password``."""
    m = re.fullmatch(r"SCRAM-SHA-256\$(\d+):([A-Za-z0-9+/=]+)\$[A-Za-z0-9+/=]+:[A-Za-z0-9+/=]+",
                     verifier)
    if not m:
        return False
    mine = scram_verifier(password, base64.b64decode(m[2]), int(m[1]))
    return hmac.compare_digest(mine.encode(), verifier.encode())


# -- resources ---------------------------------------------------------------------------

class PostgresSetting(PostgresResource):
    """A server setting that takes effect on restart (``listen_addresses``), set with ALTER SYSTEM.

    The server is restarted once when the setting changed, or when our value is written but
    still waiting for a restart (a run that died between the two). A different value waiting
    for a restart (someone's ALTER SYSTEM) is overwritten with ours, without a restart.
    """

    def __init__(self, name: str, value: str):
        self.name, self.value = name, value
        self.what = f"postgresql {name}"

    @property
    def sql(self) -> str:
        # running value | waiting for a restart? | the value a restart would give
        return ("SELECT s.setting, s.pending_restart, coalesce((SELECT f.setting "
                "FROM pg_file_settings f WHERE f.name = s.name "
                "ORDER BY f.seqno DESC LIMIT 1), s.boot_val) FROM pg_settings s "
                f"WHERE s.name = {sql_literal(self.name)};")

    def plan(self, state, host):
        setting, pending, waiting = (state.strip().split("|") + ["", ""])[:3]
        restart = "systemctl restart postgresql.service"
        alter = sql_script(f"ALTER SYSTEM SET {self.name} = {sql_literal(self.value)};")
        if setting == self.value and pending != "t":
            return Ok(f"{self.value!r}")
        if setting == self.value and waiting == self.value:
            return Change("restarted (a change of it was pending)", restart)
        if setting == self.value:
            return Change(f"{waiting!r} was waiting for a restart: set back to {self.value!r} "
                          "(no restart)", alter + "\n" + sql_script("SELECT pg_reload_conf();"))
        was = "unknown, PostgreSQL not running" if setting == "unavailable" else repr(setting)
        return Change(f"{was} -> {self.value!r} (restarted)", f"{alter}\n{restart}")


class PostgresRole(PostgresResource):
    """A login role whose password is ``password``, stored as a SCRAM-SHA-256 verifier.

    The verifier is computed here and sent on psql's stdin: the clear password reaches
    neither a command line nor the server (nor its logs).
    """

    def __init__(self, name: str, password: str):
        self.name, self.password = name, password
        self.what = f"postgresql role {name}"
        self.claim = f"role {name}"

    @property
    def sql(self) -> str:
        return ("SELECT rolcanlogin, coalesce(rolpassword, '') FROM pg_authid "
                f"WHERE rolname = {sql_literal(self.name)};")

    def plan(self, state, host):
        password = f"PASSWORD {sql_literal(scram_verifier(self.password))}"
        if not self.exists(state):
            return Change("created (login, SCRAM password)", claim_script(self.claim) + sql_script(
                f"CREATE ROLE {sql_ident(self.name)} LOGIN {password};"))
        can_login, _, verifier = state.strip().partition("|")
        fixes = [] if can_login == "t" else ["login enabled"]
        if not scram_matches(self.password, verifier):
            fixes.append("password set (SCRAM)")
        if not fixes:
            return Ok("can log in, SCRAM password up to date")
        return Change(", ".join(fixes),
                      sql_script(f"ALTER ROLE {sql_ident(self.name)} LOGIN {password};"))


class PostgresDatabase(PostgresResource):
    """A UTF-8 database owned by ``owner`` (so the owner's migrations can create tables)."""

    def __init__(self, name: str, owner: str):
        self.name, self.owner = name, owner
        self.what = f"postgresql database {name}"
        self.claim = f"database {name}"

    @property
    def sql(self) -> str:
        return ("SELECT pg_get_userbyid(datdba), pg_encoding_to_char(encoding) "
                f"FROM pg_database WHERE datname = {sql_literal(self.name)};")

    def plan(self, state, host):
        db, owner = sql_ident(self.name), sql_ident(self.owner)
        if not self.exists(state):
            return Change(f"created (UTF8, owner {self.owner})", claim_script(self.claim)
                          + sql_script(f"CREATE DATABASE {db} OWNER {owner} ENCODING 'UTF8' "
                                       "TEMPLATE template0;"))
        have_owner, _, encoding = state.strip().partition("|")
        if encoding != "UTF8":
            return Change(f"has encoding {encoding}, not UTF8: cannot fix (dump, recreate "
                          "and restore it)",
                          f"echo {q(self.name)} has encoding {q(encoding)}, not UTF8 >&2; exit 1")
        if have_owner != self.owner:
            return Change(f"owner {have_owner} -> {self.owner}",
                          sql_script(f"ALTER DATABASE {db} OWNER TO {owner};"))
        return Ok(f"UTF8, owner {self.owner}")


class PgHba(PostgresResource):
    """Lines of PostgreSQL's pg_hba.conf between fabstack's markers (``what`` names them), at
    its end: added, changed or removed (no lines: no block) with the rest of the file left as
    it is; the file is checked by PostgreSQL (pg_hba_file_rules) before the reload that makes
    it count, and put back as it was if it would not load. The file as it was stays beside it
    (``.fabstack-old``) until the reload: a run that stopped before it is finished by the next.
    """

    def __init__(self, what: str, lines: str):
        self.lines = lines
        self.what = f"pg_hba.conf lines: {what}"
        self.begin = f"# BEGIN fabstack: {what} (managed: edits are overwritten)"
        self.end = f"# END fabstack: {what}"

    @property
    def sql(self) -> str:
        return ("SELECT current_setting('hba_file'), pg_stat_file(current_setting('hba_file') "
                "|| '.fabstack-old', true) IS NOT NULL, pg_read_file(current_setting('hba_file'));")

    def _block(self, text: str) -> str | None:
        """The lines between the markers in ``text`` (None: no markers)."""
        lines = text.splitlines(keepends=True)
        if self.begin + "\n" not in lines:
            return None
        start = lines.index(self.begin + "\n") + 1
        end = next((i for i in range(start, len(lines)) if lines[i].rstrip("\n") == self.end),
                   len(lines))
        return "".join(lines[start:end])

    def plan(self, state, host):
        if not self.exists(state):  # PostgreSQL not running: the path is asked when written
            return Change("written", self.script(None)) if self.lines else Ok("none")
        path, unfinished, text = state.split("|", 2)
        have = self._block(text)
        count = len(self.lines.splitlines())
        if unfinished == "t":
            return Change(f"written again in {path} and reloaded (a run stopped before its "
                          "reload)", self.script(path))
        if have == self.lines or (have is None and not self.lines):
            return Ok(f"{count} in {path}" if count else "none")
        if not self.lines:
            return Change(f"removed from {path}", self.script(path))
        verb = "written" if have is None else "changed"
        return Change(f"{verb} in {path} ({count} line{'s' if count > 1 else ''})",
                      self.script(path))

    def script(self, path: str | None) -> str:
        """Shell: the block replaced in the file, checked, reloaded (or the file put back)."""
        block = f"{self.begin}\n{self.lines}{self.end}\n" if self.lines else ""
        hba = (q(path) if path else
               "\"$(runuser -u postgres -- psql -X -At -d postgres -c 'SHOW hba_file')\"")
        return (f"f={hba}\ncp -p \"$f\" \"$f.fabstack-old\"\n"
                f"awk -v b={q(self.begin)} -v e={q(self.end)} "
                "'$0 == b {skip = 1} !skip {print} $0 == e {skip = 0}' \"$f.fabstack-old\" "
                "> \"$f.fabstack-new\"\n"
                f"printf '%s' {q(block)} >> \"$f.fabstack-new\"\n"
                "cat \"$f.fabstack-new\" > \"$f\"\nrm -f \"$f.fabstack-new\"\n"
                + "errors=$( " + sql_script("SELECT count(*) FROM pg_hba_file_rules WHERE error "
                                           "IS NOT NULL;", "-At") + " )\n"
                "if [ \"$errors\" != 0 ]; then\n"
                "    cat \"$f.fabstack-old\" > \"$f\"; rm -f \"$f.fabstack-old\"\n"
                "    echo \"$f would not load ($errors bad lines): put back as it was\" >&2\n"
                "    exit 1\nfi\nrm -f \"$f.fabstack-old\"\n"
                + sql_script("SELECT pg_reload_conf();", "-q -At -v ON_ERROR_STOP=1")
                + " >/dev/null")


# -- the step ----------------------------------------------------------------------------

def pgpass_line(user: str, database: str, password: str) -> str:
    """A libpq password file line for ``user`` on ``database`` at localhost (any port)."""
    def esc(value: str) -> str:
        return value.replace("\\", "\\\\").replace(":", "\\:")
    return f"localhost:*:{esc(database)}:{esc(user)}:{esc(password)}\n"


def package_resources(h) -> list:
    """PostgreSQL for the db role (the distro's, or POSTGRES_VERSION from PGDG) and Redis for
    the redis role, in one apt run."""
    s, site = h.settings, h.site
    redis = ["redis-server"] if site.has("redis") else []
    version = s["POSTGRES_VERSION"]
    if not (site.has("db") and version):
        names = (["postgresql"] if site.has("db") else []) + redis
        return [AptUpdate(int(s["APT_CACHE_MAX_AGE"])), Packages(names)] if names else []
    [release] = h.probe(["cat /etc/os-release"])
    codename = os_release(release).get("VERSION_CODENAME", "")
    return [*apt_repository("pgdg", PGDG_URI, f"{codename}-pgdg", "main", PGDG_KEY),
            Packages([f"postgresql-{version}", *redis])]


def hba_lines(s, clients: list[str]) -> str:
    """pg_hba.conf lines that let the app's role into its database from each of ``clients``
    (addresses), over TLS only, with its SCRAM password."""
    db, user = (f'"{name}"' for name in (s.db_name, s.db_user))
    return "".join(f"hostssl {db} {user} {ipaddress.ip_network(client)} scram-sha-256\n"
                   for client in clients)


def postgres_resources(h) -> list:
    """The db role (its package: :func:`package_resources`): PostgreSQL running, the app's role
    and database, root's password file for them.
    On a site spread over hosts (tasks/inventory.py), it listens on its private address too,
    where only the app's hosts may connect (ufw: tasks/provision.py), over TLS."""
    s, site = h.settings, h.site
    clients = site.others("web", "worker")
    return [
        Service("postgresql"),
        PostgresSetting("listen_addresses", ",".join(["localhost", site.me.private])
                        if clients else "localhost"),
        PostgresRole(s.db_user, s["DB_PASSWORD"]),
        PostgresDatabase(s.db_name, s.db_user),
        *([PgHba("app hosts", hba_lines(s, clients))] if site.spread else []),
        File(s.layout.pgpass, pgpass_line(s.db_user, s.db_name, s["DB_PASSWORD"]), mode=0o600,
             secret=True),
    ]


def redis_acl_hash(password: str) -> str:
    """The SHA-256 of ``password`` that a Redis ACL rule takes instead of the password."""
    return hashlib.sha256(password.encode()).hexdigest()


def redis_resources(h) -> list:
    """The redis role (its package: :func:`package_resources`): Redis, on loopback with a memory
    limit; on a site spread over hosts, on
    its private address too, where the app's user logs in with REDIS_PASSWORD and the default
    user is off."""
    s, site = h.settings, h.site
    acl = (f"user default off\nuser {s.app} on #{redis_acl_hash(s['REDIS_PASSWORD'])} "
           "~* &* +@all -@admin") if site.spread else ""
    private = site.me.private if site.others("web", "worker") else ""
    return [
        File("/etc/redis/redis.conf", render("redis.conf.j2", s, private=private, acl=acl),
             owner="redis", group="redis", mode=0o640, secret=site.spread,
             notify=["redis-server:restart"]),
        Service("redis-server"),
    ]


def app_env_resources(h) -> list:
    """The app's environment file and Celery's, the ``celery`` account: for the app's hosts
    (web, worker), pointing at the site's database and Redis."""
    s = h.settings
    app, conf = s.app, s.layout.conf
    # the Celery units here (tasks/celery.py) read both files: restarted when one changes
    celery_restart = tuple(f"{unit}:restart" for unit in celery_units(h.site))
    return [
        Group("celery"),
        User("celery", group="celery", home=CELERY_HOME),
        Directory(CELERY_HOME, "celery", "celery", 0o750),
        File(s.layout.env_file, render("app.conf.j2", s, site=h.site), group=app, mode=0o640,
             secret=True, notify=(*celery_restart, f"{app}.service:restart")),
        # read by systemd for the units (EnvironmentFile=), not by the celery account
        File(f"{conf}/celery.conf", render("celery.conf.j2", s), mode=0o600,
             notify=celery_restart),
    ]


def db_resources(h) -> list:
    """Everything ``db.setup`` declares for the host's roles, in order (packages first)."""
    site = h.site
    return [*package_resources(h),
            *(postgres_resources(h) if site.has("db") else []),
            *(redis_resources(h) if site.has("redis") else []),
            *(app_env_resources(h) if site.has("web") or site.has("worker") else [])]


@converging_task("db", default=True)
def setup(h):
    """PostgreSQL, Redis, the app's role and database, and its environment files (those of
    the host's roles)."""
    return db_resources(h)


def _interactive(c, h, command: str) -> None:
    """Run ``command`` as root on the host with a terminal (sudo asks for its password)."""
    if h.conn.user == "root":
        c.run(command, pty=True, warn=True)
    else:
        c.sudo(command, pty=True, warn=True)


@task
def psql(c):
    """Open psql in the app's database as the app's role (password from a root-only file)."""
    with session(c, "db.psql", lock=False) as h:
        s = h.settings
        _interactive(c, h, f"env PGPASSFILE={q(s.layout.pgpass)} psql -h localhost "
                           f"-U {q(s.db_user)} -d {q(s.db_name)}")


@task(name="redis-cli")
def redis_cli(c):
    """Open redis-cli on the host's Redis (the cache is database 1, Celery's queues 0)."""
    with session(c, "db.redis-cli", lock=False) as h:
        _interactive(c, h, "redis-cli")
