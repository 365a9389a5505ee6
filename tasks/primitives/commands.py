"""Commands that are not idempotent by themselves, guarded where a guard exists."""

from __future__ import annotations

from .engine import Change, Ok, Resource, q


class Command(Resource):
    """A command that cannot be idempotent by itself, guarded where a guard exists.

    ``creates``: skip when this path exists. ``unless``: skip when this read-only
    shell test succeeds. With neither, it runs every time and says so.
    """

    def __init__(self, what: str, script: str, creates: str | None = None,
                 unless: str | None = None, message: str = "done"):
        self.what, self.script, self.creates, self.unless = what, script, creates, unless
        self.message = message

    def probe(self) -> str:
        tests = []
        if self.creates:
            tests.append(f"test -e {q(self.creates)}")
        if self.unless:
            tests.append(f"( {self.unless} ) >/dev/null 2>&1")
        if not tests:
            return ":"
        return f"if {' && '.join(tests)}; then echo skip; fi"

    def plan(self, state, host):
        if state.strip() == "skip":
            return Ok("already done" + (f" ({self.creates} exists)" if self.creates else ""))
        if not (self.creates or self.unless):
            return Change(f"{self.message} (not idempotent: runs every time)", self.script)
        return Change(self.message, self.script)
