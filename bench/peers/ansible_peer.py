"""Ansible beside fabstack in the bench: install it, build one converge run, read its recap.

The playbook is generated from bench/manifest.py's manifest by bench/peers/ansible/playbook.py
(one task per declared resource, Ansible's own modules), run with bench/peers/ansible/
ansible.cfg (pipelining, Ansible's default ControlPersist, no interpreter discovery, no
facts: no task reads one). What it covers and what it does differently: bench/peers/README.md.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent / "ansible"
NAME = "Ansible"
# ansible-core 2.19 and the community package that bundles the collections we use
# (community.general for ufw, community.postgresql for roles, databases and settings).
PINS = {"ansible-core": "2.19.14", "ansible": "12.3.0"}
COLLECTIONS = ("community.general", "community.postgresql")
RECAP = re.compile(r"^\S+\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)",
                   re.M)


def _venv(work: Path) -> Path:
    return work / "ansible-venv"


def _installed(venv: Path) -> dict[str, str]:
    """Versions of the pinned distributions and the collections in ``venv`` ({} if none)."""
    python = venv / "bin" / "python"
    if not python.exists():
        return {}
    script = (
        "import json, importlib.metadata as m, pathlib, ansible_collections as c\n"
        f"out = {{}}\nfor d in {list(PINS)!r}:\n"
        "    try: out[d] = m.version(d)\n    except m.PackageNotFoundError: pass\n"
        f"for name in {list(COLLECTIONS)!r}:\n"
        "    p = pathlib.Path(c.__path__[0], *name.split('.'), 'MANIFEST.json')\n"
        "    if p.exists(): out[name] = json.loads(p.read_text())['collection_info']['version']\n"
        "print(json.dumps(out))")
    res = subprocess.run([str(python), "-c", script], capture_output=True, text=True)
    return json.loads(res.stdout) if res.returncode == 0 else {}


def install(work: Path) -> str:
    """pip-install the pinned Ansible into ``work``/ansible-venv (once); return the versions."""
    venv = _venv(work)
    have = _installed(venv)
    if any(have.get(d) != v for d, v in PINS.items()):
        if not (venv / "bin" / "python").exists():
            work.mkdir(parents=True, exist_ok=True)
            subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                        "--disable-pip-version-check",
                        *(f"{d}=={v}" for d, v in PINS.items())], check=True)
        have = _installed(venv)
    missing = [d for d in (*PINS, *COLLECTIONS) if d not in have]
    if missing:
        raise RuntimeError(f"ansible venv {venv}: {', '.join(missing)} missing after install")
    return (f"ansible-core {have['ansible-core']} (ansible {have['ansible']}: "
            + ", ".join(f"{c} {have[c]}" for c in COLLECTIONS) + ")")


def command(work: Path, manifest: Path, ssh_config: Path,
            host: str) -> tuple[list[str], dict[str, str]]:
    """argv and environment of one ansible-playbook converge of ``host`` (an ssh_config alias)."""
    spec = importlib.util.spec_from_file_location("ansible_bench_playbook",
                                                  HERE / "playbook.py")
    playbook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(playbook)
    site = playbook.write(Path(manifest), work / "ansible-run")
    env = dict(os.environ,
               ANSIBLE_CONFIG=str(HERE / "ansible.cfg"),
               # Ansible's own state (tmp, ControlPersist sockets) under the bench's work dir.
               ANSIBLE_HOME=str(work / "ansible-home"),
               ANSIBLE_SSH_CONTROL_PATH_DIR=str(work / "ansible-home" / "cp"),
               # ssh reads the alias, user, key and pinned known_hosts from the sandbox's file.
               ANSIBLE_SSH_COMMON_ARGS=f"-F {shlex.quote(str(ssh_config))}",
               LC_ALL="C.UTF-8")
    for name in ("ANSIBLE_NOCOLOR", "ANSIBLE_FORCE_COLOR"):
        env.pop(name, None)
    return [str(_venv(work) / "bin" / "ansible-playbook"), "-i", f"{host},", str(site)], env


def changed(output: str) -> int:
    """changed= of the PLAY RECAP in ``output`` (summed over its hosts).

    ValueError when there is no recap, or when it counts a failed or unreachable host (a run
    that failed half-way has not compared everything, so its count means nothing).
    """
    _, recap = output.rsplit("PLAY RECAP", 1) if "PLAY RECAP" in output else ("", "")
    rows = RECAP.findall(recap)
    if not rows:
        raise ValueError("no PLAY RECAP in ansible-playbook's output:\n" + output[-2000:])
    if any(int(unreachable) or int(failed) for _, _, unreachable, failed in rows):
        raise ValueError("ansible-playbook failed: " + json.dumps(rows))
    return sum(int(ch) for _, ch, _, _ in rows)
