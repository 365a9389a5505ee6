"""Day-two tasks on the real sandbox host, on the converged stack (issue 14): ``fab manage``,
``fab logs``, ``fab maintenance``, ``fab restore-media``, provision's UPGRADE setting and
``fab upgrade``."""

import fcntl
import os
import pty
import re
import select
import signal
import subprocess
import termios
import time

from sandbox.container import Sandbox
from tests.conftest import FAB, REPO, TEST_SUITE, ProcessSampler, changed_count
from tests.load import Load

APP = "ratemyderp"
DOMAIN = "ratemyderp.test"
ADMIN_USER, ADMIN_EMAIL = "opsadmin", "opsadmin@ratemyderp.test"
ADMIN_PASSWORD = "Mk9su pw'\"$HOME;#x "  # marker Mk9su: must never show in any process's args


def fab(target, *args, env=None) -> subprocess.CompletedProcess:
    """fab on the sandbox with extra environment variables, without a terminal."""
    environ = dict(os.environ, FABRIC_FABSTACK_ENV_FILE=str(target.env_file), **(env or {}))
    return subprocess.run([FAB, "-S", str(target.info.ssh_config), "-H", target.info.alias,
                           *args], cwd=REPO, env=environ, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=600)


def https(target, pebble, path: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", "10", "--noproxy", "*", "--cacert",
                           str(pebble.issuing_root), "--resolve", f"{DOMAIN}:443:{target.info.ip}",
                           *args, f"https://{DOMAIN}{path}"], capture_output=True, text=True)


def admin_login(target, pebble, tmp_path, password: str) -> str:
    """Log in to the admin over HTTPS as ADMIN_USER; return the admin index page."""
    jar = str(tmp_path / "cookies")
    form = https(target, pebble, "/admin/login/", "-c", jar, "-b", jar)
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form.stdout)
    assert token, form.stdout[-2000:] + form.stderr
    login = https(target, pebble, "/admin/login/?next=/admin/", "-c", jar, "-b", jar,
                  "-H", f"Referer: https://{DOMAIN}/admin/login/",
                  "--data-urlencode", f"csrfmiddlewaretoken={token[1]}",
                  "--data-urlencode", f"username={ADMIN_USER}",
                  "--data-urlencode", f"password={password}",
                  "--data-urlencode", "next=/admin/", "-o", "/dev/null", "-w", "%{http_code}")
    assert login.stdout == "302", login.stdout + login.stderr
    return https(target, pebble, "/admin/", "-c", jar, "-b", jar).stdout


