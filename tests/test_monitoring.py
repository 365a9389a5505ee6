"""Monitoring over the fake connection: the switch, InfluxData's repo, telegraf.conf as TOML."""

import shutil
import subprocess
import tomllib

import pytest

from tasks import monitoring
from tasks import settings as settings_mod
from tasks.db import scram_verifier
from tasks.host import StepFailed
from tasks.primitives import File, ensure, render
from tests.conftest import VALID

SYSTEM_INPUTS = {"cpu", "mem", "disk", "diskio", "kernel", "net", "processes", "swap", "system"}
ON = {"INFLUX_URL": "https://influx.example.com:8086", "INFLUX_TOKEN": "influx-token-secret-1",
      "INFLUX_ORG": "ops", "INFLUX_BUCKET": "services", "INFLUX_SYSTEM_BUCKET": "system",
      "MONITORING_DB_PASSWORD": "monitoring-password-x"}


def make_settings(**overrides):
    return settings_mod.parse({**VALID, **overrides})


def host_for(make_host, settings, answers=(), check=False):
    host, conn = make_host(answers, check=check)
    host.settings = settings
    host._secrets = sorted(settings.secrets, key=len, reverse=True)
    return host, conn


# -- the switch ----------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, on", [
    ({}, False),
    ({"INFLUX_URL": "https://influx.example.com"}, True),
    ({"INFLUX_URL": "https://influx.example.com", "MONITORING": "off"}, False),
    ({"MONITORING": "telegraf"}, True),
])
def test_monitoring_is_on_when_asked_or_when_influx_is_set(overrides, on):
    assert make_settings(**overrides).monitoring is on


def test_bad_switch_and_short_password_are_named():
    with pytest.raises(settings_mod.SettingsError) as err:
        make_settings(MONITORING="yes", MONITORING_DB_PASSWORD="short")
    assert "MONITORING: must be telegraf, off or empty" in str(err.value)
    assert "MONITORING_DB_PASSWORD: must be at least 16" in str(err.value)


def test_off_without_password_declares_nothing(make_host):
    host, conn = host_for(make_host, make_settings())
    assert [type(r).__name__ for r in monitoring.monitoring_resources(host)] == ["Note"]
    ensure(host, *monitoring.monitoring_resources(host))
    assert conn.applied == [] and host.round_trips == 0
    assert host.report.lines == [("ok", "telegraf", "not installed (MONITORING=empty, "
                                                    "INFLUX_URL empty)")]


def test_off_with_password_makes_only_the_role(make_host):
    s = make_settings(MONITORING="off", MONITORING_DB_PASSWORD="monitoring-password-x")
    host, conn = host_for(make_host, s, answers=[(r"pg_authid", ""), (r"pg_auth_members", "0"),
                                                 (r"fabstack/owned", "")])  # a fresh host
    names = [r.what for r in monitoring.monitoring_resources(host)]
    assert names == ["telegraf", "postgresql role monitoring",
                     "postgresql role monitoring in pg_monitor"]
    ensure(host, *monitoring.monitoring_resources(host))
    applied = "\n".join(conn.applied)
    assert 'CREATE ROLE "monitoring" LOGIN PASSWORD \'SCRAM-SHA-256$4096:' in applied
    assert 'GRANT "pg_monitor" TO "monitoring";' in applied
    assert "monitoring-password-x" not in "".join(conn.scripts) + "".join(conn.commands)
    assert "telegraf" not in applied


def test_role_already_a_member_changes_nothing(make_host):
    s = make_settings(MONITORING_DB_PASSWORD="monitoring-password-x")
    verifier = scram_verifier("monitoring-password-x")
    host, conn = host_for(make_host, s, answers=[(r"pg_authid", f"t|{verifier}"),
                                                 (r"pg_auth_members", "1"),
                                                 (r"fabstack/owned", "role monitoring\n")])
    ensure(host, *monitoring.monitoring_resources(host))
    assert conn.applied == []


def test_monitoring_role_may_not_be_the_apps_role(make_host):
    s = make_settings(MONITORING_DB_USER="ratemyderp", MONITORING_DB_PASSWORD="x" * 16)
    host, _ = host_for(make_host, s)
    with pytest.raises(StepFailed, match="must not be the app's role"):
        monitoring.monitoring_resources(host)


