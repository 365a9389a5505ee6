"""The engine: resources, their plans (:class:`Ok`, :class:`Change`), :func:`ensure`
and the batched probe, and the record of what fabstack owns on a host."""

from __future__ import annotations

import shlex
from dataclasses import dataclass

STATE_DIR = "/var/lib/fabstack"
PENDING_DIR = f"{STATE_DIR}/pending"
# What fabstack created on this host (users, groups, PostgreSQL roles and databases), one
# "KIND NAME" line each. Only these may be changed: an object of the same name that exists
# without a line here belongs to someone else and is refused (Resource.conflict). Hosts
# provisioned before the record existed need their lines added by hand.
OWNED = f"{STATE_DIR}/owned"

q = shlex.quote


@dataclass
class Ok:
    message: str


@dataclass
class Change:
    """What makes a resource right: the report's ``message``, the ``script`` that does it
    and the ``diff`` shown. ``notify`` holds the markers (``UNIT@ACTION``) of the restarts
    and reloads the script asks for (and ``PACKAGE@install`` of the packages a
    :class:`Packages` change installs): a check-mode run writes none to the host, so
    :func:`ensure` keeps them in the run's report for the plans after it
    (:func:`host_notified`)."""

    message: str
    script: str
    diff: str = ""
    notify: tuple[str, ...] = ()


class Resource:
    """Base class: subclasses set ``what`` and implement ``probe`` and ``plan``.

    ``reads_host = False`` marks a resource whose plan needs nothing from the host: it is
    left out of the probe (a list of only such resources costs no round trip).
    Resources that share a ``joint`` (an object with ``probe(resources) -> str`` and
    ``split(output, n) -> list[str]``) are read together by one snippet it writes, e.g. one
    psql session for every PostgreSQL resource instead of one each.
    """

    what = "resource"
    reads_host = True
    joint = None
    claim: str | None = None  # "KIND NAME" of the object it creates, recorded in OWNED

    def probe(self) -> str:
        return ":"

    def plan(self, state: str, host) -> Ok | Change:
        raise NotImplementedError

    def exists(self, state: str) -> bool:
        """Whether the object of ``claim`` exists on the host, from the probe's ``state``."""
        return False

    def conflict(self, state: str, owned: set[str]) -> str | None:
        """Why this resource must not act on what its probe found (None: it may).

        By default: the object it claims exists and fabstack's record (OWNED) does not hold
        it, so it belongs to the system or to someone else.
        """
        if self.claim and self.claim not in owned and self.exists(state):
            return "exists on the host and was not created by fabstack"
        return None


def claim_script(claim: str) -> str:
    """Shell that records ``claim`` in OWNED; runs *before* the object is created, so a run
    killed in between leaves the line (and the next run creates the object) rather than an
    object of ours that is not recorded."""
    line = q(claim)
    return (f"mkdir -p {STATE_DIR}\n"
            f"grep -qxF -- {line} {OWNED} 2>/dev/null || echo {line} >> {OWNED}\n")


# A change's round trip reads the resources after it up to this many past the next one that,
# as last read, needed a change.
READ_AHEAD = 3


def ensure(host, *resources: Resource) -> int:
    """Bring ``resources`` to their state on ``host``; report each; return how many changed.

    One round trip reads them all; each change then runs in one round trip with the probe
    of the resources after it (their state can depend on the change): of all of them when
    none needed a change as last read, else of those up to READ_AHEAD past the next that
    did, so that a run of many changes (a fresh host) does not read the whole rest again
    at each one. A resource reached unread since the last change is read then, with the
    rest, in a round trip of its own: every plan is made on a state read after the last
    change. Nothing is changed when any resource conflicts with what its probe found (see
    :meth:`Resource.conflict`): every conflict is named at once.
    """
    todo = list(resources)
    states = _read(host, todo)
    read = len(todo)  # states[:read] were read after the last change
    changed = 0
    for i, resource in enumerate(todo):
        if i >= read:
            states[i:] = _probe(host, todo[i:])
            read = len(todo)
        outcome = resource.plan(states[i], host)
        if isinstance(outcome, Ok):
            host.ok(resource.what, outcome.message)
            continue
        changed += 1
        if host.check:
            host.report.notified.update(outcome.notify)
            host.changed(resource.what, outcome.message, outcome.diff)
            continue
        # the resources after it are read again in the change's own round trip
        read = _read_until(host, todo, states, i + 1)
        states[i + 1:read] = _probe(host, todo[i + 1:read],
                                    change=(resource.what, outcome.script))
        host.changed(resource.what, outcome.message, outcome.diff)
    return changed


