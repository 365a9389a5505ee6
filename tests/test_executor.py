"""tasks/executor.py: a task marked every_host runs on each host of -H; others stop at a
failure; a parallel one runs on all its hosts at once; no -H means the inventory's hosts.

fab runs here on a project of its own (a fabfile and fabric.yaml in a temporary folder) whose
tasks fail on host "a" without connecting anywhere; its parallel task's hosts are closed ports
of this machine (127.0.0.1:1), which refuse the connection at once.
"""

import os
import subprocess
import threading

import pytest
from invoke.exceptions import Exit
from invoke.util import yaml

from tests.conftest import FAB, REPO, VALID

FABFILE = '''
from fabric import task
from invoke.exceptions import Exit

from tasks.executor import every_host, parallel, site_wide


def across(c, hosts, *args, **kwargs):
    print(f"once for {','.join(h['host'] for h in hosts)} {kwargs}", flush=True)


@site_wide(across)
@task
def roll(c, batch=1):
    """Site-wide: once for several hosts of a spread site."""
    print(f"rolled {c.host}", flush=True)


@every_host
@task
def look(c):
    """Reads: every host is looked at."""
    print(f"looked at {c.host}", flush=True)
    if c.host == "a":
        raise Exit(f"[{c.host}] UNHEALTHY", code=1)


@task
def change(c):
    """Changes: the first failure stops the run."""
    print(f"changed {c.host}", flush=True)
    if c.host == "a":
        raise Exit(code=1)


@parallel
@task
def converge(c):
    """Converges: every host at once."""
    print(f"converging {c.host}", flush=True)
'''
CLOSED = ("127.0.0.1:1", "127.0.0.2:1")  # nothing listens: refused at once


@pytest.fixture
def project(tmp_path):
    (tmp_path / "fabfile.py").write_text(FABFILE)
    (tmp_path / ".env").write_text("".join(f"{key}={value}\n" for key, value in VALID.items()))
    config = yaml.safe_load((REPO / "fabric.yaml").read_text())
    config["fabstack"] = {"env_file": str(tmp_path / ".env")}
    (tmp_path / "fabric.yaml").write_text(yaml.safe_dump(config))
    return tmp_path


def with_inventory(project, hosts):
    config = yaml.safe_load((project / "fabric.yaml").read_text())
    config["fabstack"]["hosts"] = hosts
    (project / "fabric.yaml").write_text(yaml.safe_dump(config))


def fab(project, *args):
    return subprocess.run([FAB, "-r", str(project), *args], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=60)


def test_a_read_only_task_reports_every_host_then_fails_naming_the_failed_ones(project):
    res = fab(project, "-H", "a,b,c", "look")
    assert res.stdout.splitlines() == ["looked at a", "looked at b", "looked at c"]
    assert res.returncode == 1
    assert res.stderr.splitlines() == ["[a] UNHEALTHY", "failed on 1 of 3 hosts: a"]
    ok = fab(project, "-H", "b,c", "look")
    assert (ok.returncode, ok.stderr) == (0, "")


def test_a_task_that_changes_hosts_stops_at_the_first_failure(project):
    res = fab(project, "-H", "a,b", "change")
    assert (res.returncode, res.stdout) == (1, "changed a\n")


def test_the_project_uses_the_executor_and_the_read_only_tasks_are_marked():
    from tasks import build_namespace

    config = yaml.safe_load((REPO / "fabric.yaml").read_text())
    assert config["tasks"]["executor_class"] == "tasks.executor.Executor"
    ns = build_namespace()
    marked = {name for name in ns.task_names if getattr(ns[name], "every_host", False)}
    assert marked == {"status", "releases"}


def test_a_parallel_task_attempts_every_host_then_tables_them(project):
    res = fab(project, "-H", ",".join(CLOSED), "converge")
    assert res.returncode == 1, res
    lines = res.stdout.splitlines()
    for host in ("127.0.0.1", "127.0.0.2"):
        assert any(line.startswith(f"[{host}] failed       connection: cannot connect")
                   for line in lines), res.stdout
    assert "converging" not in res.stdout  # the task never ran without its connection
    assert lines[-4].startswith("converge on 2 hosts in ")
    assert lines[-3].split() == ["host", "changed", "ok", "failed", "seconds", "round", "trips"]
    assert [line.split()[:3] for line in lines[-2:]] == [
        ["127.0.0.1", "cannot", "connect:"], ["127.0.0.2", "cannot", "connect:"]]
    assert res.stderr.splitlines()[-1] == "failed on 2 of 2 hosts: 127.0.0.1, 127.0.0.2"


