"""Releases of the app: ``fab deploy`` ships a git ref, ``fab rollback`` and ``fab releases``.

Each release is unpacked into /opt/APP/releases/<id> (id: UTC time and commit);
/opt/APP/app is a link to the current one, switched atomically. A deploy
installs the requirements into the virtualenv (only when they changed), checks
that the release's WSGI app loads (as the app's user, with its environment),
dumps the database, migrates, collects static files, switches the link, restarts
gunicorn and asks the health endpoint through NGINX until it
answers from the new release (an app that sends an ``X-Release`` header with
the contents of its REVISION file is waited for until it names the new
release). Any failure before the switch leaves the current release serving;
a failed health check puts the previous release back. The host lock (tasks/host.py)
refuses a second deploy, or a provision, while one runs.

gunicorn runs behind systemd socket activation (APP.socket), so even a
restart queues requests instead of refusing them.
"""

from __future__ import annotations

import gzip
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from fabric import task

from .executor import every_host
from .host import StepFailed, session
from .primitives import PENDING_DIR, File, ReleaseService, ensure, q, render
from .settings import is_remote

BOOT_MARK = "@@fabstack-boot-check@@"
# Run as the app's user with its environment: the release's WSGI module must import (settings
# read, apps loaded) and hold a callable ``application``, as gunicorn will need.
BOOT_CHECK = ("import importlib, sys\n"
              "app = getattr(importlib.import_module(sys.argv[1]), 'application', None)\n"
              "if not callable(app):\n"
              "    sys.exit(sys.argv[1] + ' has no callable application')\n")


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


def _layout(s) -> dict[str, str]:
    return {"code": s.code_dir, "releases": f"{s.code_dir}/releases",
            "current": f"{s.code_dir}/app",
            "venv": s.venv_dir, "env": s.app_env_file}


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
        ReleaseService(f"{s.app}.socket", f"{s.code_dir}/app"),
        ReleaseService(unit, f"{s.code_dir}/app"),
    ]


def app_step(h) -> None:
    ensure(h, *app_resources(h))


# -- the deploy --------------------------------------------------------------------------

def prerequisites(s) -> dict[str, str]:
    """What a deploy needs that ``fab provision`` makes: path on the host -> what it is."""
    from .backup import script_path
    from .nginx import site_path

    return {f"{s.venv_dir}/bin/python": "the virtualenv",
            s.app_env_file: "the app's environment file",
            f"/etc/systemd/system/{s.app}.service": "gunicorn's unit",
            site_path(s): "the NGINX site",
            script_path(s): "the backup script"}


def _state(h) -> tuple[str, list[str], list[str]]:
    """The current release's id, every release (oldest first), and the missing prerequisites."""
    paths = _layout(h.settings)
    needed = prerequisites(h.settings)
    current, listing, missing = h.probe([
        f"readlink {q(paths['current'])} 2>/dev/null | xargs -r basename",
        f"ls -1 {q(paths['releases'])} 2>/dev/null | grep -v '^[.]'",
        "".join(f"[ -e {q(path)} ] || echo {q(path)}\n" for path in needed) + "true",
    ])
    return (current.strip(), sorted(listing.split()),
            [f"{needed[path]} ({path})" for path in missing.split()])


def _env_lines(h, release_dir: str) -> str:
    """Shell lines that load the app's environment with PYTHONPATH at ``release_dir``."""
    paths = _layout(h.settings)
    return (f"set -a; . {q(paths['env'])}; set +a\nexport PYTHONPATH={q(release_dir)}\n"
            f"cd {q(release_dir)}\n")


def _prepare(h, source: Source, release: str, current: str) -> None:
    s = h.settings
    paths = _layout(s)
    rel = f"{paths['releases']}/{release}"
    if source.archive is not None:
        upload = h.upload(source.archive, "release.tar.gz", "upload the release")
        fetch = f"tar -xzf {q(upload)} -C {q(rel)} || fail\n{h.drop_upload(upload)}\n"
    else:
        fetch = _remote_fetch(s, source.commit, rel)
    old_req = f"{paths['releases']}/{current}/requirements.txt" if current else "/dev/null"
    h.run(f"fail() {{ rm -rf {q(rel)}; exit 1; }}\n"
          f"mkdir -p {q(paths['releases'])} && mkdir {q(rel)} || exit 1\n{fetch}"
          f"printf '%s\\n' {q(release)} > {q(rel)}/REVISION || fail\n"
          f"chown -R root:root {q(rel)} && chmod -R u=rwX,go=rX {q(rel)} || fail\n"
          f"test -f {q(rel)}/requirements.txt || {{ echo 'the release has no "
          "requirements.txt' >&2; fail; }",
          what=f"release {release}")
    h.changed(f"release {release}", f"unpacked {source.label} ({source.commit[:12]})")
    venv, wsgi = q(paths["venv"]), s["WSGI_APP"]
    # One round trip: the requirements, then whether the release can boot at all (before
    # anything else: a release that cannot boot is never migrated nor switched to).
    res = h.run(f"if cmp -s {q(old_req)} {q(rel)}/requirements.txt; then echo same; else\n"
                f"  {venv}/bin/pip install -q --disable-pip-version-check "
                f"-r {q(rel)}/requirements.txt || exit 1\nfi\necho {BOOT_MARK} >&2\n"
                + _env_lines(h, rel)
                + f"runuser -u {q(s.app)} -- {venv}/bin/python -c {q(BOOT_CHECK)} {q(wsgi)}",
                what="requirements", check=False)
    pip_err, checked, boot_err = res.stderr.partition(f"{BOOT_MARK}\n")
    if not checked:
        _abort(h, release, "requirements", f"pip install failed: {pip_err.strip()[-1500:]}")
    if res.stdout.strip() == "same":
        h.ok("requirements", "unchanged since the current release")
    else:
        h.changed("requirements", "installed into the virtualenv")
    if not res.ok:
        _abort(h, release, "app boot check", f"the new release's WSGI app ({wsgi}) does not "
               f"load as {s.app} with its environment:\n{boot_err.strip()[-1500:]}")
    h.ok("app boot check", f"{wsgi}.application loads as {s.app} with its environment")


