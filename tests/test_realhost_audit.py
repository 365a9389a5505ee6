"""Audits of the whole stack on the real sandbox host: secrets, hardening, idempotence.

- Secrets: a provision that changes every secret and a deploy that does all its work (pip,
  dump, migrate, restarts) run with hostile secret values while a sampler records every
  process's arguments on the host (a password in the proxy's URL too); no secret's marker may
  show in those, in fab's output, in the journal, nor in any file a service's group or
  everyone may read.
- Hardening: systemd's exposure figure of the app's, Celery's and beat's units, and which TCP
  ports answer from outside the host (this machine, to the sandbox's address).
- Idempotence: every task of ``fab --list`` is classified; each converging one runs twice and
  the second run must change nothing. Telegraf's apt repository is out of reach here, so
  ``monitoring`` converges the monitoring role only (MONITORING_DB_PASSWORD is set, INFLUX_URL
  is not); Telegraf's own resources are covered by tests/test_monitoring.py.
"""

import re
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tasks.primitives import BACKGROUND_NICE
from tests.conftest import (
    MARKERS,
    SECRETS,
    ProcessSampler,
    changed_count,
    host_state,
    state_changes,
)

APP = "ratemyderp"
# The proxy's password (the sandbox's proxy asks for none: one given travels all the same).
PROXY_MARKER = "Mk9px"
AUDIT_MARKERS = (*MARKERS, PROXY_MARKER)
UNITS = (f"{APP}@blue.service", "celery.service", "celerybeat.service")  # gunicorn: an instance
MAX_EXPOSURE = 4.0
PUBLIC_PORTS = {22, 80, 443}
# Ports nothing should answer on from outside, tried besides the host's own listeners.
EXTRA_PORTS = {21, 23, 25, 53, 111, 3306, 5432, 6379, 8000, 8080, 8443, 9000}
CANARY_TCP, CANARY_UDP = 8765, 8766
# Groups of the services that read a secret-holding file: the app's (its environment),
# celery, telegraf (its token), backups (its .pgpass).
SERVICE_GROUPS = {APP, "celery", "telegraf", "backups"}

# Every account of the stack and exactly the supplementary groups it is in (``id -Gn`` less
# its own group): what each one reads and nothing more. backups reads the database with its
# own .pgpass and the media (readable by all), nothing in conf/; celery gets its environment
# from systemd (EnvironmentFile=, read as root); offsite reads the backups (only when an
# OFFSITE_PUBKEY was set, as the backup module does).
ACCOUNT_GROUPS = {
    APP: set(),
    "celery": set(),
    "backups": set(),
    "offsite": {"backups"},
    "www-data": set(),
    "postgres": {"ssl-cert"},
    "redis": set(),
}
OPTIONAL_ACCOUNTS = {"offsite"}

# Tasks that converge: a second run changes nothing.
CONVERGING = ("provision.all", "provision.base", "python.setup", "db.setup", "backup.setup",
              "celery.setup", "gunicorn", "nginx.setup", "certbot.setup", "monitoring.setup",
              "deploy")
# Tasks that act (or only read) on purpose, and why they are not run twice here.
ACTIONS = {
    "backup-db": "makes a new dump every time (tests/test_realhost_backup.py)",
    "restore-db": "restores a dump on purpose, after asking (tests/test_realhost_backup.py)",
    "restore-media": "puts uploads back on purpose, after asking "
                     "(tests/test_realhost_daytwo.py)",
    "rollback": "switches to the previous release on purpose (tests/test_realhost_deploy.py)",
    "celery.restart": "restarts the workers on purpose",
    "releases": "reads only: checked below to leave the host as it was",
    "status": "reads only: checked below to leave the host as it was",
    "logs": "reads only: checked below to leave the host as it was",
    "db.psql": "an interactive session",
    "manage": "runs a manage.py command on purpose (tests/test_realhost_daytwo.py)",
    "maintenance": "takes on or off; each is run twice, the second changing nothing, in "
                   "tests/test_realhost_daytwo.py",
    "db.redis-cli": "an interactive session",
    "upgrade": "upgrades packages and restarts services on purpose; run twice, the second "
               "changing nothing, in tests/test_realhost_daytwo.py",
    "certbot.renew-dry-run": "rehearses a renewal with the CA (tests/test_realhost_web.py)",
    "sandbox.demo": "runs on this machine, not the target",
    "sandbox.down": "runs on this machine, not the target",
    "sandbox.status": "runs on this machine, not the target",
    "sandbox.up": "runs on this machine, not the target",
    "sandbox.cluster-down": "runs on this machine, not the target",
    "sandbox.cluster-status": "runs on this machine, not the target",
    "sandbox.cluster-up": "runs on this machine, not the target",
}
READ_ONLY = ("releases", "status", "logs")


