"""Static files on the real sandbox host: collectstatic as the app's user into the app's static
folder, the hashed names (ManifestStaticFilesStorage) of the serving, new and kept releases
side by side, a rollback that names its own files again, and pruning by the kept releases'
manifests."""

import json
import re
import subprocess
import time

import pytest

from tests.conftest import changed_count, commit, host_state, state_changes
from tests.load import DOMAIN, Stream, fetch

APP = "ratemyderp"
STATIC = f"/var/opt/{APP}/static"
CSS = "example/demo/static/demo/site.css"


@pytest.fixture(scope="module")
def deployed(target, app_repo, pebble_env):
    """provision (with a certificate from Pebble), then the first deploy; two releases kept."""
    target.write_env(DEPLOY_REPO=str(app_repo), DEPLOY_SUBDIR="example", RELEASES_KEEP="2",
                     **pebble_env)
    target.fab("provision")
    return target.fab("deploy")


def css_of_page(ip: str) -> tuple[str, str]:
    """The release that rendered the home page, and the stylesheet it names."""
    status, _release, body = fetch(ip, "/")
    assert status == 200, body[:500]
    return (re.search(r"release: ([\w.-]+)", body).group(1),
            re.search(r'href="(/static/demo/site\.[0-9a-f]{12}\.css)"', body).group(1))


def static_file(ip: str, path: str) -> tuple[int, dict, str]:
    """Status, headers (lower-case names) and body of ``path`` as NGINX serves it."""
    res = subprocess.run(["curl", "-sk", "--noproxy", "*", "--max-time", "10", "-D", "-",
                          "--resolve", f"{DOMAIN}:443:{ip}", f"https://{DOMAIN}{path}"],
                         capture_output=True, text=True)
    head, _, body = res.stdout.replace("\r\n", "\n").partition("\n\n")
    lines = head.splitlines()
    headers = dict((k.lower(), v.strip()) for k, _, v in (line.partition(":")
                                                         for line in lines[1:]))
    return int(lines[0].split()[1]), headers, body


class PagesAndTheirCss(Stream):
    """A context manager: the home page, then the stylesheet it names, asked again and again
    (what a browser does), each pair recorded as (release, stylesheet, its status)."""

    def __init__(self, ip: str):
        self.ip, self.seen, self.errors = ip, [], []
        super().__init__()

    def _run(self):
        while not self._stop.is_set():
            try:
                release, css = css_of_page(self.ip)
                self.seen.append((release, css, fetch(self.ip, css)[0]))
            except (OSError, AssertionError, AttributeError) as exc:
                self.errors.append(repr(exc))
            self._stop.wait(0.1)

def owners(target, path: str) -> set[str]:
    """user:group of ``path`` and of everything below it."""
    return set(target.sh(f"find {path} -printf '%u:%g\\n'").stdout.split())


def test_collectstatic_runs_as_the_app_user_into_its_folder(target, deployed):
    assert re.search(r"ok           static files: \d+ static files? copied to "
                     rf"'{STATIC}'(, \d+ unmodified)?, \d+ post-processed\. \(as {APP}\); its "
                     "manifest kept in the release", deployed.stdout), deployed.stdout
    assert target.sh(f"stat -c '%U:%G %a' {STATIC}").stdout.strip() == f"{APP}:{APP} 755"
    assert owners(target, STATIC) == {f"{APP}:{APP}"}
    # NGINX reads it: every folder 755, every file 644
    assert target.sh(f"find {STATIC} \\( -type d ! -perm 755 -o -type f ! -perm 644 \\) "
                     "-print -quit").stdout == ""
    release, css = css_of_page(target.info.ip)
    manifest = json.loads(target.sh(
        f"cat /opt/{APP}/releases/{release}/.fabstack-staticfiles.json").stdout)
    assert manifest["paths"]["demo/site.css"] == css.removeprefix("/static/")


def test_a_hashed_name_is_cached_for_a_year_and_the_plain_one_is_not(target, deployed,
                                                                      app_repo):
    _release, css = css_of_page(target.info.ip)
    status, headers, body = static_file(target.info.ip, css)
    assert status == 200 and body == (app_repo / CSS).read_text()
    assert headers["cache-control"] == "public, max-age=31536000, immutable", headers
    assert headers["x-content-type-options"] == "nosniff"
    status, headers, _ = static_file(target.info.ip, "/static/demo/site.css")
    assert status == 200 and "cache-control" not in headers, headers
    assert headers["x-content-type-options"] == "nosniff"


def make_it_a_folder_collected_as_root(target) -> None:
    """The static folder as fabstack left it when collectstatic ran as root."""
    target.sh(f"chown -R root:root {STATIC} && chown root:{APP} {STATIC}")


