"""fab status and the monitoring role on the real sandbox host, after provision and deploy.

Telegraf's apt repository is out of reach here, so MONITORING=off: the package part is
tested with the fake connection (tests/test_monitoring.py); the monitoring role is made
anyway because its password is set, and is tested against the real PostgreSQL.
"""

import os
import re
import subprocess

import pytest

from tests.conftest import FAB, REPO, live_unit

APP = "ratemyderp"
MONITOR_USER = "monitoring"
MONITOR_PASSWORD = "sandbox-monitoring-password"


@pytest.fixture(scope="module")
def deployed(target, app_repo):
    """provision (monitoring off, its role on), then the first deploy of the example app."""
    target.write_env(DEPLOY_REPO=str(app_repo), DEPLOY_SUBDIR="example", MONITORING="off",
                     MONITORING_DB_USER=MONITOR_USER, MONITORING_DB_PASSWORD=MONITOR_PASSWORD)
    provisioned = target.fab("provision")
    target.fab("deploy")
    return provisioned


def psql(target, sql: str, check=True) -> subprocess.CompletedProcess:
    return target.sh(f"cd / && runuser -u postgres -- psql -X -At -v ON_ERROR_STOP=1 -d {APP} "
                     f"-c \"{sql}\"", check=check)


def test_provision_skips_telegraf_and_makes_the_role(deployed):
    assert "telegraf: not installed (MONITORING=off" in deployed.stdout
    assert f"postgresql role {MONITOR_USER}" in deployed.stdout
    assert MONITOR_PASSWORD not in deployed.stdout + deployed.stderr


def test_monitoring_role_reads_statistics_but_not_the_apps_data(target, deployed):
    assert psql(target, f"SELECT pg_has_role('{MONITOR_USER}', 'pg_monitor', 'MEMBER'), "
                        f"rolsuper FROM pg_roles WHERE rolname = '{MONITOR_USER}'"
                ).stdout.strip() == "t|f"
    tables = psql(target, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
                  ).stdout.split()
    assert "demo_counter" in tables, tables
    # Log in as Telegraf does (password over TCP on localhost); the password goes in a
    # root-only pgpass file, not on the command line.
    target.sh(f"umask 077 && printf 'localhost:*:*:{MONITOR_USER}:{MONITOR_PASSWORD}\\n' "
              "> /root/.monitor-pgpass")
    login = (f"cd / && PGPASSFILE=/root/.monitor-pgpass psql -X -At -h localhost "
             f"-U {MONITOR_USER}")
    try:
        stats = target.sh(f"{login} -d postgres -c "
                          f"\"SELECT count(*) > 0 FROM pg_stat_database WHERE datname = '{APP}'\"")
        assert stats.stdout.strip() == "t"
        activity = target.sh(f"{login} -d postgres -c \"SELECT count(*) FROM pg_stat_activity "
                             "WHERE query IS NOT NULL AND query <> '<insufficient privilege>'\"")
        assert int(activity.stdout.strip()) >= 1  # pg_monitor sees other sessions' queries
        for table in tables:
            res = target.sh(f"{login} -d {APP} -c 'SELECT * FROM {table} LIMIT 1'", check=False)
            assert res.returncode != 0, f"monitoring role read {table}: {res.stdout}"
            assert "permission denied" in res.stderr, res.stderr
    finally:
        target.sh("rm -f /root/.monitor-pgpass")


def test_status_of_a_healthy_host(target, deployed):
    res = target.fab("status", check=False)
    out = res.stdout
    assert res.returncode == 0, out + res.stderr
    for unit in (live_unit(target), "celery.service", "celerybeat.service", "nginx.service",
                 "postgresql.service", "redis-server.service"):
        assert f"service {unit}: active" in out, out
    assert "telegraf" not in out  # monitoring is off
    assert "listening: " in out and "80 (" in out and "5432 (127.0.0.1" in out
    release = target.sh(f"readlink /opt/{APP}/app").stdout.strip().rsplit("/", 1)[-1]
    assert f"release: {release}, deployed " in out
    assert f"last backup: /opt/{APP}/backup/" in out and ".dump (" in out
    # the modules before this one may have left Pebble's certificate in place
    assert re.search(r"certificate: (none for ratemyderp\.test \(plain HTTP|ratemyderp\.test: "
                     r"expires in \d+ days)", out), out
    assert f"disk use: /var/opt/{APP} " in out and f"/opt/{APP}/backup " in out
    assert "healthy" in out.splitlines()[-1]
    assert "(1 SSH round trips)" in out


@pytest.mark.parametrize("unit", ["celerybeat.service", "redis-server.service"])
def test_status_names_a_stopped_service_and_fails(target, deployed, unit):
    target.sh(f"systemctl stop {unit}")
    try:
        res = target.fab("status", check=False)
    finally:
        target.sh(f"systemctl start {unit}")
    assert res.returncode == 1, res.stdout
    assert f"failed       service {unit}: inactive" in res.stdout
    assert "UNHEALTHY, 1 problem" in res.stderr and unit in res.stderr, res.stderr
    again = target.fab("status", check=False)
    assert again.returncode == 0, again.stdout + again.stderr


def test_status_of_several_hosts_reports_each_then_fails_naming_the_bad_ones(target, deployed):
    """An unreachable host first (Fabric alone would stop there), then the sandbox: both are
    reported, and fab exits 1 naming the unreachable one."""
    down = target.info.ip.rsplit(".", 1)[0] + ".3"  # an address of the sandbox's subnet: no one
    res = subprocess.run([FAB, "-S", str(target.info.ssh_config), "-H",
                          f"{down},{target.info.alias}", "status"], cwd=REPO, timeout=300,
                         env=dict(os.environ, FABRIC_FABSTACK_ENV_FILE=str(target.env_file)),
                         capture_output=True, text=True)
    out = res.stdout
    assert res.returncode == 1, out + res.stderr
    assert re.search(rf"^\[{re.escape(down)}\] failed +connection: cannot talk to ", out, re.M), out
    assert f"[{target.info.alias}] ok           service {live_unit(target)}: active" in out, out
    assert f"[{target.info.alias}] healthy" in out, out
    assert res.stderr.strip().splitlines()[-1] == f"failed on 1 of 2 hosts: {down}", res.stderr
