"""Python: the configured interpreter and the app's virtualenv (/opt/APP/venv).

The distro's python is used when its version matches PYTHON_VERSION; on Ubuntu
the deadsnakes PPA supplies other versions; elsewhere the task stops and names
the versions that can be had. The virtualenv is recreated only when its
interpreter's version changes.
"""

from __future__ import annotations

from fabric import task

from .host import StepFailed, session
from .primitives import AptUpdate, Command, Packages, apt_repository, ensure

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


def python_resources(h, release: dict[str, str], candidate: bool) -> list:
    """Resources for PYTHON_VERSION on a host with ``release`` (its /etc/os-release)."""
    s = h.settings
    version = s["PYTHON_VERSION"]
    packages = [f"python{version}", f"python{version}-venv", f"python{version}-dev"]
    resources = []
    if not candidate:
        distro = f"{release.get('NAME', 'this system')} {release.get('VERSION_ID', '')}".strip()
        if release.get("ID") != "ubuntu":
            raise StepFailed("python", f"Python {version} is not available on {distro}: set "
                             "PYTHON_VERSION to the distro's python3 version (Debian 12: 3.11, "
                             "Debian 13: 3.13), or use Ubuntu, where the deadsnakes PPA "
                             "provides other versions")
        resources += apt_repository("deadsnakes", DEADSNAKES_URI, release["VERSION_CODENAME"],
                                    "main", DEADSNAKES_KEY)
    venv = s.venv_dir
    resources += [
        Packages(packages),
        Command(f"virtualenv {venv}",
                unless=f"grep -Eq '^version *= *{version.replace('.', '[.]')}[.]' "
                       f"{venv}/pyvenv.cfg",
                message=f"created with python{version}",
                script=f"rm -rf {venv}\npython{version} -m venv {venv}"),
    ]
    return resources


def facts(h, version: str) -> tuple[dict[str, str], bool]:
    """The host's /etc/os-release, and whether apt can install python``version``."""
    release, policy = h.probe(["cat /etc/os-release",
                               f"apt-cache policy python{version} 2>/dev/null"])
    candidate = any(line.split(":", 1)[1].strip() not in ("", "(none)")
                    for line in policy.splitlines() if "Candidate:" in line)
    return os_release(release), candidate


def python_step(h) -> None:
    version = h.settings["PYTHON_VERSION"]
    release, candidate = facts(h, version)
    if not candidate:  # the lists may be missing or stale: refresh them once and look again
        ensure(h, AptUpdate(max_age=60))
        release, candidate = facts(h, version)
    ensure(h, *python_resources(h, release, candidate))


@task(default=True, help={"check": "Show what would change and change nothing."})
def setup(c, check=False):
    """Install PYTHON_VERSION and create the app's virtualenv with it."""
    with session(c, "python", check) as h:
        python_step(h)