def _read_until(host, todo: list[Resource], states: list[str], start: int) -> int:
    """Where the read after a change ends: READ_AHEAD past the first resource from ``start``
    on whose plan, on its state as last read, is a change; the end of ``todo`` if none's is."""
    for j in range(start, len(todo)):
        if todo[j].reads_host and isinstance(todo[j].plan(states[j], host), Change):
            return min(j + 1 + READ_AHEAD, len(todo))
    return len(todo)


def refuse_conflicts(host, resources: list[Resource]) -> None:
    """Read ``resources`` in one round trip and raise StepFailed if any conflicts, for a run
    whose first changes come before it declares them (:func:`ensure` checks its own)."""
    _read(host, list(resources))


def _read(host, resources: list[Resource]) -> list[str]:
    """Each resource's state (see :func:`_probe`), after checking that none conflicts."""
    if not any(r.claim for r in resources):
        return _probe(host, resources)
    *states, record = _probe(host, resources, [f"cat {OWNED} 2>/dev/null; true"])
    owned = set(record.splitlines())
    conflicts = [f"{r.what}: {why}" for r, state in zip(resources, states, strict=True)
                 if (why := r.conflict(state, owned))]
    if conflicts:
        from ..host import StepFailed  # host imports this package

        raise StepFailed("ownership", "refusing to touch what fabstack did not create (choose "
                         "other names in the settings); nothing was changed:\n  "
                         + "\n  ".join(conflicts))
    return states


def _probe(host, resources: list[Resource], extra: list[str] | tuple = (),
           change: tuple[str, str] | None = None) -> list[str]:
    """Each resource's state (``""`` for those that read nothing), then the output of each
    ``extra`` snippet, read in one round trip. ``change`` (what, script): a change that
    runs first in that same round trip (:meth:`Host.apply`); if it fails, nothing is read
    and its StepFailed is raised."""
    snippets: list = []
    slots: list = []  # per resource: None, (snippet,) or (snippet, joint, place in joint)
    joints: dict = {}  # joint -> (snippet index, its resources)
    for r in resources:
        if not r.reads_host:
            slots.append(None)
        elif r.joint is None:
            slots.append((len(snippets),))
            snippets.append(r.probe())
        else:
            if r.joint not in joints:
                joints[r.joint] = (len(snippets), [])
                snippets.append(None)
            index, members = joints[r.joint]
            slots.append((index, r.joint, len(members)))
            members.append(r)
    for joint, (index, members) in joints.items():
        snippets[index] = joint.probe(members)
    wanted = snippets + list(extra)
    outputs = (host.probe(wanted) if change is None else
               host.apply(change[1], wanted, what=change[0]))
    parts = {joint: joint.split(outputs[index], len(members))
             for joint, (index, members) in joints.items()}
    return ["" if slot is None else outputs[slot[0]] if len(slot) == 1 else
            parts[slot[1]][slot[2]] for slot in slots] + outputs[len(snippets):]


class Note(Resource):
    """A line of the report for something deliberately not done, with the reason.

    It reads nothing and never changes anything: ``Note("certificate", "none: ACME_SERVER
    is empty")`` keeps a skipped part of a step visible in the report.
    """

    reads_host = False

    def __init__(self, what: str, message: str):
        self.what, self.message = what, message

    def plan(self, state, host):
        return Ok(self.message)


def host_notified(host, marker: str) -> bool:
    """True when this check-mode run planned a change that would notify ``marker`` (kept in
    its report: see :attr:`Change.notify`; a run that changes the host leaves its markers in
    :data:`PENDING_DIR`, where the probes find them)."""
    return bool(host.check) and marker in host.report.notified