@pytest.fixture(scope="module")
def secret_runs(target, stack, app_repo):
    """With the hostile secrets: provision, then deploy a new commit, the sampler running."""
    proxy = target.info.proxy_url.replace("://", f"://ops:{PROXY_MARKER}-pw@", 1)
    target.write_env(**stack, **SECRETS, HTTP_PROXY=proxy)
    requirements = app_repo / "example/requirements.txt"
    requirements.write_text(requirements.read_text() + f"# audit {time.time()}\n")
    subprocess.run(["git", "-C", str(app_repo), "commit", "-qam", "audit: new requirements"],
                   check=True)
    with ProcessSampler(target) as sampler:
        provision = target.fab("provision")
        deploy = target.fab("deploy")
    return {"provision": provision, "deploy": deploy, "samples": sampler.text}


def test_the_audited_runs_did_their_work(secret_runs):
    """The runs the audit reads really handled the secrets: a test of nothing proves nothing."""
    provision, deploy = secret_runs["provision"].stdout, secret_runs["deploy"].stdout
    assert f"postgresql role {APP}: password set" in provision, provision
    assert f"file /opt/{APP}/conf/{APP}.conf" in provision, provision
    assert "file /etc/pip.conf: content changed (holds secrets" in provision, provision
    for step in ("requirements: installed", "pre-migration backup: database dumped",
                 "serving"):
        assert step in deploy, (step, deploy)
    samples = secret_runs["samples"]
    for command in ("/bin/sh -s", "pip install", "manage.py migrate", "pg_dump"):
        assert command in samples, f"the sampler missed {command!r}"


def test_fabs_work_on_the_host_yields_the_cpu_to_the_services(secret_runs):
    """What a run starts in its SSH sessions (pip, collectstatic, pg_dump) runs in an autogroup
    at BACKGROUND_NICE, but a migration (its locks hold the app's requests); the site's
    services (NGINX, gunicorn) stay at 0."""
    lines = secret_runs["samples"].splitlines()
    for command, nice in (("pip install", BACKGROUND_NICE),
                          ("manage.py collectstatic", BACKGROUND_NICE),
                          ("pg_dump", BACKGROUND_NICE), ("manage.py migrate", 0),
                          ("nginx: worker process", 0), ("bin/gunicorn --chdir", 0)):
        seen = {line.rsplit(" [", 1)[1] for line in lines if command in line}
        assert seen == {f"autogroup nice {nice}]"}, (command, seen)


def test_no_secret_in_process_arguments_output_or_journal(target, secret_runs):
    """No marker in any process's arguments, in fab's output, nor anywhere in the journal."""
    journal = target.sh("journalctl --no-pager -o cat").stdout
    assert "Started" in journal, "the journal is empty"
    texts = {"process arguments": secret_runs["samples"], "journal": journal}
    for name in ("provision", "deploy"):
        texts[f"fab {name} output"] = secret_runs[name].stdout + secret_runs[name].stderr
    for marker in AUDIT_MARKERS:
        for where, text in texts.items():
            assert marker not in text, f"{marker} in the {where}"


def secret_files(target) -> list[tuple[str, str, str, int]]:
    """Every file on the host holding a secret's marker: (path, owner, group, mode)."""
    patterns = " ".join(f"-e {m}" for m in AUDIT_MARKERS)
    out = target.sh(
        "for d in /*; do case $d in /proc|/sys|/dev) ;; *) printf '%s\\0' \"$d\";; esac; done "
        f"| xargs -0 grep -rlF --devices=skip {patterns} "
        "| while IFS= read -r f; do stat -c '%n|%U|%G|%a' \"$f\"; done", check=False).stdout
    return [(path, owner, group, int(mode, 8)) for path, owner, group, mode in
            (line.rsplit("|", 3) for line in out.splitlines())]


