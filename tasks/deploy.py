"""Releases of the app: ``fab deploy`` ships a git ref, ``fab rollback`` and ``fab releases``.

Each release is unpacked into /opt/APP/releases/<id> (id: UTC time and commit) and runs
from a virtualenv of its own, built beside the serving one (/opt/APP/venvs/KEY, KEY from
requirements.txt and the interpreter; reused when neither changed; one a release runs from
is never written). A deploy checks that the release's WSGI app loads (as the app's user,
with its environment), dumps the database, migrates and collects static files; then it
starts the release in the gunicorn instance that does not serve (``APP@blue``,
``APP@green``), asks HEALTH_PATH of that instance directly until it answers 2xx from the
release (an app that sends an ``X-Release`` header with the contents of its REVISION file
is waited for until it names the release), and only then rewrites NGINX's upstream file to
name it and reloads NGINX. The instance that served is stopped once NGINX's old workers
have finished their requests; its release and virtualenv stay, for ``fab rollback``. Any
failure before the switch leaves the current release serving; no user request reaches a
release that has not answered healthy. The host lock (tasks/host.py) refuses a second
deploy, or a provision, while one runs.
"""

from __future__ import annotations

import gzip
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from fabric import task
from paramiko import SSHException

from .executor import every_host, site_wide
from .host import StepFailed, converging_task, peer, session
from .layout import GENERATORS
from .nginx import CHECKER, live_color
from .primitives import (
    PENDING_DIR,
    Change,
    Command,
    Directory,
    File,
    Ok,
    Resource,
    ensure,
    q,
    render,
)
from .primitives.engine import host_notified
from .python import interpreter
from .scripts import script
from .settings import is_remote

WANTS = "/etc/systemd/system/multi-user.target.wants"  # where `systemctl enable` links units
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

class LiveInstance(Resource):
    """The gunicorn instance that serves (the one the upstream file names) running once a
    release is deployed; at boot the generator (files/gunicorn-generator.sh.j2) starts it, so
    no instance is enabled. A change of gunicorn's unit restarts it the way a deploy switches
    (files/app-restart.sh.j2): the release started in the other instance, checked there, then
    given the requests.
    """

    def __init__(self, s):
        self.s, self.what = s, "gunicorn instance"
        self.marker = f"{s.app}@restart"

    def probe(self) -> str:
        layout, app = self.s.layout, q(self.s.app)
        return (f"test -d {q(layout.current)} && echo release=yes\n" + live_color(self.s)
                + 'if [ "$c" != legacy ]; then\n    echo "color=$c"\n'
                f"    systemctl show -p ActiveState -p NeedDaemonReload -- {app}@\"$c\".service\n"
                f"fi\n[ -e {PENDING_DIR}/{q(self.marker)} ] && echo pending=yes; true")

    def plan(self, state, host):
        props = dict(line.split("=", 1) for line in state.splitlines() if "=" in line)
        if "release" not in props:
            return Ok(f"no release deployed yet ({self.s.layout.current} missing)")
        if "color" not in props:
            return Ok(f"served by {self.s.app}.socket's gunicorn, as deployed before the two "
                      "instances: the next deploy moves the app to them")
        unit = q(f"{self.s.app}@{props['color']}.service")
        reload = "systemctl daemon-reload\n" if props.get("NeedDaemonReload") == "yes" else ""
        if "pending" in props or host_notified(host, self.marker):
            return Change(f"{props['color']}: restarted as a deploy switches (its unit "
                          "changed): the release started in the other instance, checked, "
                          "then given the requests", restart_app(self.s))
        if props.get("ActiveState") != "active":
            return Change(f"{props['color']}: started", f"{reload}systemctl start -- {unit}")
        return Ok(f"{props['color']} serves: running (the one that starts at boot)")


