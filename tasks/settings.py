"""Settings from a local ``.env`` file, validated before any host is touched.

Every key the library reads is declared once in :data:`KEYS` with its default,
its check and whether it is a secret; ``conf.example.env`` documents the same
keys (a test keeps the two in step). :func:`load` reads the file with
python-dotenv into a private dict (``os.environ`` is never touched), applies
defaults and raises :class:`SettingsError` naming *every* bad key at once.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from dotenv.parser import parse_stream

from .layout import Layout

REQUIRED = object()

_PLACEHOLDER = re.compile(r"^<[^<>]*>$")
_APP_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,30}$")
_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_DOMAIN = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})+$")
_EMAIL = re.compile(r"^[^@\s<>\"'\\]+@[^@\s<>\"'\\]+$")
_PG_NAME = re.compile(r"^[a-z_][a-z0-9_-]{0,62}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_REDIS_SIZE = re.compile(r"^[1-9][0-9]*(b|k|kb|m|mb|g|gb)?$", re.I)
REDIS_POLICIES = ("noeviction", "volatile-lru", "allkeys-lru", "volatile-lfu", "allkeys-lfu",
                  "volatile-random", "allkeys-random", "volatile-ttl")
BOOLEANS = ("true", "false", "yes", "no", "on", "off", "1", "0")
_PUBKEY = re.compile(r"^(ssh|ecdsa|sk)-[\w@.-]+ [A-Za-z0-9+/=]+")
_NGINX_SIZE = re.compile(r"^[0-9]{1,6}[kKmMgG]?$")
LETSENCRYPT_ACME = "https://acme-v02.api.letsencrypt.org/directory"
# Extra variables for the app's environment file: APP_ENV_FOO=x in .env becomes FOO=x, and
# APP_SECRET_ENV_FOO=x too, masked in all output whatever its name and value.
EXTRA_PREFIX = "APP_ENV_"
SECRET_EXTRA_PREFIX = "APP_SECRET_ENV_"
# An extra variable whose name holds one of these words is masked in all output.
_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|DSN|CREDENTIAL")
# Accounts of the system and of the stack's services: never the app's user or group. Every
# other account that exists on a host and was not created by fabstack is refused at
# provision time (primitives.Resource.conflict).
RESERVED_ACCOUNTS = frozenset((
    "root", "daemon", "bin", "sys", "sync", "games", "man", "lp", "mail", "news", "uucp",
    "proxy", "www-data", "backup", "list", "irc", "gnats", "nobody", "_apt", "messagebus",
    "sshd", "postgres", "redis", "telegraf", "nginx",
    "celery", "backups", "offsite",  # fabstack's own service accounts
))
RESERVED_DATABASES = frozenset(("postgres", "template0", "template1"))
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_URL_BREAKERS = re.compile(r"[\s\"'\\<>`]")
_HOSTNAME = re.compile(r"^([A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*\.?|[0-9A-Fa-f:.]+)$")
_PACKAGE = re.compile(r"^[a-z0-9][a-z0-9+.-]+(:[a-z0-9-]+)?$")
_GIT_REF = re.compile(r"^(?!-)(?!.*\.\.)(?!.*//)[A-Za-z0-9._/+@-]+(?<![./])$")
_SUBDIR = re.compile(r"^[A-Za-z0-9._/+@ -]*$")
# Variables fabstack writes into the app's environment file itself (see app_environment).
MANAGED_ENV = (
    "PYTHONPATH", "DJANGO_SETTINGS_MODULE", "DJANGO_SECURE_SSL_REDIRECT", "DJANGO_STATIC_DIR",
    "DJANGO_MEDIA_DIR", "DJANGO_SECRET_KEY", "DJANGO_ADMIN_URL", "DJANGO_ALLOWED_HOSTS",
    "DATABASE_URL", "CELERY_BROKER_URL", "REDIS_URL", "INFLUX_TOKEN", "INFLUX_BUCKET",
    "INFLUX_ORG", "INFLUX_URL", "MAILGUN_API_KEY", "MAILGUN_DOMAIN",
)
# Redis's databases: Celery's queues, the Django cache
REDIS_BROKER_DB, REDIS_CACHE_DB = 0, 1


class SettingsError(Exception):
    """The settings file is unusable; the message names every bad key."""


def check_app_name(value: str) -> str | None:
    if _APP_NAME.match(value):
        if value in RESERVED_ACCOUNTS or value.startswith(("systemd-", "pg_")):
            return (f"{value!r} is reserved (a system or service account, or a name fabstack "
                    "uses itself): choose a name of the app's own")
        return None
    if not value:
        return "is empty: set the app's name (a valid Unix user name) or leave the key out"
    faults = [fault for fault, found in (
        (f"is {len(value)} characters long", len(value) > 31),
        ("has spaces", any(c.isspace() for c in value)),
        ("has uppercase letters", any(c.isupper() for c in value)),
        ("does not start with a letter", not value[:1].isalpha()),
        ("has other characters than a-z, 0-9, '-' and '_'",
         bool(re.search(r"[^a-zA-Z0-9_\s-]", value))),
    ) if found]
    return (f"{value!r} {', '.join(faults)}: it must be a valid Unix user "
            "name: lowercase letter first, then lowercase letters, digits, '-' or '_', at most "
            "31 characters")


def check_domain(value: str) -> str | None:
    if not _DOMAIN.match(value.lower()):
        return "must be a fully qualified domain name such as example.com"
    return None


def check_email(value: str) -> str | None:
    local, _, domain = value.partition("@")
    if not _EMAIL.match(value) or check_domain(domain):
        return "must be an e-mail address such as ops@example.com"
    return None


def check_python_version(value: str) -> str | None:
    if value and not re.match(r"^3\.\d{1,2}$", value):
        return "must be empty (the distro's python3) or a Python 3 minor version such as 3.12"
    return None


def url_problem(value: str, schemes: tuple[str, ...]) -> str | None:
    """Why ``value`` is not a URL with one of ``schemes`` every file it lands in reads alike."""
    names = " or ".join(f"{scheme}://" for scheme in schemes)
    if found := _URL_BREAKERS.search(value):
        return (f"must be a {names} URL without spaces, quotes or backslashes "
                f"(found {found[0]!r})")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number in range
    except ValueError as exc:
        return f"is not a URL that can be parsed ({exc})"
    if parts.scheme not in schemes or not parts.hostname:
        return f"must be a {names} URL"
    if not _HOSTNAME.match(parts.hostname):
        return f"has a host name that cannot be parsed: {parts.hostname!r}"
    return None


def url_credentials(value: str) -> list[str]:
    """The credentials a URL carries (its password; for http(s), a token as user name), and
    the URL itself when it carries any: what must be masked."""
    try:
        parts = urlsplit(value)
    except ValueError:
        return []
    secret = parts.password or (parts.username if parts.scheme in ("http", "https") else None)
    return [value, secret, unquote(secret)] if secret else []


def check_url(value: str) -> str | None:
    return url_problem(value, ("http", "https")) if value else None


def check_https_url(value: str) -> str | None:
    return url_problem(value, ("https",)) if value else None


def is_remote(repo: str) -> bool:
    """True when DEPLOY_REPO names a remote repository (URL or scp-like), not a local path."""
    return "://" in repo or (":" in repo and "@" in repo.split(":", 1)[0])


def check_deploy_repo(value: str) -> str | None:
    if not value:
        return None
    if "://" in value:
        if problem := url_problem(value, ("https", "http", "ssh", "git")):
            return problem
        if urlsplit(value).scheme in ("ssh", "git") and urlsplit(value).password is not None:
            return "must not hold a password in an ssh:// or git:// URL: use DEPLOY_KEY"
        return None
    if is_remote(value) and _URL_BREAKERS.search(value):
        return "must be user@host:path without spaces, quotes or backslashes"
    return None


def check_git_ref(value: str) -> str | None:
    if not _GIT_REF.match(value):
        return ("must be a git ref such as HEAD, main, v1.2 or a commit: letters, digits and "
                "._/+@-, no '..'")
    return None


def check_subdir(value: str) -> str | None:
    if not _SUBDIR.match(value) or ".." in value.split("/"):
        return ("must be a folder of the repository: letters, digits, spaces and ._/+@-, "
                "no '..'")
    return None


def check_packages(value: str) -> str | None:
    if bad := [name for name in value.split() if not _PACKAGE.match(name)]:
        return f"{' '.join(map(repr, bad))}: not Debian package names (space-separated)"
    return None


def check_plain(value: str) -> str | None:
    if found := re.search(r"[\"'\\]", value):
        return f"must not hold quotes or backslashes (found {found[0]!r})"
    return None


def check_local_file(value: str) -> str | None:
    if value and not Path(value).expanduser().is_file():
        return f"names a file that does not exist on this machine: {value}"
    return None


def check_pem_file(label: str) -> Callable[[str], str | None]:
    """A check: the value names a local file holding a PEM block whose label ends in ``label``
    (CERTIFICATE, PRIVATE KEY), as the host's file it is copied to must."""
    def check(value: str) -> str | None:
        if not value:
            return None
        if problem := check_local_file(value):
            return problem
        text = Path(value).expanduser().read_text(errors="replace")
        if not re.search(rf"^-----BEGIN [A-Z ]*{label}-----$", text, re.M):
            return f"must name a PEM file with a {label} block: {value}"
        return None
    return check


