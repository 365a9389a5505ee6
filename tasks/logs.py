"""``fab logs``: the stack's logs, from the journal and the log files, merged in time order.

One script on the host (files/logs.sh.j2) prints the journal of the chosen units
(:func:`sources`) and the last FILE_LINES lines of their log files; :class:`LogLines` gives
each line a time (for a file's line, the timestamp it starts with, or the time of the line
before), a ``TIME UNIT |`` prefix and masked secrets, and prints them in time order, then,
with ``--follow``, new lines as they come. The README's "Logs" section is the manual.
"""

from __future__ import annotations

import calendar
import fnmatch
import json
import re
import sys
import time
from dataclasses import dataclass

from fabric import task

from . import scripts
from .host import StepFailed, session

FILE_LINES = 20000  # of each log file, only the last lines are read
FILE_MARK = "@@fabstack-file@@ "
FOLLOW_MARK = "@@fabstack-follow@@"
_SINCE = re.compile(r"^(\d+)\s*(s|sec|m|min|h|d)$")
_SECONDS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}
_MONTHS = {m: i for i, m in enumerate(("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug",
                                      "Sep", "Oct", "Nov", "Dec"), 1)}
# Timestamps a log line of the stack starts with (near its start), most specific first.
_STAMPS = [
    # gunicorn's error log, Celery, Django's plain format, PostgreSQL: 2026-11-30 05:00:01
    (re.compile(r"(\d{4})-(\d\d)-(\d\d)[ T](\d\d):(\d\d):(\d\d)"),
     lambda m: (int(m[1]), int(m[2]), int(m[3]), int(m[4]), int(m[5]), int(m[6]))),
    # NGINX's error log: 2026/11/30 05:00:01
    (re.compile(r"(\d{4})/(\d\d)/(\d\d) (\d\d):(\d\d):(\d\d)"),
     lambda m: (int(m[1]), int(m[2]), int(m[3]), int(m[4]), int(m[5]), int(m[6]))),
    # access logs (gunicorn, NGINX): [30/Nov/2026:05:00:01 +0000]
    (re.compile(r"(\d\d)/([A-Z][a-z]{2})/(\d{4}):(\d\d):(\d\d):(\d\d)"),
     lambda m: (int(m[3]), _MONTHS.get(m[2], 1), int(m[1]), int(m[4]), int(m[5]), int(m[6]))),
    # Redis: 123:M 30 Nov 2026 05:00:01.123
    (re.compile(r"(\d{1,2}) ([A-Z][a-z]{2}) (\d{4}) (\d\d):(\d\d):(\d\d)"),
     lambda m: (int(m[3]), _MONTHS.get(m[2], 1), int(m[1]), int(m[4]), int(m[5]), int(m[6]))),
]


@dataclass
class Source:
    """One unit's logs: journal units (globs), syslog identifiers, log file globs."""

    units: tuple[str, ...]
    tags: tuple[str, ...]
    files: tuple[str, ...]


def sources(s) -> dict[str, Source]:
    """The units ``--unit`` takes, in the order ``fab logs`` lists them."""
    app = s.app
    return {
        # gunicorn's instances (and the unit of a host deployed before them)
        "app": Source((f"{app}@*.service", f"{app}.service", f"{app}.socket"), (),
                      (f"{s.layout.logs}/*.log",)),
        "celery": Source(("celery.service",), (), (f"{s.layout.celery_logs}/w*.log",)),
        "beat": Source(("celerybeat.service",), (), (f"{s.layout.celery_logs}/beat.log",)),
        "nginx": Source(("nginx.service",), (), ("/var/log/nginx/*.log",)),
        "postgresql": Source(("postgresql*.service",), (), ("/var/log/postgresql/*.log",)),
        "redis": Source(("redis-server.service",), (), ("/var/log/redis/*.log",)),
        "backup": Source((f"{app}-backup.service",), (f"{app}-backup",), ()),
    }