def app_resources(h) -> list:
    """gunicorn's unit (two instances, blue and green), its configuration, the generator that
    starts the one that serves at boot, and that instance."""
    s = h.settings
    return [
        File(f"/etc/systemd/system/{s.app}@.service", render("gunicorn.service.j2", s),
             notify=[f"{s.app}:restart"]),
        File(s.layout.gunicorn_conf, render("gunicorn.conf.py.j2", s), group=s.app, mode=0o640,
             notify=[f"{s.app}:restart"]),
        Directory(GENERATORS),
        File(s.layout.boot_generator, render("gunicorn-generator.sh.j2", s), mode=0o755),
        # a host of before: its instances enabled, one after the other, by the switches
        Command("enabled gunicorn instances", f"rm -f -- {WANTS}/{s.app}@*.service\n"
                "systemctl daemon-reload", unless=f"! ls -d {WANTS}/{s.app}@*.service",
                message=f"removed: {s.layout.boot_generator} starts the instance that serves"),
        LiveInstance(s),
    ]


# -- the deploy --------------------------------------------------------------------------

def prerequisites(h) -> dict[str, str]:
    """What a deploy needs that ``fab provision`` makes on the host (its roles'): path on the
    host -> what it is."""
    from .nginx import site_path

    s = h.settings
    needed = {f"{s.layout.venv}/bin/python": "the virtualenv",
              f"/usr/bin/{interpreter(s['PYTHON_VERSION'])}":
                  "the interpreter of PYTHON_VERSION, which builds the release's virtualenv",
              s.layout.env_file: "the app's environment file"}
    if h.site.has("web"):
        needed |= {f"/etc/systemd/system/{s.app}@.service": "gunicorn's unit",
                   s.layout.boot_generator: "the generator that starts gunicorn's instance "
                                            "at boot",
                   s.layout.upstream: "NGINX's upstream file",
                   site_path(s): "the NGINX site"}
    return needed | {s.layout.backup_script: "the backup script"}


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
    needed = prerequisites(h)
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


def _resolve_remote(h, ref: str) -> Source | None:
    """Mirror DEPLOY_REPO on the host (with DEPLOY_KEY) and resolve ``ref`` there.

    The mirror is root's only (0700). A credential in DEPLOY_REPO's URL never reaches a
    command line (git hands a remote's URL to its helpers as an argument, which any user
    on the host can read): the mirror gets the URL without it, and git reads it from a
    root-only file through its ``store`` credential helper. In check mode the mirror is read
    as it is, not updated (None: there is none yet).
    """
    s = h.settings
    cache, key, credentials = s.layout.repo, s.layout.deploy_key, s.layout.git_credentials
    url, credential = remote_credentials(s["DEPLOY_REPO"])
    label = f"{url}@{ref}"
    if h.check:
        res = h.run(f"git -C {q(cache)} rev-parse --verify {q(ref + '^{commit}')}",
                    what="release source", check=False)
        if not res.ok:
            h.changed("release source", f"would mirror {url} on the host and deploy "
                      f"{ref} (not resolved: check mode fetches nothing)")
            return None
        return Source(res.stdout.strip(), None, f"{label} (as last fetched)")
    ensure(h, File(credentials, credential or "", mode=0o600, secret=True,
                   present=credential is not None),
           *([File(key, Path(s["DEPLOY_KEY"]).expanduser().read_text(), mode=0o600,
                   secret=True)] if s["DEPLOY_KEY"] else []))
    res = h.run(script("deploy-mirror.sh.j2", s, url=url, ref=ref), what="release source")
    return Source(res.stdout.strip(), None, label)


def _backup_and_migrate(h, release: str) -> None:
    s = h.settings
    from .backup import dump_database, human

    try:  # the backup script's dump (tasks/backup.py), kept BACKUP_KEEP_DEPLOY times, made
        # where the database runs (the site's db host)
        with peer(h, "db") as db_host:
            dump, size = dump_database(db_host, "previous-deploy")
            where = "" if db_host is h else f" on {db_host.name}"
    except (StepFailed, OSError, EOFError, SSHException) as exc:
        _abort(h, release, "pre-migration backup",
               f"pg_dump failed, not migrating: {h.mask(getattr(exc, 'message', str(exc)))[-500:]}")
    h.changed("pre-migration backup", f"database dumped to {dump}{where} ({human(size)})")
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


def _collect_static(h, release: str) -> None:
    s = h.settings
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


HEALTH_TIMEOUT = 60  # seconds a new instance may take to answer healthy


def _instance_script(name: str, s, **values) -> str:
    return script(name, s, checker=CHECKER, pending=PENDING_DIR, timeout=HEALTH_TIMEOUT,
                  **values)


