"""Files and directories: content, owner, group and mode."""

from __future__ import annotations

import base64
import difflib
import hashlib
import os

from .engine import PENDING_DIR, Change, Ok, Resource, q

DIFF_LIMIT = 64 * 1024


def _stat_snippet(path: str) -> str:
    return f"stat -c '%F|%U|%G|%a' -- {q(path)} 2>/dev/null || echo missing"


def _fix_meta(path: str, meta: str, owner: str, group: str, mode: int) -> tuple[list, list]:
    _kind, have_owner, have_group, have_mode = meta.split("|")
    fixes, cmds = [], []
    if (have_owner, have_group) != (owner, group):
        fixes.append(f"owner {have_owner}:{have_group} -> {owner}:{group}")
        cmds.append(f"chown {q(owner)}:{q(group)} -- {q(path)}")
    if int(have_mode, 8) != mode:
        fixes.append(f"mode {int(have_mode, 8):04o} -> {mode:04o}")
        cmds.append(f"chmod {mode:04o} -- {q(path)}")
    return fixes, cmds


class Directory(Resource):
    """A directory with ``owner``, ``group`` and ``mode`` (parents are created as needed)."""

    def __init__(self, path: str, owner: str = "root", group: str = "root", mode: int = 0o755):
        self.path, self.owner, self.group, self.mode = path, owner, group, mode
        self.what = f"directory {path}"

    def probe(self) -> str:
        return _stat_snippet(self.path)

    def plan(self, state, host):
        state = state.strip()
        if state == "missing":
            return Change(f"created ({self.owner}:{self.group} {self.mode:04o})",
                          f"mkdir -p -- {q(self.path)}\n"
                          f"chown {q(self.owner)}:{q(self.group)} -- {q(self.path)}\n"
                          f"chmod {self.mode:04o} -- {q(self.path)}")
        if not state.startswith("directory|"):
            return Change(f"is a {state.split('|')[0]}, not a directory: cannot fix",
                          f"echo {q(self.path)} is not a directory >&2; exit 1")
        fixes, cmds = _fix_meta(self.path, state, self.owner, self.group, self.mode)
        if not fixes:
            return Ok(f"{self.owner}:{self.group} {self.mode:04o}")
        return Change("; ".join(fixes), "\n".join(cmds))

class File(Resource):
    """A file with exactly ``content``, ``owner``, ``group`` and ``mode`` (or absent).

    The new content is written to a temporary file in the same directory, which
    mktemp creates empty and readable by root only and which is given the file's
    owner, group and mode *before* the content lands (so a secret is never readable
    by others, whatever the umask), checked with ``validate`` (``%s`` is the
    temporary path) when given, then moved into place atomically. ``notify`` names
    units to act on when the file is written, removed or has its owner or mode put right, as
    ``"UNIT:restart"`` or ``"UNIT:reload"``. ``secret=True`` keeps the content out of diffs.
    """

    def __init__(self, path: str, content: str | bytes = b"", owner: str = "root",
                 group: str = "root", mode: int = 0o644, validate: str | None = None,
                 notify: list[str] | tuple = (), secret: bool = False, present: bool = True):
        self.path, self.owner, self.group, self.mode = path, owner, group, mode
        self.content = content.encode() if isinstance(content, str) else content
        self.digest = hashlib.sha256(self.content).hexdigest()
        self.validate, self.secret, self.present = validate, secret, present
        self.markers = [n.replace(":", "@") for n in notify]
        self.what = f"file {path}"

    def probe(self) -> str:
        p = q(self.path)
        if not self.present:
            return f"test -e {p} && echo present"
        dump = "" if self.secret else (
            f"  [ \"$h\" != {self.digest} ] && [ $(stat -c %s -- {p}) -le {DIFF_LIMIT} ]"
            f" && base64 -w0 -- {p}; echo\n")
        return (f"if [ -f {p} ]; then\n  {_stat_snippet(self.path)}\n"
                f"  h=$(sha256sum -- {p} | cut -c1-64); echo \"$h\"\n{dump}"
                "else echo missing; fi")

    def plan(self, state, host):
        if not self.present:
            if state.strip() == "present":
                return Change("removed", f"rm -f -- {q(self.path)}\n" + self._touch_markers(),
                              notify=tuple(self.markers))
            return Ok("absent")
        lines = state.splitlines() + ["", "", ""]
        if lines[0] == "missing":
            diff = "" if self.secret else self._diff(b"", "/dev/null")
            return self._write(f"created ({self.owner}:{self.group} {self.mode:04o})", diff)
        meta, digest, old = lines[0], lines[1].strip(), lines[2].strip()
        if digest != self.digest:
            if self.secret:
                return self._write("content changed (holds secrets: diff not shown)", "")
            diff = self._diff(base64.b64decode(old), self.path) if old else ""
            return self._write("content changed", diff)
        fixes, cmds = _fix_meta(self.path, meta, self.owner, self.group, self.mode)
        if not fixes:
            return Ok(f"up to date ({self.owner}:{self.group} {self.mode:04o})")
        return Change("; ".join(fixes), "\n".join(cmds + [self._touch_markers()]),
                      notify=tuple(self.markers))

    def _touch_markers(self) -> str:
        if not self.markers:
            return ""
        return (f"mkdir -p {PENDING_DIR}\n"
                + "".join(f"touch {PENDING_DIR}/{q(m)}\n" for m in self.markers))

    def _diff(self, old: bytes, old_name: str) -> str:
        try:
            a = old.decode().splitlines(keepends=True)
            b = self.content.decode().splitlines(keepends=True)
        except UnicodeDecodeError:
            return "(binary content)"
        return "".join(difflib.unified_diff(a, b, old_name, self.path, n=1))

    def _write(self, message: str, diff: str) -> Change:
        directory = os.path.dirname(self.path) or "/"
        body = base64.encodebytes(self.content).decode()
        validate = ""
        if self.validate:
            check_cmd = self.validate.replace("%s", '"$tmp"')
            validate = (f"if ! {check_cmd} >&2; then\n"
                        f"  echo 'validation failed ({self.validate}): "
                        f"{self.path} left unchanged' >&2; exit 3\nfi\n")
        return Change(message,
                      f"umask 077\ntmp=$(mktemp {q(directory)}/.fabstack.XXXXXX)\n"
                      "trap 'rm -f \"$tmp\"' EXIT\n"
                      f"chown {q(self.owner)}:{q(self.group)} \"$tmp\"\n"
                      f"chmod {self.mode:04o} \"$tmp\"\n"
                      f"base64 -d > \"$tmp\" <<'FABSTACK_EOF'\n{body}FABSTACK_EOF\n{validate}"
                      f"{self._touch_markers()}mv -f \"$tmp\" {q(self.path)}\ntrap - EXIT",
                      diff, notify=tuple(self.markers))
