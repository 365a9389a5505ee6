"""fab's executor for fabstack: Fabric's, with two marks a task can carry.

- :func:`every_host`: Fabric runs a task once per host and stops at the first host that
  fails. A task marked ``every_host`` (the read-only ones: ``status``, ``releases``) goes on
  to the next host instead, so each host's report is printed; fab then exits non-zero naming
  every host that failed. Other tasks keep Fabric's behaviour: a converging run stops at the
  first failure.
- :func:`takes_remainder`: the words after ``--`` are the task's own arguments (``fab manage
  -- migrate``), read by the task; Fabric would also run them as a shell command on each host.
- :func:`parallel`: given several hosts, the task runs on all of them at once (one thread and
  one connection per host, every connection opened first); every host is attempted even when
  one fails, then a table says how each went, and fab exits non-zero if any failed. On one
  host it runs exactly as Fabric runs it.
- :func:`site_wide`: given several hosts of one site spread over hosts (tasks/inventory.py),
  the task runs once for them all, as the function the mark names (``fab deploy``: a rolling
  deploy, tasks/rollout.py); on one host, or on hosts of no such site, as Fabric runs it.

Without ``-H``, every task acts on the hosts of the inventory (``fabstack.hosts``,
tasks/inventory.py), as if they were given with ``-H``; an inventory name given with ``-H``
connects to that host's ``ssh`` address.

fab uses this executor through the project's ``fabric.yaml`` (``tasks.executor_class``):
Invoke chooses the executor before it reads a collection's own configuration.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass

from fabric import Connection
from fabric.executor import Executor as FabricExecutor
from fabric.tasks import ConnectionCall
from invoke import Call
from invoke.exceptions import Exit

from . import host as host_mod
from . import inventory


def every_host(task):
    """Mark ``task`` to run on every host even when one fails (see the module's doc)."""
    task.every_host = True
    return task


def takes_remainder(task):
    """Mark ``task`` as reading the words after ``--`` itself (see the module's doc)."""
    task.takes_remainder = True
    return task


def parallel(task):
    """Mark ``task`` to run on all its hosts at once (see the module's doc)."""
    task.parallel = True
    return task


def site_wide(run):
    """Mark a task to run once for several hosts of a site as ``run(c, hosts, *args,
    **kwargs)`` (``c``: fab's Context; ``hosts``: each host's Connection arguments; see the
    module's doc)."""
    def mark(task):
        task.site_wide = run
        return task
    return mark


class EveryHostCall:
    """A task on one host whose failure is recorded in ``failures`` instead of raised."""

    def __init__(self, task, host: str, failures: list[tuple[str, int]]):
        self.task, self.host, self.failures = task, host, failures

    def __call__(self, *args, **kwargs):
        try:
            return self.task(*args, **kwargs)
        except Exit as exc:
            if exc.message:
                print(exc.message, file=sys.stderr, flush=True)
            self.failures.append((self.host, exc.code or 1))
            return None

    def __getattr__(self, name):
        return getattr(self.task, name)


@dataclass
class HostRun:
    """One host of a :class:`ParallelRun`: its connection and how its run went."""

    conn: Connection
    name: str
    error: str | None = None  # why it has no summary (no connection, a crash)
    failed: bool = False
    summary: host_mod.Summary | None = None


class ParallelRun:
    """A :func:`parallel` task on several hosts (Connection arguments ``hosts``) at once."""

    def __init__(self, task, hosts: list[dict], title: str):
        self.task, self.hosts, self.title = task, hosts, title

    def __getattr__(self, name):
        return getattr(self.task, name)

    def __call__(self, c, *args, **kwargs):
        started = time.monotonic()
        _settings, entries = host_mod.load_config(c.config)  # a bad .env stops every host
        runs = []
        for kwargs_ in self.hosts:
            conn = Connection(config=c.config, **kwargs_)
            runs.append(HostRun(conn, inventory.site_of(entries, conn.original_host).me.name))
        opened = threading.Barrier(len(runs))  # every connection is opened before any run
        threads = [threading.Thread(target=self._run, args=(run, opened, args, kwargs))
                   for run in runs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self._table(runs, time.monotonic() - started)
        failed = [run.name for run in runs if run.failed]
        if failed:
            raise Exit(f"failed on {len(failed)} of {len(runs)} hosts: {', '.join(failed)}",
                       code=1)

    def _run(self, run: HostRun, opened: threading.Barrier, args, kwargs) -> None:
        """In a thread of its own: connect (the host's key checked), wait for the others'
        connections, run the task; ``run`` says how it went."""
        try:
            host_mod.check_host_keys(run.conn)
            run.conn.open()
        except Exception as exc:  # noqa: BLE001 - any failure to connect is that host's
            run.error = f"cannot connect: {exc or type(exc).__name__}"
            host_mod.say(f"[{run.name}] failed       connection: {run.error}")
        opened.wait()
        try:
            if run.error is None:
                self.task(run.conn, *args, **kwargs)
        except Exit as exc:
            run.failed = True
            if exc.message:
                host_mod.say(exc.message, sys.stderr)
        except Exception as exc:  # noqa: BLE001 - one host's crash stops no other host
            run.error = f"{type(exc).__name__}: {exc}"
            host_mod.say(f"[{run.name}] failed       {self.title}: {run.error}")
        finally:
            run.conn.close()
        run.summary = host_mod.last_summary()  # this thread's: None unless a session ended
        run.failed = run.failed or run.error is not None or run.summary is None

    def _table(self, runs: list[HostRun], seconds: float) -> None:
        """Each host's figures (or why it has none), a line each."""
        width = max(len(run.name) for run in runs)
        # the sessions' title (fab provision's is "provision"), else the task's
        title = next((run.summary.title for run in runs if run.summary), self.title)
        lines = [f"{title} on {len(runs)} hosts in {seconds:.2f} s:",
                 f"  {'host':<{width}}  changed      ok  failed  seconds  round trips"]
        for run in runs:
            row = run.summary
            if row is None:
                lines.append(f"  {run.name:<{width}}  {run.error or 'failed before it began'}")
            else:
                lines.append(f"  {run.name:<{width}}  {row.changed:>7}  {row.ok:>6}  "
                             f"{row.failed:>6}  {row.seconds:>7.2f}  {row.round_trips:>11}")
        host_mod.say("\n".join(lines))


class Executor(FabricExecutor):
    """Fabric's executor, with :func:`every_host` tasks run on each host, failures at the end,
    and the words after ``--`` left to a :func:`takes_remainder` task."""

    def execute(self, *tasks):
        self.failures: list[tuple[str, int]] = []
        self.every_host_calls = 0
        results = super().execute(*tasks)
        if self.failures:
            hosts = ", ".join(host for host, _code in self.failures)
            raise Exit(f"failed on {len(self.failures)} of {self.every_host_calls} hosts: "
                       f"{hosts}", code=max(code for _host, code in self.failures))
        return results

    def normalize_hosts(self, hosts):
        """Fabric's, with an inventory name made that host's ``ssh`` address."""
        entries = self._inventory()
        return super().normalize_hosts(
            [entries[value].ssh if isinstance(value, str) and value in entries else value
             for value in hosts or []])

    def _inventory(self) -> dict[str, inventory.HostEntry]:
        try:
            return inventory.load(self.config)
        except inventory.InventoryError as exc:
            raise Exit(f"error: {exc}\nNothing was changed on any host.", code=2) from None

    def expand_calls(self, calls, apply_hosts=True):
        if any(getattr(call.task, "takes_remainder", False) for call in calls):
            self.core.remainder = ""  # the task's arguments, not a command of their own
        hosts = self.core[0].args.hosts
        if apply_hosts and not hosts.value and (entries := self._inventory()):
            hosts.value = ",".join(entries)  # no -H: the inventory's hosts
        expanded = []
        entries = self._inventory() if apply_hosts else {}
        for call in super().expand_calls(calls, apply_hosts):
            if (isinstance(call, ConnectionCall) and getattr(call.task, "site_wide", None)
                    and inventory.site_of(entries, inventory.host_part(
                        call.init_kwargs["host"])).spread):
                last = expanded[-1] if expanded else None
                if isinstance(last, SiteCall) and last.same(call):
                    last.add(call)
                    continue
                expanded.append(SiteCall(call))
                continue
            if isinstance(call, ConnectionCall) and getattr(call.task, "every_host", False):
                call.task = EveryHostCall(call.task, call.init_kwargs["host"], self.failures)
                self.every_host_calls += 1
            if isinstance(call, ConnectionCall) and getattr(call.task, "parallel", False):
                last = expanded[-1] if expanded else None
                if isinstance(last, ParallelCall) and last.same(call):
                    last.add(call)  # the same task on another host: one call runs them all
                    continue
                call = ParallelCall(call)
            expanded.append(call)
        # a parallel or site-wide task given one host runs as Fabric runs it
        return [call.single if isinstance(call, ParallelCall) and len(call.hosts) == 1
                else call for call in expanded]


class ParallelCall(Call):
    """The calls of one :func:`parallel` task on several hosts, run by a :class:`ParallelRun`."""

    def __init__(self, single: ConnectionCall):
        self.single, self.hosts = single, [single.init_kwargs]
        title = single.called_as or single.task.name
        super().__init__(self.runner(single.task, title), called_as=single.called_as,
                         args=single.args, kwargs=single.kwargs)

    def runner(self, task, title: str):
        return ParallelRun(task, self.hosts, title)

    def same(self, call: ConnectionCall) -> bool:
        """True when ``call`` is this task, with the same arguments, on a host not in it yet."""
        return (call.task is self.single.task and (call.args, call.kwargs) ==
                (self.single.args, self.single.kwargs) and call.init_kwargs not in self.hosts)

    def add(self, call: ConnectionCall) -> None:
        self.hosts.append(call.init_kwargs)


class SiteCall(ParallelCall):
    """The calls of one :func:`site_wide` task on hosts of a site, run by a :class:`SiteRun`."""

    def runner(self, task, title: str):
        return SiteRun(task, self.hosts)


class SiteRun:
    """A :func:`site_wide` task on several hosts (Connection arguments ``hosts``) of a site."""

    def __init__(self, task, hosts: list[dict]):
        self.task, self.hosts = task, hosts

    def __getattr__(self, name):
        return getattr(self.task, name)

    def __call__(self, c, *args, **kwargs):
        return self.task.site_wide(c, self.hosts, *args, **kwargs)
