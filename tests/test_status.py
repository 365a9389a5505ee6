"""fab status over the fake connection: one probe, the report's lines, the exit status."""

import pytest
from invoke.exceptions import Exit

from tasks import settings as settings_mod
from tasks import status
from tasks.host import Host
from tasks.inventory import Site, load, site_of
from tests.conftest import VALID
from tests.fake import FakeConnection

NOW = 1_700_000_000
DAY = 86400
UNITS = ["ratemyderp@blue.service", "celery.service", "celerybeat.service", "nginx.service",
         "postgresql.service", "redis-server.service"]
SS = ("0.0.0.0:22\n[::]:22\n0.0.0.0:80\n127.0.0.1:5432\n[::1]:5432\n127.0.0.1:6379\n"
      "0.0.0.0:443\n")


def answers(down=(), cert=str(NOW + 60 * DAY), dump=None, df="41% /\n", units=UNITS,
            restarting=()):
    dump = f"{NOW - 3600}.5 2500000 /opt/ratemyderp/backup/daily/x.dump" if dump is None \
        else dump
    return [
        (r"^date \+%s$", f"{NOW}\n"),
        # the instance the upstream file names first ("app UNIT STATE"), then the others
        # (and the type of systemd's job on a unit when one is under way)
        (r"systemctl is-active", "".join(
            f"{'app ' * ('@' in u)}{u} " + ("inactive" if u in down else
                                             "deactivating restart" if u in restarting else
                                             "active") + "\n" for u in units)),
        (r"ss -ltnH", SS),
        (r"readlink", f"releases/20231114-120000-abcdef123456\n{NOW - 2 * DAY}\n"),
        (r"-name '\*\.dump'", dump + "\n" if dump else ""),
        (r"openssl x509", cert + "\n"),
        (r"du -sh", "1.2M\t/var/opt/ratemyderp\n40M\t/var/lib/postgresql\n"
                    "3.1M\t/opt/ratemyderp/backup\n"),
        (r"df -P", df),
        (r"stat -c %Y -- /var/www/fabstack-maintenance/", ""),  # no maintenance page
    ]


def run_status(tmp_path, capsys, monkeypatch, env=None, **kw):
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in {**VALID, **(env or {})}.items()))
    conn = FakeConnection(answers=answers(**kw))
    conn.config = {"fabstack": {"env_file": str(env_file)}, "sudo": {}}
    real_host = Host

    def fake_host(c, settings, **kwargs):
        return real_host(c, settings, executor=conn.exec_script, **kwargs)

    monkeypatch.setattr("tasks.host.Host", fake_host)
    monkeypatch.setattr("tasks.host.check_host_keys", lambda c: None)
    try:
        status.status.body(conn)
        code = 0
    except Exit as exc:
        code = exc.code
        print(exc.message or "")
    return code, capsys.readouterr().out, conn


def test_healthy_host_in_one_round_trip(tmp_path, capsys, monkeypatch):
    code, out, conn = run_status(tmp_path, capsys, monkeypatch)
    assert code == 0, out
    assert len(conn.scripts) == 1 and conn.applied == []
    for unit in UNITS:
        assert f"ok           service {unit}: active" in out
    assert "telegraf" not in out and "maintenance" not in out
    assert "listening: 22 (0.0.0.0, [::]), 80 (0.0.0.0), 443 (0.0.0.0), " \
           "5432 (127.0.0.1, [::1]), 6379 (127.0.0.1)" in out
    assert "release: 20231114-120000-abcdef123456, deployed 2023-11-12 22:13 UTC (48 h ago)" \
        in out
    assert "last backup: /opt/ratemyderp/backup/daily/x.dump (2.5 MB), made" in out
    assert "(60 min ago)" in out
    assert "certificate: example.com: expires in 60 days" in out
    assert "disk use: /var/opt/ratemyderp 1.2M, /var/lib/postgresql 40M, " \
           "/opt/ratemyderp/backup 3.1M" in out
    assert "filesystem /: 41% used" in out
    assert out.rstrip().endswith("[fakehost] healthy")


def test_stopped_service_is_named_and_exits_1(tmp_path, capsys, monkeypatch):
    code, out, _ = run_status(tmp_path, capsys, monkeypatch, down=["celerybeat.service"])
    assert code == 1
    assert "failed       service celerybeat.service: inactive (Celery beat)" in out
    assert "UNHEALTHY, 1 problem:\n  service celerybeat.service: inactive" in out


