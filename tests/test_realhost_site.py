"""A site spread over five hosts of a real cluster (sandbox/cluster.py), as the inventory's
roles say: a load balancer (lb), two web hosts behind it (web1, web2), a worker host (work)
and the data host (db, redis).

``fab provision`` without ``-H`` provisions them all at once and tables them, twice (the second
run changes nothing); ``-H`` narrows to one; a host out of reach fails alone. Each runs its
roles' services only. PostgreSQL and Redis answer the app's hosts alone (not the lb, not this
machine), PostgreSQL over TLS only, Redis to the app's user and its password only (a hostile
one: it travels percent-encoded in the URLs, hashed in redis.conf); the web hosts answer HTTP
from the lb alone. ``fab deploy`` deploys every app host, dumping the database once on the data
host; the lb spreads requests over both web hosts, which log the client's own address; Celery
runs on the worker host through the remote Redis into the remote database, over TLS; the media
folder is the data host's, mounted on the others: an upload through web1 is served by web2 and
read by a Celery task on the worker host; with web1 powered off, the lb serves from web2.

The cluster is this module's own (tests/conftest.py's cluster_sandbox: tests on 10.216.50),
on one Debian release (FABSTACK_SITE_SUITE).
"""

import os
import re
import shlex
import socket
import time

import pytest

from sandbox.cluster import Cluster
from sandbox.tasks import ssh_key
from tests.conftest import TEST_SUITE, Fleet, cluster_sandbox, commit, needs_root, table
from tests.load import DOMAIN, Load, release_served

# The site's five hosts boot on one Debian release (FABSTACK_SITE_SUITE, default 12): what
# they prove is the same code on 13, whose single-host suite proves that release's distro, and
# a second site would cost the tests' time budget about 8 minutes.
SITE_SUITE = os.environ.get("FABSTACK_SITE_SUITE", "bookworm")
pytestmark = [pytest.mark.realhost, needs_root,
              pytest.mark.skipif(TEST_SUITE != SITE_SUITE,
                                 reason=f"the spread site boots on {SITE_SUITE} alone "
                                        "(FABSTACK_SITE_SUITE)")]
APP = "ratemyderp"
UPSTREAM = f"/etc/nginx/conf.d/fabstack-{APP}-web.conf"  # the lb's, of the web hosts
WEB_LIVE = f"/etc/nginx/conf.d/fabstack-{APP}-upstream.conf"  # a web host's, of its instance
# with the cluster's name, 10 characters at most (tests-work)
MEMBERS = ("lb", "web1", "web2", "work", "data")
ROLES = {"lb": ["lb"], "web1": ["web"], "web2": ["web"], "work": ["worker"],
         "data": ["db", "redis"]}