def _remote_fetch(s, commit: str, rel: str) -> str:
    """Shell lines that archive ``commit`` from the host's mirror of DEPLOY_REPO into ``rel``."""
    cache = f"{s.code_dir}/repo.git"
    subdir = s["DEPLOY_SUBDIR"].strip("/")
    tree = f"{commit}:{subdir}" if subdir else commit
    return f"git -C {q(cache)} archive --format=tar {q(tree)} | tar -x -C {q(rel)} || fail\n"


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
    cache, key = f"{s.code_dir}/repo.git", f"{s.conf_dir}/deploy_key"
    credentials = f"{s.conf_dir}/git-credentials"
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
    proxy = s["HTTP_PROXY"]
    git = f"git -c credential.helper={q('store --file=' + credentials)} -C {q(cache)}"
    res = h.run(
        (f"export https_proxy={q(proxy)} http_proxy={q(proxy)}\n" if proxy else "")
        + f"export GIT_SSH_COMMAND=\"ssh -i {key} -o IdentitiesOnly=yes "
        f"-o StrictHostKeyChecking=accept-new -o UserKnownHostsFile={s.conf_dir}/known_hosts\"\n"
        f"export GIT_TERMINAL_PROMPT=0\nset -e\numask 077\n"
        f"if [ -d {q(cache)} ]; then chmod 0700 {q(cache)}\n"
        f"  {git} remote set-url origin {q(url)}\n  {git} remote update --prune >&2\n"
        f"else {git.replace(f' -C {q(cache)}', '')} clone --quiet --mirror {q(url)} {q(cache)} "
        ">&2; fi\n"
        f"git -C {q(cache)} rev-parse --verify {q(s['DEPLOY_REF'] + '^{commit}')}",
        what="release source")
    return Source(res.stdout.strip(), None, label)


def _backup_and_migrate(h, release: str) -> None:
    s = h.settings
    paths = _layout(s)
    rel = f"{paths['releases']}/{release}"
    from .backup import dump_database, human

    try:  # the backup script's dump (tasks/backup.py), kept BACKUP_KEEP_DEPLOY times
        dump, size = dump_database(h, "previous-deploy")
    except StepFailed as exc:
        _abort(h, release, "pre-migration backup",
               f"pg_dump failed, not migrating: {exc.message[-500:]}")
    h.changed("pre-migration backup", f"database dumped to {dump} ({human(size)})")
    venv = q(paths["venv"])
    res = h.run(_env_lines(h, rel)
                + f"runuser -u {q(s.app)} -- {venv}/bin/python manage.py migrate --noinput",
                what="migrations", check=False)
    if not res.ok:
        _abort(h, release, "migrations", res.stderr.strip()[-1500:] or res.stdout[-1500:])
    applied = [line.split("Applying ", 1)[1].removesuffix("... OK") for line in
               res.stdout.splitlines() if "Applying " in line]
    if applied:
        h.changed("migrations", f"applied {', '.join(applied)}")
    else:
        h.ok("migrations", "none to apply")
    res = h.run(_env_lines(h, rel) + f"{venv}/bin/python manage.py collectstatic --noinput",
                what="static files", check=False)
    if not res.ok:
        _abort(h, release, "static files", res.stderr.strip()[-1500:])
    h.ok("static files", res.stdout.strip().splitlines()[-1] if res.stdout.strip() else "done")


def _abort(h, release: str, what: str, why: str):
    paths = _layout(h.settings)
    h.run(f"rm -rf {q(paths['releases'])}/{q(release)}", what=what)
    raise StepFailed(what, f"{why}\nrelease {release} abandoned; the current release "
                     "keeps serving")