def test_provision_gives_a_folder_collected_as_root_to_the_app(target, deployed):
    make_it_a_folder_collected_as_root(target)
    res = target.fab("provision.base")
    assert f"changed      static folder {STATIC}: given to {APP} with all it holds " \
           "(collected as root before)" in res.stdout, res.stdout
    assert owners(target, STATIC) == {f"{APP}:{APP}"}
    again = target.fab("provision.base")
    assert changed_count(again.stdout) == 0, again.stdout


def test_old_and_new_stylesheets_are_both_served_while_and_after_the_switch(
        target, deployed, app_repo):
    """A deploy that changes the stylesheet, on a folder collected as root: the deploy gives
    it to the app; pages of either release find their stylesheet throughout."""
    ip = target.info.ip
    old_release, old_css = css_of_page(ip)
    old_text = (app_repo / CSS).read_text()
    make_it_a_folder_collected_as_root(target)
    commit(app_repo, "a new colour", {CSS: old_text + "h1 { color: teal; }\n"})
    with PagesAndTheirCss(ip) as pages:
        res = target.fab("deploy")
        time.sleep(1)
    assert f"changed      static folder: given to {APP} with all it holds" in res.stdout, \
        res.stdout
    new_release, new_css = css_of_page(ip)
    assert new_release != old_release and new_css != old_css
    print(f"\npages and their stylesheet during the deploy: {len(pages.seen)} asked, "
          f"{len(pages.errors)} errors")
    assert pages.errors == [] and {r for r, _, _ in pages.seen} == {old_release, new_release}
    assert {(r, css) for r, css, _ in pages.seen} == {(old_release, old_css),
                                                      (new_release, new_css)}
    assert {status for _, _, status in pages.seen} == {200}, pages.seen
    assert static_file(ip, old_css)[2] == old_text
    assert static_file(ip, new_css)[2] == (app_repo / CSS).read_text()
    # collected by the app's user: the new file is its, and so is everything else now
    assert target.sh(f"stat -c %U:%G {STATIC}{new_css.removeprefix('/static')}"
                     ).stdout.strip() == f"{APP}:{APP}"
    assert owners(target, STATIC) == {f"{APP}:{APP}"}


def test_a_rollback_names_its_own_stylesheet_again(target, deployed, app_repo):
    ip = target.info.ip
    releases = target.sh(f"ls /opt/{APP}/releases").stdout.split()
    current, current_css = css_of_page(ip)
    target.fab("rollback")
    previous, previous_css = css_of_page(ip)
    assert previous == releases[releases.index(current) - 1]
    assert previous_css != current_css and static_file(ip, previous_css)[0] == 200
    target.fab("deploy")  # forward again: HEAD in a release of its own
    assert css_of_page(ip)[1] == current_css


def kept_names(target) -> set[str]:
    """What the kept releases' manifests name, and the manifest itself."""
    names = {"staticfiles.json"}
    for release in target.sh(f"ls /opt/{APP}/releases").stdout.split():
        paths = json.loads(target.sh(f"cat /opt/{APP}/releases/{release}/"
                                     ".fabstack-staticfiles.json").stdout)["paths"]
        names |= set(paths) | set(paths.values())
    return names


def test_pruning_removes_what_only_a_pruned_release_named(target, deployed, app_repo):
    """Releases: the first (stylesheet a), the second (b), the same commit again (b), then a
    third stylesheet (c) with two releases kept: a's file goes, b's stays (a kept release names
    it, though the release that first collected it is gone), c's arrives."""
    ip = target.info.ip
    releases = target.sh(f"ls /opt/{APP}/releases").stdout.split()
    first = json.loads(target.sh(f"cat /opt/{APP}/releases/{releases[0]}/"
                                 ".fabstack-staticfiles.json").stdout)["paths"]
    only_first = f"/static/{first['demo/site.css']}"
    assert static_file(ip, only_first)[0] == 200
    _release, kept_css = css_of_page(ip)
    commit(app_repo, "another colour", {CSS: (app_repo / CSS).read_text()
                                        + "h1 { color: navy; }\n"})
    res = target.fab("deploy")
    assert re.search(r"removed \d+ static files? no kept release's manifest names",
                     res.stdout), res.stdout
    assert len(target.sh(f"ls /opt/{APP}/releases").stdout.split()) == 2
    assert static_file(ip, only_first)[0] == 404
    assert static_file(ip, kept_css)[0] == 200
    assert static_file(ip, css_of_page(ip)[1])[0] == 200
    files = set(target.sh(f"cd {STATIC} && find . ! -type d -printf '%P\\n'").stdout.split())
    assert files == kept_names(target)


def test_a_second_deploy_of_the_same_commit_changes_nothing(target, deployed):
    before = host_state(target)
    res = target.fab("deploy")
    assert "is already current" in res.stdout and changed_count(res.stdout) == 0, res.stdout
    assert state_changes(before, host_state(target)) == []
