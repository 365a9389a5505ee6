"""systemd units: enabled, running, restarted or reloaded when their files changed."""

from __future__ import annotations

from .engine import PENDING_DIR, Change, Ok, Resource, host_notified, q

# systemd's jobs that leave a unit running when done
STARTING_JOBS = ("start", "restart", "try-restart", "reload-or-start")


class Service(Resource):
    """A systemd unit, ``enabled`` at boot and ``running`` (or not).

    Reloads systemd when the unit's file changed, and restarts or reloads the
    unit once when a :class:`File` notified it (in this run or an earlier,
    interrupted one).
    """

    OK_ENABLED = ("enabled", "static", "alias", "indirect", "generated", "enabled-runtime")

    def __init__(self, name: str, enabled: bool = True, running: bool = True):
        self.unit = name if "." in name else f"{name}.service"
        self.enabled, self.running = enabled, running
        self.what = f"service {self.unit}"

    def probe(self) -> str:
        u = q(self.unit)
        # the type of systemd's job on the unit, when one is under way (a deploy's queued
        # restart of Celery: "job=restart")
        return (f"s=$(systemctl show -p LoadState -p UnitFileState -p ActiveState "
                f"-p NeedDaemonReload -p Job -- {u} 2>/dev/null)\n"
                'printf "%s\\n" "$s"\n'
                f"case $s in *Job=[0-9]*) systemctl list-jobs --no-legend -- {u} | "
                "awk '{print \"job=\" $3}' ;; esac\n"
                f"for f in {self._markers}; do [ -e \"$f\" ] && echo \"pending=${{f##*@}}\";"
                " done; true")

    @property
    def _markers(self) -> str:
        """Marker globs: a File may notify "nginx" or "nginx.service"."""
        names = {self.unit, self.unit.removesuffix(".service")}
        return " ".join(f"{PENDING_DIR}/{q(n)}@*" for n in sorted(names))

    def plan(self, state, host):
        props = dict(line.split("=", 1) for line in state.splitlines() if "=" in line)
        pending = {action for action in ("restart", "reload")
                   for name in (self.unit, self.unit.removesuffix(".service"))
                   if host_notified(host, f"{name}@{action}")}
        pending |= {line.split("=", 1)[1] for line in state.splitlines()
                    if line.startswith("pending=")}
        u = q(self.unit)
        cmds, done = [], []
        if props.get("LoadState") == "not-found" or props.get("NeedDaemonReload") == "yes":
            cmds.append("systemctl daemon-reload")
            done.append("unit files reloaded")
        if self.enabled and props.get("UnitFileState") not in self.OK_ENABLED:
            cmds.append(f"systemctl enable -- {u}")
            done.append("enabled")
        elif not self.enabled and props.get("UnitFileState") == "enabled":
            cmds.append(f"systemctl disable -- {u}")
            done.append("disabled")
        active = props.get("ActiveState") == "active"
        starting = props.get("job") in STARTING_JOBS
        if self.running and not active and not starting:
            cmds.append(f"systemctl start -- {u}")
            done.append("started")
        elif self.running and "restart" in pending:
            cmds.append(f"systemctl restart -- {u}")
            done.append("restarted (its configuration changed)")
        elif self.running and "reload" in pending:
            cmds.append(f"systemctl reload -- {u}")
            done.append("reloaded (its configuration changed)")
        elif not self.running and active:
            cmds.append(f"systemctl stop -- {u}")
            done.append("stopped")
        if pending and cmds:  # a stopped unit keeps them: starting it later clears them
            cmds.append(f"rm -f {self._markers}")
        if not cmds:
            return Ok(("enabled, " if self.enabled else "") + (
                "stopped" if not self.running else "running" if active else
                f"starting (systemd's {props['job']} job is under way)"))
        return Change(", ".join(done), "\n".join(cmds))


class ReleaseService(Service):
    """A :class:`Service` that runs only once ``release_dir`` exists (a release is deployed).

    Whether it does is read by the same probe as the unit's state, so deciding costs no
    round trip of its own.
    """

    def __init__(self, name: str, release_dir: str):
        super().__init__(name, enabled=True, running=True)
        self.release_dir = release_dir

    def probe(self) -> str:
        return f"test -d {q(self.release_dir)} && echo release=yes\n" + super().probe()

    def plan(self, state, host):
        self.running = "release=yes" in state.splitlines()
        outcome = super().plan(state, host)
        if not self.running:
            outcome.message += f" (no release deployed yet: {self.release_dir} missing)"
        return outcome
