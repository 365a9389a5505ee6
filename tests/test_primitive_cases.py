"""Each primitive as data: host state in, commands out (or the already-converged message).

One JSON file per case under tests/cases/<primitive>/. A case names the
resource and its arguments, the raw output of the resource's probe on the
host, what fabstack's record says it created there (``owned``, optional), and
either ``conflict`` (why the resource refuses to touch what it found), ``ok``
(the message when nothing needs doing) or the change ``message`` with the exact
``commands`` (or, for long scripts, the lines the script must contain in order)
and optionally the ``diff`` shown.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from tasks import primitives

CASES = sorted((Path(__file__).parent / "cases").glob("*/*.json"))


@pytest.mark.parametrize("path", CASES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_case(path):
    case = json.loads(path.read_text())
    resource = getattr(primitives, case["resource"])(**case["args"])
    conflict = resource.conflict(case["state"], set(case.get("owned", [])))
    assert conflict == case.get("conflict"), conflict
    if conflict:
        return
    outcome = resource.plan(case["state"], SimpleNamespace(check=False))
    if "ok" in case:
        assert isinstance(outcome, primitives.Ok), outcome
        assert outcome.message == case["ok"]
        return
    assert isinstance(outcome, primitives.Change), outcome
    assert outcome.message == case["message"]
    if "commands" in case:
        assert outcome.script.splitlines() == case["commands"]
    lines = outcome.script.splitlines()
    position = 0
    for expected in case.get("script_contains", []):
        assert expected in lines[position:], f"{expected!r} not in order in:\n{outcome.script}"
        position = lines.index(expected, position) + 1
    if "diff" in case:
        assert outcome.diff == case["diff"]


def test_every_primitive_has_a_converged_case():
    covered = {json.loads(p.read_text())["resource"] for p in CASES
               if "ok" in json.loads(p.read_text())}
    resources = {name for name, obj in vars(primitives).items()
                 if isinstance(obj, type) and issubclass(obj, primitives.Resource)
                 and obj is not primitives.Resource}
    assert resources <= covered, f"no already-converged case for {sorted(resources - covered)}"