def test_on_without_role_password_is_refused(make_host):
    host, _ = host_for(make_host, make_settings(**{**ON, "MONITORING_DB_PASSWORD": ""}))
    with pytest.raises(StepFailed, match="MONITORING_DB_PASSWORD empty"):
        monitoring.monitoring_resources(host)


def test_on_with_missing_influx_settings_names_them(make_host):
    host, conn = host_for(make_host, make_settings(MONITORING="telegraf"))
    with pytest.raises(StepFailed) as err:
        ensure(host, *monitoring.monitoring_resources(host))
    for key in ("INFLUX_URL", "INFLUX_TOKEN", "INFLUX_ORG", "INFLUX_BUCKET",
                "MONITORING_DB_PASSWORD"):
        assert key in str(err.value)
    assert conn.scripts == []


# -- repository and install ---------------------------------------------------------------

def test_repository_key_install_config_and_one_restart(make_host):
    s = make_settings(**ON)
    host, conn = host_for(make_host, s)
    resources = monitoring.monitoring_resources(host)
    assert [r.what for r in resources] == [
        "postgresql role monitoring", "postgresql role monitoring in pg_monitor",
        "apt key influxdata", "file /etc/apt/sources.list.d/influxdata.sources", "apt lists",
        "packages telegraf", "file /etc/telegraf/telegraf.conf", "service telegraf.service"]
    conn.answers = [(r"pg_authid", ""), (r"pg_auth_members", "0"), (r"fabstack/owned", ""),
                    (r"keyrings/influxdata\.asc", ""), (r"influxdata\.sources", "missing\n"),
                    (r"apt-lists-updated", "100 100 due"), (r"dpkg-query", ""),
                    (r"telegraf\.conf", "missing\n"),
                    (r"systemctl show", "LoadState=loaded\nUnitFileState=enabled\n"
                                        "ActiveState=active\nNeedDaemonReload=no\n"
                                        "pending=restart\n")]
    ensure(host, *resources)
    applied = "\n".join(conn.applied)
    assert ("apt-helper download-file https://repos.influxdata.com/influxdata-archive.key "
            "/etc/apt/keyrings/influxdata.asc.part") in applied
    assert resources[3].content.decode() == (
        "Types: deb\nURIs: https://repos.influxdata.com/debian\nSuites: stable\n"
        "Components: main\nSigned-By: /etc/apt/keyrings/influxdata.asc\n")
    assert "apt-get -q update" in applied
    assert "install -- telegraf" in applied
    conf = resources[6]
    assert isinstance(conf, File) and conf.secret
    assert (conf.owner, conf.group, conf.mode) == ("root", "telegraf", 0o640)
    assert 'chown root:telegraf "$tmp"' in applied and 'chmod 0640 "$tmp"' in applied
    assert "touch /var/lib/fabstack/pending/telegraf.service@restart" in applied
    assert applied.count("systemctl restart -- telegraf.service") == 1
    # secrets reach the host only inside the (base64) file body, never in the report
    report = "\n".join(f"{w}: {m}" for _, w, m in host.report.lines)
    assert "influx-token-secret-1" not in report and "monitoring-password-x" not in report


def test_converged_telegraf_changes_nothing(make_host):
    s = make_settings(**ON)
    host, conn = host_for(make_host, s)
    resources = monitoring.monitoring_resources(host)
    conf = resources[6]
    conn.answers = [(r"pg_authid", f"t|{scram_verifier(ON['MONITORING_DB_PASSWORD'])}"),
                    (r"pg_auth_members", "1"), (r"fabstack/owned", "role monitoring\n"),
                    (r"keyrings/influxdata\.asc", "skip"),
                    (r"influxdata\.sources",
                     f"regular file|root|root|644\n{resources[3].digest}\n"),
                    (r"apt-lists-updated", "100 200"), (r"dpkg-query", "telegraf ii \n"),
                    (r"telegraf\.conf", f"regular file|root|telegraf|640\n{conf.digest}\n"),
                    (r"systemctl show", "LoadState=loaded\nUnitFileState=enabled\n"
                                        "ActiveState=active\nNeedDaemonReload=no\n")]
    assert ensure(host, *resources) == 0
    assert conn.applied == [] and host.round_trips == 1


