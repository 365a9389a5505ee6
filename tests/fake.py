"""A recording fake of a Fabric connection, for fast unit tests of the library's logic.

Scripts reach a real host on stdin; the fake receives them the same way. Probe
scripts (split at their markers) are answered snippet by snippet from
``answers``: a list of ``(regex, output)`` tried in order, first match wins (a joint
psql snippet is answered query by query, the same way). A snippet no pattern matches
fails the test with :class:`UnexpectedCommand`, naming the snippet and the patterns, as
Invoke's MockContext refuses a command it was not given: "" reads as "absent" to many
resources, so a silent "" would let a stale pattern pass. A test that means "no output"
answers "" explicitly.
Every other script is recorded in ``applied`` and succeeds (or fails, when it matches a
regex in ``failing``) with no output: code that reads the output of a script that succeeded
fails the test the same way (a test that needs that output gives the host its own executor).
A change followed by a probe in the same round trip (``Host.apply``) is recorded as the
change alone, and its probe answered when it succeeds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from tasks.db import JointPsql
from tasks.host import BACKGROUND, PROBE_MARK, Result
from tasks.primitives import OWNED

# Host.apply's script: the change (as "set -e" and its script) in a subshell, then the probe.
APPLY_THEN_PROBE = re.compile(r"^\(\n(set -e\n.*)\n\) </dev/null\nstatus=\$\?\n"
                              r"\[ \$status -eq 0 \] \|\| exit \$status\n(.*)true\n\Z", re.S | re.M)


def owned_answer(resources) -> tuple[str, str]:
    """A fake answer to the ownership record's probe: fabstack created every object of
    ``resources`` (what a host it provisioned holds)."""
    return (re.escape(f"cat {OWNED}"), "".join(f"{r.claim}\n" for r in resources if r.claim))


class UnexpectedCommand(AssertionError):
    """A probe snippet that no pattern of the fake's ``answers`` matches, or the output of
    an applied script read by the code."""


class Applied(Result):
    """What an applied script returns: its exit status; its output is not the fake's to give."""

    def __init__(self, script: str):
        self.script, self.stderr, self.exited = script, "", 0

    @property
    def stdout(self) -> str:
        raise UnexpectedCommand(f"the code read the output of this script, which the fake "
                                f"connection does not give:\n{self.script.rstrip()}")

    def __repr__(self) -> str:
        return f"Applied(exited={self.exited})"


@dataclass
class FakeConnection:
    answers: list[tuple[str, str]] = field(default_factory=list)
    failing: list[str] = field(default_factory=list)
    host: str = "fakehost"
    user: str = "root"
    commands: list[str] = field(default_factory=list)
    scripts: list[str] = field(default_factory=list)
    applied: list[str] = field(default_factory=list)

    @property
    def original_host(self) -> str:
        return self.host

    def exec_script(self, command: str, script: str, wait: float = 0) -> Result:
        self.commands.append(command)
        # the line Host.run starts every script with, the session's priority, is the host's
        script = script.removeprefix(BACKGROUND)
        self.scripts.append(script)
        if folded := APPLY_THEN_PROBE.search(script):  # Host.apply: a change, then a probe
            script, probe = folded.groups()
        elif PROBE_MARK in script:
            return Result(self._answer_probe(script), "", 0)
        else:
            probe = None
        self.applied.append(script)
        if any(re.search(pattern, script) for pattern in self.failing):
            return Result("", "simulated failure", 1)
        if probe is None:
            return Applied(script)
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
            for pattern, text in self.answers:
                if re.search(pattern, snippet):
                    return text
            patterns = "".join(f"\n  {pattern!r}" for pattern, _ in self.answers) or " none"
            raise UnexpectedCommand(f"the fake connection has no answer for this probe "
                                    f"snippet:\n{snippet.rstrip()}\nconfigured patterns:"
                                    f"{patterns}")
        queries = re.split(rf"^\\echo {re.escape(mark)}(\d+)\n", snippet, flags=re.M)
        return "".join(f"{mark}{index}\n{self._answer(query)}"
                       for index, query in zip(queries[1::2], queries[2::2], strict=True))
