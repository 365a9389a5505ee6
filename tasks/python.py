"""Python: the configured interpreter and the app's virtualenv (/opt/APP/venv).

An empty PYTHON_VERSION (the default) means the distro's ``python3``, whatever its version
(Debian 12: 3.11, Debian 13: 3.13). A version such as 3.12 is taken from the distro when it
has it, from the deadsnakes PPA on Ubuntu otherwise; elsewhere the task stops and says what
can be had. The virtualenv is recreated only when its interpreter's minor version changes.
"""

from __future__ import annotations

from .host import StepFailed, converging_task
from .primitives import AptUpdate, Command, Packages, apt_repository, ensure, q

DEADSNAKES_KEY = ("https://keyserver.ubuntu.com/pks/lookup?op=get&search="
                  "0xF23C5A6CF475977595C89F51BA6932366A755776")
DEADSNAKES_URI = "https://ppa.launchpadcontent.net/deadsnakes/ppa/ubuntu"


def os_release(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if "=" in line:
            key, value = line.split("=", 1)
            out[key] = value.strip().strip('"')
    return out


def interpreter(version: str) -> str:
    """The interpreter's command for PYTHON_VERSION: ``python3.X``, or ``python3`` when empty."""
    return f"python{version}" if version else "python3"


def python_resources(h, release: dict[str, str], candidate: bool) -> list:
    """Resources for PYTHON_VERSION on a host with ``release`` (its /etc/os-release)."""
    s = h.settings
    version = s["PYTHON_VERSION"]
    python = interpreter(version)
    resources = []
    if not candidate:
        distro = f"{release.get('NAME', 'this system')} {release.get('VERSION_ID', '')}".strip()
        if release.get("ID") != "ubuntu":
            raise StepFailed("python", f"Python {version or '3'} is not available on {distro}: "
                             "leave PYTHON_VERSION empty for the distro's python3 (Debian 12: "
                             "3.11, Debian 13: 3.13), or use Ubuntu, where the deadsnakes PPA "
                             "provides other versions")
        resources += apt_repository("deadsnakes", DEADSNAKES_URI, release["VERSION_CODENAME"],
                                    "main", DEADSNAKES_KEY)
    layout = s.layout
    venv = layout.venv
    # The seed virtualenv, until the first deploy gives the app one per release (and makes
    # /opt/APP/venv a link to the current release's): made when missing, and made again when
    # its minor version (pyvenv.cfg) is not the interpreter's (read on the host when
    # PYTHON_VERSION is empty: a distro upgrade that moves python3) while no release runs
    # from it. A virtualenv a release runs from is never touched: the next deploy builds the
    # release's on the new interpreter.
    want = q(version) if version else (
        f"$({python} -c 'import sys; print(\"%d.%d\" % sys.version_info[:2])' 2>/dev/null)")
    cfg = q(venv + "/pyvenv.cfg")
    serving = f"[ -e {cfg} ] && {{ [ -L {q(venv)} ] || [ -e {q(layout.current)} ]; }}"
    resources += [
        Packages([python, f"{python}-venv", f"{python}-dev"]),
        Command(f"virtualenv {venv}",
                unless=f'{{ {serving}; }} || {{ want={want} && [ -n "$want" ] && '
                       f'grep -Eq "^version *= *$want[.]" {cfg}; }}',
                message=f"created with {python}",
                script=f"rm -rf {q(venv)}\n{python} -m venv {q(venv)}"),
    ]
    return resources


def facts(h, version: str) -> tuple[dict[str, str], bool]:
    """The host's /etc/os-release, and whether apt can install PYTHON_VERSION's interpreter."""
    release, policy = h.probe(["cat /etc/os-release",
                               f"apt-cache policy {interpreter(version)} 2>/dev/null"])
    candidate = any(line.split(":", 1)[1].strip() not in ("", "(none)")
                    for line in policy.splitlines() if "Candidate:" in line)
    return os_release(release), candidate


def ready_resources(h) -> list:
    """:func:`python_resources` for the host as its facts are, once the apt lists are fresh
    enough to install PYTHON_VERSION's interpreter (refreshed here if they were not)."""
    version = h.settings["PYTHON_VERSION"]
    release, candidate = facts(h, version)
    if not candidate:  # the lists may be missing or stale: refresh them once and look again
        ensure(h, AptUpdate(max_age=60))
        release, candidate = facts(h, version)
    return python_resources(h, release, candidate)


@converging_task("python", default=True)
def setup(h):
    """Install PYTHON_VERSION (empty: the distro's python3) and the app's virtualenv."""
    return ready_resources(h)
