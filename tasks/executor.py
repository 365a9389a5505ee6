"""fab's executor for fabstack: Fabric's, with two marks a task can carry.

- :func:`every_host`: Fabric runs a task once per host and stops at the first host that
  fails. A task marked ``every_host`` (the read-only ones: ``status``, ``releases``) goes on
  to the next host instead, so each host's report is printed; fab then exits non-zero naming
  every host that failed. Other tasks keep Fabric's behaviour: a converging run stops at the
  first failure.
- :func:`takes_remainder`: the words after ``--`` are the task's own arguments (``fab manage
  -- migrate``), read by the task; Fabric would also run them as a shell command on each host.

fab uses this executor through the project's ``fabric.yaml`` (``tasks.executor_class``):
Invoke chooses the executor before it reads a collection's own configuration.
"""

from __future__ import annotations

import sys

from fabric.executor import Executor as FabricExecutor
from fabric.tasks import ConnectionCall
from invoke.exceptions import Exit


def every_host(task):
    """Mark ``task`` to run on every host even when one fails (see the module's doc)."""
    task.every_host = True
    return task


def takes_remainder(task):
    """Mark ``task`` as reading the words after ``--`` itself (see the module's doc)."""
    task.takes_remainder = True
    return task


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

    def expand_calls(self, calls, apply_hosts=True):
        if any(getattr(call.task, "takes_remainder", False) for call in calls):
            self.core.remainder = ""  # the task's arguments, not a command of their own
        expanded = super().expand_calls(calls, apply_hosts)
        for call in expanded:
            if isinstance(call, ConnectionCall) and getattr(call.task, "every_host", False):
                call.task = EveryHostCall(call.task, call.init_kwargs["host"], self.failures)
                self.every_host_calls += 1
        return expanded