def _switch(h, release: str) -> None:
    """Point the app link at ``release`` atomically and restart gunicorn.

    A restart, not a reload: gunicorn's HUP was seen to leave new workers running the old
    release's code. systemd holds the socket meanwhile, so requests wait instead of failing,
    and gunicorn's graceful stop lets the old workers finish theirs.
    """
    s = h.settings
    paths = _layout(s)
    h.run(f"set -e\nln -sfn releases/{q(release)} {q(paths['code'])}/.app.new\n"
          f"mv -T {q(paths['code'])}/.app.new {q(paths['current'])}\n" + restart_app(s),
          what=f"switch to {release}")


def restart_app(s) -> str:
    """Shell lines that restart the app's gunicorn behind its socket (requests wait in the
    socket's backlog; the old workers finish theirs): a deploy's switch, fab upgrade's last
    restart."""
    unit = f"{s.app}.service"
    return (f"systemctl start {q(s.app)}.socket\n"
            f"systemctl restart {q(unit)}\n"
            # the restart also does any restart a configuration change left pending
            f"rm -f {PENDING_DIR}/{q(unit)}@* {PENDING_DIR}/{q(s.app)}@*")


def health_check(h, release: str, timeout: int = 60) -> tuple[bool, str]:
    """Ask HEALTH_PATH through NGINX (following redirects) until it answers from ``release``."""
    s = h.settings
    domain, path = s["DOMAIN"], s["HEALTH_PATH"]
    res = h.run(
        f"want={q(release)}; end=$(( $(date +%s) + {timeout} ))\n"
        "while :; do\n"
        f"  out=$(curl -sS -k -L --max-time 5 -o /dev/null -D - -w 'code=%{{http_code}}' "
        f"--resolve {domain}:80:127.0.0.1 --resolve {domain}:443:127.0.0.1 "
        f"http://{domain}{path} 2>&1)\n"
        "  code=$(printf '%s' \"$out\" | sed -n 's/.*code=//p' | tail -n 1)\n"
        "  rel=$(printf '%s' \"$out\" | tr -d '\\r' | sed -n 's/^[Xx]-[Rr]elease: *//p'"
        " | tail -n 1)\n"
        "  case $code in 2??) if [ -z \"$rel\" ] || [ \"$rel\" = \"$want\" ]; then\n"
        "    echo \"HTTP $code${rel:+ from release $rel}\"; exit 0; fi;; esac\n"
        "  if [ $(date +%s) -ge $end ]; then\n"
        "    echo \"HTTP ${code:-no answer}${rel:+ from release $rel}: $(printf '%s' \"$out\""
        " | grep -v '^code=' | tail -n 1)\"; exit 1; fi\n"
        "  sleep 0.5\ndone", what="health check", check=False)
    return res.ok, res.stdout.strip()


def _restart_workers(h) -> None:
    from .celery import restart_celery

    restart_celery(h)


def _prune(h, releases: list[str], keep: int, protect: set[str]) -> None:
    old = [r for r in releases[:-keep] if r not in protect] if len(releases) > keep else []
    if not old:
        h.ok("old releases", f"{len(releases)} kept (at most {keep})")
        return
    base = _layout(h.settings)["releases"]
    h.run("rm -rf " + " ".join(q(f"{base}/{r}") for r in old), what="old releases")
    h.changed("old releases", f"removed {', '.join(old)} (keeping {keep})")


def deploy_release(h, ref: str | None = None, force: bool = False,
                   maintenance: bool = False) -> None:
    s = h.settings
    if not s["DEPLOY_REPO"]:
        raise StepFailed("release source", "DEPLOY_REPO is not set in the settings")
    ref = ref or s["DEPLOY_REF"]
    remote = is_remote(s["DEPLOY_REPO"])
    source = None if remote else resolve_local(s["DEPLOY_REPO"], ref, s["DEPLOY_SUBDIR"])
    current, releases, missing = _state(h)
    if missing:
        raise StepFailed("provisioned", f"the host is not fully provisioned, missing "
                         f"{', '.join(missing)}: run `fab provision` first (a provision "
                         "that stopped part-way is finished by running it again)")
    if remote:
        source = _resolve_remote(h)
        if source is None:
            return
    if current.endswith(f"-{source.commit[:12]}") and not force:
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
    _prepare(h, source, release, current)
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
                h.run(f"rm -rf {q(_layout(s)['releases'])}/{q(release)}", what="rollback")
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
    current, releases, _ = _state(h)
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
        current, listing, _ = _state(h)
        for release in listing:
            h.ok(f"release {release}", "current" if release == current else "kept")


@task(help={"check": "Show what would change and change nothing."})
def gunicorn(c, check=False):
    """gunicorn's systemd socket and service units for the app (part of provision)."""
    with session(c, "gunicorn", check) as h:
        app_step(h)