def _start_beside(h, release: str, rollback: bool = False) -> str:
    """Start ``release`` in the gunicorn instance that does not serve and check it there
    (files/deploy-start.sh.j2); returns the instance's color. A release that does not answer
    healthy never gets a request: a deploy abandons it, a rollback stays where it is."""
    s = h.settings
    res = h.run(_instance_script("deploy-start.sh.j2", s, release=release,
                                 **h.lock_values()), what="new instance", check=False)
    color, _, answer = res.stdout.strip().partition("\n")
    unit = f"{s.app}@{color}"
    if not res.ok:
        why = (f"{unit} running {release} did not answer {s['HEALTH_PATH']} healthy on its "
               f"own socket within {HEALTH_TIMEOUT} s: {answer.strip() or 'no answer'}"
               + (f"\n{res.stderr.strip()[-1500:]}" if res.stderr.strip() else "")
               + "\nno user request reached it")
        if rollback:
            raise StepFailed("health check", why)
        _abort(h, release, "health check", why)
    h.changed(f"instance {color}", f"{unit} runs {release} beside the serving one; "
              f"{s['HEALTH_PATH']} asked directly: {answer.strip()}")
    return color


def _switch(h, release: str, color: str, current: str) -> str:
    """Give the site's requests to instance ``color`` (files/deploy-switch.sh.j2): NGINX's
    upstream file rewritten, tested, reloaded; once the workers of the configuration before
    have finished and the site answers from ``release``, the instance that served is told to
    stop and the app's and the virtualenv's links name ``release``. Returns that answer."""
    s = h.settings
    res = h.run(_instance_script("deploy-switch.sh.j2", s, release=release, color=color),
                what=f"switch to {release}", check=False)
    if not res.ok:
        raise StepFailed("switch", f"the site did not answer from {release} through NGINX "
                         f"({res.stdout.strip() or res.stderr.strip()[-1500:]}); "
                         f"{current or 'the release before'} serves as before")
    return res.stdout.strip()


def restart_app(s) -> str:
    """The shell program that restarts the app as a deploy switches (files/
    app-restart.sh.j2): fab upgrade's last restart, and provision's after a unit change."""
    return _instance_script("app-restart.sh.j2", s)


def health_check(h, release: str, timeout: int = 60) -> tuple[bool, str]:
    """Ask HEALTH_PATH through NGINX (following redirects) until it answers from ``release``."""
    res = h.run(script("health-check.sh.j2", h.settings, want=release, timeout=timeout),
                what="health check", check=False)
    return res.ok, res.stdout.strip()


def _restart_workers(h, reason: str) -> None:
    from .celery import restart_celery, units

    if units(h.site):
        restart_celery(h, reason, wait=False)


def _link(h, release: str) -> None:
    """On a worker host without the web role: the app's links name ``release``
    (files/deploy-links.sh.j2), which Celery runs once restarted."""
    h.run(script("deploy-links.sh.j2", h.settings, release=release), what=f"release {release}")


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


def release_name(commit: str) -> str:
    """The name of a release of ``commit`` made now: UTC time and the commit's first 12."""
    return time.strftime("%Y%m%d%H%M%S", time.gmtime()) + f"-{commit[:12]}"


def read_host(h, ref: str | None, source: Source | None = None
              ) -> tuple[State, Source | None]:
    """The host's releases and the source to deploy (``ref``, default DEPLOY_REF): ``source``
    when given (a local repository's, archived once for several hosts), else resolved; None
    in check mode when a remote repository was never mirrored on the host. Fails when the
    host is not provisioned for a deploy."""
    s = h.settings
    if not s["DEPLOY_REPO"]:
        raise StepFailed("release source", "DEPLOY_REPO is not set in the settings")
    ref = ref or s["DEPLOY_REF"]
    remote = is_remote(s["DEPLOY_REPO"])
    if source is None and not remote:
        source = resolve_local(s["DEPLOY_REPO"], ref, s["DEPLOY_SUBDIR"])
    state = _state(h)
    if state.missing:
        raise StepFailed("provisioned", f"the host is not fully provisioned, missing "
                         f"{', '.join(state.missing)}: run `fab provision` first (a provision "
                         "that stopped part-way is finished by running it again)")
    if remote:
        source = _resolve_remote(h, ref)
    return state, source


