"""The deploy's steps before the switch, over the fake connection: the release's virtualenv,
boot check; and the pruning of releases and virtualenvs after it."""

import subprocess
from types import SimpleNamespace

import pytest

from tasks import deploy
from tasks.host import Result, StepFailed
from tasks.inventory import Site
from tasks.primitives import render
from tasks.scripts import script

RELEASE = "20261127000000-abcdef123456"
SOURCE = deploy.Source("abcdef1234567890", None, "git@example.com:app.git@main")


def prepare(make_host, requirements: Result):
    """Run deploy._prepare; the requirements-and-boot script answers ``requirements``."""
    host, conn = make_host()

    def execute(command, stdin, wait):
        conn.exec_script(command, stdin)
        return requirements if "action=boot" in stdin else Result("", "", 0)

    host._exec = execute
    return host, conn


def boot_script(conn) -> str:
    return next(script for script in conn.applied if "action=boot" in script)


@pytest.mark.parametrize("action, niced", [("collectstatic", True), ("migrate", False)])
def test_building_a_release_yields_the_cpu_and_migrating_does_not(settings, tmp_path, action,
                                                                  niced):
    """Every command runs at the background niceness (Host.run); a migration takes full
    priority back. The script run by sh (in a session of its own) with a stub renice; it stops
    at the environment file, which is not on this machine (before it changes anything)."""
    stubs, log = tmp_path / "bin", tmp_path / "log"
    stubs.mkdir()
    (stubs / "renice").write_text('#!/bin/sh\necho "renice $*" >> "$LOG"\n')
    (stubs / "renice").chmod(0o755)
    res = subprocess.run(["sh", "-s"], input=script("deploy-release.sh.j2", settings,
                                                    release=RELEASE, action=action),
                         text=True, capture_output=True, start_new_session=True,
                         env={"PATH": f"{stubs}:/usr/bin:/bin", "LOG": str(log)})
    assert "ratemyderp.conf" in res.stderr and res.returncode != 0
    calls = log.read_text().splitlines() if log.exists() else []
    assert calls == ([] if niced else [f"renice -n 0 -p {calls[0].split()[-1]}"]), calls


def test_the_release_must_load_before_anything_else(make_host, capsys):
    host, conn = prepare(make_host, Result("same 0123456789abcdef\n", f"{deploy.BOOT_MARK}\n", 0))
    deploy._prepare(host, SOURCE, RELEASE)
    script = boot_script(conn)
    # as the app's user, with the environment its file gives, from the new release
    assert script.startswith(f"release={RELEASE}\naction=boot\npython=python3\n")
    assert "rel=/opt/ratemyderp/releases/$release\n" in script
    assert "venv=$rel/.fabstack-venv\n" in script
    assert "set -a\n# shellcheck source=/dev/null" in script
    assert ("\n. /opt/ratemyderp/conf/ratemyderp.conf\nset +a\nexport PYTHONPATH=\"$rel\"\n"
            in script)
    assert 'runuser -u ratemyderp -- "$venv/bin/python" - config.wsgi <<' in script
    out = capsys.readouterr().out
    assert ("ok           requirements: unchanged: the release runs from virtualenv "
            "/opt/ratemyderp/venvs/0123456789abcdef") in out
    assert "ok           app boot check: config.wsgi.application loads as ratemyderp" in out


def test_no_secret_reaches_a_command_line_or_a_script(make_host, settings):
    host, conn = prepare(make_host, Result("", f"{deploy.BOOT_MARK}\n", 0))
    deploy._prepare(host, SOURCE, RELEASE)
    for secret in settings.secrets:
        assert not any(secret in text for text in conn.commands + conn.scripts)


def test_failing_requirements_abandon_the_release(make_host):
    host, conn = prepare(make_host, Result("", "ERROR: No matching distribution found for "
                                               "nope==1\n", 1))
    with pytest.raises(StepFailed) as err:
        deploy._prepare(host, SOURCE, RELEASE)
    assert err.value.what == "requirements"
    assert "pip install failed: ERROR: No matching distribution found for nope==1" in \
        err.value.message
    assert "the current release keeps serving" in err.value.message
    assert conn.applied[-1] == f"rm -rf /opt/ratemyderp/releases/{RELEASE}"


