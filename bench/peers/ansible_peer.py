"""Ansible beside fabstack in the bench: one converge run, one empty run, what a run covered.

The playbook is generated from bench/manifest.py's manifest by bench/peers/ansible/playbook.py
(one task per declared resource, Ansible's own modules), run with bench/peers/ansible/
ansible.cfg (pipelining, Ansible's default ControlPersist, no interpreter discovery, no
facts: no task reads one). ansible-core and the community package whose collections it uses
come from the `bench` extra of pyproject.toml (`make bench` installs them beside fab). What
it covers and what it does differently: bench/peers/README.md.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent / "ansible"
NAME = "Ansible"
BIN = Path(sys.executable).parent
# the collections we use, bundled by the community package `ansible`
COLLECTIONS = ("community.general", "community.postgresql")
RECAP = re.compile(r"^\S+\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)",
                   re.M)
# "TASK [name] ****" / "RUNNING HANDLER [name] ****", then a line per host: "ok: [host]"...
HEADING = re.compile(r"^(TASK|RUNNING HANDLER) \[(.*)\] \*+$", re.M)
DONE = re.compile(r"^(ok|changed): \[", re.M)
# playbook.py ends each task's name with the manifest resources it serves: "(#5 #6)"
TAG = re.compile(r"\((#\d+(?: #\d+)*)\)$")


def version() -> str:
    import ansible_collections

    collections = []
    for name in COLLECTIONS:
        manifest = Path(ansible_collections.__path__[0], *name.split("."), "MANIFEST.json")
        collections.append(f"{name} "
                           + json.loads(manifest.read_text())["collection_info"]["version"])
    return (f"ansible-core {importlib.metadata.version('ansible-core')} "
            f"(ansible {importlib.metadata.version('ansible')}: {', '.join(collections)})")


def _playbook():
    spec = importlib.util.spec_from_file_location("ansible_bench_playbook",
                                                  HERE / "playbook.py")
    playbook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(playbook)
    return playbook


def _env(work: Path, ssh_config: Path) -> dict[str, str]:
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
    return env


def command(work: Path, manifest: Path, ssh_config: Path,
            host: str) -> tuple[list[str], dict[str, str]]:
    """argv and environment of one ansible-playbook converge of ``host`` (an ssh_config alias)."""
    site = _playbook().write(Path(manifest), work / "ansible-run")
    return [str(BIN / "ansible-playbook"), "-i", f"{host},", str(site)], _env(work, ssh_config)


def empty(work: Path, ssh_config: Path, host: str) -> tuple[list[str], dict[str, str]]:
    """argv and environment of an empty run: ansible-playbook's start-up, one connection and
    one `raw: true` (a play with no task would not connect)."""
    return ([str(BIN / "ansible-playbook"), "-i", f"{host},", str(HERE / "empty.yml")],
            _env(work, ssh_config))


def check(output: str, manifest: Path) -> int:
    """changed= of the PLAY RECAP in ``output`` (summed over its hosts).

    ValueError unless the run covered the playbook generated from ``manifest``: no failed or
    unreachable host, every task of the play reported ok or changed, the recap's ok= is the
    play's task count (plus the handlers that ran), and every resource of ``manifest`` is
    served by one of those tasks or by a handler of the play.
    """
    _, recap = output.rsplit("PLAY RECAP", 1) if "PLAY RECAP" in output else ("", "")
    rows = RECAP.findall(recap)
    if not rows:
        raise ValueError("no PLAY RECAP in ansible-playbook's output:\n" + output[-2000:])
    if any(int(unreachable) or int(failed) for _, _, unreachable, failed in rows):
        raise ValueError("a host failed or was unreachable: " + json.dumps(rows))
    headings = list(HEADING.finditer(output))
    done = {"TASK": [], "RUNNING HANDLER": []}
    for n, h in enumerate(headings):
        body = output[h.end():headings[n + 1].start() if n + 1 < len(headings) else None]
        if DONE.search(body):
            done[h[1]].append(h[2])
    play = _playbook().plan(Path(manifest))
    tasks = [task["name"] for task in play.tasks]
    missing = [name for name in tasks if name not in done["TASK"]]
    ok = sum(int(ok) for ok, _, _, _ in rows)
    if missing or ok != len(tasks) + len(done["RUNNING HANDLER"]):
        raise ValueError(f"ok={ok} for a play of {len(tasks)} tasks (and "
                         f"{len(done['RUNNING HANDLER'])} handlers run); tasks that reported "
                         f"neither ok nor changed: {', '.join(missing) or 'none'}")
    served = set(play.by_handler) | {int(n) for name in done["TASK"]
                                     if (m := TAG.search(name)) for n in re.findall(r"\d+", m[1])}
    unserved = [f"#{n} {r['what']}" for n, r in enumerate(play.resources, 1) if n not in served]
    if unserved:
        raise ValueError(f"no task or handler of the play for {len(unserved)} of the manifest's "
                         f"{len(play.resources)} resources: {', '.join(unserved)}")
    return sum(int(ch) for _, ch, _, _ in rows)