def test_no_file_holding_a_secret_is_readable_by_others(target, secret_runs):
    """Every secret-holding file: not world-readable; group-readable only by a service's group."""
    files = secret_files(target)
    print("\nfiles holding a secret:")
    for path, owner, group, mode in files:
        print(f"  {mode:04o} {owner}:{group} {path}")
    paths = {f[0] for f in files}
    assert f"/opt/{APP}/conf/{APP}.conf" in paths, "the walk found not even the app's conf"
    assert "/etc/pip.conf" in paths, "the proxy's password is not where pip reads it"
    for path, owner, group, mode in files:
        assert not mode & 0o004, f"{path} ({mode:04o}) is readable by everyone"
        assert not mode & 0o040 or group in SERVICE_GROUPS, \
            f"{path} ({mode:04o} {owner}:{group}) is readable by group {group}"


def test_every_account_is_in_exactly_its_declared_groups(target, stack):
    """``id -Gn`` of each account against ACCOUNT_GROUPS, and every member of the services'
    groups is declared (no undeclared account is in the app's, backups' or celery's group)."""
    out = target.sh("".join(f"echo \"{name}: $(id -Gn {name} 2>/dev/null)\"\n"
                            for name in ACCOUNT_GROUPS)
                    + "".join(f"echo \"group {g}: $(getent group {g} | cut -d: -f4)\"\n"
                              for g in sorted(SERVICE_GROUPS))).stdout
    print(f"\n{out}")
    found = dict(line.split(": ", 1) for line in out.splitlines())
    for name, declared in ACCOUNT_GROUPS.items():
        groups = found[name].split()
        if not groups and name in OPTIONAL_ACCOUNTS:
            continue
        assert groups, f"account {name} does not exist"
        assert set(groups[1:]) - {groups[0]} == declared, f"{name} is in {groups}"
    for group in SERVICE_GROUPS:
        members = set(filter(None, found[f"group {group}"].split(",")))
        declared = {name for name, groups in ACCOUNT_GROUPS.items() if group in groups}
        assert members <= declared, f"group {group} has undeclared members {members - declared}"


def test_backups_reads_the_media_but_nothing_in_conf(target, stack):
    """The backups account: no secret of the app's environment, every media file."""
    conf = target.sh(f"runuser -u backups -- cat /opt/{APP}/conf/{APP}.conf", check=False)
    assert conf.returncode != 0 and "Permission denied" in conf.stderr, conf
    target.sh(f"install -d -o {APP} -g {APP} -m 0750 /var/opt/{APP}/media/old && "
              f"install -o {APP} -g {APP} -m 0640 /etc/hostname /var/opt/{APP}/media/old/a.txt")
    try:
        assert "made readable by all" in target.fab("provision.base").stdout
        target.sh(f"runuser -u backups -- cat /var/opt/{APP}/media/old/a.txt")
    finally:
        target.sh(f"rm -rf /var/opt/{APP}/media/old")


def test_exposure_of_the_app_and_celery_units(target, stack):
    """systemd-analyze security: each unit's overall exposure at most MAX_EXPOSURE."""
    out = target.sh(f"systemd-analyze security --no-pager {' '.join(UNITS)}").stdout
    figures = {unit: float(value) for unit, value in
               re.findall(r"^(\S+\.service)\s+(\d+\.\d+)\s", out, re.M)}
    print(f"\nsystemd-analyze security exposure: {figures}")
    assert set(figures) == set(UNITS), out[-2000:]
    for unit, figure in figures.items():
        assert figure <= MAX_EXPOSURE, f"{unit}: exposure {figure} > {MAX_EXPOSURE}"