def test_createsuperuser_from_the_environment_then_admin_login(target, stack, pebble,
                                                                tmp_path):
    env = {"DJANGO_SUPERUSER_USERNAME": ADMIN_USER, "DJANGO_SUPERUSER_EMAIL": ADMIN_EMAIL,
           "DJANGO_SUPERUSER_PASSWORD": ADMIN_PASSWORD}
    target.sh(f"cd / && runuser -u postgres -- psql -X -q -d {APP} -c "
              f"\"DELETE FROM auth_user WHERE username = '{ADMIN_USER}'\"")  # a reused sandbox
    with ProcessSampler(target) as sampler:
        res = fab(target, "manage", "--", "createsuperuser", "--noinput", env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Superuser created successfully." in res.stdout, res.stdout
    assert "passed on: DJANGO_SUPERUSER_EMAIL, DJANGO_SUPERUSER_PASSWORD, " \
           "DJANGO_SUPERUSER_USERNAME" in res.stdout
    assert "createsuperuser" in sampler.text  # the sampler saw the command run
    assert "Mk9su" not in sampler.text + res.stdout + res.stderr
    assert not target.sh("ls -A /root | grep fabstack-manage", check=False).stdout
    page = admin_login(target, pebble, tmp_path, ADMIN_PASSWORD)
    assert "Site administration" in page, page[-2000:]
    again = fab(target, "manage", "--", "createsuperuser", "--noinput", env=env)
    assert again.returncode == 1 and "already taken" in again.stderr, again.stderr


def test_check_deploy_streams_its_report(target, stack):
    res = fab(target, "manage", "--", "check", "--deploy")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "System check identified" in res.stdout + res.stderr
    assert "output streamed" in res.stdout
    assert re.search(r"manage: 0 changed, \d+ ok, 0 failed", res.stdout), res.stdout


def test_a_failing_command_exit_status_comes_back(target, stack):
    res = fab(target, "manage", "--", "shell", "-c", "import sys; print('bye'); sys.exit(7)")
    assert res.returncode == 7, res.stdout + res.stderr
    assert "bye" in res.stdout
    assert "exited with status 7" in res.stdout
    # Fabric itself never ran the words after -- as a shell command on the host
    assert "not found" not in res.stderr, res.stderr
    bad = fab(target, "manage", "--", "nosuchcommand")
    assert bad.returncode == 1 and "Unknown command: 'nosuchcommand'" in bad.stderr


def test_output_is_masked_and_runs_as_the_app_user(target, stack):
    res = fab(target, "manage", "--", "shell", "-c",
              "import os, getpass; print(getpass.getuser(), os.getcwd()); "
              "print('key=' + os.environ['DJANGO_SECRET_KEY'])")
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{APP} /opt/{APP}/releases/" in res.stdout, res.stdout
    assert "key=********" in res.stdout
    assert "sandbox-key-" not in res.stdout + res.stderr


def test_with_a_terminal_the_command_is_interactive(target, stack):
    """A Django shell on a terminal: input typed, its answer back, exit status 0."""

    def own_terminal():  # as in an operator's shell: the terminal controls fab's session
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    main, side = pty.openpty()
    env = dict(os.environ, FABRIC_FABSTACK_ENV_FILE=str(target.env_file))
    proc = subprocess.Popen([FAB, "-S", str(target.info.ssh_config), "-H", target.info.alias,
                             "manage", "--", "shell", "-i", "python"], cwd=REPO, env=env,
                            stdin=side, stdout=side, stderr=side, close_fds=True,
                            preexec_fn=own_terminal)
    os.close(side)
    seen, sent = b"", False
    end = time.monotonic() + 120
    try:
        while time.monotonic() < end and proc.poll() is None:
            ready, _, _ = select.select([main], [], [], 1)
            if ready:
                try:
                    seen += os.read(main, 4096)
                except OSError:
                    break
            if not sent and b">>> " in seen:
                os.write(main, b"print(6 * 7, 'x')\nexit()\n")
                sent = True
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(main)
    text = seen.decode(errors="replace")
    assert "with a terminal" in text, text
    assert "42 x" in text, text
    assert proc.returncode == 0, text


# -- fab logs ------------------------------------------------------------------------------

STAMPED = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) ([\w./-]+) \| ")


def test_logs_show_the_workers_start_after_a_restart(target, stack):
    target.sh("systemctl restart celery.service")
    res = fab(target, "logs", "--unit", "celery", "--since", "5min")
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    ready = [line for line in lines if re.search(r"^\S+ \S+ celery/w1[^ ]*\.log \| .*ready\.$",
                                                   line)]
    assert ready, res.stdout[-3000:]
    stamp = time.mktime(time.strptime(STAMPED.match(ready[-1])[1], "%Y-%m-%d %H:%M:%S"))
    assert abs(stamp - time.mktime(time.gmtime())) < 300
    assert any(re.search(r" celery \| Started celery\.service", line) for line in lines)
    assert all(STAMPED.match(line) for line in lines
               if not line.startswith(f"[{target.info.alias}]")), res.stdout[-3000:]
    assert not any(" app " in line or " nginx" in line for line in lines)


def test_a_secret_the_app_logs_is_masked(target, stack, pebble):
    password = "sandbox-db-password"  # DB_PASSWORD of the sandbox's settings
    https(target, pebble, f"/no-such-page/{password}/")
    res = fab(target, "logs", "--unit", "app", "--since", "5min")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "app | " in res.stdout and "Not Found: /no-such-page/********/" in res.stdout, \
        res.stdout[-3000:]
    assert re.search(r" app/gunicorn-access\.log \| .*/no-such-page/\*+/", res.stdout)
    assert password not in res.stdout + res.stderr


