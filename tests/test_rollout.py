"""tasks/rollout.py: the steps of a rolling deploy over a site's hosts, in order, over fake
connections; each host's deploy steps (tasks/deploy.py, proved on a real cluster by
tests/test_realhost_site.py) stand in as records of what ran where."""

import pytest
from invoke.exceptions import Exit

from tasks import deploy, rollout
from tasks.host import StepFailed
from tasks.inventory import load, site_of

SITE = {"lb": {"ssh": "l", "private": "10.0.0.10", "roles": ["lb"]},
        "web1": {"ssh": "w1", "private": "10.0.0.11", "roles": ["web"]},
        "web2": {"ssh": "w2", "private": "10.0.0.12", "roles": ["web"]},
        "web3": {"ssh": "w3", "private": "10.0.0.13", "roles": ["web"]},
        "worker": {"ssh": "k", "private": "10.0.0.14", "roles": ["worker"]},
        "data": {"ssh": "d", "private": "10.0.0.15", "roles": ["db", "redis"]}}
SOURCE = deploy.Source("abcdef1234567890", None, "/srv/app@main")


@pytest.fixture
def run(make_host, monkeypatch):
    """A rollout over the site's hosts: ``run(fail={host: step}, unhealthy={hosts}, batch=1)``
    returns (what ran, as "host step" lines, and the Exit it ended with, or None)."""
    def start(fail=None, unhealthy=(), batch=1):
        fail, ran = fail or {}, []
        entries = load({"fabstack": {"hosts": SITE}})

        def step(name, result=None):
            def record(h, *args, **kwargs):
                ran.append(f"{h.name} {name}")
                if fail.get(h.name) == name:
                    raise StepFailed(name, f"{name} failed on {h.name}")
                return result
            return record

        for name in ("_prepare", "_collect_static", "_backup_and_migrate", "_switch",
                     "_restart_workers", "_link", "_prune"):
            monkeypatch.setattr(deploy, name, step(name))
        monkeypatch.setattr(deploy, "_start_beside", step("_start_beside", "green"))
        monkeypatch.setattr(deploy, "resolve_local", lambda *args: SOURCE)
        monkeypatch.setattr(deploy, "read_host", lambda h, ref, source: (
            deploy.State("20261101000000-0123456789ab", ["20261101000000-0123456789ab"], [],
                         False), SOURCE))
        monkeypatch.setattr(deploy, "health_check", lambda h, release, timeout: (
            h.name not in unhealthy, ""))
        monkeypatch.setattr(rollout, "ensure", lambda h, upstream, service: ran.append(
            f"{h.name} upstream down: {' '.join(sorted(upstream.down)) or '-'}"))
        monkeypatch.setattr(rollout.nginx, "web_upstream", lambda h, down: type(
            "Upstream", (), {"down": down}))
        members = []
        for values in SITE.values():
            host, _conn = make_host(site=site_of(entries, values["ssh"]))
            host.settings.values["DEPLOY_REPO"] = "/srv/app"
            members.append(rollout.Member(host))
        plan = rollout.Rollout(members, batch, check=False)
        plan.run(None, False)
        try:
            plan.finish(1.0)
        except Exit as exc:
            return ran, exc
        return ran, None
    return start


def test_it_builds_everywhere_migrates_once_then_switches_web_hosts_out_of_the_lb(run):
    ran, stopped = run()
    assert stopped is None
    assert ran == [
        *[f"{host} {step}" for host in ("web1", "web2", "web3", "worker")
          for step in ("_prepare", "_collect_static")[:1 + (host != "worker")]],
        "web1 _backup_and_migrate",
        *[line for host in ("web1", "web2", "web3") for line in (
            f"lb upstream down: {host}", f"{host} _start_beside", f"{host} _switch",
            f"{host} _restart_workers", "lb upstream down: -")],
        "worker _link", "worker _restart_workers",
        *[f"{host} _prune" for host in ("web1", "web2", "web3", "worker")],
    ]


def test_a_build_that_fails_anywhere_switches_nothing_and_leaves_no_release(run, capsys):
    ran, stopped = run(fail={"web2": "_prepare"})
    assert not any(line.endswith(("_backup_and_migrate", "_switch", "_link")) or " upstream "
                   in line for line in ran), ran
    assert "web2 failed to build it" in stopped.message
    out = capsys.readouterr().out
    for host in ("web1", "web3", "worker"):  # built there, then removed
        assert f"[{host}] ok           release " in out and "removed: web2 failed" in out


def test_a_host_that_fails_its_switch_stops_the_rollout_and_serves_on(run, capsys):
    ran, stopped = run(fail={"web2": "_start_beside"})
    assert ran[-3:] == ["lb upstream down: web2", "web2 _start_beside", "lb upstream down: -"]
    assert "web3 _start_beside" not in ran and "worker _link" not in ran
    assert stopped.code == 1 and stopped.message.startswith("rolling deploy stopped: web2 failed")
    release = next(line.split()[2] for line in capsys.readouterr().out.splitlines()
                   if line.startswith("  web1 "))
    assert stopped.message.endswith(f"hosts run: web1 {release}, web2 20261101000000-0123456789ab,"
                                    f" web3 20261101000000-0123456789ab, worker "
                                    "20261101000000-0123456789ab")


@pytest.mark.parametrize("unhealthy, batch, runs", [
    ({"web3"}, 1, True),  # 2 healthy: a batch of 1 leaves 2 serving
    ({"web2", "web3"}, 1, False),
    ({"web3"}, 2, True),
    (set(), 3, False),  # every web host out at once
])
def test_too_few_healthy_web_hosts_for_the_batch_refuse_the_rollout(run, unhealthy, batch, runs):
    ran, stopped = run(unhealthy=unhealthy, batch=batch)
    assert (stopped is None) is runs, stopped
    if runs:  # the unhealthy ones first
        assert ran[ran.index("web1 _backup_and_migrate") + 1] == "lb upstream down: " + (
            "web1 web3" if batch == 2 else "web3")
    else:
        assert ran == [] and "refused: " in stopped.message
