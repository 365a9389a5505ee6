"""tasks/executor.py: a task marked every_host runs on each host of -H; others stop at a failure.

fab runs here on a project of its own (a fabfile and fabric.yaml in a temporary folder) whose
tasks fail on host "a" without connecting anywhere.
"""

import os
import subprocess

import pytest
from invoke.util import yaml

from tests.conftest import FAB, REPO

FABFILE = '''
from fabric import task
from invoke.exceptions import Exit

from tasks.executor import every_host


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
'''


@pytest.fixture
def project(tmp_path):
    (tmp_path / "fabfile.py").write_text(FABFILE)
    (tmp_path / "fabric.yaml").write_text((REPO / "fabric.yaml").read_text())
    return tmp_path


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
