"""A rolling deploy: ``fab deploy`` on several hosts of a site spread over hosts.

Given hosts of one site (tasks/inventory.py; ``fab deploy`` without ``-H`` acts on the whole
inventory), the deploy runs once for them all (tasks/executor.py: ``site_wide``), in steps:

1. **Lock and read.** The run holds the host lock of every host it acts on (those given, and
   the site's lb and db hosts, which take part) until it ends: one lock for the site. Every app
   host (web, worker) is read at once. A host not provisioned, a source that does not resolve,
   or fewer healthy web hosts than a batch leaves serving stop it before anything changes.
2. **Build.** On every app host at once: the release unpacked, its virtualenv built, its WSGI
   app checked; on the web hosts, its static files collected. A failure on any host removes
   the release from every host: nothing was switched anywhere.
3. **Migrate.** One dump (on the db host) and one migration, from the first app host.
4. **Web hosts**, ``batch`` at a time (default one): each taken out of the lb's upstream (its
   NGINX reloaded gracefully: requests under way finish), switched blue/green and checked as
   on one host (tasks/deploy.py), then put back. A host that fails stays on the release it ran,
   back in the upstream if that one answers healthy; the rollout stops there (the hosts not
   switched keep their release, the new one removed from them) and exits non-zero.
5. **Worker hosts**: the release made current and Celery restarted (warm shutdown: running
   tasks finish), beat with its host.
6. Old releases pruned on every host switched.

A table ends the run: each app host's release before and after. On one host, or on hosts of
no spread site, ``fab deploy`` runs host by host as before (tasks/deploy.py).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass

from fabric import Connection
from invoke.exceptions import Exit
from paramiko import SSHException

from . import deploy, inventory, nginx
from .host import Host, StepFailed, load_config, say, session
from .primitives import Service, ensure, q

TITLE = "deploy"


@dataclass
class Member:
    """One host of the rollout and how it went."""

    h: Host
    state: deploy.State | None = None
    source: deploy.Source | None = None
    built: bool = False
    now: str = ""  # the release it runs now
    note: str = ""  # what became of it

    @property
    def name(self) -> str:
        return self.h.name

    def has(self, role: str) -> bool:
        return self.h.site.has(role)

    @property
    def before(self) -> str:
        return self.state.current if self.state else ""


def attempt(m: Member, step, *args) -> bool:
    """``step(m, *args)``, its failure reported as ``m``'s; True when it succeeded."""
    h = m.h
    try:
        step(m, *args)
        return True
    except StepFailed as exc:
        h.failed(exc.what, exc.message)
    except (OSError, EOFError, SSHException) as exc:
        h.failed(h.step or "connection", f"cannot talk to {h.name}: "
                 f"{exc or type(exc).__name__}")
    m.note = m.note or f"failed ({h.step or 'connection'})"
    return False


def at_once(members: list[Member], step, *args) -> bool:
    """``step`` on every member at once, a thread each; True when it succeeded on all."""
    if len(members) < 2:
        return all(attempt(m, step, *args) for m in members)
    with ThreadPoolExecutor(max_workers=len(members)) as pool:
        return all(list(pool.map(lambda m: attempt(m, step, *args), members)))


def rolling_deploy(c, hosts: list[dict], ref=None, force=False, check=False,
                   maintenance=False, batch=1) -> None:
    """``fab deploy`` on the hosts (Connection arguments) of a site: see the module's doc."""
    started = time.monotonic()
    _settings, entries = load_config(c.config)
    if maintenance:
        raise Exit("error: --maintenance is not built for a rolling deploy yet: turn the "
                   "page on with fab maintenance on first (it acts on every web host)", code=2)
    if not str(batch).isdigit() or int(batch) < 1:
        raise Exit(f"error: --batch {batch!r}: give a number of web hosts, 1 or more", code=2)
    conns = [Connection(config=c.config, **kwargs) for kwargs in hosts]
    site = inventory.site_of(entries, conns[0].original_host)
    given = {inventory.site_of(entries, conn.original_host).me.name for conn in conns}
    for role in ("lb", "db"):  # they take part even when not given: the upstream, the dump
        [entry] = site.holding(role)
        if entry.name not in given:
            given.add(entry.name)
            conns.append(Connection(entry.ssh, config=c.config))
    rollout = None
    with ExitStack() as stack:
        members = [Member(stack.enter_context(session(conn, TITLE, check))) for conn in conns]
        rollout = Rollout(members, int(batch), check)
        rollout.run(ref, force)
    rollout.finish(time.monotonic() - started)