def check_positive_int(value: str) -> str | None:
    if not value.isdigit() or int(value) <= 0:
        return "must be a positive whole number"
    return None


def check_pg_name(value: str) -> str | None:
    if value and not _PG_NAME.match(value):
        return ("must be empty (the app's name) or a PostgreSQL name: lowercase letter or '_' "
                "first, then lowercase letters, digits, '_' or '-', at most 63 characters")
    return None


def check_role_name(value: str) -> str | None:
    if value == "postgres" or value.startswith("pg_"):
        return f"{value!r} is PostgreSQL's own (the superuser, or a pg_ role): choose another"
    return check_pg_name(value)


def check_database_name(value: str) -> str | None:
    if value in RESERVED_DATABASES:
        return f"{value!r} is PostgreSQL's own database: choose another"
    return check_pg_name(value)


def check_min_length(minimum: int) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        if len(value) < minimum:
            return f"must be at least {minimum} characters long"
        return None
    return check


def check_pg_version(value: str) -> str | None:
    if value and not (value.isdigit() and 10 <= int(value) <= 99):
        return "must be empty (the distro's PostgreSQL) or a major version such as 16"
    return None


def check_redis_size(value: str) -> str | None:
    if not _REDIS_SIZE.match(value):
        return "must be a size such as 256mb, 1gb or 100000000 (bytes)"
    return None


