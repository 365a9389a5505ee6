"""The bench's coverage checks: a run that covers less than the manifest fails the bench.

Each check reads the output a tool prints (trimmed from real runs on the sandbox) and must
name what a short run left out.
"""

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def load(path: Path):
    spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


run = load(BENCH / "run.py")
pyinfra_peer = load(BENCH / "peers" / "pyinfra_peer.py")
ansible_peer = load(BENCH / "peers" / "ansible_peer.py")


@pytest.fixture
def manifest(tmp_path) -> Path:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"resources": [
        {"type": "group", "what": "group ratemyderp", "name": "ratemyderp", "system": True},
        {"type": "directory", "what": "directory /opt/ratemyderp", "path": "/opt/ratemyderp",
         "owner": "root", "group": "ratemyderp", "mode": "0750"},
    ], "notes": ["certificate"]}))
    return path


FAB = """\
[h] ok           group ratemyderp: exists
[h] changed      directory /opt/ratemyderp: created (root:ratemyderp 0750)
[h] ok           certificate: none: ACME_SERVER is empty
[h] provision: 1 changed, 2 ok, 0 failed in 1.93 s (2 SSH round trips)
"""


def test_fab_check_counts_a_run_that_reports_every_resource(manifest):
    assert run.fab_check(FAB, manifest) == 1


def test_fab_check_names_a_resource_missing_from_the_report(manifest):
    short = FAB.replace("[h] ok           group ratemyderp: exists\n", "").replace(
        "1 changed, 2 ok", "1 changed, 1 ok")
    with pytest.raises(ValueError, match="not reported: group ratemyderp"):
        run.fab_check(short, manifest)


def test_fab_check_fails_a_summary_that_counts_otherwise(manifest):
    with pytest.raises(ValueError, match="1 changed, 3 ok, 0 failed for the manifest's 2 "
                                         "resources and 1 notes"):
        run.fab_check(FAB.replace("2 ok", "3 ok"), manifest)


def test_fab_check_names_a_line_the_manifest_lacks(manifest):
    extra = FAB.replace("[h] provision:", "[h] ok           user ratemyderp: exists\n"
                        "[h] provision:")
    with pytest.raises(ValueError, match="not in the manifest: user ratemyderp: exists"):
        run.fab_check(extra, manifest)


PYINFRA = """\
--> Results:
    Operation                                   Hosts   Success   Error   No Change
    Group ratemyderp (#1)                       1       -         -       1
    Directory /opt/ratemyderp (#2)              1       1         -       -
    Grand total                                 2       1         -       1

--> Disconnecting from hosts...
"""


def test_pyinfra_check_counts_a_run_that_covers_every_resource(manifest):
    assert pyinfra_peer.check(PYINFRA, manifest) == 1


def test_pyinfra_check_names_a_resource_with_no_operation(manifest):
    short = PYINFRA.replace("    Group ratemyderp (#1)                       1       -         -"
                            "       1\n", "").replace("2       1         -       1",
                                                      "1       1         -       -")
    with pytest.raises(ValueError, match="none for 1 of the manifest's 2 resources: "
                                         "#1 group ratemyderp"):
        pyinfra_peer.check(short, manifest)


def test_pyinfra_check_fails_a_run_with_an_error(manifest):
    failed = PYINFRA.replace("1       1         -       -", "1       -         1       -")
    with pytest.raises(ValueError, match="1 failed"):
        pyinfra_peer.check(failed.replace("2       1         -       1",
                                          "2       -         1       1"), manifest)


ANSIBLE = """\
PLAY [the state fab provision declares (bench/manifest.py)] ********************

TASK [group ratemyderp (#1)] ********************************************************
ok: [h]

TASK [directory /opt/ratemyderp (#2)] ***********************************************
changed: [h]

PLAY RECAP *********************************************************************
h                 : ok=2    changed=1    unreachable=0    failed=0    skipped=0    rescued=0
"""


def test_ansible_check_counts_a_run_with_every_task_ok(manifest):
    assert ansible_peer.check(ANSIBLE, manifest) == 1


def test_ansible_check_names_a_task_that_did_not_run(manifest):
    short = re.sub(r"TASK \[group ratemyderp \(#1\)\] \*+\nok: \[h\]\n\n", "",
                   ANSIBLE).replace("ok=2", "ok=1")
    with pytest.raises(ValueError, match="ok=1 for a play of 2 tasks .* neither ok nor "
                                         "changed: group ratemyderp \\(#1\\)"):
        ansible_peer.check(short, manifest)


def test_ansible_check_names_a_resource_no_task_serves(manifest, monkeypatch):
    playbook = ansible_peer._playbook()
    monkeypatch.setattr(playbook.Builder, "group", lambda self, r: None)  # groups lost
    monkeypatch.setattr(ansible_peer, "_playbook", lambda: playbook)
    short = re.sub(r"TASK \[group ratemyderp \(#1\)\] \*+\nok: \[h\]\n\n", "",
                   ANSIBLE).replace("ok=2", "ok=1")
    with pytest.raises(ValueError, match="no task or handler of the play for 1 of the "
                                         "manifest's 2 resources: #1 group ratemyderp"):
        ansible_peer.check(short, manifest)


def test_ansible_check_counts_handlers_beside_tasks(manifest):
    handler = ANSIBLE.replace("PLAY RECAP", "RUNNING HANDLER [reload nginx.service] ****\n"
                              "changed: [h]\n\nPLAY RECAP").replace(
        "ok=2    changed=1", "ok=3    changed=2")
    assert ansible_peer.check(handler, manifest) == 2
    with pytest.raises(ValueError, match="ok=2 for a play of 2 tasks"):
        ansible_peer.check(handler.replace("ok=3", "ok=2"), manifest)


def test_the_worst_request_is_shown_beside_the_controls_worst():
    """A deploy section's figures: the verdict is the issue's (the worst against 3x the
    controls' median), with the worst of as many requests with no deploy beside it."""
    spread = {"sent": 2500, "failed": 0, "p99": 0.012}
    section = {"rate": 50, "date": "today", "machine": "m",
               "during": {**spread, "median": 0.004, "worst": 0.030},
               "quiet": {**spread, "median": 0.004, "worst": 0.016},
               "deploy": {"median": 3.4, "min": 3.2, "max": 3.5, "round_trips": [11], "runs": 3}}
    lines = run.targets({"deploy": section})
    assert ("worst request during them <= 3x the median with no deploy: 30 ms vs 4.0 ms = x7.5:"
            " NOT met (the worst of as many requests with no deploy: 16 ms = x4.0)") in lines
    table = run.table({"deploy": section})
    assert "| requests during them | 4.0 ms | | 30 ms | | | 2500 sent, 0 failed" in table
    assert "| as many requests with no deploy (the controls) | 4.0 ms | | 16 ms |" in table
