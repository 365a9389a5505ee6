"""Monitoring: Telegraf sends the host's and the app's metrics to InfluxDB v2.

``fab monitoring`` (``monitoring.setup``) installs Telegraf from InfluxData's apt repository
and writes /etc/telegraf/telegraf.conf (root:telegraf 0640: it holds the token): system
metrics to INFLUX_SYSTEM_BUCKET, the app's and Celery's units and PostgreSQL to INFLUX_BUCKET.
PostgreSQL is read by MONITORING_DB_USER, a ``pg_monitor`` member with no rights on the app's
tables, made whenever MONITORING_DB_PASSWORD is set, even with MONITORING=off (Telegraf's
repository may be out of reach, the role is not).
"""

from __future__ import annotations

from .db import PostgresResource, PostgresRole, sql_ident, sql_literal, sql_script
from .host import StepFailed, converging_task
from .primitives import (
    Change,
    File,
    Note,
    Ok,
    Packages,
    Service,
    apt_repository,
    render,
)

INFLUX_REPO = "https://repos.influxdata.com/debian"
INFLUX_KEY = "https://repos.influxdata.com/influxdata-archive.key"
TELEGRAF_CONF = "/etc/telegraf/telegraf.conf"
STATS_ROLE = "pg_monitor"


class PostgresMembership(PostgresResource):
    """Role ``member`` is a member of role ``role`` (e.g. pg_monitor)."""

    def __init__(self, member: str, role: str):
        self.member, self.role = member, role
        self.what = f"postgresql role {member} in {role}"

    @property
    def sql(self) -> str:
        return ("SELECT count(*) FROM pg_auth_members m "
                "JOIN pg_roles r ON r.oid = m.roleid "
                "JOIN pg_roles u ON u.oid = m.member "
                f"WHERE r.rolname = {sql_literal(self.role)} "
                f"AND u.rolname = {sql_literal(self.member)};")

    def plan(self, state, host):
        if state.strip() == "1":
            return Ok("member")
        return Change("granted",
                      sql_script(f"GRANT {sql_ident(self.role)} TO {sql_ident(self.member)};"))


def missing_settings(s) -> list[str]:
    """The settings Telegraf needs that are empty (only asked when monitoring is on)."""
    needed = ("INFLUX_URL", "INFLUX_TOKEN", "INFLUX_ORG", "INFLUX_BUCKET",
              "MONITORING_DB_PASSWORD")
    return [name for name in needed if not s[name]]


def role_resources(h) -> list:
    """The monitoring role (pg_monitor, nothing else), when its password is set, where
    PostgreSQL runs (the db role)."""
    s = h.settings
    if not s["MONITORING_DB_PASSWORD"] or not h.site.has("db"):
        return []
    user = s["MONITORING_DB_USER"]
    if user == s.db_user:
        raise StepFailed("monitoring role", f"MONITORING_DB_USER must not be the app's role "
                         f"({user}): it would read the app's data")
    return [PostgresRole(user, s["MONITORING_DB_PASSWORD"]),
            PostgresMembership(user, STATS_ROLE)]


def telegraf_resources(h) -> list:
    """InfluxData's repository, Telegraf, its configuration and its service."""
    s = h.settings
    return [
        *apt_repository("influxdata", INFLUX_REPO, "stable", "main", INFLUX_KEY),
        Packages(["telegraf"]),
        File(TELEGRAF_CONF, render("telegraf.conf.j2", s, postgres=h.site.has("db")),
             owner="root", group="telegraf",
             mode=0o640, secret=True, notify=["telegraf.service:restart"]),
        Service("telegraf"),
    ]


def monitoring_resources(h) -> list:
    """Everything ``monitoring.setup`` declares, in order."""
    s = h.settings
    if not s.monitoring:
        return [Note("telegraf", f"not installed (MONITORING={s['MONITORING'] or 'empty'}, "
                                 f"INFLUX_URL {'set' if s['INFLUX_URL'] else 'empty'})"),
                *role_resources(h)]
    missing = missing_settings(s)
    if missing:
        raise StepFailed("monitoring", f"Telegraf is on (MONITORING={s['MONITORING'] or 'empty'}"
                         f", INFLUX_URL set) but {', '.join(missing)} empty: set them in "
                         f"{s.source}, or MONITORING=off")
    return [*role_resources(h), *telegraf_resources(h)]


@converging_task("monitoring", default=True)
def setup(h):
    """Telegraf to InfluxDB v2, and PostgreSQL's monitoring role (pg_monitor)."""
    return monitoring_resources(h)