# -- telegraf.conf -------------------------------------------------------------------------

def rendered(**overrides) -> dict:
    return tomllib.loads(render("telegraf.conf.j2", make_settings(**{**ON, **overrides})))


def test_telegraf_conf_parses_and_holds_every_section():
    conf = rendered()
    assert set(conf) == {"global_tags", "agent", "outputs", "inputs"}
    assert conf["global_tags"] == {"app": "ratemyderp"}
    agent = conf["agent"]
    assert agent["interval"] == "10s" and agent["flush_interval"] == "10s"
    assert agent["omit_hostname"] is False and agent["round_interval"] is True
    system, services = conf["outputs"]["influxdb_v2"]
    for out in (system, services):
        assert out["urls"] == ["https://influx.example.com:8086"]
        assert out["token"] == "influx-token-secret-1" and out["organization"] == "ops"
    assert system["bucket"] == "system" and set(system["namepass"]) == SYSTEM_INPUTS
    assert services["bucket"] == "services"
    assert set(services["namepass"]) == {"systemd_units", "postgresql"}
    inputs = conf["inputs"]
    assert set(inputs) == SYSTEM_INPUTS | {"systemd_units", "postgresql"}
    # every metric an input makes goes to exactly one bucket
    assert not set(system["namepass"]) & set(services["namepass"])
    assert set(system["namepass"]) | set(services["namepass"]) == set(inputs)
    [units] = inputs["systemd_units"]
    assert units["unittype"] == "service"
    assert units["pattern"].split() == ["ratemyderp@*.service", "celery.service",
                                        "celerybeat.service"]
    [pg] = inputs["postgresql"]
    assert pg["databases"] == ["ratemyderp"]
    assert pg["address"] == ("host=localhost port=5432 sslmode=disable dbname=postgres "
                             "user='monitoring' password='monitoring-password-x'")


def test_telegraf_conf_follows_app_name_and_buckets():
    conf = rendered(APP_NAME="shop", INFLUX_SYSTEM_BUCKET="", DB_NAME="shopdb",
                    MONITORING_DB_USER="stats")
    assert conf["global_tags"]["app"] == "shop"
    assert [o["bucket"] for o in conf["outputs"]["influxdb_v2"]] == ["services", "services"]
    assert conf["inputs"]["systemd_units"][0]["pattern"].startswith("shop@*.service ")
    assert conf["inputs"]["postgresql"][0]["databases"] == ["shopdb"]
    assert "user='stats'" in conf["inputs"]["postgresql"][0]["address"]


def test_telegraf_conf_quotes_any_secret():
    token = 'tok"en\\ with\ttab'
    password = "it's \"a\" pa\\ss #x"
    conf = rendered(INFLUX_TOKEN=token, MONITORING_DB_PASSWORD=password)
    assert conf["outputs"]["influxdb_v2"][0]["token"] == token
    address = conf["inputs"]["postgresql"][0]["address"]
    assert address.endswith(" password='it\\'s \"a\" pa\\\\ss #x'")


def test_telegraf_conf_renders_with_monitoring_off():
    """Every template is pre-rendered at the start of every task, monitoring on or not."""
    conf = tomllib.loads(render("telegraf.conf.j2", make_settings()))
    assert "postgresql" not in conf["inputs"]
    assert conf["outputs"]["influxdb_v2"][1]["namepass"] == ["systemd_units"]


@pytest.mark.skipif(shutil.which("telegraf") is None,
                    reason="no telegraf binary on this machine (InfluxData's repository is out "
                           "of reach here): the config is checked as TOML only")
def test_telegraf_accepts_the_config(tmp_path):
    path = tmp_path / "telegraf.conf"
    path.write_text(render("telegraf.conf.j2", make_settings(**ON)))
    # --test gathers once and prints, without writing to any output
    res = subprocess.run(["telegraf", "--config", str(path), "--test",
                          "--input-filter", "cpu:mem:kernel"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
