"""Users and groups (each recorded as fabstack's before it is created)."""

from __future__ import annotations

from .engine import Change, Ok, Resource, claim_script, q


class Group(Resource):
    """A (system) group."""

    def __init__(self, name: str, system: bool = True):
        self.name, self.system = name, system
        self.what = f"group {name}"
        self.claim = f"group {name}"

    def probe(self) -> str:
        return f"getent group {q(self.name)}"

    def exists(self, state):
        return bool(state.strip())

    def plan(self, state, host):
        if self.exists(state):
            return Ok("exists")
        return Change("created", claim_script(self.claim)
                      + f"groupadd {'--system ' if self.system else ''}{q(self.name)}")


class User(Resource):
    """A user with primary ``group``, ``home``, ``shell``, a locked password and exactly the
    supplementary ``groups`` given (it is taken out of any other: least privilege).

    The home directory is not created here: declare it as a :class:`Directory`.
    """

    def __init__(self, name: str, group: str, home: str, shell: str = "/usr/sbin/nologin",
                 system: bool = True, groups: list[str] | tuple = ()):
        self.name, self.group, self.home, self.shell = name, group, home, shell
        self.system, self.groups = system, sorted(groups)
        self.what = f"user {name}"
        self.claim = f"user {name}"

    def probe(self) -> str:
        n = q(self.name)
        return (f"getent passwd {n}; echo \"groups $(id -Gn {n} 2>/dev/null)\"; "
                f"echo \"gid $(getent group {q(self.group)} | cut -d: -f3)\"; "
                f"echo \"password $(getent shadow {n} | cut -d: -f2 | cut -c1)\"")

    def exists(self, state):
        lines = state.splitlines()
        return bool(lines) and lines[0].count(":") == 6

    def plan(self, state, host):
        lines = state.splitlines()
        info = dict(line.split(" ", 1) if " " in line else (line, "") for line in lines[1:])
        passwd = lines[0].split(":") if self.exists(state) else None
        if passwd is None:
            extra = f" --groups {q(','.join(self.groups))}" if self.groups else ""
            return Change(f"created (group {self.group}, home {self.home}, shell {self.shell})",
                          claim_script(self.claim)
                          + f"useradd {'--system ' if self.system else ''}--gid {q(self.group)} "
                          f"--home-dir {q(self.home)} --no-create-home --shell {q(self.shell)}"
                          f"{extra} {q(self.name)}")
        fixes, args = [], []
        if passwd[3] != info.get("gid", "").strip():
            fixes.append(f"primary group -> {self.group}")
            args.append(f"--gid {q(self.group)}")
        if passwd[5] != self.home:
            fixes.append(f"home {passwd[5]} -> {self.home}")
            args.append(f"--home {q(self.home)}")
        if passwd[6] != self.shell:
            fixes.append(f"shell {passwd[6]} -> {self.shell}")
            args.append(f"--shell {q(self.shell)}")
        # id -Gn: the primary group, then the supplementary ones
        have = set(info.get("groups", "").split()) - {self.group}
        missing = [g for g in self.groups if g not in have]
        extra = sorted(have - set(self.groups))
        if missing:
            fixes.append(f"added to {', '.join(missing)}")
        if extra:
            fixes.append(f"removed from {', '.join(extra)}")
        if missing or extra:
            args.append(f"--groups {q(','.join(self.groups))}")
        if info.get("password", "").strip() not in ("!", "*"):
            fixes.append("password login locked")
            args.append("--lock")
        if not fixes:
            return Ok("exists as declared")
        return Change("; ".join(fixes), f"usermod {' '.join(args)} {q(self.name)}")