def test_a_release_that_cannot_boot_is_abandoned(make_host, capsys):
    host, conn = prepare(make_host, Result(
        "built fedcba9876543210\n", f"{deploy.BOOT_MARK}\nTraceback (most recent call last):\n"
                                    "RuntimeError: cannot boot\n", 1))
    with pytest.raises(StepFailed) as err:
        deploy._prepare(host, SOURCE, RELEASE)
    assert err.value.what == "app boot check"
    assert err.value.message.startswith(
        "the new release's WSGI app (config.wsgi) does not load as ratemyderp with its "
        "environment:\nTraceback")
    assert "RuntimeError: cannot boot\nrelease " in err.value.message
    assert conn.applied[-1] == f"rm -rf /opt/ratemyderp/releases/{RELEASE}"
    # the requirements themselves were fine, and reported so
    assert ("changed      requirements: installed into a new virtualenv "
            "/opt/ratemyderp/venvs/fedcba9876543210, beside the serving one"
            in capsys.readouterr().out)


def test_the_serving_virtualenv_is_never_written(make_host):
    """The boot step builds the release's virtualenv in venvs/ and writes nothing through
    /opt/APP/venv, the serving release's (the real-host proof hashes it:
    tests/test_realhost_deploy.py)."""
    host, conn = prepare(make_host, Result("built 0123456789abcdef\n", f"{deploy.BOOT_MARK}\n", 0))
    deploy._prepare(host, SOURCE, RELEASE)
    script = boot_script(conn)
    assert "dir=/opt/ratemyderp/venvs/$key\n" in script
    assert '"$python" -m venv "$dir"' in script and '"$dir/bin/pip" install' in script
    assert "/opt/ratemyderp/venv/" not in script and "/opt/ratemyderp/venv\n" not in script
    # a build that fails is removed, so the next deploy builds it again
    assert 'rm -rf -- "$dir"\n            exit 1' in script


@pytest.mark.parametrize("old, removed, outcome", [
    ([], "", "ok           old releases: 4 kept (at most 5)"),
    (["r1"], "", "changed      old releases: removed r1 (keeping 3)"),
    (["r1", "r2"], "venv 0123456789abcdef\nvenv legacy\nstatic 3\n",
     "changed      old releases: removed r1, r2 (keeping 2); removed virtualenvs "
     "0123456789abcdef, legacy (no kept release runs from them); removed 3 static files no "
     "kept release's manifest names"),
    ([], "venv 0123456789abcdef\n", "changed      old releases: removed virtualenv "
     "0123456789abcdef (no kept release runs from it)"),
    (["r1"], "static-kept r3\n", "changed      old releases: removed r1 (keeping 3); static "
     "files all kept: release r3 kept no manifest of them"),
    ([], "static-kept r3\n", "ok           old releases: 4 kept (at most 5)\n"),
])
def test_prune_removes_old_releases_and_the_virtualenvs_none_runs_from(
        make_host, capsys, old, removed, outcome):
    host, conn = make_host()

    def execute(command, stdin, wait):
        conn.exec_script(command, stdin)
        return Result(removed, "", 0)

    host._exec = execute
    releases = old + ["r3", "r4", "r5", "r6"][:4 - len(old)]
    keep = {0: 5, 1: 3, 2: 2}[len(old)]
    deploy._prune(host, releases, keep, {releases[-1]})
    script = conn.applied[-1]
    assert script.startswith("set -- " + " ".join(old) + "\n" if old else "#!/bin/sh")
    assert outcome in capsys.readouterr().out


# -- a remote DEPLOY_REPO with a credential ----------------------------------------------------

