"""The fab command line: task listing.

Bad input on the command line (settings, templates, the host, sudo, task arguments) is
tested against the real sandbox host, its state compared: tests/test_realhost_badinput.py.
"""

import subprocess

from tests.conftest import FAB, REPO


def test_every_task_has_a_docstring():
    res = subprocess.run([FAB, "--list"], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    lines = [line for line in res.stdout.splitlines()[1:] if line.strip()]
    tasks = [line for line in lines if line.startswith("  ") and not line.startswith("    ")]
    assert tasks and all(len(line.split()) > 1 for line in tasks), res.stdout