def since_seconds(since: str) -> int:
    """``--since`` (5min, 1h, 2d, 30s) in seconds; StepFailed naming the forms otherwise."""
    m = _SINCE.match(since.strip())
    if not m:
        raise StepFailed("logs", f"--since {since!r}: give a number and a unit: 30s, 5min, "
                         "1h, 2d")
    return int(m[1]) * _SECONDS[m[2]]


def line_time(line: str, offset: int) -> float | None:
    """The UTC epoch of the timestamp near the start of ``line`` (host's UTC ``offset`` in
    seconds for stamps without a zone), or None."""
    head = line[:80]
    for pattern, fields in _STAMPS:
        m = pattern.search(head)
        if m:
            try:
                return calendar.timegm(fields(m) + (0, 0, 0)) - offset
            except (ValueError, OverflowError):
                return None
    return None


def script(s, selected: dict[str, Source], seconds: int, follow: bool) -> str:
    """The shell script that prints the logs (files/logs.sh.j2): ``cut=EPOCH offset=SECONDS``,
    the journal as JSON lines, each file's tail after a FILE_MARK line; with ``follow``,
    FOLLOW_MARK and then new lines as they come."""
    return scripts.script(
        "logs.sh.j2", s, seconds=seconds, follow="1" if follow else "",
        units=" ".join(u for src in selected.values() for u in src.units),
        tags=" ".join(t for src in selected.values() for t in src.tags),
        files=" ".join(f for src in selected.values() for f in src.files),
        file_mark=FILE_MARK, follow_mark=FOLLOW_MARK, file_lines=FILE_LINES)


def journal_line(entry: dict, selected: dict[str, Source]) -> tuple[float, str, str] | None:
    """(time, unit, message) of a journal entry, or None when it is not one."""
    if "__REALTIME_TIMESTAMP" not in entry:
        return None
    names = [entry.get(k, "") for k in ("_SYSTEMD_UNIT", "UNIT", "OBJECT_SYSTEMD_UNIT")]
    tag = entry.get("SYSLOG_IDENTIFIER", "")
    label = next((name for name, src in selected.items()
                  if tag in src.tags or any(fnmatch.fnmatch(n, u) for n in names if n
                                            for u in src.units)), None)
    if label is None:  # -u also matches systemd's own messages about the unit
        label = next(iter(selected)) if len(selected) == 1 else "journal"
    message = entry.get("MESSAGE", "")
    if isinstance(message, list):  # journald's form for bytes that are not UTF-8
        message = bytes(message).decode(errors="replace")
    return int(entry["__REALTIME_TIMESTAMP"]) / 1e6, label, str(message or "")


def file_label(path: str, selected: dict[str, Source]) -> str:
    name = next((name for name, src in selected.items()
                 if any(fnmatch.fnmatch(path, f) for f in src.files)), "file")
    return f"{name}/{path.rsplit('/', 1)[-1]}"