def test_a_token_in_deploy_repo_never_reaches_a_command_line(make_host, capsys):
    """The mirror gets the URL without the token; git reads it from a root-only file."""
    import base64

    from tasks import settings as settings_mod
    from tests.conftest import VALID

    token = "ghp_S3cretToken0123"
    s = settings_mod.parse({**VALID, "DEPLOY_REPO": f"https://{token}@git.example.com/org/app.git",
                            "DEPLOY_REF": "main"})
    host, conn = make_host([(r"git-credentials", "missing\n")])
    host.settings = s

    def execute(command, stdin, wait):
        res = conn.exec_script(command, stdin, wait)
        return Result("abcdef1234567890\n", "", 0) if "rev-parse" in stdin else res

    host._exec = execute
    source = deploy._resolve_remote(host, "main")
    write, fetch = conn.applied[0], conn.scripts[-1]
    assert "/opt/ratemyderp/conf/git-credentials" in write and "chmod 0600" in write
    assert token not in write  # base64: the content travels encoded, as every file's does
    stored = base64.b64decode(write.split("<<'FABSTACK_EOF'\n")[1].split("FABSTACK_EOF")[0])
    assert stored == f"https://{token}:@git.example.com\n".encode()
    assert token not in fetch and "umask 077" in fetch and "chmod 0700" in fetch
    assert fetch.startswith("url=https://git.example.com/org/app.git\nref=main\n")
    assert 'clone --quiet --mirror "$url" "$cache"' in fetch
    assert "helper='store --file=/opt/ratemyderp/conf/git-credentials'\n" in fetch
    assert source.label == "https://git.example.com/org/app.git@main"
    assert token in s.secrets


def test_the_mirror_resolves_the_ref_asked_for_not_only_deploy_ref(settings, tmp_path):
    """files/deploy-mirror.sh.j2 run here by sh against a real repository (a file:// URL),
    with the host's mirror in a scratch folder: `fab deploy --ref` names another commit than
    DEPLOY_REF (main)."""
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path / "app")]
    subprocess.run(["git", "init", "-q", "-b", "main", str(tmp_path / "app")], check=True)
    commits = {}
    for tag in ("v1", "v2"):
        subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", tag], check=True)
        subprocess.run([*git, "tag", tag], check=True)
        commits[tag] = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True,
                                      text=True, check=True).stdout.strip()

    def resolve(ref: str) -> str:
        program = script("deploy-mirror.sh.j2", settings, url=f"file://{tmp_path}/app", ref=ref)
        program = program.replace(settings.layout.repo, str(tmp_path / "mirror"))
        return subprocess.run(["sh", "-s"], input=program, capture_output=True, text=True,
                              check=True).stdout.strip()

    assert resolve("v1") == commits["v1"]  # the clone
    assert resolve("main") == commits["v2"]  # the update
    assert resolve("v1") == commits["v1"]


@pytest.mark.parametrize("repo, url, line", [
    ("https://u:p%40w@git.example.com:8443/a.git", "https://git.example.com:8443/a.git",
     "https://u:p%40w@git.example.com:8443\n"),
    ("https://git.example.com/a.git", "https://git.example.com/a.git", None),
    ("ssh://git@git.example.com/a.git", "ssh://git@git.example.com/a.git", None),
    ("git@github.com:org/a.git", "git@github.com:org/a.git", None),
])
def test_remote_credentials(repo, url, line):
    assert deploy.remote_credentials(repo) == (url, line)


# -- provision's python step and the virtualenvs of releases ----------------------------------

def seed_guard(make_host, root) -> str:
    """The python step's guard on /opt/APP/venv (its ``unless``), with /opt/APP at ``root``."""
    from tasks.primitives import Command
    from tasks.python import python_resources

    host, _ = make_host()
    command = next(r for r in python_resources(host, {"ID": "debian"}, True)
                   if isinstance(r, Command))
    return command.unless.replace("/opt/ratemyderp", str(root))


@pytest.mark.parametrize("state, left_alone", [
    ("missing", False),
    ("seed of another python", False),
    ("seed of this python", True),
    ("legacy of another python, a release serving from it", True),
    ("link to a release's virtualenv of another python", True),
    ("link to a removed virtualenv", False),
])
def test_provision_never_rebuilds_a_virtualenv_a_release_runs_from(
        make_host, tmp_path, state, left_alone):
    """The seed virtualenv is made (again) only while no release runs from it: changing
    PYTHON_VERSION no longer empties the serving one (the next deploy builds the release's)."""
    import subprocess
    import sys

    this = "{}.{}".format(*sys.version_info[:2])
    venv, venvs = tmp_path / "venv", tmp_path / "venvs"

    def virtualenv(path, version):
        path.mkdir(parents=True)
        (path / "pyvenv.cfg").write_text(f"home = /usr/bin\nversion = {version}.1\n")

    if state.startswith("seed"):
        virtualenv(venv, this if "this" in state else "2.9")
    elif state.startswith("legacy"):
        virtualenv(venv, "2.9")
        (tmp_path / "releases/r1").mkdir(parents=True)
        (tmp_path / "app").symlink_to("releases/r1")
    elif state.startswith("link"):
        if "removed" not in state:
            virtualenv(venvs / "0123456789abcdef", "2.9")
        venv.symlink_to(venvs / "0123456789abcdef")
    res = subprocess.run(["sh", "-c", seed_guard(make_host, tmp_path)], capture_output=True)
    assert (res.returncode == 0) == left_alone, res.stderr