def check_redis_policy(value: str) -> str | None:
    if value not in REDIS_POLICIES:
        return f"must be one of {', '.join(REDIS_POLICIES)}"
    return None


def check_upgrade(value: str) -> str | None:
    if value not in ("", "off", "security", "all"):
        return "must be empty, off, security or all"
    return None


def check_bool(value: str) -> str | None:
    if value.lower() not in BOOLEANS:
        return "must be True or False"
    return None


def check_dotted(value: str) -> str | None:
    if not _DOTTED.match(value):
        return "must be a dotted Python module path such as config.settings.production"
    return None


def check_admin_url(value: str) -> str | None:
    if not value.endswith("/") or value.startswith("/") or any(c.isspace() for c in value):
        return "must be a path without spaces that ends with '/' and does not start with it"
    return None


def check_optional_domain(value: str) -> str | None:
    return check_domain(value) if value else None


def check_nginx_size(value: str) -> str | None:
    if not _NGINX_SIZE.match(value):
        return "must be a size NGINX reads, such as 10m, 512k or 1g (0: no limit)"
    return None


MONITORING_MODES = ("", "telegraf", "off")


def check_monitoring(value: str) -> str | None:
    if value not in MONITORING_MODES:
        return "must be telegraf, off or empty (telegraf when INFLUX_URL is set)"
    return None


def check_required_role_name(value: str) -> str | None:
    return check_role_name(value) if value else "must be a PostgreSQL role name"


def check_optional_min_length(minimum: int) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        return check_min_length(minimum)(value) if value else None
    return check


def is_true(value: str) -> bool:
    """A boolean setting's value (checked with check_bool) as a bool."""
    return value.lower() in ("true", "yes", "on", "1")


def check_health_path(value: str) -> str | None:
    if not re.match(r"^/[A-Za-z0-9._~/?=&%-]*$", value):
        return "must be a URL path such as /health/"
    return None


def check_calendar(value: str) -> str | None:
    if not re.match(r"^[A-Za-z0-9*:/,. ~-]+$", value):
        return "must be a systemd OnCalendar= expression such as *-*-* 03:15:00 or daily"
    return None


def check_public_key(value: str) -> str | None:
    if not value:
        return None
    if problem := check_local_file(value):
        return problem
    text = Path(value).expanduser().read_text(errors="replace").strip()
    if len(text.splitlines()) != 1 or not _PUBKEY.match(text):
        return "must name a file with one SSH public key line (ssh-ed25519 AAAA...)"
    return None


