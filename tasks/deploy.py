"""Releases of the app: ``fab deploy`` ships a git ref, ``fab rollback`` and ``fab releases``.

Each release is unpacked into /opt/APP/releases/<id> (id: UTC time and commit);
/opt/APP/app is a link to the current one, switched atomically. A deploy gives the
release its virtualenv, built beside the serving one (/opt/APP/venvs/KEY, KEY from
requirements.txt and the interpreter; reused when neither changed; the serving one is
never written), checks that the release's WSGI app loads (as the app's user, with its
environment), dumps the database, migrates, collects static files, switches the app's
and the virtualenv's links (/opt/APP/venv), restarts gunicorn and asks the health
endpoint through NGINX until it answers from the new release (an app that sends an
``X-Release`` header with the contents of its REVISION file is waited for until it
names the new release). Any failure before the switch leaves the current release
serving; a failed health check puts the previous release back. The host lock
(tasks/host.py) refuses a second deploy, or a provision, while one runs.

gunicorn runs behind systemd socket activation (APP.socket), so even a
restart queues requests instead of refusing them. What comes next (blue/green gunicorn
instances, the health check before traffic, an NGINX upstream file as the switch): the
README's "Releases built beside the serving one".
"""

from __future__ import annotations

import gzip
import posixpath
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from fabric import task

from .executor import every_host
from .host import StepFailed, converging_task, session
from .primitives import PENDING_DIR, File, ReleaseService, ensure, q, render
from .python import interpreter
from .scripts import script
from .settings import is_remote

BOOT_MARK = "@@fabstack-boot-check@@"  # files/deploy-release.sh.j2 prints it after pip


@dataclass
class Source:
    """The code to deploy: a commit of a local repository, archived here, or a remote URL."""

    commit: str
    archive: bytes | None  # gzipped tar of the (sub)tree; None for a remote repository
    label: str


def resolve_local(repo: str, ref: str, subdir: str) -> Source:
    """Resolve ``ref`` in the local git repository ``repo`` and archive its (sub)tree."""
    path = Path(repo).expanduser()

    def git(*args: str) -> bytes:
        res = subprocess.run(["git", "-C", str(path), *args], capture_output=True)
        if res.returncode != 0:
            raise StepFailed("release source", f"git {' '.join(args)} in {path}: "
                             f"{res.stderr.decode(errors='replace').strip()}")
        return res.stdout

    commit = git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}").decode().strip()
    tree = f"{commit}:{subdir.strip('/')}" if subdir.strip("/") else commit
    archive = gzip.compress(git("archive", "--format=tar", tree), compresslevel=6)
    return Source(commit, archive, f"{path}@{ref}")


# -- provisioning: gunicorn's units ------------------------------------------------------

def app_resources(h) -> list:
    """gunicorn's socket and service units; the service runs once a release exists."""
    s = h.settings
    unit = f"{s.app}.service"
    return [
        File(f"/etc/systemd/system/{s.app}.socket", render("gunicorn.socket.j2", s),
             notify=[f"{s.app}.socket:restart"]),
        File(f"/etc/systemd/system/{unit}", render("gunicorn.service.j2", s),
             notify=[f"{unit}:restart"]),
        # Before the first release there is nothing to activate: a request would only fail
        # the service and, after a few, the socket too.
        ReleaseService(f"{s.app}.socket", s.layout.current),
        ReleaseService(unit, s.layout.current),
    ]


# -- the deploy --------------------------------------------------------------------------

def prerequisites(s) -> dict[str, str]:
    """What a deploy needs that ``fab provision`` makes: path on the host -> what it is."""
    from .nginx import site_path

    return {f"{s.layout.venv}/bin/python": "the virtualenv",
            f"/usr/bin/{interpreter(s['PYTHON_VERSION'])}":
                "the interpreter of PYTHON_VERSION, which builds the release's virtualenv",
            s.layout.env_file: "the app's environment file",
            f"/etc/systemd/system/{s.app}.service": "gunicorn's unit",
            site_path(s): "the NGINX site",
            s.layout.backup_script: "the backup script"}


@dataclass
class State:
    """A host's releases as a deploy finds them."""

    current: str  # the current release's id ("": none)
    releases: list[str]  # every release, oldest first
    missing: list[str]  # the prerequisites provision has not made
    venv_stale: bool  # the current release's virtualenv is not the one a deploy would build