def test_all_units_merged_in_time_order(target, stack):
    res = fab(target, "logs", "--since", "10min")
    assert res.returncode == 0, res.stdout + res.stderr
    stamped = [STAMPED.match(line) for line in res.stdout.splitlines()]
    stamped = [m for m in stamped if m]
    units = {m[2].split("/")[0] for m in stamped}
    assert {"app", "celery", "beat"} <= units, units
    times = [m[1] for m in stamped]
    assert times == sorted(times)


def test_follow_prints_new_lines_and_stops_on_the_host(target, stack):
    environ = dict(os.environ, FABRIC_FABSTACK_ENV_FILE=str(target.env_file))
    proc = subprocess.Popen([FAB, "-S", str(target.info.ssh_config), "-H", target.info.alias,
                             "logs", "--unit", "celery", "--since", "1s", "--follow"], cwd=REPO,
                            env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True,
                            # Ctrl-C as from an operator's terminal: a background job of a
                            # shell without job control (CI) inherits SIGINT ignored
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = ""
    try:
        time.sleep(3)
        target.sh("systemctl restart celery.service")
        end = time.monotonic() + 60
        while time.monotonic() < end and "ready." not in seen:
            ready, _, _ = select.select([proc.stdout], [], [], 1)
            if ready:
                seen += proc.stdout.readline()
        assert "ready." in seen, seen
        assert proc.poll() is None  # still following
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    # the followers on the host end with fab's connection
    time.sleep(3)
    left = target.sh("pgrep -a -x journalctl; pgrep -a -x tail; true").stdout
    assert not left.strip(), left


def test_logs_refuse_bad_options_before_reading_anything(target, stack):
    res = fab(target, "logs", "--unit", "mysql")
    assert res.returncode == 1
    assert "--unit 'mysql': choose one of app, celery, beat, nginx, postgresql, redis, backup" \
        in res.stdout, res.stdout
    res = fab(target, "logs", "--since", "yesterday")
    assert res.returncode == 1 and "30s, 5min, 1h, 2d" in res.stdout, res.stdout


# -- fab maintenance -----------------------------------------------------------------------

def head_and_body(res: subprocess.CompletedProcess) -> tuple[int, dict[str, str], str]:
    head, _, body = res.stdout.partition("\n\n")  # text mode: CRLF is read as LF
    lines = head.splitlines()
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def from_the_host(path: str) -> str:
    return (f"curl -sS -k -o /dev/null -w '%{{http_code}}' --resolve {DOMAIN}:443:127.0.0.1 "
            f"https://{DOMAIN}{path}")


def test_maintenance_on_shows_the_page_but_not_to_the_host(target, stack, pebble):
    message = "<b>Upgrading</b> the database & more"
    fab(target, "maintenance", "off")  # a reused sandbox may have it on
    try:
        on = fab(target, "maintenance", "on", "--message", message)
        assert on.returncode == 0, on.stdout + on.stderr
        assert "maintenance page on]" in on.stdout and "nginx.service: reloaded" in on.stdout
        code, headers, body = head_and_body(https(target, pebble, "/", "-i"))
        assert code == 503 and headers.get("retry-after") == "300", (code, headers)
        assert "Down for maintenance" in body
        assert "&lt;b&gt;Upgrading&lt;/b&gt; the database &amp; more" in body, body
        code, _, body = head_and_body(https(target, pebble, "/admin/login/", "-i", "-d", "x=1"))
        assert code == 503 and "Down for maintenance" in body
        code, _, body = head_and_body(https(target, pebble, "/static/demo/site.css", "-i"))
        assert code == 200 and "{" in body
        assert target.sh(from_the_host("/health/")).stdout == "200"
        # a deploy runs behind the page: its health check reaches the app
        deploy = fab(target, "deploy", "--force")
        assert deploy.returncode == 0 and re.search(r"serving from \S+ \(HTTP 200",
                                                    deploy.stdout), deploy.stdout
        again = fab(target, "maintenance", "on", "--message", message)
        assert again.returncode == 0 and changed_count(again.stdout) == 0, again.stdout
        kept = fab(target, "nginx")  # provision's NGINX step keeps the page on
        assert kept.returncode == 0 and changed_count(kept.stdout) == 0, kept.stdout
        st = fab(target, "status")
        assert re.search(r"warning +maintenance: on since ", st.stdout), st.stdout
    finally:
        off = fab(target, "maintenance", "off")
    assert off.returncode == 0, off.stdout + off.stderr
    assert "file /var/www/fabstack-maintenance/ratemyderp/fabstack-maintenance.html: removed" \
        in off.stdout
    code, _, body = head_and_body(https(target, pebble, "/", "-i"))
    assert code == 200 and "release: " in body
    again = fab(target, "maintenance", "off")
    assert again.returncode == 0 and changed_count(again.stdout) == 0, again.stdout
    assert "maintenance" not in fab(target, "status").stdout


def test_deploy_with_maintenance_shows_the_page_meanwhile(target, stack, pebble, tmp_path):
    """Requests from outside during the deploy: the page (503) for a while, never a 502.

    A request that an NGINX worker refused as it exited for a reload is asked again, as a
    browser does: the worker ends its idle HTTP/2 connections with GOAWAY, which curl reports as
    an error of the HTTP/2 framing layer (exit 16; curl/curl#1618) where browsers retry."""
    fab(target, "maintenance", "off")  # a reused sandbox may have it on
    codes = tmp_path / "codes"
    ask = (f"curl -s -o /dev/null -w '%{{http_code}} %{{errormsg}}' --max-time 5 --noproxy '*' "
           f"--cacert {pebble.issuing_root} --resolve {DOMAIN}:443:{target.info.ip} "
           f"https://{DOMAIN}/")
    loop = subprocess.Popen(
        ["sh", "-c", f"while :; do out=$({ask}); [ $? != 16 ] || out=\"$({ask}) (asked again "
                     f"after: $out)\"; echo \"$out\" >> {codes}; sleep 0.1; done"])
    try:
        time.sleep(1)
        res = fab(target, "deploy", "--force", "--maintenance")
        time.sleep(1)
    finally:
        loop.terminate()
        loop.wait()
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert out.index("maintenance page: on:") < out.index("migrations:") < \
        out.index("maintenance page: off:"), out
    lines = codes.read_text().splitlines()  # "CODE" or "000 CURL'S ERROR"
    seen = [line.split()[0] for line in lines]
    assert "503" in seen and seen[-1] == "200", seen
    assert set(seen) <= {"200", "503"}, [line for line in lines if line[:3] not in ("200", "503")]
    assert not target.sh(f"ls /var/www/fabstack-maintenance/{APP}/").stdout.strip()


def test_maintenance_refuses_bad_input_before_changing_anything(target, stack):
    for args, error in ((["maybe"], "'maybe': say on or off"),
                        (["off", "--message", "x"], "--message goes with on, not off"),
                        (["on", "--message", " "], "--message is empty")):
        res = fab(target, "maintenance", *args)
        assert res.returncode == 1 and error in res.stdout, res.stdout
        assert "(0 SSH round trips)" in res.stdout


# -- fab restore-media ---------------------------------------------------------------------

MEDIA = f"/var/opt/{APP}/media"
UPLOAD = "uploads/2026/photo.bin"


def stat(target, path: str) -> str:
    """Bytes (sha256), owner, group, mode and time of ``path`` on the host."""
    return target.sh(f"cd {MEDIA} && sha256sum {path} | cut -c1-64 && "
                     f"stat -c '%U %G %a %Y' {path}").stdout


def test_restore_media_puts_a_deleted_upload_back(target, stack):
    # the backup module's faked clock leaves newer snapshots, which would rotate ours away;
    # media are readable by all (the backups account reads them without the app's group), but
    # modes other than the defaults show that restore-media puts back the ones it found
    target.sh(f"rm -rf {MEDIA}/uploads {MEDIA}/newer.txt /opt/{APP}/backup/media/*; "
              f"install -d -o {APP} -g {APP} -m 0775 {MEDIA}/uploads {MEDIA}/uploads/2026; "
              f"head -c 100000 /dev/urandom > /root/photo.bin; "
              f"install -o {APP} -g {APP} -m 0664 /root/photo.bin {MEDIA}/{UPLOAD}; "
              f"touch -d '2026-11-01 10:00:00' {MEDIA}/{UPLOAD}")
    before = stat(target, UPLOAD)
    made = target.sh(f"/usr/local/sbin/{APP}-backup media 2>&1").stdout
    snapshot = re.search(r"media snapshot \S+/(\d{8}T\d{6}Z)", made)[1]
    listing = fab(target, "restore-media")
    assert listing.returncode == 0 and re.search(rf"ok +snapshot {snapshot}: \d+ files, ",
                                                 listing.stdout), listing.stdout
    target.sh(f"rm {MEDIA}/{UPLOAD}; echo later > {MEDIA}/newer.txt; "
              f"chown {APP}:{APP} {MEDIA}/newer.txt")
    asked = fab(target, "restore-media", "--snapshot", snapshot, "--path", UPLOAD)
    assert asked.returncode == 1 and "not confirmed: nothing was changed" in asked.stdout
    assert f"1 to put back from {snapshot}: {UPLOAD}" in asked.stdout, asked.stdout
    assert target.sh(f"test -e {MEDIA}/{UPLOAD}", check=False).returncode == 1
    done = fab(target, "restore-media", "--snapshot", snapshot, "--path", UPLOAD, "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"put back 1 from {snapshot}: {UPLOAD}" in done.stdout
    assert stat(target, UPLOAD) == before
    again = fab(target, "restore-media", "--snapshot", snapshot, "--path", UPLOAD, "--yes")
    assert again.returncode == 0 and "as in snapshot" in again.stdout, again.stdout
    assert changed_count(again.stdout) == 0
    # the whole tree: the upload made after the snapshot stays unless --delete
    target.sh(f"rm -r {MEDIA}/uploads")
    whole = fab(target, "restore-media", "--snapshot", snapshot, "--yes")
    assert whole.returncode == 0, whole.stdout + whole.stderr
    assert stat(target, UPLOAD) == before
    assert target.sh(f"stat -c '%U %G %a' {MEDIA}/uploads/2026").stdout == f"{APP} {APP} 775\n"
    assert target.sh(f"cat {MEDIA}/newer.txt").stdout == "later\n"
    exact = fab(target, "restore-media", "--snapshot", snapshot, "--delete", "--yes")
    assert exact.returncode == 0 and "deleted 1 the snapshot does not have: newer.txt" \
        in exact.stdout, exact.stdout
    assert target.sh(f"test -e {MEDIA}/newer.txt", check=False).returncode == 1


def test_restore_media_refuses_bad_input_before_changing_anything(target, stack):
    for args, error in ((["--snapshot", "20261130T000000Z", "--path", "../../etc/passwd"],
                         "inside the media folder"),
                        (["--snapshot", "last-tuesday"], "a snapshot's name is its UTC time")):
        res = fab(target, "restore-media", *args)
        assert res.returncode == 1 and error in res.stdout, res.stdout
        assert "(0 SSH round trips)" in res.stdout
    res = fab(target, "restore-media", "--snapshot", "20000101T000000Z", "--yes")
    assert res.returncode == 1 and "no snapshot 20000101T000000Z (there are: " in res.stdout


# -- provision's UPGRADE setting -----------------------------------------------------------

# Upgrades are made pending by lowering the versions dpkg records a notch (VERSION~ sorts just
# before VERSION, so every dependency on them still holds and apt can plan: a made-up 0.1-1 broke
# util-linux's exact dependency on libsmartcols1, and apt refused). SECURITY's candidate is in the
# suite's security archive, build-essential's in the suite only; neither has maintainer scripts.
SECURITY = {"bookworm": "net-tools", "trixie": "libbrotli1"}[TEST_SUITE]
OTHER = "build-essential"


def versions(target, *packages) -> dict[str, str]:
    out = target.sh(f"dpkg-query -W -f '${{Package}} ${{Version}}\\n' {' '.join(packages)}").stdout
    return dict(line.split() for line in out.splitlines())


def set_version(target, package: str, value: str) -> None:
    target.sh(f"sed -i '/^Package: {package}$/,/^$/ s/^Version: .*/Version: {value}/' "
              "/var/lib/dpkg/status")


def lowered(real: dict[str, str]) -> dict[str, str]:
    return {package: f"{version}~" for package, version in real.items()}


def test_provision_installs_pending_upgrades_only_when_the_settings_say_so(target, stack):
    real = versions(target, SECURITY, OTHER)
    low = lowered(real)
    for package, value in low.items():
        set_version(target, package, value)
    try:
        assert versions(target, SECURITY, OTHER) == low
        for setting in ({}, {"UPGRADE": "off"}):  # empty: off on a provisioned host
            target.write_env(**stack, **setting)
            res = target.fab("provision.base")
            assert versions(target, SECURITY, OTHER) == low, res.stdout
            assert re.search(r"ok +system upgrade: 2 upgrades pending, not installed \(UPGRADE="
                             r"(empty|off)\)", res.stdout), res.stdout
            assert changed_count(res.stdout) == 0
        target.write_env(**stack, UPGRADE="security")
        res = target.fab("provision.base")
        assert f"upgraded 1 security packages: {SECURITY} (1 other upgrades left" in res.stdout
        assert versions(target, SECURITY, OTHER) == {SECURITY: real[SECURITY],
                                                     OTHER: low[OTHER]}, res.stdout
        target.write_env(**stack, UPGRADE="all")
        res = target.fab("provision.base")
        assert f"changed      system upgrade: upgraded 1 packages: {OTHER}" in res.stdout
        assert versions(target, SECURITY, OTHER) == real
    finally:
        target.write_env(**stack)
        for package, value in real.items():
            set_version(target, package, value)


def test_provision_says_when_apt_cannot_plan_the_upgrade(target, stack):
    """A dependency broken in dpkg's record: apt refuses, and that is no "nothing pending"."""
    real = versions(target, "libsmartcols1")
    set_version(target, "libsmartcols1", "0.1-1")  # util-linux needs its exact version
    try:
        target.write_env(**stack, UPGRADE="off")
        res = target.fab("provision.base", check=False)
        assert res.returncode == 1, res.stdout
        assert re.search(r"failed +system upgrade: .*apt-get dist-upgrade refuses: E: Unmet "
                         "dependencies", res.stdout), res.stdout
        assert "no upgrades pending" not in res.stdout
    finally:
        target.write_env(**stack)
        set_version(target, "libsmartcols1", real["libsmartcols1"])
    assert "system upgrade: no upgrades pending" in target.fab("provision.base").stdout


# -- fab upgrade ---------------------------------------------------------------------------

# libssl's and NGINX's packages made pending as above, each source's packages together (their
# versions depend on each other exactly): the reinstall replaces the library that the services
# map and NGINX's binary, so needrestart names them; NGINX's maintainer scripts would restart it.
LIBSSL = {"bookworm": "libssl3", "trixie": "libssl3t64"}[TEST_SUITE]


def lower_exactly(target, real: dict[str, str], back: bool = False) -> None:
    """Lower ``real``'s versions a notch, and every dependency on them that names that very
    version (``= V``, ``>= V``: binNMU-safe ones pair it with ``<< V.1~``) (``back``: undo)."""
    def bre(text):  # sed's basic regular expression for ``text``
        return re.sub(r"([.\[\]*^$\\/])", r"\\\1", text)

    pairs = [(v, f"{v}~") if not back else (f"{v}~", v) for v in set(real.values())]
    script = "".join(f"s/^Version: {bre(old)}$/Version: {new}/;s/(= {bre(old)})/(= {new})/g;"
                     f"s/(>= {bre(old)})/(>= {new})/g;" for old, new in pairs)
    target.sh(f"sed -i '{script}' /var/lib/dpkg/status")


def source_packages(target, *packages: str) -> dict[str, str]:
    """Every installed package built from the same source as one of ``packages``: version."""
    out = target.sh(
        f"src=$(dpkg-query -W -f '${{source:Package}}\\n' {' '.join(packages)} | sort -u)\n"
        "dpkg-query -W -f '${source:Package} ${Package} ${Version} ${db:Status-Abbrev}\\n' | "
        "while read -r s p v st; do [ \"$st\" = ii ] && printf '%s\\n' \"$src\" | grep -qxF \"$s\" "
        "&& echo \"$p $v\"; done; true").stdout
    return dict(line.split() for line in out.splitlines())


def test_upgrade_reports_then_restarts_one_at_a_time_under_load(target, stack):
    real = source_packages(target, LIBSSL, "nginx")
    assert LIBSSL in real and "nginx" in real, real
    lower_exactly(target, real)
    started = target.sh("date +%s").stdout.strip()
    try:
        check = fab(target, "upgrade", "--check")
        assert check.returncode == 0, check.stdout + check.stderr
        for package, version in real.items():
            assert re.search(rf"pending +package {re.escape(package)}: {re.escape(version)}~ -> ",
                             check.stdout), check.stdout
        assert versions(target, *real) == lowered(real)
        with Load(target.info.ip) as load:
            res = fab(target, "upgrade")
            time.sleep(1)
        print(f"\nfab upgrade under load: {load.summary()}\n{res.stdout}")
        assert res.returncode == 0, res.stdout + res.stderr
        assert load.sent > 20 and load.failed == [], (load.failed[:5], res.stdout)
        assert versions(target, *real) == real
        out = res.stdout
        assert out.index("pending      package ") < out.index("changed      system upgrade: "
                                                          "upgraded ")
        restarted = re.findall(r"changed +service (\S+): restarted \(", out)
        assert "nginx.service" in restarted, out
        assert "service nginx.service: restarted (ran old libraries; new master on the same " \
            "sockets)" in out
        assert restarted[-1].startswith(f"{APP}@"), restarted  # the instance that served
        # which has stopped since: none of its processes runs the old libraries
        assert not re.search(rf"warning +service {APP}@", out), out
        assert "ok           health check: HTTP 200 from release " in out
        # PostgreSQL's and Redis's restarts fail requests: named and left to the operator
        for unit in ("postgresql@", "redis-server.service"):
            assert re.search(rf"warning +service {unit}\S*: still runs old libraries: its "
                             "restart fails the app's requests", out), out
        # no maintainer script restarted a service: policy-rc.d said no, and went afterwards
        assert target.sh("test -e /usr/sbin/policy-rc.d", check=False).returncode == 1
        journal = target.sh(f"journalctl -q -o cat --since @{started} -u nginx.service").stdout
        assert "Stopping" not in journal and "Stopped" not in journal, journal
        again = fab(target, "upgrade")
        assert again.returncode == 0 and changed_count(again.stdout) == 0, again.stdout
        assert "ok           system upgrade: no upgrades pending" in again.stdout
    finally:
        lower_exactly(target, real, back=True)


def test_upgrade_reboot_when_services_still_run_old_libraries(target, stack, sandbox):
    """After the test above PostgreSQL and Redis run old libraries: --reboot reboots, waits until
    the host is back and fab status is clean; then nothing is left and it does not reboot."""
    left = target.sh("needrestart -b -r l | sed -n 's/^NEEDRESTART-SVC: //p'").stdout.split()
    assert "redis-server.service" in left, left
    box = Sandbox(name=sandbox.name, suite=sandbox.suite,
                  subnet=sandbox.host_ip.rsplit(".", 1)[0])
    environ = dict(os.environ, FABRIC_FABSTACK_ENV_FILE=str(target.env_file))
    proc = subprocess.Popen([FAB, "-S", str(target.info.ssh_config), "-H", target.info.alias,
                             "upgrade", "--reboot"], cwd=REPO, env=environ, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    try:
        # A reboot inside the sandbox ends its systemd-nspawn (tasks/sandbox.py): boot it
        # again, as a server's firmware would.
        deadline = time.monotonic() + 120
        while box.running():
            assert time.monotonic() < deadline and proc.poll() is None, proc.stdout.read()
            time.sleep(0.5)
        box.boot()
        out, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert re.search(r"changed +reboot: rebooting \(.*redis-server\.service runs old libraries",
                     out), out
    assert re.search(r"ok +reboot: back and fab status clean after \d+ s", out), out
    assert "needrestart: no service runs old libraries" in out
    again = fab(target, "upgrade", "--reboot")
    assert again.returncode == 0 and changed_count(again.stdout) == 0, again.stdout
    assert "ok           reboot: not needed: nothing runs old code" in again.stdout


def test_upgrade_refuses_a_foreign_policy_rc_d_and_removes_its_own_leftover(target, stack):
    from tasks.upgrade import POLICY_MARK

    real = versions(target, SECURITY)
    lower_exactly(target, real)
    try:
        target.sh("printf '#!/bin/sh\\nexit 101\\n' > /usr/sbin/policy-rc.d")
        res = fab(target, "upgrade")
        assert res.returncode == 1, res.stdout
        assert "failed       policy-rc.d: /usr/sbin/policy-rc.d exists and is not fabstack's" \
            in res.stdout, res.stdout
        assert versions(target, SECURITY) == lowered(real)
        assert target.sh("cat /usr/sbin/policy-rc.d").stdout == "#!/bin/sh\nexit 101\n"
        # one that a fab upgrade killed with SIGKILL left
        target.sh(f"printf '#!/bin/sh\\n%s\\nexit 101\\n' '{POLICY_MARK}' > /usr/sbin/policy-rc.d")
        res = fab(target, "upgrade", "--security")
        assert res.returncode == 0, res.stdout + res.stderr
        assert "changed      policy-rc.d: removed: a fab upgrade that was killed left it" \
            in res.stdout
        assert f"system upgrade: upgraded 1 security packages: {SECURITY}" in res.stdout
        assert versions(target, SECURITY) == real
        assert target.sh("test -e /usr/sbin/policy-rc.d", check=False).returncode == 1
    finally:
        target.sh("rm -f /usr/sbin/policy-rc.d")
        lower_exactly(target, real, back=True)


def test_unattended_upgrades_on_by_default_and_off_when_asked(target, stack):
    """On unless the settings say False (the other modules run with it off: tests/conftest.py)."""
    periodic = "apt-config dump APT::Periodic | grep APT::Periodic:: | sort"
    try:
        target.write_env(**stack, UNATTENDED_UPGRADES=None)  # the key left out: its default
        res = target.fab("provision.base")
        assert target.sh("dpkg-query -W -f '${Status}' unattended-upgrades").stdout == \
            "install ok installed"
        assert target.sh(periodic).stdout == ('APT::Periodic::Unattended-Upgrade "1";\n'
                                              'APT::Periodic::Update-Package-Lists "1";\n')
        dry = target.sh("unattended-upgrade --dry-run --debug 2>&1 | head -n 40").stdout
        assert f"origin=Debian,codename={TEST_SUITE}-security" in dry, dry
        target.write_env(**stack, UNATTENDED_UPGRADES="False")
        res = target.fab("provision.base")
        assert "file /etc/apt/apt.conf.d/20auto-upgrades: content changed" in res.stdout
        assert target.sh(periodic).stdout == ('APT::Periodic::Unattended-Upgrade "0";\n'
                                              'APT::Periodic::Update-Package-Lists "0";\n')
        again = target.fab("provision.base")
        assert changed_count(again.stdout) == 0, again.stdout
    finally:
        target.write_env(**stack)
        target.fab("provision.base")
