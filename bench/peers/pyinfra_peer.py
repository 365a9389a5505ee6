"""The pyinfra peer of the bench: install pyinfra, build one converge run, count its changes.

bench/run.py imports this module (see bench/peers/README.md, section "pyinfra"). The run is
`pyinfra -y @ssh/HOST bench/peers/pyinfra_deploy.py`: -y is how pyinfra runs unattended (no
change-detection pass and no prompt); everything else is pyinfra's defaults. The host key
stays checked: the sandbox's ssh_config (HostName, User, IdentityFile, UserKnownHostsFile)
is read by pyinfra itself, and its known_hosts file and strict checking are given as data
too, as is its identity file (--key).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

NAME = "pyinfra"
VERSION = "3.10.0"
DEPLOY = Path(__file__).resolve().parent / "pyinfra_deploy.py"
# "Grand total" row of pyinfra's results table: hosts, success (= changed), error, no change
GRAND_TOTAL = re.compile(r"^\s*Grand total\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s*$", re.M)
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _venv(work: Path) -> Path:
    return work / "pyinfra-venv"


def install(work: Path) -> str:
    """pip-install pinned pyinfra into ``work``/pyinfra-venv unless there; its version."""
    venv = _venv(work)
    pyinfra = venv / "bin" / "pyinfra"

    def version() -> str:
        out = subprocess.run([str(pyinfra), "--version"], capture_output=True, text=True,
                             check=True).stdout
        return out.strip().split()[-1].lstrip("v")

    if pyinfra.exists() and version() == VERSION:
        return VERSION
    work.mkdir(parents=True, exist_ok=True)
    if not (venv / "bin" / "python").exists():
        subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"pyinfra=={VERSION}"],
                   check=True)
    return version()


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


def command(work: Path, manifest: Path, ssh_config: Path, host: str
            ) -> tuple[list[str], dict[str, str]]:
    """argv and environment of one pyinfra converge of ``host`` to ``manifest``."""
    argv = [str(_venv(work) / "bin" / "pyinfra"), "-y",
            "--data", f"ssh_config_file={ssh_config}",
            "--data", "ssh_strict_host_key_checking=yes"]
    known_hosts = _ssh_option(ssh_config, host, "UserKnownHostsFile")
    if known_hosts:
        argv += ["--data", f"ssh_known_hosts_file={known_hosts}"]
    identity = _ssh_option(ssh_config, host, "IdentityFile")
    if identity:
        argv += ["--key", identity]
    # "@ssh/NAME": the ssh connector for NAME, an alias that only the ssh_config resolves
    argv += [f"@ssh/{host}", str(DEPLOY)]
    env = dict(os.environ, FABSTACK_MANIFEST=str(manifest))
    return argv, env


def changed(output: str) -> int:
    """How many operations the run reported as changed ("Success" in the results table)."""
    found = GRAND_TOTAL.findall(ANSI.sub("", output))
    if not found:
        raise ValueError("no 'Grand total' results row in pyinfra's output")
    hosts, success = found[-1][:2]
    if hosts in ("-", "0"):
        raise ValueError("pyinfra's results cover no host (inventory not reached?)")
    return 0 if success == "-" else int(success)