def _state(h) -> State:
    """Read the host's releases (one round trip)."""
    s = h.settings
    layout = s.layout
    needed = prerequisites(s)
    python = interpreter(s["PYTHON_VERSION"])
    current, listing, missing, stale = h.probe([
        f"readlink {q(layout.current)} 2>/dev/null | xargs -r basename",
        f"ls -1 {q(layout.releases)} 2>/dev/null | grep -v '^[.]'",
        "".join(f"[ -e {q(path)} ] || echo {q(path)}\n" for path in needed) + "true",
        # the key the current release's virtualenv would have now (an interpreter changed
        # by PYTHON_VERSION changes it), against the one it runs from
        f"(\n{script('venv-key.sh.j2', s, python=python, rel=layout.current)}"
        f"[ \"$(readlink {q(layout.current + '/' + layout.release_venv)})\" = "
        f"{q(layout.venvs)}/\"$key\" ] || echo stale\n) 2>/dev/null; true",
    ])
    return State(current.strip(), sorted(listing.split()),
                 [f"{needed[path]} ({path})" for path in missing.split()],
                 stale.strip() == "stale")


def _prepare(h, source: Source, release: str) -> None:
    s = h.settings
    if source.archive is not None:
        archive, tree = h.upload(source.archive, "release.tar.gz", "upload the release"), ""
    else:
        subdir = s["DEPLOY_SUBDIR"].strip("/")
        archive, tree = "", f"{source.commit}:{subdir}" if subdir else source.commit
    h.run(script("deploy-unpack.sh.j2", s, release=release, archive=archive, tree=tree),
          what=f"release {release}")
    h.changed(f"release {release}", f"unpacked {source.label} ({source.commit[:12]})")
    wsgi = s["WSGI_APP"]
    # One round trip: the release's virtualenv, then whether the release can boot at all
    # (before anything else: a release that cannot boot is never migrated nor switched to).
    res = h.run(script("deploy-release.sh.j2", s, release=release, action="boot",
                       python=interpreter(s["PYTHON_VERSION"]), mark=BOOT_MARK),
                what="requirements", check=False)
    pip_err, checked, boot_err = res.stderr.partition(f"{BOOT_MARK}\n")
    if not checked:
        _abort(h, release, "requirements", f"pip install failed: {pip_err.strip()[-1500:]}")
    built, _, key = res.stdout.strip().rpartition("\n")[2].partition(" ")
    venv = f"{s.layout.venvs}/{key}"
    if built == "same":
        h.ok("requirements", f"unchanged: the release runs from virtualenv {venv}")
    else:
        h.changed("requirements", f"installed into a new virtualenv {venv}, beside the "
                  "serving one")
    if not res.ok:
        _abort(h, release, "app boot check", f"the new release's WSGI app ({wsgi}) does not "
               f"load as {s.app} with its environment:\n{boot_err.strip()[-1500:]}")
    h.ok("app boot check", f"{wsgi}.application loads as {s.app} with its environment")


def remote_credentials(repo: str) -> tuple[str, str | None]:
    """``repo`` without the ``user:password@`` (or token) an http(s) URL may carry, and that
    credential as a git-credential-store line (None: it carries none)."""
    parts = urlsplit(repo)
    if parts.scheme not in ("http", "https") or parts.username is None:
        return repo, None
    host = parts.netloc.rpartition("@")[2]
    return (urlunsplit(parts._replace(netloc=host)),
            f"{parts.scheme}://{parts.username}:{parts.password or ''}@{host}\n")


def _resolve_remote(h) -> Source | None:
    """Mirror DEPLOY_REPO on the host (with DEPLOY_KEY) and resolve the ref there.

    The mirror is root's only (0700). A credential in DEPLOY_REPO's URL never reaches a
    command line (git hands a remote's URL to its helpers as an argument, which any user
    on the host can read): the mirror gets the URL without it, and git reads it from a
    root-only file through its ``store`` credential helper. In check mode the mirror is read
    as it is, not updated (None: there is none yet).
    """
    s = h.settings
    cache, key, credentials = s.layout.repo, s.layout.deploy_key, s.layout.git_credentials
    url, credential = remote_credentials(s["DEPLOY_REPO"])
    label = f"{url}@{s['DEPLOY_REF']}"
    if h.check:
        res = h.run(f"git -C {q(cache)} rev-parse --verify {q(s['DEPLOY_REF'] + '^{commit}')}",
                    what="release source", check=False)
        if not res.ok:
            h.changed("release source", f"would mirror {url} on the host and deploy "
                      f"{s['DEPLOY_REF']} (not resolved: check mode fetches nothing)")
            return None
        return Source(res.stdout.strip(), None, f"{label} (as last fetched)")
    ensure(h, File(credentials, credential or "", mode=0o600, secret=True,
                   present=credential is not None),
           *([File(key, Path(s["DEPLOY_KEY"]).expanduser().read_text(), mode=0o600,
                   secret=True)] if s["DEPLOY_KEY"] else []))
    res = h.run(script("deploy-mirror.sh.j2", s, url=url), what="release source")
    return Source(res.stdout.strip(), None, label)