@dataclass(frozen=True)
class Key:
    name: str
    doc: str
    default: object = REQUIRED
    check: Callable[[str], str | None] | None = None
    secret: bool = False


KEYS: tuple[Key, ...] = (
    Key("APP_NAME", "Name of the app: its system user, group, paths (/opt/APP, /var/opt/APP, "
        "/var/log/APP) and units", "ratemyderp", check_app_name),
    Key("DOMAIN", "Public domain name of the site (www.DOMAIN is served too: see WWW_ALIAS)",
        check=check_domain),
    Key("ADMIN_EMAIL", "Operator's e-mail, the contact for the TLS certificate",
        check=check_email),
    Key("PYTHON_VERSION", "Python minor version for the app's virtualenv, e.g. 3.12 (the "
        "distro's when it has it; deadsnakes on Ubuntu otherwise). Empty: the distro's python3 "
        "(Debian 12: 3.11, Debian 13: 3.13)", "", check_python_version),
    Key("BASE_PACKAGES", "Space-separated apt packages every server gets",
        "neovim net-tools git python3 virtualenv", check_packages),
    Key("APT_CACHE_MAX_AGE", "Seconds before the host's apt lists are refreshed again",
        "3600", check_positive_int),
    Key("UPGRADE", "Which pending package upgrades provision installs: off, security (from a "
        "security archive only) or all. Empty: security on a first provision, off after",
        "", check_upgrade),
    Key("UNATTENDED_UPGRADES", "True: Debian's unattended-upgrades installs security updates "
        "daily between runs; False: it does not", "True", check_bool),
    Key("HTTP_PROXY", "Proxy the host uses for apt and pip, e.g. http://10.0.0.1:3128 "
        "(empty: direct); one with user:password@ is a secret", "", check_url),
    Key("EXTRA_CA_CERT", "Local path of a PEM file with extra CA certificates the host must "
        "trust, e.g. a corporate proxy's (empty: none)", "", check_pem_file("CERTIFICATE")),
    Key("POSTGRES_VERSION", "PostgreSQL major version from the PostgreSQL (PGDG) apt repository, "
        "e.g. 16 (empty: the distro's PostgreSQL). Choose it before the first provision: moving "
        "a host to another major version is an upgrade (pg_upgradecluster), not done here", "",
        check_pg_version),
    Key("DB_NAME", "Name of the app's PostgreSQL database (empty: APP_NAME)", "",
        check_database_name),
    Key("DB_USER", "PostgreSQL login role that owns the app's database (empty: APP_NAME)", "",
        check_role_name),
    Key("DB_PASSWORD", "Password of the app's PostgreSQL role (any characters, at least 16); "
        "changing it changes the role's password on the next provision",
        check=check_min_length(16), secret=True),
    Key("REDIS_PASSWORD", "Password of the app's Redis user (at least 16 characters): needed, "
        "and only used, when the inventory spreads the site over several hosts (Redis then "
        "listens on its private address)", "", check_optional_min_length(16), secret=True),
    Key("MEDIA_KEY", "Local path of the SSH private key (no passphrase) with which the web and "
        "worker hosts mount the db host's media folder (sshfs): needed, and only used, when "
        "the inventory gives the site several such hosts", "", check_pem_file("PRIVATE KEY")),
    Key("REDIS_MAXMEMORY", "Memory limit of Redis, e.g. 256mb or 1gb", "256mb", check_redis_size),
    Key("REDIS_MAXMEMORY_POLICY", "What Redis evicts at the limit: volatile-lru evicts cache keys "
        "(they expire) and keeps Celery's queues (they do not)", "volatile-lru",
        check_redis_policy),
    Key("DJANGO_SETTINGS_MODULE", "The app's production settings module",
        "config.settings.production", check_dotted),
    Key("DJANGO_SECRET_KEY", "Django's SECRET_KEY (at least 50 characters), e.g. the output of "
        "python3 -c 'import secrets; print(secrets.token_urlsafe(50))'",
        check=check_min_length(50), secret=True),
    Key("DJANGO_ADMIN_URL", "Path of Django's admin site, e.g. a hard-to-guess admin-x7k2/",
        "admin/", check_admin_url),
    Key("DJANGO_SECURE_SSL_REDIRECT", "True: Django redirects HTTP to HTTPS and sends cookies "
        "over HTTPS only", "True", check_bool),
    Key("MAILGUN_API_KEY", "Mailgun API key for the app's mail (empty: none)", "", secret=True),
    Key("MAILGUN_DOMAIN", "Mailgun sending domain (empty: none)", "", check_optional_domain),
    Key("INFLUX_URL", "InfluxDB v2 URL the app and monitoring write to (empty: none)", "",
        check_url),
    Key("INFLUX_TOKEN", "InfluxDB API token (empty: none)", "", secret=True),
    Key("INFLUX_ORG", "InfluxDB organisation (empty: none)", "", check_plain),
    Key("INFLUX_BUCKET", "InfluxDB bucket (empty: none)", "", check_plain),
    Key("CELERY_APP", "The app's Celery application (celery -A)", "config.celery_app",
        check_dotted),
    Key("CELERY_CONCURRENCY", "Worker processes of the Celery worker", "2", check_positive_int),
    Key("CELERY_TIME_LIMIT", "Seconds a Celery task may run before its worker is replaced", "300",
        check_positive_int),
    # -- NGINX and the TLS certificate (fab nginx, fab certbot) --
    Key("NGINX_CLIENT_MAX_BODY_SIZE", "Largest request body NGINX accepts (uploads), e.g. 10m or "
        "512k; 0: no limit", "10m", check_nginx_size),
    Key("WWW_ALIAS", "True: www.DOMAIN is served too and is in the certificate", "True",
        check_bool),
    Key("ACME_SERVER", "ACME directory URL certbot gets the certificate from: Let's Encrypt "
        "(default), its staging https://acme-staging-v02.api.letsencrypt.org/directory or an "
        "internal ACME CA (trust its HTTPS certificate with EXTRA_CA_CERT). Empty: no "
        "certificate, the site is served over plain HTTP", LETSENCRYPT_ACME, check_https_url),
    # -- releases (fab deploy) --
    Key("DEPLOY_REPO", "Git repository of the app: a local path (its ref is archived here and "
        "uploaded) or a remote URL (mirrored on the host, read with DEPLOY_KEY); empty: "
        "deploy refuses to run. A URL with a token or password in it is a secret", "",
        check_deploy_repo),
    Key("DEPLOY_SUBDIR", "Folder of the repository that holds the app (manage.py, "
        "requirements.txt); empty: its root", "", check_subdir),
    Key("DEPLOY_REF", "Git ref deployed when `fab deploy` is given no --ref", "HEAD",
        check_git_ref),
    Key("DEPLOY_KEY", "Local path of the SSH private key the host reads a remote DEPLOY_REPO "
        "with (empty: none)", "", check_pem_file("PRIVATE KEY")),
    Key("RELEASES_KEEP", "How many releases stay on the host (the current and the previous "
        "always do)", "5", check_positive_int),
    Key("GUNICORN_WORKERS", "gunicorn worker processes", "3", check_positive_int),
    Key("WSGI_APP", "The app's WSGI module for gunicorn", "config.wsgi", check_dotted),
    Key("HEALTH_PATH", "Path the deploy asks through NGINX; it must answer 2xx (and, if the app "
        "sends X-Release, name the new release)", "/health/", check_health_path),
    # -- backups (fab backup, fab backup-db, fab restore-db) --
    Key("BACKUP_SCHEDULE", "When the daily backup runs: a systemd OnCalendar= expression, in "
        "the host's time zone", "*-*-* 03:15:00", check_calendar),
    Key("BACKUP_KEEP_DAILY", "Daily database dumps kept", "7", check_positive_int),
    Key("BACKUP_KEEP_WEEKLY", "Weekly database dumps kept (the first daily dump of each ISO "
        "week)", "4", check_positive_int),
    Key("BACKUP_KEEP_MONTHLY", "Monthly database dumps kept (the first daily dump of each "
        "month)", "6", check_positive_int),
    Key("BACKUP_KEEP_DEPLOY", "Pre-migration dumps kept (one per deploy)", "3",
        check_positive_int),
    Key("BACKUP_KEEP_MEDIA", "Daily media snapshots kept (hard-linked: unchanged files take "
        "no space)", "14", check_positive_int),
    Key("OFFSITE_PUBKEY", "Local path of the SSH public key (.pub) an off-site host pulls the "
        "backups with, as the read-only `offsite` account (empty: no such account)", "",
        check_public_key),
    # -- monitoring (fab monitoring): Telegraf to InfluxDB v2 --
    Key("MONITORING", "telegraf: install Telegraf from InfluxData's apt repository and send "
        "metrics to INFLUX_URL; off: no Telegraf (the monitoring role is still made when "
        "MONITORING_DB_PASSWORD is set); empty: telegraf when INFLUX_URL is set, else off", "",
        check_monitoring),
    Key("INFLUX_SYSTEM_BUCKET", "InfluxDB bucket for the host's system metrics (cpu, mem, disk, "
        "...); service and PostgreSQL metrics go to INFLUX_BUCKET. Empty: INFLUX_BUCKET", "",
        check_plain),
    Key("MONITORING_DB_USER", "PostgreSQL role Telegraf reads statistics with (pg_monitor, no "
        "access to the app's data)", "monitoring", check_required_role_name),
    Key("MONITORING_DB_PASSWORD", "Password of the monitoring role (at least 16 characters; "
        "empty: no role, and no PostgreSQL metrics)", "", check_optional_min_length(16),
        secret=True),
)