def wanted(h, state: State, source: Source, force: bool) -> bool:
    """Whether ``source`` is to be deployed on the host; when it is current already, says so
    (after asking a web host's health: a current release that is not healthy fails)."""
    current = state.current
    if not current.endswith(f"-{source.commit[:12]}") or force:
        return True
    if state.venv_stale:
        h.changed(f"release {current}", f"{source.commit[:12]} is current but does not run "
                  "from the virtualenv its requirements and PYTHON_VERSION's interpreter "
                  "give: deploying it again")
        return True
    if not h.site.has("web"):
        h.ok(f"release {current}", f"{source.commit[:12]} is already current")
        return False
    healthy, detail = health_check(h, current, timeout=10)
    if not healthy:
        raise StepFailed("health check", f"release {current} is current but not "
                         f"healthy: {detail} (use --force to deploy it again)")
    h.ok(f"release {current}", f"{source.commit[:12]} is already current; {detail}")
    return False


def deploy_release(h, ref: str | None = None, force: bool = False,
                   maintenance: bool = False) -> None:
    s = h.settings
    state, source = read_host(h, ref)
    current, releases = state.current, state.releases
    if source is None or not wanted(h, state, source, force):
        return
    release = release_name(source.commit)
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
        if h.site.has("web"):
            _collect_static(h, release)
            color = _start_beside(h, release)
            try:
                detail = _switch(h, release, color, current)
            except StepFailed as failed:
                _abort(h, release, failed.what, failed.message)
            h.changed(f"release {release}", f"serving from {s.app}@{color} ({detail})")
        else:
            _link(h, release)
            h.changed(f"release {release}", "current (for Celery: no web role here)")
        _restart_workers(h, "(new release)")
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
    if h.site.has("web"):
        color = _start_beside(h, previous, rollback=True)
        detail = _switch(h, previous, color, current)
        h.changed("rollback", f"serving {previous} instead of {current} from "
                  f"{h.settings.app}@{color} ({detail})")
    else:
        _link(h, previous)
        h.changed("rollback", f"{previous} current instead of {current} (for Celery)")
    _restart_workers(h, f"(to {previous})")


def _rolling(c, hosts, *args, **kwargs):
    from .rollout import rolling_deploy  # (which imports this module)

    return rolling_deploy(c, hosts, *args, **kwargs)


@site_wide(_rolling)
@task(help={"ref": "Git ref to deploy (default: DEPLOY_REF)",
            "force": "Deploy even if the commit is already current",
            "maintenance": "Show the maintenance page from the migration to the deploy's "
                           "end (fab maintenance)",
            "check": "Show what would be deployed and change nothing.",
            "batch": "Web hosts switched at once in a rolling deploy of a site spread over "
                     "hosts (default 1)"})
def deploy(c, ref=None, force=False, check=False, maintenance=False, batch=1):
    """Ship a release: unpack, install requirements, back up, migrate, switch, health-check
    (several hosts of a site: a rolling deploy, tasks/rollout.py)."""
    with session(c, "deploy", check) as h:
        if releases_here(h):
            deploy_release(h, ref, force, maintenance)


def releases_here(h) -> bool:
    """True on a host that runs the app (the web or worker role); elsewhere (an lb, db or
    redis host of a site spread over hosts) it says there is nothing to do there."""
    site = h.site
    if site.has("web") or site.has("worker"):
        return True
    apps = [entry.name for entry in site.hosts if entry.roles & {"web", "worker"}]
    h.ok("releases", f"none on this host: {', '.join(apps)} run{'s' * (len(apps) == 1)} "
         "the app")
    return False


@task
def rollback(c):
    """Switch back to the release before the current one (health-checked)."""
    with session(c, "rollback") as h:
        if releases_here(h):
            rollback_release(h)


@every_host
@task
def releases(c):
    """List the releases on the host, marking the current one."""
    with session(c, "releases", lock=False) as h:
        if not releases_here(h):
            return
        state = _state(h)
        current = state.current
        for release in state.releases:
            h.ok(f"release {release}", "current" if release == current else "kept")


@converging_task("gunicorn")
def gunicorn(h):
    """gunicorn's unit (instances blue and green) and the one that serves (part of provision)."""
    return app_resources(h)