class Rollout:
    """The steps of a rolling deploy over ``members`` (see the module's doc)."""

    def __init__(self, members: list[Member], batch: int, check: bool):
        self.members, self.batch, self.check = members, batch, check
        self.apps = [m for m in members if m.has("web") or m.has("worker")]
        self.webs = [m for m in self.apps if m.has("web")]
        self.workers = [m for m in self.apps if not m.has("web")]
        self.lb = next((m for m in members if m.has("lb") and not m.has("web")), None)
        self.release = ""
        self.stopped = ""  # why the rollout stopped ("": it did not)

    def run(self, ref, force: bool) -> None:
        if not self.check and not at_once(self.members, lambda m: m.h.take_lock()):
            self.stopped = "a host's lock was not taken; nothing was done"
            return
        for m in self.members:
            if m not in self.apps:
                deploy.releases_here(m.h)
        if not self.apps:
            return
        if not self._read(ref, force):
            return
        if self.check:
            for m in self.apps:
                m.h.changed(f"release {self.release}", f"would deploy {m.source.label} "
                            f"({m.source.commit[:12]}) over {m.before or 'nothing'}")
            return
        if not self._build():
            return
        first = self.apps[0]
        if not attempt(first, lambda m: deploy._backup_and_migrate(m.h, self.release)):
            self._abandon(self.apps, f"{first.name}'s migration failed")
            return
        for start in range(0, len(self.webs), self.batch):
            if not self._switch_batch(self.webs[start:start + self.batch]):
                self._abandon(self.webs[start:] + self.workers, "the rollout stopped")
                return
        at_once(self.workers, self._switch_worker)
        for m in self.apps:
            attempt(m, lambda m: deploy._prune(
                m.h, m.state.releases + [self.release], int(m.h.settings["RELEASES_KEEP"]),
                {self.release, m.before}))

    # -- the steps ---------------------------------------------------------------------------

    def _read(self, ref, force: bool) -> bool:
        """Every app host's releases and the source; False (the rollout stopped) when one
        cannot be deployed, when the commit is current everywhere, or when too few web hosts
        are healthy for the batch."""
        h = self.apps[0].h
        s = h.settings
        source = None
        if s["DEPLOY_REPO"] and not deploy.is_remote(s["DEPLOY_REPO"]):
            # archived once for every host
            if not attempt(self.apps[0], lambda m: setattr(m, "source", deploy.resolve_local(
                    s["DEPLOY_REPO"], ref or s["DEPLOY_REF"], s["DEPLOY_SUBDIR"]))):
                self.stopped = "the release source did not resolve; nothing was done"
                return False
            source = self.apps[0].source

        def read(m: Member) -> None:
            m.state, m.source = deploy.read_host(m.h, ref, source)

        if not at_once(self.apps, read):
            self.stopped = "an app host cannot be deployed; nothing was done"
            return False
        if any(m.source is None for m in self.apps):  # check mode, never mirrored
            return False
        commits = {m.source.commit for m in self.apps}
        if len(commits) > 1:
            for m in self.apps:
                m.h.failed("release source", f"{ref or s['DEPLOY_REF']} is "
                           f"{m.source.commit[:12]} here; the hosts disagree (the repository "
                           "moved meanwhile?): deploy again")
            self.stopped = "the hosts resolved different commits; nothing was done"
            return False
        wanted = [m for m in self.apps if attempt(m, lambda m: setattr(
            m, "note", "deploy" if deploy.wanted(m.h, m.state, m.source, force) else "current"))]
        if len(wanted) < len(self.apps):
            self.stopped = "a current release is not healthy; nothing was done"
            return False
        if all(m.note == "current" for m in self.apps):
            for m in self.apps:
                m.now, m.note = m.before, "already current"
            return False
        for m in self.apps:
            m.note = ""
        self.release = deploy.release_name(commits.pop())
        return self._healthy_enough()

    def _healthy_enough(self) -> bool:
        """True unless fewer web hosts answer healthy than a batch leaves serving (on a site
        that serves at all); the unhealthy ones go first."""
        if len(self.webs) < 2 or not any(m.before for m in self.webs):
            return True
        health = dict(zip((m.name for m in self.webs), self._pool(
            lambda m: bool(m.before) and deploy.health_check(m.h, m.before, timeout=5)[0],
            self.webs), strict=True))
        healthy, unhealthy = sum(health.values()), [n for n, ok in health.items() if not ok]
        serving = len(self.webs) - self.batch
        why = ""
        if serving < 1:
            why = (f"a batch of {self.batch} takes all {len(self.webs)} web hosts out at once "
                   f"(--batch {len(self.webs) - 1} at most)")
        elif healthy < serving:
            why = (f"{healthy} of {len(self.webs)} web hosts answer healthy (not: "
                   f"{', '.join(unhealthy)}); a batch of {self.batch} leaves {serving} serving")
        if why:
            for m in self.webs:
                m.h.failed("rollout", f"refused: {why}")
            self.stopped = f"refused: {why}; nothing was done"
            return False
        self.webs.sort(key=lambda m: health[m.name])  # the unhealthy ones first (stable)
        return True

    @staticmethod
    def _pool(step, members: list[Member]) -> list:
        with ThreadPoolExecutor(max_workers=len(members)) as pool:
            return list(pool.map(step, members))

    def _build(self) -> bool:
        def build(m: Member) -> None:
            deploy._prepare(m.h, m.source, self.release)
            m.built = True
            if m.has("web"):
                deploy._collect_static(m.h, self.release)

        if at_once(self.apps, build):
            return True
        failed = [m.name for m in self.apps if m.note]
        self._abandon([m for m in self.apps if m.built], f"{', '.join(failed)} failed to "
                      "build it; nothing was switched")
        return False

    def _upstream(self, down: list[Member]) -> bool:
        """The lb's upstream with ``down`` marked down, live (a graceful reload)."""
        if self.lb is None:  # the lb is the one web host: nothing to take out
            return True
        names = tuple(m.name for m in down)
        return attempt(self.lb, lambda m: ensure(m.h, nginx.web_upstream(m.h, names),
                                                 Service("nginx")))

    def _switch_batch(self, batch: list[Member]) -> bool:
        if not self._upstream(batch):
            names = ", ".join(m.name for m in batch)
            self.stopped = f"the lb's upstream could not take {names} out"
            return False

        def switch(m: Member) -> None:
            try:  # a failure abandons the release there (deploy._abort)
                color = deploy._start_beside(m.h, self.release)
                try:
                    detail = deploy._switch(m.h, self.release, color, m.before)
                except StepFailed as failed:
                    deploy._abort(m.h, self.release, failed.what, failed.message)
            except StepFailed:
                m.built = False
                raise
            m.now, m.note = self.release, "switched"
            m.h.changed(f"release {self.release}", f"serving from {m.h.settings.app}@{color} "
                        f"({detail})")
            deploy._restart_workers(m.h, "(new release)")

        at_once(batch, switch)
        failed = [m for m in batch if m.now != self.release]
        back_out = []
        for m in failed:
            healthy = bool(m.before) and deploy.health_check(m.h, m.before, timeout=10)[0]
            m.now = m.before
            m.note += f"; {m.before or 'nothing'} serves" + ("" if healthy else
                                                             ", not healthy: left out of the lb")
            if not healthy:
                back_out.append(m)
        self._upstream(back_out)
        if failed:
            self.stopped = f"{', '.join(m.name for m in failed)} failed"
        return not failed

    def _switch_worker(self, m: Member) -> None:
        deploy._link(m.h, self.release)
        m.now, m.note = self.release, "switched"
        m.h.changed(f"release {self.release}", "current (for Celery: no web role here)")
        deploy._restart_workers(m.h, "(new release)")

    def _abandon(self, members: list[Member], why: str) -> None:
        """Remove the release from ``members``, which keep the one they run."""
        self.stopped = self.stopped or why
        for m in members:
            m.now = m.now or m.before
            if m.built and m.now != self.release:
                if attempt(m, lambda m: m.h.run(
                        f"rm -rf -- {q(m.h.settings.layout.release(self.release))}",
                        what=f"release {self.release}")):
                    m.h.ok(f"release {self.release}", f"removed: {why}; {m.before or 'nothing'}"
                           " runs as before")
                m.note = m.note or "kept its release"

    def finish(self, seconds: float) -> None:
        """The table, then a non-zero exit when the rollout stopped."""
        if all(m.state is None for m in self.apps) or (self.check and not self.stopped):
            if self.stopped:
                raise Exit(f"rolling deploy stopped: {self.stopped}", code=1)
            return
        width = max(len(m.name) for m in self.apps)
        lines = [f"{TITLE} of {self.release or 'nothing'} on {len(self.apps)} app hosts in "
                 f"{seconds:.2f} s:",
                 f"  {'host':<{width}}  {'release before':<27}  {'release now':<27}  result"]
        for m in self.apps:
            lines.append(f"  {m.name:<{width}}  {m.before or 'none':<27}  "
                         f"{m.now or m.before or 'none':<27}  {m.note or '-'}")
        say("\n".join(lines))
        if self.stopped:
            runs = ", ".join(f"{m.name} {m.now or m.before or 'none'}" for m in self.apps)
            raise Exit(f"rolling deploy stopped: {self.stopped}\nhosts run: {runs}", code=1)