KEYS_BY_NAME = {key.name: key for key in KEYS}


@dataclass
class Settings:
    """Validated settings. ``values`` maps every key of :data:`KEYS` to a string."""

    values: dict[str, str]
    source: str = ".env"
    secrets: list[str] = field(default_factory=list)
    extras: dict[str, str] = field(default_factory=dict)  # APP_ENV_FOO=x as {"FOO": "x"}

    def __getitem__(self, name: str) -> str:
        return self.values[name]

    @property
    def app(self) -> str:
        return self.values["APP_NAME"]

    @property
    def site_names(self) -> list[str]:
        """The site's host names: DOMAIN, and www.DOMAIN when WWW_ALIAS is on."""
        domain = self.values["DOMAIN"]
        return [domain, f"www.{domain}"] if is_true(self.values["WWW_ALIAS"]) else [domain]

    @property
    def layout(self) -> Layout:
        """Where the app lives on the host (tasks/layout.py)."""
        return Layout.of(self.app)

    @property
    def db_name(self) -> str:
        return self.values["DB_NAME"] or self.app

    @property
    def db_user(self) -> str:
        return self.values["DB_USER"] or self.app

    def database_url(self, host: str = "localhost") -> str:
        """postgres://USER:PASSWORD@HOST:5432/NAME, each part percent-encoded; over TLS
        (sslmode=require) when the database is on another host."""
        user, password, name = (quote(v, safe="") for v in
                                (self.db_user, self.values["DB_PASSWORD"], self.db_name))
        tls = "" if host == "localhost" else "?sslmode=require"
        return f"postgres://{user}:{password}@{host}:5432/{name}{tls}"

    def redis_url(self, database: int, host: str = "localhost", auth: bool = False) -> str:
        """redis://HOST:6379/DATABASE; with ``auth``, as the app's Redis user (its name and
        REDIS_PASSWORD, percent-encoded)."""
        login = (f"{quote(self.app, safe='')}:{quote(self.values['REDIS_PASSWORD'], safe='')}@"
                 if auth else "")
        return f"redis://{login}{host}:6379/{database}"

    @property
    def monitoring(self) -> bool:
        """Whether Telegraf is installed: MONITORING=telegraf, or empty and INFLUX_URL set."""
        mode = self.values["MONITORING"]
        return mode == "telegraf" or (mode == "" and bool(self.values["INFLUX_URL"]))

    def app_environment(self, site=None) -> dict[str, str]:
        """The app's environment (:data:`MANAGED_ENV`, then the operator's extras), on a host
        of ``site`` (an inventory.Site; None: a whole stack on one host)."""
        v = self.values
        db, redis = ((site.address_of("db"), site.address_of("redis")) if site
                     else ("localhost", "localhost"))
        auth = bool(site and site.spread)
        env = {
            "PYTHONPATH": self.layout.current,
            "DJANGO_SETTINGS_MODULE": v["DJANGO_SETTINGS_MODULE"],
            "DJANGO_SECURE_SSL_REDIRECT": v["DJANGO_SECURE_SSL_REDIRECT"],
            "DJANGO_STATIC_DIR": self.layout.static,
            "DJANGO_MEDIA_DIR": self.layout.media,
            "DJANGO_SECRET_KEY": v["DJANGO_SECRET_KEY"],
            "DJANGO_ADMIN_URL": v["DJANGO_ADMIN_URL"],
            "DJANGO_ALLOWED_HOSTS": f"{v['DOMAIN']},www.{v['DOMAIN']}",
            "DATABASE_URL": self.database_url(db),
            "CELERY_BROKER_URL": self.redis_url(REDIS_BROKER_DB, redis, auth),
            "REDIS_URL": self.redis_url(REDIS_CACHE_DB, redis, auth),
            **{name: v[name] for name in MANAGED_ENV if name.startswith(("INFLUX_", "MAILGUN_"))},
        }
        return env | self.extras


