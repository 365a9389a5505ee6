"""The pyinfra peer of the bench: one converge run, one empty run, and what a run covered.

bench/run.py imports this module (see bench/peers/README.md, section "pyinfra"). pyinfra
comes from the `bench` extra of pyproject.toml (`make bench` installs it beside fab). The
run is `pyinfra -y @ssh/HOST bench/peers/pyinfra_deploy.py`: -y is how pyinfra runs
unattended (no change-detection pass and no prompt); everything else is pyinfra's defaults.
The host key stays checked: the sandbox's ssh_config (HostName, User, IdentityFile,
UserKnownHostsFile) is read by pyinfra itself, and its known_hosts file and strict checking
are given as data too, as is its identity file (--key).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import sys
from pathlib import Path

NAME = "pyinfra"
PYINFRA = str(Path(sys.executable).parent / "pyinfra")
DEPLOY = Path(__file__).resolve().parent / "pyinfra_deploy.py"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# The results table pyinfra prints last: one row per operation (its name, then how many
# hosts ran it and how many of those changed, failed, changed nothing), then "Grand total".
HEADER = re.compile(r"^\s*Operation\s+Hosts\s+Success\s+Error\s+No Change\s*$", re.M)
ROW = re.compile(r"^\s*(.+?)\s+(\d+|-)\s+(\d+|-)\s+(\d+|-)\s+(\d+|-)\s*$")
# pyinfra_deploy.py ends each operation's name with the manifest resource it serves
TAG = re.compile(r"\(#(\d+)\)$")


def version() -> str:
    return importlib.metadata.version("pyinfra")


def _ssh_option(ssh_config: Path, host: str, option: str) -> str | None:
    """One option of ``host``'s block in ``ssh_config`` (as written there)."""
    current = False
    for line in ssh_config.read_text().splitlines():
        words = line.split(None, 1)
        if not words or words[0].startswith("#"):
            continue
        key, value = words[0].lower(), (words[1].strip() if len(words) > 1 else "")
        if key == "host":
            current = host in value.split()
        elif current and key == option.lower():
            return value
    return None


def _connect(ssh_config: Path, host: str) -> list[str]:
    """pyinfra's arguments that reach ``host`` (an alias only the ssh_config resolves)."""
    argv = ["--data", f"ssh_config_file={ssh_config}",
            "--data", "ssh_strict_host_key_checking=yes"]
    known_hosts = _ssh_option(ssh_config, host, "UserKnownHostsFile")
    if known_hosts:
        argv += ["--data", f"ssh_known_hosts_file={known_hosts}"]
    identity = _ssh_option(ssh_config, host, "IdentityFile")
    if identity:
        argv += ["--key", identity]
    return [*argv, f"@ssh/{host}"]  # "@ssh/NAME": the ssh connector for NAME


def command(work: Path, manifest: Path, ssh_config: Path, host: str
            ) -> tuple[list[str], dict[str, str]]:
    """argv and environment of one pyinfra converge of ``host`` to ``manifest``."""
    return ([PYINFRA, "-y", *_connect(ssh_config, host), str(DEPLOY)],
            dict(os.environ, FABSTACK_MANIFEST=str(manifest)))


def empty(work: Path, ssh_config: Path, host: str) -> tuple[list[str], dict[str, str]]:
    """argv and environment of an empty run: pyinfra's start-up, one connection, `true`."""
    return [PYINFRA, "-y", *_connect(ssh_config, host), "exec", "--", "true"], dict(os.environ)


def _results(output: str) -> tuple[list[tuple[str, list[int]]], list[int]]:
    """The rows of the last results table: [(operation, [hosts, changed, failed, no change])]
    and the Grand total's counts."""
    text = ANSI.sub("", output)
    headers = list(HEADER.finditer(text))
    if not headers:
        raise ValueError("pyinfra printed no results table")
    rows, total = [], None
    for line in text[headers[-1].end():].splitlines():
        m = ROW.match(line)
        if not m:
            continue
        counts = [0 if v == "-" else int(v) for v in m.groups()[1:]]
        if m[1] == "Grand total":
            total = counts
            break
        rows.append((m[1], counts))
    if total is None:
        raise ValueError("pyinfra's results table has no Grand total row")
    return rows, total


def check(output: str, manifest: Path) -> int:
    """How many operations changed something in the run whose ``output`` this is.

    ValueError unless the run covered the manifest: every operation ran on the host without
    an error, and every resource of ``manifest`` (its path) had its operations among them (a deploy
    that lost a resource, or a run cut short, covers less than fab provision does).
    """
    resources = json.loads(Path(manifest).read_text())["resources"]
    rows, (ops, changed, failed, unchanged) = _results(output)
    if failed or ops != changed + unchanged or ops != len(rows):
        raise ValueError(f"{ops} operations: {changed} changed, {unchanged} unchanged, "
                         f"{failed} failed")
    covered = {int(m[1]) for name, _ in rows if (m := TAG.search(name))}
    missing = [f"#{n} {r['what']}" for n, r in enumerate(resources, 1) if n not in covered]
    if missing:
        raise ValueError(f"{ops} operations, none for {len(missing)} of the manifest's "
                         f"{len(resources)} resources: {', '.join(missing)}")
    return changed