class LogLines:
    """Reads the script's output line by line; prints the backlog sorted by time, then (when
    following) each new line as it comes, prefixed and masked."""

    def __init__(self, selected: dict[str, Source], mask, out=None):
        self.selected, self.mask, self.out = selected, mask, out
        self.cut, self.offset = 0, 0
        self.backlog: list[tuple[float, int, str, str]] = []
        self.following = False
        self.file: str | None = None
        self.last: dict[str, float] = {}  # per file: the time of its last stamped line
        self.seen: set[str] = set()  # journal cursors (an entry may match -u and -t)
        self.printed = 0

    def feed(self, line: str) -> None:
        if line.startswith("cut=") and not self.backlog and self.file is None:
            fields = dict(part.split("=", 1) for part in line.split())
            self.cut, self.offset = int(fields["cut"]), int(fields["offset"])
            return
        if line == FOLLOW_MARK:
            self.flush()
            self.following, self.file = True, None
            return
        if line.startswith(FILE_MARK):
            self.file = line[len(FILE_MARK):]
            return
        if self.following and line.startswith("==> ") and line.endswith(" <=="):
            self.file = line[4:-4]
            return
        entry = None
        if line.startswith("{\""):
            try:
                entry = json.loads(line)
            except ValueError:
                entry = None
        found = journal_line(entry, self.selected) if isinstance(entry, dict) else None
        if found:
            cursor = entry.get("__CURSOR", "")
            if cursor in self.seen:
                return
            self.seen.add(cursor)
            self._add(*found)
        elif self.file is not None and line:
            stamp = line_time(line, self.offset)
            if stamp is None:
                stamp = self.last.get(self.file, 0.0)
            self.last[self.file] = stamp
            if stamp >= self.cut or self.following:
                self._add(stamp, file_label(self.file, self.selected), line)

    def _add(self, stamp: float, label: str, message: str) -> None:
        for part in message.splitlines() or [""]:
            if self.following:
                self._print(stamp, label, part)
            else:
                self.backlog.append((stamp, len(self.backlog), label, part))

    def _print(self, stamp: float, label: str, message: str) -> None:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(stamp))
        print(self.mask(f"{when} {label} | {message}"), file=self.out or sys.stdout,
              flush=True)
        self.printed += 1

    def flush(self) -> None:
        for stamp, _, label, message in sorted(self.backlog):
            self._print(stamp, label, message)
        self.backlog = []


def stream(h, text: str, on_line) -> tuple[int, str]:
    """Run ``text`` as root on the host, calling ``on_line`` with each line of its output as
    it comes; return its exit status and its standard error. Ctrl-C ends it."""
    mode = h._privilege()
    command = {"root": "/bin/sh -s", "nopasswd": "sudo -n /bin/sh -s",
               "password": "sudo -k -S -p '' /bin/sh -s"}[mode]
    stdin = (h.sudo_password + "\n" if mode == "password" else "") + text
    h.step = "logs"
    chan = h.conn.transport.open_session()
    # short waits on the channel: a Ctrl-C is seen within a second, whatever paramiko waits on
    chan.settimeout(1)
    err = bytearray()
    try:
        chan.exec_command(command)
        chan.sendall(stdin.encode())
        chan.shutdown_write()
        buf = b""
        while True:
            try:
                data = chan.recv(65536)
            except TimeoutError:  # socket.timeout: nothing new yet
                continue
            while chan.recv_stderr_ready():
                err.extend(chan.recv_stderr(65536))
            if not data:
                break
            buf += data
            *lines, buf = buf.split(b"\n")
            for line in lines:
                on_line(line.decode(errors="replace"))
        if buf:
            on_line(buf.decode(errors="replace"))
        while chan.recv_stderr_ready():
            err.extend(chan.recv_stderr(65536))
        code = chan.recv_exit_status()
    except KeyboardInterrupt:
        code = 0
    finally:
        chan.close()
    h.round_trips += 1
    return code, err.decode(errors="replace")


@task(help={"unit": "app, celery, beat, nginx, postgresql, redis or backup (default: all)",
            "since": "How far back: 30s, 5min, 1h, 2d (default 1h)",
            "follow": "Keep printing new lines until Ctrl-C"})
def logs(c, unit=None, since="1h", follow=False):
    """Print the stack's logs (journal and log files), merged in time order, secrets masked."""
    with session(c, "logs", lock=False) as h:
        every = sources(h.settings)
        if unit is not None and unit not in every:
            raise StepFailed("logs", f"--unit {unit!r}: choose one of {', '.join(every)}")
        seconds = since_seconds(since)
        selected = {unit: every[unit]} if unit else every
        reader = LogLines(selected, h.mask)
        h.conn.open()
        status, err = stream(h, script(h.settings, selected, seconds, follow), reader.feed)
        reader.flush()
        if status not in (0, -1):
            raise StepFailed("logs", h.mask(err.strip() or f"exit {status}"))
        h.ok("logs", f"{reader.printed} lines of {', '.join(selected)} since {since} ago")
