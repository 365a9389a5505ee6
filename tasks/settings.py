"""Settings from a local ``.env`` file, validated before any host is touched.

Every key the library reads is declared once in :data:`KEYS` with its default,
its check and whether it is a secret; ``conf.example.env`` documents the same
keys (a test keeps the two in step). :func:`load` reads the file with
python-dotenv into a private dict (``os.environ`` is never touched), applies
defaults and raises :class:`SettingsError` naming *every* bad key at once.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from dotenv import dotenv_values

REQUIRED = object()

_PLACEHOLDER = re.compile(r"^<[^<>]*>$")
_APP_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,30}$")
_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_DOMAIN = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})+$")
_EMAIL = re.compile(r"^[^@\s<>]+@[^@\s<>]+$")


class SettingsError(Exception):
    """The settings file is unusable; the message names every bad key."""


def check_app_name(value: str) -> str | None:
    if not _APP_NAME.match(value):
        return ("must be a valid Unix user name: lowercase letter first, then lowercase "
                "letters, digits, '-' or '_', at most 31 characters")
    return None


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
    if not re.match(r"^3\.\d{1,2}$", value):
        return "must be a Python 3 minor version such as 3.11"
    return None


def check_url(value: str) -> str | None:
    if not value:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http:// or https:// URL (or empty)"
    return None


def check_local_file(value: str) -> str | None:
    if value and not Path(value).expanduser().is_file():
        return f"names a file that does not exist on this machine: {value}"
    return None


def check_positive_int(value: str) -> str | None:
    if not value.isdigit() or int(value) <= 0:
        return "must be a positive whole number"
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
    Key("DOMAIN", "Public domain name of the site (its www. alias is served too)",
        check=check_domain),
    Key("ADMIN_EMAIL", "Operator's e-mail, the contact for the TLS certificate",
        check=check_email),
    Key("PYTHON_VERSION", "Python minor version for the app's virtualenv (the distro's "
        "python when it matches; deadsnakes on Ubuntu otherwise)", "3.11", check_python_version),
    Key("BASE_PACKAGES", "Space-separated apt packages every server gets",
        "neovim net-tools git python3 virtualenv"),
    Key("APT_CACHE_MAX_AGE", "Seconds before the host's apt lists are refreshed again",
        "3600", check_positive_int),
    Key("HTTP_PROXY", "Proxy the host uses for apt and pip, e.g. http://10.0.0.1:3128 "
        "(empty: direct)", "", check_url),
    Key("EXTRA_CA_CERT", "Local path of a PEM file with extra CA certificates the host must "
        "trust, e.g. a corporate proxy's (empty: none)", "", check_local_file),
)

KEYS_BY_NAME = {key.name: key for key in KEYS}


@dataclass
class Settings:
    """Validated settings. ``values`` maps every key of :data:`KEYS` to a string."""

    values: dict[str, str]
    source: str = ".env"
    secrets: list[str] = field(default_factory=list)

    def __getitem__(self, name: str) -> str:
        return self.values[name]

    @property
    def app(self) -> str:
        return self.values["APP_NAME"]

    @property
    def code_dir(self) -> str:
        return f"/opt/{self.app}"

    @property
    def conf_dir(self) -> str:
        return f"/opt/{self.app}/conf"

    @property
    def venv_dir(self) -> str:
        return f"/opt/{self.app}/venv"

    @property
    def backup_dir(self) -> str:
        return f"/opt/{self.app}/backup"

    @property
    def home_dir(self) -> str:
        return f"/var/opt/{self.app}"

    @property
    def static_dir(self) -> str:
        return f"/var/opt/{self.app}/static"

    @property
    def media_dir(self) -> str:
        return f"/var/opt/{self.app}/media"

    @property
    def log_dir(self) -> str:
        return f"/var/log/{self.app}"


def parse(raw: dict[str, str | None], source: str = ".env") -> Settings:
    """Validate ``raw`` (as read from a .env file) against :data:`KEYS`."""
    problems: list[str] = []
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
        if key.check and (reason := key.check(value)):
            problems.append(f"{key.name}: {reason}")
            continue
        values[key.name] = value
        if key.secret and value:
            secrets.append(value)
    if problems:
        raise SettingsError(f"{source} is not usable ({len(problems)} problem"
                            f"{'s' if len(problems) > 1 else ''}):\n  "
                            + "\n  ".join(problems))
    return Settings(values=values, source=source, secrets=secrets)


def load(path: str | Path = ".env") -> Settings:
    """Read and validate the .env file at ``path``; raise SettingsError if unusable."""
    path = Path(path)
    if not path.is_file():
        raise SettingsError(f"settings file {path} not found: copy conf.example.env to {path} "
                            "and fill it in")
    raw = dotenv_values(path, interpolate=False)
    return parse(raw, source=str(path))