def _backup_and_migrate(h, release: str) -> None:
    s = h.settings
    from .backup import dump_database, human

    try:  # the backup script's dump (tasks/backup.py), kept BACKUP_KEEP_DEPLOY times
        dump, size = dump_database(h, "previous-deploy")
    except StepFailed as exc:
        _abort(h, release, "pre-migration backup",
               f"pg_dump failed, not migrating: {exc.message[-500:]}")
    h.changed("pre-migration backup", f"database dumped to {dump} ({human(size)})")
    res = h.run(script("deploy-release.sh.j2", s, release=release, action="migrate"),
                what="migrations", check=False)
    if not res.ok:
        _abort(h, release, "migrations", res.stderr.strip()[-1500:] or res.stdout[-1500:])
    applied = [line.split("Applying ", 1)[1].removesuffix("... OK") for line in
               res.stdout.splitlines() if "Applying " in line]
    if applied:
        h.changed("migrations", f"applied {', '.join(applied)}")
    else:
        h.ok("migrations", "none to apply")
    res = h.run(script("deploy-release.sh.j2", s, release=release, action="collectstatic"),
                what="static files", check=False)
    if not res.ok:
        _abort(h, release, "static files", res.stderr.strip()[-1500:])
    # collectstatic's lines, and files/deploy-release.sh.j2's own ("static folder: ...",
    # "manifest: ...")
    ours = ("static folder: ", "manifest: ")
    lines = res.stdout.strip().splitlines()
    notes = dict(line.split(": ", 1) for line in lines if line.startswith(ours))
    if "static folder" in notes:
        h.changed("static folder", notes["static folder"])
    counts = [line for line in lines if not line.startswith(ours)]
    h.ok("static files", f"{counts[-1] if counts else 'done'} (as {s.app})"
         + ("; its manifest kept in the release" if "manifest" in notes else ""))


def _abort(h, release: str, what: str, why: str):
    h.run(f"rm -rf {q(h.settings.layout.release(release))}", what=what)
    raise StepFailed(what, f"{why}\nrelease {release} abandoned; the current release "
                     "keeps serving")


def _switch(h, release: str) -> None:
    """Point the app link at ``release`` atomically and restart gunicorn.

    A restart, not a reload: gunicorn's HUP was seen to leave new workers running the old
    release's code. systemd holds the socket meanwhile, so requests wait instead of failing,
    and gunicorn's graceful stop lets the old workers finish theirs.
    """
    layout = h.settings.layout
    link = posixpath.relpath(layout.release(release), posixpath.dirname(layout.current))
    h.run(script("deploy-switch.sh.j2", h.settings, link=link, pending=PENDING_DIR),
          what=f"switch to {release}")


def restart_app(s) -> str:
    """The shell program that restarts the app's gunicorn behind its socket (files/
    app-restart.sh.j2): fab upgrade's last restart (a deploy's switch includes it)."""
    return script("app-restart.sh.j2", s, pending=PENDING_DIR)


def health_check(h, release: str, timeout: int = 60) -> tuple[bool, str]:
    """Ask HEALTH_PATH through NGINX (following redirects) until it answers from ``release``."""
    res = h.run(script("health-check.sh.j2", h.settings, want=release, timeout=timeout),
                what="health check", check=False)
    return res.ok, res.stdout.strip()


def _restart_workers(h) -> None:
    from .celery import restart_celery

    restart_celery(h)


def _prune(h, releases: list[str], keep: int, protect: set[str]) -> None:
    """Remove the releases beyond ``keep`` (but those in ``protect``), the virtualenvs no
    remaining release runs from and the static files no remaining release's manifest names
    (files/deploy-prune.sh.j2), in one round trip."""
    old = [r for r in releases[:-keep] if r not in protect] if len(releases) > keep else []
    res = h.run(script("deploy-prune.sh.j2", h.settings, *old), what="old releases")
    said = [line.partition(" ")[::2] for line in res.stdout.splitlines()]
    venvs = [name for kind, name in said if kind == "venv"]
    static = [int(n) for kind, n in said if kind == "static"]
    unnamed = [release for kind, release in said if kind == "static-kept"]
    many = len(venvs) > 1
    gone = ([f"removed {', '.join(old)} (keeping {keep})"] if old else []) + (
        [f"removed virtualenv{'s' * many} {', '.join(venvs)} (no kept release runs from "
         f"{'them' if many else 'it'})"] if venvs else []) + (
        [f"removed {static[0]} static file{'s' * (static[0] > 1)} no kept release's manifest "
         "names"] if static else [])
    if old and unnamed:  # an app without ManifestStaticFilesStorage, or collected before
        gone.append(f"static files all kept: release {unnamed[0]} kept no manifest of them")
    if gone:
        h.changed("old releases", "; ".join(gone))
    else:
        h.ok("old releases", f"{len(releases)} kept (at most {keep})")