def parse(raw: dict[str, str | None], source: str = ".env",
          problems: list[str] | None = None) -> Settings:
    """Validate ``raw`` (as read from a .env file) against :data:`KEYS`.

    ``problems`` already found in the file (by :func:`load`) are reported with the others.
    """
    problems = list(problems or [])
    values: dict[str, str] = {}
    secrets: list[str] = []
    for key in KEYS:
        value = raw.get(key.name)
        if value is None or (value == "" and key.default is REQUIRED):
            if key.default is REQUIRED:
                problems.append(f"{key.name}: missing ({key.doc})")
                continue
            value = str(key.default)
        if _PLACEHOLDER.match(value.strip()):
            problems.append(f"{key.name}: still the placeholder {value!r}; set a real value")
            continue
        # A secret may hold any character but NUL (its files quote it); nothing else holds
        # a control character: it would break the line it lands on.
        if "\0" in value or (not key.secret and _CONTROL.search(value)):
            problems.append(f"{key.name}: holds a control character (a newline, tab or NUL)")
            continue
        if key.check and (reason := key.check(value)):
            problems.append(f"{key.name}: {reason}")
            continue
        values[key.name] = value
        if key.secret and value:
            secrets.append(value)
        secrets.extend(url_credentials(value))
    extras: dict[str, str] = {}
    for name, value in raw.items():
        prefix = next((p for p in (EXTRA_PREFIX, SECRET_EXTRA_PREFIX) if name.startswith(p)), "")
        if not prefix:
            continue
        var, value = name[len(prefix):], value or ""
        if not _ENV_NAME.match(var):
            problems.append(f"{name}: {var!r} is not a valid environment variable name")
        elif var in MANAGED_ENV:
            problems.append(f"{name}: {var} is set by fabstack itself; set its own key instead")
        elif var in extras:
            problems.append(f"{name}: {var} is set by {EXTRA_PREFIX}{var} too; keep one")
        elif "\0" in value:
            problems.append(f"{name}: holds a NUL character")
        else:
            extras[var] = value
            if prefix == SECRET_EXTRA_PREFIX or _SECRET_NAME.search(var.upper()):
                secrets.append(value)
            secrets.extend(url_credentials(value))
    if problems:
        raise SettingsError(f"{source} is not usable ({len(problems)} problem"
                            f"{'s' if len(problems) > 1 else ''}):\n  "
                            + "\n  ".join(problems))
    return Settings(values=values, source=source, secrets=secrets, extras=extras)


