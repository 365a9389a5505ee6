"""``fab manage -- ARGS``: Django's manage.py in the current release, as the app's user.

The command runs in /opt/APP/app with the app's environment file loaded, with a terminal on
the host when fab has one, its output streamed back line by line with secrets masked
otherwise; fab exits with its status. The ``DJANGO_SUPERUSER_*`` variables of fab's own
environment reach it through a root-only file written from the step's standard input and
deleted before manage.py starts, never through a command line. The task is marked
:func:`~tasks.executor.takes_remainder`, so the words after ``--`` are its own. The README's
"Django commands" section is the manual.
"""

from __future__ import annotations

import os
import re
import sys

from fabric import task
from invoke.exceptions import Exit

from . import scripts
from .executor import takes_remainder
from .host import MASK, StepFailed, session
from .primitives import q

FORWARDED = "DJANGO_SUPERUSER_"
_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")


def remainder(argv: list[str]) -> list[str]:
    """The words after the first ``--`` of ``argv`` (Invoke keeps them only joined by spaces)."""
    return argv[argv.index("--") + 1:] if "--" in argv else []


def forwarded(environ) -> dict[str, str]:
    """The ``DJANGO_SUPERUSER_*`` variables of ``environ`` to pass on to the command."""
    return {k: v for k, v in sorted(environ.items())
            if k.startswith(FORWARDED) and _NAME.match(k)}


def runner_script(s, stdin: bool) -> str:
    """The command's shell script on the host (files/manage-run.sh.j2): its arguments are the
    root-only file of passed-on variables (deleted first), then manage.py's."""
    return scripts.script("manage-run.sh.j2", s, stdin="1" if stdin else "")


def stage(h, args: list[str], variables: dict[str, str], interactive: bool) -> str:
    """Check the host can run manage.py and write the passed-on variables; return the
    command that runs it (holding no value of any variable)."""
    s = h.settings
    lines = "".join(f"{k}={q(v)}\n" for k, v in variables.items())
    res = h.run(scripts.script("manage-stage.sh.j2", s, variables=lines),
                what="manage.py", check=False)
    if res.exited == 3:
        raise StepFailed("manage.py", res.stderr.strip())
    if not res.ok:
        raise StepFailed("manage.py", h.mask(res.stderr.strip() or f"exit {res.exited}"))
    shown = ", ".join(variables) or "none"
    h.ok("manage.py", f"manage.py {' '.join(args)} in {s.layout.current} as {s.app} "
         f"({'with a terminal' if interactive else 'output streamed'}; passed on: {shown})")
    return (f"/bin/sh -c {q(runner_script(s, interactive))} manage "
            f"{q(res.stdout.strip())} " + " ".join(q(a) for a in args))


class MaskedLines:
    """A file-like object that writes whole lines to ``out``, secrets masked."""

    def __init__(self, mask, out, extra: list[str]):
        self.mask, self.out, self.buf = mask, out, ""
        self.extra = sorted((v for v in extra if len(v) >= 4), key=len, reverse=True)

    def _masked(self, text: str) -> str:
        for value in self.extra:
            text = text.replace(value, MASK)
        return self.mask(text)

    def write(self, text: str) -> None:
        self.buf += text
        if "\n" in self.buf:
            done, self.buf = self.buf.rsplit("\n", 1)
            self.out.write(self._masked(done + "\n"))
            self.out.flush()

    def flush(self) -> None:
        if self.buf:
            self.out.write(self._masked(self.buf))
            self.buf = ""
        self.out.flush()


def run_command(c, h, command: str, interactive: bool, secrets: list[str]) -> int:
    """Run ``command`` as root on the host; return its exit status."""
    run = c.run if h.conn.user == "root" else c.sudo
    h.step = "manage.py"
    if interactive:
        res = run(command, pty=True, warn=True)
    else:
        out, err = MaskedLines(h.mask, sys.stdout, secrets), MaskedLines(h.mask, sys.stderr,
                                                                         secrets)
        try:
            res = run(command, warn=True, in_stream=False, out_stream=out, err_stream=err)
        finally:
            out.flush()
            err.flush()
    h.round_trips += 1
    return res.exited


@takes_remainder
@task
def manage(c):
    """Run `manage.py ARGS` (after --) in the current release as the app's user."""
    args = remainder(sys.argv)
    if not args:
        raise Exit("error: nothing to run: fab -H HOST manage -- COMMAND [ARGS] "
                   "(e.g. fab manage -- check --deploy)\nNothing was changed on any host.",
                   code=2)
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    variables = forwarded(os.environ)
    with session(c, "manage") as h:
        command = stage(h, args, variables, interactive)
        status = run_command(c, h, command, interactive, list(variables.values()))
        if status:
            h.failed("manage.py", f"manage.py {' '.join(args)} exited with status {status}")
        else:
            h.ok("manage.py", f"manage.py {' '.join(args)} finished")
    if status:
        raise Exit(code=status)