@pytest.fixture
def canaries(target, stack):
    """A TCP and a UDP listener on every address of the host; the UDP one logs what it gets."""
    udp = (f"import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
           f"s.bind(('0.0.0.0', {CANARY_UDP}))\n"
           "while True: print(s.recvfrom(100)[0].decode(), flush=True)")
    target.sh(f"systemd-run -q --unit=fabstack-canary-tcp python3 -m http.server {CANARY_TCP} "
              f"--bind 0.0.0.0; systemd-run -q --unit=fabstack-canary-udp python3 -c \"{udp}\"; "
              f"for i in $(seq 50); do ss -Hln | grep -q ':{CANARY_UDP} ' && "
              f"ss -Hln | grep -q ':{CANARY_TCP} ' && exit 0; sleep 0.1; done; exit 1")
    yield
    target.sh("systemctl stop fabstack-canary-tcp fabstack-canary-udp; true")


def connects(ip: str, port: int) -> bool:
    """Whether a TCP connection to ``ip:port`` from this machine is accepted within 3 s."""
    try:
        socket.create_connection((ip, port), timeout=3).close()
        return True
    except OSError:
        return False


def test_only_ssh_http_and_https_answer_from_outside(target, canaries):
    """Every port the host listens on (the canary on all addresses too), and some more."""
    listening = {int(m) for m in re.findall(r":(\d+)\s", target.sh("ss -Htln").stdout)}
    assert CANARY_TCP in listening and PUBLIC_PORTS <= listening, listening
    ports = sorted(listening | EXTRA_PORTS)
    with ThreadPoolExecutor(8) as pool:
        answered = {port for port, ok in zip(ports, pool.map(
            lambda p: connects(target.info.ip, p), ports), strict=True) if ok}
    print(f"\nTCP ports tried from outside: {ports}; answered: {sorted(answered)}")
    assert answered == PUBLIC_PORTS


def test_udp_is_not_let_in(target, canaries):
    """A datagram from outside never reaches a listener; one sent on the host itself does."""
    sent_outside = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for _ in range(3):
        sent_outside.sendto(b"from-outside", (target.info.ip, CANARY_UDP))
    target.sh(f"python3 -c \"import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM)"
              f".sendto(b'from-inside', ('{target.info.ip}', {CANARY_UDP}))\"")
    deadline = time.monotonic() + 10
    while "from-inside" not in (got := target.sh(
            "journalctl -o cat -u fabstack-canary-udp --no-pager").stdout):
        assert time.monotonic() < deadline, "the canary got nothing, not even from the host"
        time.sleep(0.5)
    assert "from-outside" not in got
    udp = [line.split()[3] for line in target.sh("ss -Hulnp").stdout.splitlines()
           if f":{CANARY_UDP} " not in line]
    print(f"\nUDP listeners besides the canary: {udp or 'none'}")
    assert "deny (incoming)" in target.sh("ufw status verbose").stdout


def test_every_task_is_classified(target):
    """A new task must be put in CONVERGING or ACTIONS (with a reason) to pass."""
    listed = set(re.findall(r"^  (\S+)", target.fab("--list").stdout, re.M))
    unknown = listed - set(CONVERGING) - set(ACTIONS)
    assert not unknown, f"tasks neither converging nor actions: {sorted(unknown)}"
    gone = (set(CONVERGING) | set(ACTIONS)) - listed
    assert not gone, f"classified tasks fab no longer lists: {sorted(gone)}"


def test_every_converging_task_changes_nothing_the_second_time(target, stack):
    """Each converging task twice, with the audit's settings (secrets set, HTTPS)."""
    target.write_env(**stack, **SECRETS)
    figures = {}
    for name in CONVERGING:
        first = changed_count(target.fab(name).stdout)
        second = target.fab(name)
        figures[name] = (first, changed_count(second.stdout))
        assert figures[name][1] == 0, f"fab {name} changed things the second time:\n" \
            f"{second.stdout}"
    print(f"\nchanged (first run, second run): {figures}")


def test_read_only_actions_leave_the_host_as_it_was(target, stack):
    """releases, status and logs only read: the host's state is the same afterwards."""
    before = host_state(target)
    for name in READ_ONLY:
        target.fab(name, check=False)  # status exits 1 on a problem: it still only reads
    changes = state_changes(before, host_state(target))
    assert changes == [], "\n".join(changes[:40])