def deploy_release(h, ref: str | None = None, force: bool = False,
                   maintenance: bool = False) -> None:
    s = h.settings
    if not s["DEPLOY_REPO"]:
        raise StepFailed("release source", "DEPLOY_REPO is not set in the settings")
    ref = ref or s["DEPLOY_REF"]
    remote = is_remote(s["DEPLOY_REPO"])
    source = None if remote else resolve_local(s["DEPLOY_REPO"], ref, s["DEPLOY_SUBDIR"])
    state = _state(h)
    current, releases, missing = state.current, state.releases, state.missing
    if missing:
        raise StepFailed("provisioned", f"the host is not fully provisioned, missing "
                         f"{', '.join(missing)}: run `fab provision` first (a provision "
                         "that stopped part-way is finished by running it again)")
    if remote:
        source = _resolve_remote(h)
        if source is None:
            return
    if current.endswith(f"-{source.commit[:12]}") and state.venv_stale and not force:
        h.changed(f"release {current}", f"{source.commit[:12]} is current but does not run "
                  "from the virtualenv its requirements and PYTHON_VERSION's interpreter "
                  "give: deploying it again")
    elif current.endswith(f"-{source.commit[:12]}") and not force:
        healthy, detail = health_check(h, current, timeout=10)
        if not healthy:
            raise StepFailed("health check", f"release {current} is current but not "
                             f"healthy: {detail} (use --force to deploy it again)")
        h.ok(f"release {current}", f"{source.commit[:12]} is already current; {detail}")
        return
    release = time.strftime("%Y%m%d%H%M%S", time.gmtime()) + f"-{source.commit[:12]}"
    if h.check:
        h.changed(f"release {release}", f"would deploy {source.label} "
                  f"({source.commit[:12]}) over {current or 'nothing'}")
        return
    _prepare(h, source, release)
    page_on = False  # fab deploy --maintenance turned the maintenance page on
    try:
        if maintenance:
            from .maintenance import page_on_during_deploy
            page_on = page_on_during_deploy(h)
        _backup_and_migrate(h, release)
        _switch(h, release)
        healthy, detail = health_check(h, release)
        if not healthy:
            if current:
                _switch(h, current)
                h.run(f"rm -rf {q(s.layout.release(release))}", what="rollback")
                raise StepFailed("health check", f"{detail}; put release {current} back "
                                 f"and removed {release}")
            raise StepFailed("health check", f"{detail}; there is no earlier release to put "
                             "back")
        h.changed(f"release {release}", f"serving ({detail})")
        _restart_workers(h)
        _prune(h, releases + [release], int(s["RELEASES_KEEP"]), {release, current})
    finally:
        if page_on:
            from .maintenance import turn_off
            turn_off(h)


def rollback_release(h) -> None:
    state = _state(h)
    current, releases = state.current, state.releases
    if current not in releases or releases.index(current) == 0:
        raise StepFailed("rollback", f"no release before {current or 'the current one'} "
                         f"(releases: {', '.join(releases) or 'none'})")
    previous = releases[releases.index(current) - 1]
    _switch(h, previous)
    healthy, detail = health_check(h, previous)
    if not healthy:
        _switch(h, current)
        raise StepFailed("health check", f"{detail}; stayed on {current}")
    h.changed("rollback", f"serving {previous} instead of {current} ({detail})")
    _restart_workers(h)


@task(help={"ref": "Git ref to deploy (default: DEPLOY_REF)",
            "force": "Deploy even if the commit is already current",
            "maintenance": "Show the maintenance page from the migration to the deploy's "
                           "end (fab maintenance)",
            "check": "Show what would be deployed and change nothing."})
def deploy(c, ref=None, force=False, check=False, maintenance=False):
    """Ship a release: unpack, install requirements, back up, migrate, switch, health-check."""
    with session(c, "deploy", check) as h:
        deploy_release(h, ref, force, maintenance)


@task
def rollback(c):
    """Switch back to the release before the current one (health-checked)."""
    with session(c, "rollback") as h:
        rollback_release(h)


@every_host
@task
def releases(c):
    """List the releases on the host, marking the current one."""
    with session(c, "releases", lock=False) as h:
        state = _state(h)
        current = state.current
        for release in state.releases:
            h.ok(f"release {release}", "current" if release == current else "kept")


@converging_task("gunicorn")
def gunicorn(h):
    """gunicorn's systemd socket and service units for the app (part of provision)."""
    return app_resources(h)