def test_a_parallel_task_on_one_host_runs_as_fabric_runs_it(project):
    res = fab(project, "-H", CLOSED[0], "converge")
    assert (res.returncode, res.stdout) == (0, "converging 127.0.0.1\n")


def test_without_hosts_every_task_acts_on_the_inventory(project):
    with_inventory(project, {"a": {"ssh": CLOSED[0]}, "b": {"ssh": f"ops@{CLOSED[1]}"}})
    res = fab(project, "converge")
    assert [line.split()[0] for line in res.stdout.splitlines()[-2:]] == ["a", "b"], res.stdout
    assert "failed on 2 of 2 hosts: a, b" in res.stderr
    serial = fab(project, "-H", "b,a", "change")  # an inventory name: its ssh address
    assert serial.stdout == "changed 127.0.0.2\nchanged 127.0.0.1\n", serial


def test_a_site_wide_task_runs_once_for_hosts_of_a_spread_site_alone(project):
    site = {"a": {"ssh": CLOSED[0], "private": "10.0.0.1", "roles": ["lb", "web", "worker"]},
            "b": {"ssh": CLOSED[1], "private": "10.0.0.2", "roles": ["db", "redis"]}}
    with_inventory(project, site)
    res = fab(project, "roll", "--batch", "2")
    assert (res.returncode, res.stdout) == (0, "once for 127.0.0.1:1,127.0.0.2:1 {'batch': 2}\n")
    one = fab(project, "-H", "b", "roll")  # one host of the site: as Fabric runs it
    assert one.stdout == "rolled 127.0.0.2\n", one
    with_inventory(project, {"a": {"ssh": CLOSED[0]}, "b": {"ssh": CLOSED[1]}})
    whole = fab(project, "roll")  # whole stacks: host by host
    assert whole.stdout == "rolled 127.0.0.1\nrolled 127.0.0.2\n", whole


def test_a_malformed_inventory_stops_fab_before_any_host(project):
    with_inventory(project, {"a": {"ssh": "root@x:99999"}})
    res = fab(project, "converge")
    assert res.returncode == 2 and "fabstack.hosts.a.ssh" in res.stderr, res
    assert "Nothing was changed on any host." in res.stderr


def test_fabstack_tasks_need_a_host(tmp_path):
    """Without -H and without an inventory, a task says how to name a host."""
    (tmp_path / ".env").write_text("".join(f"{key}={value}\n" for key, value in VALID.items()))
    res = subprocess.run([FAB, "-r", str(REPO), "provision"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=60)
    assert res.returncode == 2 and "no host to act on: give one with -H HOST" in res.stderr, res


def test_a_parallel_run_runs_its_hosts_at_once_and_tables_their_figures(tmp_path, monkeypatch,
                                                                         capsys):
    from types import SimpleNamespace

    from tasks import executor
    from tasks.host import session

    class Conn(SimpleNamespace):
        def open(self):
            if self.host == "down":
                raise ConnectionRefusedError("Connection refused")

        def close(self):
            pass

    monkeypatch.setattr(executor, "Connection", lambda config, host: Conn(
        config=config, host=host, original_host=host, user="root"))
    monkeypatch.setattr("tasks.host.check_host_keys", lambda c: None)
    started = {"a": threading.Event(), "b": threading.Event()}

    def converge(c):
        with session(c, "converge") as h:
            started[c.host].set()
            other = "b" if c.host == "a" else "a"
            # each host waits for the other to have begun: true only when they run at once
            assert started[other].wait(10), f"{c.host} ran alone"
            h.changed("file /etc/x", "created")
            h.ok("file /etc/y", "as wanted")
            if c.host == "b":
                h.ok("file /etc/z", "as wanted")

    (tmp_path / ".env").write_text("".join(f"{key}={value}\n" for key, value in VALID.items()))
    config = {"fabstack": {"env_file": str(tmp_path / ".env"),
                           "hosts": {"web1": {"ssh": "a"}}}, "sudo": {}}
    run = executor.ParallelRun(converge, [{"host": "a"}, {"host": "b"}, {"host": "down"}],
                               "converge")
    with pytest.raises(Exit) as exc:
        run(SimpleNamespace(config=config))
    assert exc.value.message == "failed on 1 of 3 hosts: down"
    lines = capsys.readouterr().out.splitlines()
    assert "[web1] changed      file /etc/x: created" in lines  # its inventory name
    assert "[down] failed       connection: cannot connect: Connection refused" in lines
    table = [line.split() for line in lines[-3:]]
    assert [row[:4] for row in table] == [["web1", "1", "1", "0"], ["b", "1", "2", "0"],
                                          ["down", "cannot", "connect:", "Connection"]]
    assert [row[5] for row in table[:2]] == ["0", "0"]  # round trips: none was needed