def test_a_deploy_needs_the_interpreter_of_python_version(settings):
    """The release's virtualenv is built with PYTHON_VERSION's interpreter: a host that
    provision has not given it is named before anything changes."""
    from tasks import settings as settings_mod
    from tests.conftest import VALID

    def host(s):
        return SimpleNamespace(settings=s, site=Site.alone("h"))

    assert deploy.prerequisites(host(settings))["/usr/bin/python3"].startswith("the interpreter")
    other = settings_mod.parse({**VALID, "PYTHON_VERSION": "3.12"})
    assert "/usr/bin/python3.12" in deploy.prerequisites(host(other))


@pytest.mark.parametrize("link, stale", [("right", False), ("other", True), (None, True)])
def test_a_current_release_on_another_virtualenv_is_deployed_again(
        make_host, tmp_path, link, stale):
    """The deploy's probe computes the key the current release's virtualenv would have now
    (files/venv-key.sh.j2): one of another interpreter (PYTHON_VERSION changed), or none of
    its own (a release from before per-release virtualenvs), makes it stale."""
    import subprocess

    from tasks.scripts import script

    host, _ = make_host()
    snippets = []
    host.probe = lambda s: snippets.extend(s) or ["", "", "", ""]
    deploy._state(host)
    stale_probe = snippets[3].replace("/opt/ratemyderp", str(tmp_path))
    release = tmp_path / "releases/r1"
    release.mkdir(parents=True)
    (release / "requirements.txt").write_text("Django==5.2.19\n")
    (tmp_path / "app").symlink_to("releases/r1")
    key = subprocess.run(["sh", "-c", script("venv-key.sh.j2", host.settings, rel=release,
                                             python="python3") + 'echo "$key"'],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert len(key) == 16
    if link:
        venv = tmp_path / "venvs" / (key if link == "right" else "0123456789abcdef")
        venv.mkdir(parents=True)
        (release / ".fabstack-venv").symlink_to(venv)
    res = subprocess.run(["sh", "-c", stale_probe], capture_output=True, text=True)
    assert res.returncode == 0 and (res.stdout.strip() == "stale") == stale, res


# -- the switch and the pruning, run here on a copy of /opt/APP ---------------------------------

def run_here(program: str, root, *args: str, release: str = ""):
    """``program`` run by sh with the host's folders in ``root`` (/opt/ratemyderp at ``root``,
    /etc/nginx at root/nginx...), systemctl a stub that logs, fabstack-nginx-check one that
    passes, and curl one that answers 200 from release ``release``."""
    import os
    import subprocess

    bin_dir = root / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in (("systemctl", f'echo "$@" >> {root}/systemctl.log'), ("checker", ""),
                       ("journalctl", ""),
                       ("curl", f"printf 'HTTP/1.1 200 OK\\r\\nX-Release: {release}\\r\\n\\r\\n"
                                "code=200'")):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    for folder in ("nginx/conf.d", "run", "pending"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for path, here in (("/usr/local/sbin/fabstack-nginx-check", bin_dir / "checker"),
                       ("/opt/ratemyderp", root), ("/etc/nginx", root / "nginx"),
                       ("/run/ratemyderp", root / "run"), ("/etc/systemd/system", root)):
        program = program.replace(path, str(here))
    res = subprocess.run(["sh", "-c", program, "sh", *args], capture_output=True, text=True,
                         env=dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}"))
    assert res.returncode == 0, res.stderr
    return res.stdout


def release_with(root, name: str, venv: str | None):
    """Release ``name`` in ``root``, its virtualenv link naming venvs/``venv`` (None: none)."""
    release = root / "releases" / name
    release.mkdir(parents=True)
    if venv:
        (root / "venvs" / venv).mkdir(parents=True, exist_ok=True)
        (release / ".fabstack-venv").symlink_to(root / "venvs" / venv)


def boots(settings, root) -> str:
    """The instance files/gunicorn-generator.sh.j2 has multi-user.target want ("" none)."""
    import shutil

    generated = root / "generator"
    shutil.rmtree(generated, ignore_errors=True)
    generated.mkdir()
    run_here(render("gunicorn-generator.sh.j2", settings), root, str(generated))
    wants = generated / "multi-user.target.wants"
    links = list(wants.iterdir()) if wants.exists() else []
    assert all(link.readlink() == root / "ratemyderp@.service" for link in links), links
    return " ".join(link.name for link in links)


def test_the_generator_wants_no_instance_before_the_first_release(settings, tmp_path):
    (tmp_path / "nginx/conf.d").mkdir(parents=True)
    (tmp_path / "nginx/conf.d/fabstack-ratemyderp-upstream.conf").write_text(
        render("nginx-upstream.conf.j2", settings, color="blue"))
    assert boots(settings, tmp_path) == ""  # names blue, which runs no release yet


def start_and_switch(settings, root, release: str) -> str:
    """deploy-start.sh.j2, then deploy-switch.sh.j2 for ``release``; the instance's color."""
    from tasks.deploy import _instance_script

    out = run_here(_instance_script("deploy-start.sh.j2", settings, release=release), root,
                   release=release)
    color = out.split()[0]
    assert out.splitlines()[1] == f"HTTP 200 from release {release}"
    run_here(_instance_script("deploy-switch.sh.j2", settings, release=release, color=color),
             root, release=release)
    return color


def test_the_switch_moves_both_links_and_keeps_a_shared_virtualenv_as_the_legacy_one(
        settings, tmp_path):
    import os

    root = tmp_path
    (root / "venv").mkdir()  # a host of the shared virtualenv, served by APP.socket
    (root / "venv/pyvenv.cfg").write_text("version = 3.11.2\n")
    release_with(root, "r1", None)
    (root / "app").symlink_to("releases/r1")
    upstream = root / "nginx/conf.d/fabstack-ratemyderp-upstream.conf"
    release_with(root, "r2", "0123456789abcdef")
    assert start_and_switch(settings, root, "r2") == "blue"
    assert os.readlink(root / "instances/blue") == f"{root}/releases/r2"
    assert f"server unix:{root}/run/blue/gunicorn.sock;" in upstream.read_text()
    assert os.readlink(root / "app") == "releases/r2"
    assert os.readlink(root / "venv") == f"{root}/venvs/0123456789abcdef"
    assert (root / "venvs/legacy/pyvenv.cfg").read_text() == "version = 3.11.2\n"
    log = (root / "systemctl.log").read_text()
    assert "start -- ratemyderp@blue.service" in log
    assert log.endswith("reload nginx.service\n"
                        "disable --now --quiet -- ratemyderp.socket ratemyderp.service\n"
                        "daemon-reload\n"), log
    assert boots(settings, root) == "ratemyderp@blue.service"
    # rollback to a release of the shared virtualenv, in the other instance
    assert start_and_switch(settings, root, "r1") == "green"
    assert os.readlink(root / "releases/r1/.fabstack-venv") == f"{root}/venvs/legacy"
    assert os.readlink(root / "app") == "releases/r1"
    assert os.readlink(root / "venv") == f"{root}/venvs/legacy"
    assert f"server unix:{root}/run/green/gunicorn.sock;" in upstream.read_text()
    # the instance that served yields the CPU (its main process asked for its autogroup) and
    # is told to stop, and that is all the switch asks of systemd
    log = (root / "systemctl.log").read_text()
    assert log.endswith("reload nginx.service\n"
                        "show -p MainPID --value -- ratemyderp@blue.service\n"
                        "stop --no-block -- ratemyderp@blue.service\n"), log
    assert boots(settings, root) == "ratemyderp@green.service"
    assert start_and_switch(settings, root, "r2") == "blue"
    assert os.readlink(root / "venv") == f"{root}/venvs/0123456789abcdef"
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == []
    assert sorted(p.name for p in (root / "instances").iterdir()) == ["blue", "green"]


def test_pruning_keeps_every_virtualenv_a_kept_release_or_the_link_names(settings, tmp_path):
    import os

    from tasks.scripts import script

    root = tmp_path
    release_with(root, "r1", "1111111111111111")
    release_with(root, "r2", None)  # runs from the legacy one
    (root / "venvs/legacy").mkdir()
    release_with(root, "r3", "3333333333333333")
    release_with(root, "r4", "3333333333333333")
    (root / "venvs/4444444444444444").mkdir()  # built for a release that then failed
    os.symlink(root / "venvs/3333333333333333", root / "venv")
    prune = script("deploy-prune.sh.j2", settings, "r1")
    assert run_here(prune, root).splitlines() == [
        "venv 1111111111111111", "venv 4444444444444444", "static-kept r2"]
    assert sorted(p.name for p in (root / "venvs").iterdir()) == ["3333333333333333", "legacy"]
    assert sorted(p.name for p in (root / "releases").iterdir()) == ["r2", "r3", "r4"]
    prune = script("deploy-prune.sh.j2", settings, "r2")
    assert run_here(prune, root).splitlines() == ["venv legacy", "static-kept r3"]


def static_release(root, name: str, paths: dict[str, str] | None) -> None:
    """Release ``name`` with its copy of the manifest naming ``paths`` (None: no copy), and
    the files it names in ``root``/static."""
    import json

    release_with(root, name, None)
    if paths is not None:
        (root / "releases" / name / ".fabstack-staticfiles.json").write_text(
            json.dumps({"paths": paths, "version": "1.1", "hash": "0"}))
    for path in [*(paths or {}), *(paths or {}).values()]:
        (root / "static" / path).parent.mkdir(parents=True, exist_ok=True)
        (root / "static" / path).write_text(name)


def test_pruning_removes_the_static_files_no_kept_release_names(settings, tmp_path):
    import os

    from tasks.scripts import script

    root = tmp_path
    (root / "bin").mkdir()
    (root / "bin/runuser").write_text('#!/bin/sh\nshift 3\nexec "$@"\n')  # -u APP --
    (root / "bin/runuser").chmod(0o755)
    static_release(root, "r1", {"demo/site.css": "demo/site.111111111111.css",
                                "old/gone.js": "old/gone.111111111111.js"})
    static_release(root, "r2", {"demo/site.css": "demo/site.222222222222.css"})
    static_release(root, "r3", {"demo/site.css": "demo/site.333333333333.css",
                                "demo/new.js": "demo/new.333333333333.js"})
    (root / "static/staticfiles.json").write_text("{}")  # the last collectstatic's
    os.symlink("site.css", root / "static/demo/linked.css")  # named by no manifest
    for name in ("site.111111111111.css.gz", "site.333333333333.css.gz",
                 "site.333333333333.css.br", "site.333333333333.css.map"):  # WhiteNoise's
        (root / "static/demo" / name).write_text("compressed")

    def prune(*old: str) -> list[str]:
        program = script("deploy-prune.sh.j2", settings, *old)
        return run_here(program.replace(settings.layout.static, str(root / "static")),
                        root).splitlines()

    def files() -> list[str]:
        return sorted(str(p.relative_to(root / "static")) for p in (root / "static").rglob("*")
                      if not p.is_dir() or p.is_symlink())

    # old/gone.js, its hashed name, site.111... and its .gz, the link, a .map no manifest names
    assert prune("r1") == ["static 6"]
    assert files() == ["demo/new.333333333333.js", "demo/new.js", "demo/site.222222222222.css",
                       "demo/site.333333333333.css", "demo/site.333333333333.css.br",
                       "demo/site.333333333333.css.gz", "demo/site.css", "staticfiles.json"]
    assert not (root / "static/old").exists()  # emptied, so removed
    static_release(root, "r4", None)  # an app without ManifestStaticFilesStorage
    assert prune("r2") == ["static-kept r4"]
    assert "demo/site.222222222222.css" in files()


def test_a_failed_switch_abandons_the_release_and_the_one_before_serves(make_host,
                                                                         monkeypatch):
    """The site did not answer from the new release through NGINX (the switch script put the
    upstream file back and exited 1): the release is removed, fab says who serves."""
    host, conn = make_host(failing=[r"switch_to \"\$color\""])
    monkeypatch.setattr(deploy, "_state", lambda h: deploy.State("r1", ["r1"], [], False))
    monkeypatch.setattr(deploy, "resolve_local", lambda *args: SOURCE)
    for step in ("_prepare", "_backup_and_migrate", "_collect_static"):
        monkeypatch.setattr(deploy, step, lambda *args: None)
    monkeypatch.setattr(deploy, "_start_beside", lambda *args: "green")
    host.settings.values["DEPLOY_REPO"] = "/srv/app"
    with pytest.raises(StepFailed, match=r"switch: the site did not answer from (\S+) through "
                       r"NGINX .*; r1 serves as before\nrelease \1 abandoned; the current "
                       "release keeps serving"):
        deploy.deploy_release(host)
    assert conn.applied[-1].startswith("rm -rf /opt/ratemyderp/releases/")
    assert not any("celery" in script for script in conn.applied)  # nothing after the switch


def test_an_upload_that_does_not_unpack_leaves_neither_it_nor_the_release(settings, tmp_path):
    """files/deploy-unpack.sh.j2 run here by sh, the releases in a scratch folder."""
    upload = tmp_path / "upload"
    upload.mkdir()
    (upload / "release.tar.gz").write_bytes(b"not a tar")
    program = script("deploy-unpack.sh.j2", settings, release=RELEASE,
                     archive=str(upload / "release.tar.gz"), tree="")
    program = program.replace(settings.layout.releases, str(tmp_path / "releases"))
    res = subprocess.run(["sh", "-s"], input=program, capture_output=True, text=True)
    assert res.returncode == 1, res.stderr
    assert not upload.exists() and list((tmp_path / "releases").iterdir()) == []


class FakeWorker:
    """What gunicorn.conf.py.j2's post_worker_init uses of a gunicorn worker."""

    def __init__(self, app):
        self.wsgi, self.lines = app, []
        self.log = self

    def info(self, message, *args):
        self.lines.append(message % args)

    def exception(self, message, *args):
        self.lines.append("error: " + message % args)


def gunicorn_conf(settings, tmp_path, monkeypatch, release_conf: str = "") -> dict:
    """The configuration gunicorn reads (files/gunicorn.conf.py.j2) run as gunicorn runs it,
    in a release's folder with ``release_conf`` as its own gunicorn.conf.py."""
    monkeypatch.chdir(tmp_path)
    if release_conf:
        (tmp_path / "gunicorn.conf.py").write_text(release_conf)
    conf = {"__file__": "gunicorn.conf.py"}
    exec(compile(render("gunicorn.conf.py.j2", settings), "gunicorn.conf.py", "exec"), conf)
    return conf


def test_each_gunicorn_worker_answers_the_health_path_once_before_its_first_request(
        settings, tmp_path, monkeypatch):
    seen = []

    def app(environ, start_response):
        seen.append(environ)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    conf = gunicorn_conf(settings, tmp_path, monkeypatch,
                         "workers = 7\ndef post_worker_init(worker):\n"
                         "    worker.lines.append('release hook')\n")
    worker = FakeWorker(app)
    conf["post_worker_init"](worker)
    assert conf["workers"] == 7  # the release's own configuration is read too
    assert conf["preload_app"] is True
    assert conf["control_socket_disable"] is True
    assert worker.lines == ["release hook", "warm-up: /health/ answered 200 OK"]
    [environ] = seen
    assert (environ["REQUEST_METHOD"], environ["PATH_INFO"], environ["HTTP_HOST"]) == (
        "GET", settings["HEALTH_PATH"], settings["DOMAIN"])
    assert environ["HTTP_X_FORWARDED_PROTO"] == "https"


def test_a_warm_up_that_fails_is_logged_and_the_worker_serves_on(settings, tmp_path,
                                                                 monkeypatch):
    def app(environ, start_response):
        raise RuntimeError("database down")

    conf = gunicorn_conf(settings, tmp_path, monkeypatch)
    worker = FakeWorker(app)
    conf["post_worker_init"](worker)  # no exception: gunicorn would stop the worker
    assert worker.lines == ["error: warm-up: /health/ failed"]


def test_a_release_may_keep_its_app_from_being_imported_before_the_fork(settings, tmp_path,
                                                                        monkeypatch):
    conf = gunicorn_conf(settings, tmp_path, monkeypatch, "preload_app = False\n")
    assert conf["preload_app"] is False
