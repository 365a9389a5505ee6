"""`make setup` installs every program the tests, the sandbox, the demo and the bench run here.

A program missing on a fresh machine fails a real-host test at minute 10 (rsync did, once);
this scan fails in a second instead. Every program this repository's Python code starts on
this machine (the first word of a command list given to subprocess, the sandbox's ``_run``,
Pebble's ``_spawn``, or looked up with ``shutil.which``) must be declared in PROGRAMS with
its Debian package, and that package must be in the Makefile's SYSTEM_PACKAGES or be
Essential in Debian (on every Debian system by definition).
"""

import ast
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("tasks", "sandbox", "tests", "bench")
# program -> the Debian package that provides it on this machine
PROGRAMS = {
    "cp": "coreutils",
    "curl": "curl",
    "debootstrap": "debootstrap",
    "dpkg": "dpkg",
    "git": "git",
    "ip": "iproute2",
    "mount": "mount",
    "umount": "mount",
    "openssl": "openssl",
    "pebble": "pebble",
    "pebble-challtestsrv": "pebble",
    "rsync": "rsync",
    "sh": "dash",
    "shellcheck": "shellcheck",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "systemd-nspawn": "systemd-container",
    "tinyproxy": "tinyproxy-bin",  # the program alone, without Debian's proxy service
}
# Started only when present, the test that needs them skipped otherwise, and why.
OPTIONAL = {
    "telegraf": "InfluxData's repository is out of reach here (tests/test_monitoring.py)",
    "python3": "the interpreter that runs the tests and the bench",
}
# Essential: yes in Debian, so on every machine of this kind.
ESSENTIAL = {"coreutils", "dash", "mount", "util-linux", "bash", "dpkg", "findutils", "grep", "sed",
             "tar", "gzip", "debianutils", "diffutils", "hostname", "login", "ncurses-bin"}
RUNNERS = {"run", "Popen", "check_output", "check_call", "_run", "_spawn"}


def makefile_packages() -> set[str]:
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    match = re.search(r"^SYSTEM_PACKAGES\s*:=\s*(.+)$", text, re.M)
    assert match, "the Makefile has no SYSTEM_PACKAGES line"
    return set(match[1].split())


def first_word(node: ast.AST) -> str | None:
    """The program of a command given as a list or tuple literal, if its first item is one."""
    if isinstance(node, ast.List | ast.Tuple) and node.elts:
        head = node.elts[0]
        if isinstance(head, ast.Constant) and isinstance(head.value, str):
            return head.value
    return None


def programs_started() -> dict[str, set[str]]:
    """Program -> the files that start it, from the Python code of SCANNED."""
    found: dict[str, set[str]] = {}
    for folder in SCANNED:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not isinstance(node, ast.Call):
                    continue
                name = getattr(node.func, "attr", None) or getattr(node.func, "id", None)
                words = []
                if name in RUNNERS:
                    words = [first_word(arg) for arg in node.args]
                    if name == "_run" and node.args and isinstance(node.args[0], ast.Constant):
                        words.append(node.args[0].value)
                elif name == "which" and node.args:
                    if isinstance(node.args[0], ast.Constant):
                        words.append(node.args[0].value)
                    elif isinstance(node.args[0], ast.Name):  # for tool in (...): which(tool)
                        words += [first for first in _loop_values(path, node.args[0].id)]
                for word in words:
                    if word and "/" not in word:
                        found.setdefault(word, set()).add(str(path.relative_to(ROOT)))
    return found


def _loop_values(path: Path, name: str) -> list[str]:
    """The string constants a ``for NAME in (...)`` loop of ``path`` iterates over."""
    values = []
    for node in ast.walk(ast.parse(path.read_text())):
        loop = isinstance(node, ast.For | ast.comprehension)
        if loop and getattr(node.target, "id", "") == name and isinstance(node.iter, ast.Tuple):
            values += [e.value for e in node.iter.elts if isinstance(e, ast.Constant)]
    return values


def test_the_scan_finds_the_programs_it_is_meant_to():
    """A scan that finds nothing proves nothing: the known ones are found where they are."""
    found = programs_started()
    assert "tests/test_realhost_backup.py" in found.get("rsync", set())
    assert "tests/conftest.py" in found.get("systemd-nspawn", set())
    assert "sandbox/pebble.py" in found.get("pebble-challtestsrv", set())
    assert "sandbox/container.py" in found.get("debootstrap", set())


def test_every_program_started_here_is_declared():
    undeclared = {program: sorted(files) for program, files in programs_started().items()
                  if program not in PROGRAMS and program not in OPTIONAL}
    assert not undeclared, (f"programs started on this machine with no package declared in "
                            f"tests/test_setup.py PROGRAMS: {undeclared}")


def test_make_setup_installs_every_declared_program():
    installed = makefile_packages() | ESSENTIAL
    missing = {program: package for program, package in PROGRAMS.items()
               if package not in installed}
    assert not missing, f"add to the Makefile's SYSTEM_PACKAGES: {missing}"


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_declared_package_provides_the_program(program):
    """Where the program is installed, dpkg agrees on the package that brought it."""
    path = shutil.which(program)
    if path is None or shutil.which("dpkg") is None:
        pytest.skip(f"{program} is not installed here")
    real = str(Path(path).resolve())
    owners = set()
    for candidate in {path, real, real.replace("/usr/", "/", 1)}:
        res = subprocess.run(["dpkg", "-S", candidate], capture_output=True, text=True)
        owners |= {line.split(":")[0] for line in res.stdout.splitlines()}
    if not owners:
        pytest.skip(f"{path} belongs to no Debian package here")
    assert PROGRAMS[program] in owners, f"{path} comes from {owners}, not {PROGRAMS[program]}"