REDIS_PASSWORD = "Mk6rd pw'\"$\\#%@:/= "
# A client of PostgreSQL's wire protocol on the app host: the server's first answer to a
# startup without TLS, then its answer to a request for TLS.
PG_PROBE = r"""
import socket, struct, sys
host, name = sys.argv[1], sys.argv[2].encode()
params = b"user\0" + name + b"\0database\0" + name + b"\0\0"
plain = socket.create_connection((host, 5432), 5)
plain.sendall(struct.pack("!ii", 8 + len(params), 196608) + params)
answer = plain.recv(4096)
print(answer[:1].decode(), answer.decode(errors="replace").replace("\0", " "))
tls = socket.create_connection((host, 5432), 5)
tls.sendall(struct.pack("!ii", 8, 80877103))
print("TLS", tls.recv(1).decode())
"""
# A client of Redis's protocol on the app host: PING without a login, then AUTH as the app's
# user with the password read from stdin (never on a command line), then PING.
REDIS_PROBE = r"""
import socket, sys
user, password = sys.argv[2], sys.stdin.read()
def command(*words):
    parts = [w.encode() for w in words]
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
s = socket.create_connection((sys.argv[1], 6379), 5)
for words in (("PING",), ("AUTH", user, password), ("PING",)):
    s.sendall(command(*words))
    print(s.recv(4096).decode().strip())
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory, app_repo):
    name, subnet = cluster_sandbox("s", 3)
    cluster = Cluster(name=name, members=MEMBERS, suite=TEST_SUITE, subnet=subnet)
    fleet = Fleet(cluster.up(fresh=True), tmp_path_factory.mktemp("site"))
    # plain HTTP (no ACME CA here): Django must not redirect to HTTPS
    fleet.write_env(DEPLOY_REPO=str(app_repo), DEPLOY_SUBDIR="example",
                    REDIS_PASSWORD=REDIS_PASSWORD, DJANGO_SECURE_SSL_REDIRECT="False",
                    MEDIA_KEY=str(ssh_key(fleet.work / "media_key")))
    yield fleet
    if not os.environ.get("FABSTACK_KEEP_SANDBOX"):
        cluster.down()


@pytest.fixture(scope="module")
def hosts(site):
    return {member: {"ssh": info.alias, "private": info.ip, "roles": ROLES[member]}
            for member, info in site.info.members.items()}


@pytest.fixture(scope="module")
def provisioned(site, hosts):
    return site.fab(hosts, "provision"), site.fab(hosts, "provision")


@pytest.fixture(scope="module")
def deployed(site, hosts, provisioned):
    return site.fab(hosts, "deploy")


def ip(site, member: str) -> str:
    return site.info.members[member].ip


def test_every_host_converges_at_once_then_a_second_run_changes_nothing(provisioned):
    first, second = provisioned
    assert first.returncode == 0, first.stdout + first.stderr
    rows = table(first.stdout)
    assert sorted(rows) == sorted(MEMBERS) and all(int(row[0]) > 0 for row in rows.values())
    # at once: the whole run took less than the hosts' runs one after the other
    total = float(re.search(r"^provision on 5 hosts in ([\d.]+) s:$", first.stdout, re.M)[1])
    assert total < sum(float(row[3]) for row in rows.values()), first.stdout
    assert second.returncode == 0, second.stdout + second.stderr
    assert {host: row[0] for host, row in table(second.stdout).items()} == dict.fromkeys(
        MEMBERS, "0"), [line for line in second.stdout.splitlines() if "] changed " in line]
    assert "Mk6rd" not in first.stdout + first.stderr + second.stdout + second.stderr


def test_h_narrows_to_one_host_and_a_host_out_of_reach_fails_alone(site, hosts, provisioned):
    one = site.fab(hosts, "-H", "data", "provision")  # an inventory name: its ssh address
    assert one.returncode == 0 and "[data] provision: 0 changed" in one.stdout, one.stdout
    assert "[web1]" not in one.stdout and "  host " not in one.stdout  # one host: no table
    data = site.info.members["data"]
    gone = {**hosts, "data": {**hosts["data"], "ssh": f"root@{data.ip}:1"}}  # a closed port
    res = site.fab(gone, "-H", "web1,data", "provision")
    assert res.returncode == 1, res.stdout + res.stderr
    rows = table(res.stdout)
    assert rows["web1"][0] == "0" and rows["data"][:2] == ["cannot", "connect:"], rows
    assert res.stderr.strip().splitlines()[-1] == "failed on 1 of 2 hosts: data"


def test_each_host_runs_the_services_of_its_roles_only(site, provisioned):
    def units(member):
        return set(site.sh(member, "systemctl list-units --type=service --state=active "
                                   "--no-legend --plain | awk '{print $1}'").stdout.split())

    def files(member, *paths):
        return site.sh(member, f"ls {' '.join(paths)} 2>/dev/null").stdout.split()

    app_units = (f"/etc/systemd/system/{APP}@.service", "/etc/systemd/system/celery.service",
                 "/etc/systemd/system/celerybeat.service")
    data = {"postgresql.service", "redis-server.service"}
    assert "nginx.service" in units("lb") and not data & units("lb")
    assert files("lb", *app_units) == []
    for web in ("web1", "web2"):
        assert "nginx.service" in units(web) and not data & units(web)
        assert files(web, *app_units) == [app_units[0]]
    # Celery's units wait for the first release to start
    assert site.sh("work", "systemctl is-enabled celery.service celerybeat.service"
                   ).returncode == 0
    assert files("work", *app_units, "/usr/sbin/nginx") == list(app_units[1:])
    assert data <= units("data")
    assert files("data", *app_units, "/usr/sbin/nginx") == []
    assert site.sh("web1", "dpkg-query -W postgresql redis-server").returncode != 0


def test_each_firewall_opens_each_service_to_whom_needs_it(site, provisioned):
    def allowed(member):
        return re.findall(r"^(\S+) +ALLOW +(\S+)", site.sh(member, "ufw status").stdout, re.M)

    apps = [ip(site, member) for member in ("web1", "web2", "work")]
    assert ("80/tcp", "Anywhere") in allowed("lb") and ("443/tcp", "Anywhere") in allowed("lb")
    assert [rule for rule in allowed("web1") if rule[0] != "OpenSSH"] == [
        ("80/tcp", ip(site, "lb"))]
    assert [rule for rule in allowed("work") if rule[0] != "OpenSSH"] == []
    assert [rule for rule in allowed("data") if rule[0] != "OpenSSH"] == [
        (f"{port}/tcp", app) for port in (5432, 6379) for app in apps]


def test_postgres_and_redis_answer_the_app_hosts_alone(site, provisioned):
    data = ip(site, "data")
    for port in (5432, 6379):
        with pytest.raises(OSError):  # from this machine: dropped by ufw
            socket.create_connection((data, port), 2).close()
        for member, answers in (("work", True), ("lb", False)):
            res = site.sh(member, f"python3 -c 'import socket; socket.create_connection("
                                  f"(\"{data}\", {port}), 2)'")
            assert (res.returncode == 0) is answers, (member, port, res.stderr)


def test_the_web_hosts_answer_http_from_the_lb_alone(site, provisioned):
    with pytest.raises(OSError):  # from this machine: dropped by ufw
        socket.create_connection((ip(site, "web1"), 80), 2).close()
    ask = f"curl -s -o /dev/null -w %{{http_code}} --max-time 5 -H 'Host: {DOMAIN}' "
    assert site.sh("lb", ask + f"http://{ip(site, 'web1')}/").stdout != "000"
    assert site.sh("work", ask + f"http://{ip(site, 'web1')}/").stdout == "000"


def test_postgres_refuses_the_app_hosts_without_tls(site, provisioned):
    res = site.sh("web1", f"python3 - {ip(site, 'data')} {APP}", stdin=PG_PROBE)
    plain, tls = res.stdout.splitlines()
    assert plain.startswith("E ") and "no encryption" in plain, res.stdout + res.stderr
    assert tls == "TLS S"


def test_redis_wants_the_apps_user_and_password(site, provisioned):
    res = site.sh("work", f"python3 -c {shlex.quote(REDIS_PROBE)} {ip(site, 'data')} {APP}",
                  stdin=REDIS_PASSWORD)
    assert res.stdout.splitlines() == ["-NOAUTH Authentication required.", "+OK", "+PONG"], \
        res.stdout + res.stderr
    conf = site.sh("data", "cat /etc/redis/redis.conf").stdout
    assert "user default off" in conf and "Mk6rd" not in conf


def test_a_deploy_dumps_once_on_the_data_host_and_every_app_host_runs_it(site, deployed):
    out = deployed.stdout + deployed.stderr
    assert deployed.returncode == 0, out
    assert out.count("pre-migration backup: database dumped to ") == 1, out
    assert " on data (" in out
    assert re.search(r"^\[lb\] ok +releases: none on this host: web1, web2, work run the "
                     "app$", out, re.M), out
    assert re.search(r"^\[work\] changed +release \S+: current \(for Celery", out, re.M)
    assert re.search(r"^deploy of \S+ on 3 app hosts in ", out, re.M), out
    assert "Mk6rd" not in out
    release = release_served(ip(site, "lb"))  # one name on every host
    for member in ("web1", "web2", "work"):
        assert site.sh(member, f"readlink /opt/{APP}/app").stdout.strip() == f"releases/{release}"
    dumps = site.sh("data", f"ls /opt/{APP}/backup/previous-deploy/").stdout.split()
    assert len(dumps) == 1 and dumps[0].endswith(".dump"), dumps


def test_a_rolling_deploy_takes_each_web_host_out_and_fails_no_request(site, hosts, deployed,
                                                                       app_repo):
    old = release_served(ip(site, "lb"))
    commit(app_repo, "a change for the rolling deploy", {"example/ROLLING": "1\n"})
    with Load(ip(site, "lb")) as load:
        res = site.fab(hosts, "deploy")
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    print(f"\nrolling deploy: {load.summary()}")
    assert load.sent > 20 and load.failed == [], (load.summary(), out)
    new = release_served(ip(site, "lb"))
    assert new != old and set(load.releases) == {old, new}, load.summary()
    # each web host out of the lb's upstream, then back: two reloads each
    assert len(re.findall(rf"^\[lb\] changed +file {UPSTREAM}: ", out, re.M)) == 4, out
    assert " down;" not in site.sh("lb", f"cat {UPSTREAM}").stdout
    rows = table_of_deploy(out)
    assert {host: row[1] for host, row in rows.items()} == dict.fromkeys(
        ("web1", "web2", "work"), new), out
    again = site.fab(hosts, "deploy")  # the same commit again: nothing to do anywhere
    out = again.stdout + again.stderr
    assert again.returncode == 0 and "] changed " not in out, out
    assert out.count("is already current") == 3, out


def test_a_web_host_that_fails_its_check_stops_the_rollout_and_serves_on(site, hosts, deployed,
                                                                         app_repo):
    before = release_served(ip(site, "lb"))
    # web2's instance that does not serve cannot start (a drop-in for that instance alone)
    live = site.sh("web2", f"grep -o 'run/{APP}/[a-z]*' {WEB_LIVE}").stdout.strip()
    idle = "green" if live.endswith("blue") else "blue"
    broken = f"/etc/systemd/system/{APP}@{idle}.service.d"
    site.sh("web2", f"mkdir -p {broken} && printf '[Service]\\nExecStart=\\n"
                    f"ExecStart=/bin/false\\n' > {broken}/broken.conf && systemctl daemon-reload")
    try:
        commit(app_repo, "a change web2 cannot start", {"example/ROLLING": "2\n"})
        with Load(ip(site, "lb")) as load:
            res = site.fab(hosts, "deploy")
    finally:
        site.sh("web2", f"rm -rf {broken} && systemctl daemon-reload")
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    assert load.failed == [], (load.summary(), out)
    assert "rolling deploy stopped: web2 failed" in res.stderr, out
    rows = table_of_deploy(out)
    new = rows["web1"][1]
    assert new != before and rows["web2"][1] == rows["work"][1] == before, out
    for member, release in (("web1", new), ("web2", before), ("work", before)):
        assert site.sh(member, f"readlink /opt/{APP}/app").stdout.strip() == f"releases/{release}"
    assert site.sh("work", f"ls /opt/{APP}/releases").stdout.split()[-1] == before
    assert " down;" not in site.sh("lb", f"cat {UPSTREAM}").stdout  # web2 serves: back in
    answered = {release_served(ip(site, "lb")) for _ in range(6)}
    assert answered == {new, before}, answered


def test_the_lb_spreads_requests_over_the_web_hosts_which_see_the_client(site, deployed):
    for _ in range(10):
        assert release_served(ip(site, "lb"))
    me = site.info.host_ip  # this machine, on the cluster's bridge
    for web in ("web1", "web2"):
        log = site.sh(web, "cat /var/log/nginx/access.log").stdout
        assert re.search(rf"^{re.escape(me)} .*\"GET / HTTP", log, re.M), (web, log[-1000:])


def test_celery_runs_through_the_remote_redis_into_the_remote_database(site, deployed):
    query = ("runuser -u postgres -- psql -XAt -d " + APP + " -c "
             "\"SELECT count(*) FROM demo_heartbeat\"")
    deadline = time.monotonic() + 90
    while int(site.sh("data", query).stdout.strip() or 0) == 0:
        assert time.monotonic() < deadline, "no Heartbeat row: beat -> Redis -> worker -> DB"
        time.sleep(2)
    tls = site.sh("data", "runuser -u postgres -- psql -XAt -d postgres -c \"SELECT "
                          "count(*), count(*) FILTER (WHERE ssl) FROM pg_stat_ssl JOIN "
                          "pg_stat_activity USING (pid) WHERE client_addr IS NOT NULL\"")
    total, encrypted = tls.stdout.strip().split("|")
    assert int(total) > 0 and total == encrypted, tls.stdout


def test_an_upload_through_web1_is_served_by_web2_and_read_by_a_celery_task(site, deployed):
    for member in ("web1", "web2", "work"):
        assert site.sh(member, f"mountpoint -q /var/opt/{APP}/media").returncode == 0, member
    # as the app on web1 writes an upload
    site.sh("web1", f"runuser -u {APP} -- sh -c 'mkdir -p /var/opt/{APP}/media/up && "
                    f"printf \"hello, shared media\\n\" > /var/opt/{APP}/media/up/hello.txt'")
    assert site.sh("data", f"stat -c %U:%s /var/opt/{APP}/media/up/hello.txt").stdout == (
        f"{APP}:20\n")  # on the db host's disk, as the app's user there
    ask = f"curl -s --max-time 5 -H 'Host: {DOMAIN}' "
    assert site.sh("lb", ask + f"http://{ip(site, 'web2')}/media/up/hello.txt").stdout == (
        "hello, shared media\n")
    # a Celery task on the worker host reads it (its size into the cache, read back from web2)
    django = (f"set -a && . /opt/{APP}/conf/{APP}.conf && cd /opt/{APP}/app && runuser -u "
              f"{APP} -- /opt/{APP}/venv/bin/python manage.py shell -c ")
    site.sh("web1", django + shlex.quote("from demo.tasks import media_size; "
                                         "media_size.delay('up/hello.txt')"))
    deadline = time.monotonic() + 30
    while (size := site.sh("web2", django + shlex.quote(
            "from django.core.cache import cache; "
            "print(cache.get('demo:media:up/hello.txt'))")).stdout.split()[-1:]) != ["20"]:
        assert time.monotonic() < deadline, f"no size from the worker: {size!r}"
        time.sleep(1)
    # the account that serves them has SFTP alone, with the app hosts' key
    sftp_only = site.sh("web1", f"ssh -i /opt/{APP}/conf/media_key -o UserKnownHostsFile="
                                f"/opt/{APP}/conf/media_known_hosts -o BatchMode=yes "
                                f"{APP}@{ip(site, 'data')} id")
    assert "uid=" not in sftp_only.stdout, sftp_only


def test_with_web1_powered_off_the_lb_serves_from_web2(site, deployed):
    """The module's last test: web1 stays off."""
    site.sh("web1", "systemctl poweroff")
    deadline = time.monotonic() + 30
    while socket_open(ip(site, "web1"), 22):
        assert time.monotonic() < deadline, "web1 did not power off"
        time.sleep(0.5)
    started = time.monotonic()
    for _ in range(10):
        assert release_served(ip(site, "lb"))
    assert time.monotonic() - started < 10  # web1 left out after its first failure


def table_of_deploy(out: str) -> dict[str, list[str]]:
    """The rows of a rolling deploy's table, by host: release before, release now, result."""
    head = list(re.finditer(r"^  host +release before +release now +result$", out, re.M))[-1]
    rows = {}
    for line in out[head.end():].splitlines()[1:]:
        if not line.startswith("  "):
            break
        host, before, now, *result = line.split()
        rows[host] = [before, now, " ".join(result)]
    return rows


def socket_open(address: str, port: int) -> bool:
    try:
        socket.create_connection((address, port), 1).close()
        return True
    except OSError:
        return False
