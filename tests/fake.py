"""A recording fake of a Fabric connection, for fast unit tests of the library's logic.

Scripts reach a real host on stdin; the fake receives them the same way. Probe
scripts (split at their markers) are answered snippet by snippet from
``answers``: a list of ``(regex, output)`` tried in order, first match wins,
no match answers "" (a joint psql snippet is answered query by query, the same way).
Every other script is recorded in ``applied`` and
succeeds (or fails, when it matches a regex in ``failing``); a change followed by a probe in
the same round trip (``Host.apply``) is recorded as the change alone, and its probe answered
when it succeeds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from tasks.db import JointPsql
from tasks.host import PROBE_MARK, Result
from tasks.primitives import OWNED

# Host.apply's script: the change (as "set -e" and its script) in a subshell, then the probe.
APPLY_THEN_PROBE = re.compile(r"^\(\n(set -e\n.*)\n\) </dev/null\nstatus=\$\?\n"
                              r"\[ \$status -eq 0 \] \|\| exit \$status\n(.*)true\n\Z", re.S | re.M)


def owned_answer(resources) -> tuple[str, str]:
    """A fake answer to the ownership record's probe: fabstack created every object of
    ``resources`` (what a host it provisioned holds)."""
    return (re.escape(f"cat {OWNED}"), "".join(f"{r.claim}\n" for r in resources if r.claim))


@dataclass
class FakeConnection:
    answers: list[tuple[str, str]] = field(default_factory=list)
    failing: list[str] = field(default_factory=list)
    host: str = "fakehost"
    user: str = "root"
    commands: list[str] = field(default_factory=list)
    scripts: list[str] = field(default_factory=list)
    applied: list[str] = field(default_factory=list)

    def exec_script(self, command: str, script: str, wait: float = 0) -> Result:
        self.commands.append(command)
        self.scripts.append(script)
        if folded := APPLY_THEN_PROBE.search(script):  # Host.apply: a change, then a probe
            script, probe = folded.groups()
        elif PROBE_MARK in script:
            return Result(self._answer_probe(script), "", 0)
        else:
            probe = ""
        self.applied.append(script)
        if any(re.search(pattern, script) for pattern in self.failing):
            return Result("", "simulated failure", 1)
        return Result(self._answer_probe(probe), "", 0)

    def _answer_probe(self, script: str) -> str:
        chunks = re.split(rf"^echo '{re.escape(PROBE_MARK)}(\d+)'\n", script, flags=re.M)
        out = []
        for index, snippet in zip(chunks[1::2], chunks[2::2], strict=True):
            out.append(f"{PROBE_MARK}{index}\n{self._answer(snippet)}")
        return "".join(out)

    def _answer(self, snippet: str) -> str:
        mark = JointPsql.MARK
        if mark not in snippet:
            return next((text for pattern, text in self.answers
                         if re.search(pattern, snippet)), "")
        queries = re.split(rf"^\\echo {re.escape(mark)}(\d+)\n", snippet, flags=re.M)
        return "".join(f"{mark}{index}\n{self._answer(query)}"
                       for index, query in zip(queries[1::2], queries[2::2], strict=True))