def test_a_restart_under_way_is_a_warning_not_a_failure(tmp_path, capsys, monkeypatch):
    """Right after a deploy, which queues Celery's restart and does not wait for it."""
    code, out, _ = run_status(tmp_path, capsys, monkeypatch, restarting=["celery.service"])
    assert code == 0, out
    assert "warning      service celery.service: deactivating: systemd's restart job is under " \
           "way (Celery worker)" in out


def test_the_instance_that_serves_is_the_one_checked(tmp_path, capsys, monkeypatch):
    code, out, _ = run_status(tmp_path, capsys, monkeypatch, down=["ratemyderp@green.service"],
                              units=["ratemyderp@green.service", *UNITS[1:]])
    assert code == 1
    assert "failed       service ratemyderp@green.service: inactive (gunicorn, the instance " \
           "that serves)" in out
    code, out, _ = run_status(tmp_path, capsys, monkeypatch,
                              units=["ratemyderp@legacy.service", *UNITS[1:]])
    assert code == 1 and "gunicorn: NGINX's upstream file names no instance" in out


def test_telegraf_is_checked_when_monitoring_is_on(tmp_path, capsys, monkeypatch):
    code, out, _ = run_status(tmp_path, capsys, monkeypatch, env={"MONITORING": "telegraf"})
    assert code == 1 and "service telegraf.service: unknown" in out
    code, out, _ = run_status(tmp_path, capsys, monkeypatch, env={"MONITORING": "telegraf"},
                              units=[*UNITS, "telegraf.service"])
    assert code == 0 and "service telegraf.service: active (metrics)" in out


@pytest.mark.parametrize("kw, problem", [
    ({"cert": str(NOW + 3 * DAY)}, "certificate: example.com: expires in 3 days"),
    ({"cert": str(NOW - DAY)}, "certificate: example.com: expires in -1 days"),
    ({"dump": f"{NOW - 3 * DAY} 100 /opt/ratemyderp/backup/old.dump"}, "older than 48 h"),
    ({"df": "95% /\n"}, "filesystem /: 95% used"),
])
def test_other_problems_fail(tmp_path, capsys, monkeypatch, kw, problem):
    code, out, _ = run_status(tmp_path, capsys, monkeypatch, **kw)
    assert code == 1 and problem in out.split("UNHEALTHY")[1], out


def test_fresh_host_warns_without_failing(tmp_path, capsys, monkeypatch):
    code, out, _ = run_status(tmp_path, capsys, monkeypatch, cert="none", dump="",
                              env={"ACME_SERVER": ""})
    assert code == 0, out
    assert "warning      last backup: none (no *.dump below /opt/ratemyderp/backup)" in out
    assert "ok           certificate: none for example.com (plain HTTP" in out


def test_snippets_follow_the_settings():
    s = settings_mod.parse({**VALID, "APP_NAME": "shop", "DOMAIN": "shop.example.org"})
    probe = "\n".join(status.snippets(s, Site.alone("h")))
    assert "readlink -- /opt/shop/app" in probe
    assert "find /opt/shop/backup -type f -name '*.dump'" in probe
    assert "/etc/letsencrypt/live/shop.example.org/fullchain.pem" in probe
    assert "du -sh -- /var/opt/shop /var/lib/postgresql /opt/shop/backup" in probe
    assert "systemctl is-active -- shop@$c.service" in probe
    assert "/run/shop/\"$c\"/ /etc/nginx/conf.d/fabstack-shop-upstream.conf" in probe
    assert "ratemyderp" not in probe


def test_ago():
    assert [status.ago(x) for x in (5, 600, 5 * 3600, 10 * DAY)] == \
        ["5 s", "10 min", "5 h", "10 days"]


def test_each_host_of_a_spread_site_reports_its_roles():
    s = settings_mod.parse(dict(VALID))
    entries = load({"fabstack": {"hosts": {
        "app": {"ssh": "a", "private": "10.0.0.11", "roles": ["lb", "web", "worker"]},
        "data": {"ssh": "d", "private": "10.0.0.12", "roles": ["db", "redis"]}}}})
    answers = ["1796014801\n", "", "", "", "", "none\n", "", "", ""]
    whats = {name: {line.what for line in status.assess(s, site_of(entries, host), answers)}
             for name, host in (("app", "a"), ("data", "d"))}
    assert {"gunicorn", "release", "certificate", "service nginx.service",
            "service celery.service"} <= whats["app"]
    assert not {"last backup", "service postgresql.service"} & whats["app"]
    assert {"last backup", "service postgresql.service",
            "service redis-server.service"} <= whats["data"]
    assert not {"gunicorn", "release", "certificate", "service nginx.service"} & whats["data"]
    assert {"listening", "disk use"} <= whats["app"] & whats["data"]