def read(text: str) -> tuple[dict[str, str | None], list[str]]:
    """The bindings of a .env file's ``text`` (values literal, no ``$VAR`` expansion) and the
    problems of the file itself: a line that cannot be parsed, a key set more than once."""
    raw: dict[str, str | None] = {}
    lines: dict[str, list[int]] = {}
    problems = []
    for binding in parse_stream(io.StringIO(text)):
        if binding.error:
            problems.append(f"line {binding.original.line}: cannot be read as KEY=value: "
                            f"{binding.original.string.strip()[:60]!r}")
        elif binding.key is not None:
            raw[binding.key] = binding.value
            lines.setdefault(binding.key, []).append(binding.original.line)
    for key, where in lines.items():
        if len(where) > 1:
            shown = ", ".join(map(str, where[:-1])) + f" and {where[-1]}"
            problems.append(f"{key}: is set {'twice' if len(where) == 2 else f'{len(where)} times'}"
                            f": lines {shown}; keep one")
    return raw, problems


def load(path: str | Path = ".env") -> Settings:
    """Read and validate the .env file at ``path``; raise SettingsError if unusable."""
    path = Path(path)
    if not path.is_file():
        raise SettingsError(f"settings file {path} not found: copy conf.example.env to {path} "
                            "and fill it in")
    raw, problems = read(path.read_text(errors="replace"))
    return parse(raw, source=str(path), problems=problems)
