"""A site spread over two hosts of a real cluster (sandbox/cluster.py): the app host (lb, web,
worker) and the data host (db, redis), as the inventory's roles say.

``fab provision`` without ``-H`` provisions both at once and tables them, twice (the second run
changes nothing); ``-H`` narrows to one; a host out of reach fails alone. Each runs its roles'
services only; PostgreSQL and Redis answer the app host alone (not this machine), PostgreSQL
over TLS only, Redis to the app's user and its password only (a hostile one: it travels
percent-encoded in the URLs, hashed in redis.conf); a deploy dumps the database on the data
host, migrates it from the app host and serves; Celery's beat and worker run through the
remote Redis and write to the remote database, over TLS.

The cluster is this module's own (tests/conftest.py's cluster_sandbox: tests on 10.216.50).
"""

import os
import re
import shlex
import socket
import time

import pytest

from sandbox.cluster import Cluster
from tests.conftest import TEST_SUITE, Fleet, cluster_sandbox, needs_root, table
from tests.load import release_served

pytestmark = [pytest.mark.realhost, needs_root]
APP = "ratemyderp"
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
    cluster = Cluster(name=name, members=("app", "data"), suite=TEST_SUITE, subnet=subnet)
    fleet = Fleet(cluster.up(fresh=True), tmp_path_factory.mktemp("site"))
    # plain HTTP (no ACME CA here): Django must not redirect to HTTPS
    fleet.write_env(DEPLOY_REPO=str(app_repo), DEPLOY_SUBDIR="example",
                    REDIS_PASSWORD=REDIS_PASSWORD, DJANGO_SECURE_SSL_REDIRECT="False")
    yield fleet
    if not os.environ.get("FABSTACK_KEEP_SANDBOX"):
        cluster.down()


@pytest.fixture(scope="module")
def hosts(site):
    app, data = site.info.members.values()
    return {"app": {"ssh": app.alias, "private": app.ip, "roles": ["lb", "web", "worker"]},
            "data": {"ssh": data.alias, "private": data.ip, "roles": ["db", "redis"]}}


@pytest.fixture(scope="module")
def provisioned(site, hosts):
    return site.fab(hosts, "provision"), site.fab(hosts, "provision")


def ip(site, member: str) -> str:
    return site.info.members[member].ip


def test_both_hosts_converge_at_once_then_a_second_run_changes_nothing(provisioned):
    first, second = provisioned
    assert first.returncode == 0, first.stdout + first.stderr
    rows = table(first.stdout)
    assert list(rows) == ["app", "data"] and all(int(row[0]) > 0 for row in rows.values())
    # at once: the whole run took less than the hosts' runs one after the other
    total = float(re.search(r"^provision on 2 hosts in ([\d.]+) s:$", first.stdout, re.M)[1])
    assert total < sum(float(row[3]) for row in rows.values()), first.stdout
    assert second.returncode == 0, second.stdout + second.stderr
    assert {host: row[0] for host, row in table(second.stdout).items()} == {"app": "0",
                                                                          "data": "0"}
    assert "Mk6rd" not in first.stdout + first.stderr + second.stdout + second.stderr


def test_h_narrows_to_one_host_and_a_host_out_of_reach_fails_alone(site, hosts, provisioned):
    one = site.fab(hosts, "-H", "data", "provision")  # an inventory name: its ssh address
    assert one.returncode == 0 and "[data] provision: 0 changed" in one.stdout, one.stdout
    assert "[app]" not in one.stdout and "  host " not in one.stdout  # one host: no table
    data = site.info.members["data"]
    gone = {**hosts, "data": {**hosts["data"], "ssh": f"root@{data.ip}:1"}}  # a closed port
    res = site.fab(gone, "provision")
    assert res.returncode == 1, res.stdout + res.stderr
    rows = table(res.stdout)
    assert rows["app"][0] == "0" and rows["data"][:2] == ["cannot", "connect:"], rows
    assert res.stderr.strip().splitlines()[-1] == "failed on 1 of 2 hosts: data"


def test_each_host_runs_the_services_of_its_roles_only(site, provisioned):
    def units(member):
        return site.sh(member, "systemctl list-units --type=service --state=active --no-legend "
                               "--plain | awk '{print $1}'").stdout.split()

    app, data = units("app"), units("data")
    assert "nginx.service" in app and not {"postgresql.service", "redis-server.service"} & set(app)
    # Celery's units wait for the first release to start
    assert site.sh("app", "systemctl is-enabled celery.service celerybeat.service").returncode == 0
    assert {"postgresql.service", "redis-server.service"} <= set(data)
    assert site.sh("data", "ls /etc/systemd/system/celery.service /usr/sbin/nginx "
                           f"/etc/systemd/system/{APP}@.service").stdout == ""
    assert site.sh("app", "dpkg-query -W postgresql redis-server").returncode != 0
    rules = site.sh("data", "ufw status").stdout
    assert f"5432/tcp                   ALLOW       {ip(site, 'app')}" in rules, rules
    assert f"6379/tcp                   ALLOW       {ip(site, 'app')}" in rules, rules
    assert "80/tcp" not in rules and "443/tcp" not in rules


def test_postgres_and_redis_answer_the_app_host_alone(site, provisioned):
    data = ip(site, "data")
    for port in (5432, 6379):
        with pytest.raises(OSError):  # from this machine: dropped by ufw
            socket.create_connection((data, port), 2).close()
        res = site.sh("app", f"python3 -c 'import socket; socket.create_connection("
                             f"(\"{data}\", {port}), 5)'")
        assert res.returncode == 0, res.stderr


def test_postgres_refuses_the_app_host_without_tls(site, provisioned):
    res = site.sh("app", f"python3 - {ip(site, 'data')} {APP}", stdin=PG_PROBE)
    plain, tls = res.stdout.splitlines()
    assert plain.startswith("E ") and "no encryption" in plain, res.stdout + res.stderr
    assert tls == "TLS S"


def test_redis_wants_the_apps_user_and_password(site, provisioned):
    res = site.sh("app", f"python3 -c {shlex.quote(REDIS_PROBE)} {ip(site, 'data')} {APP}",
                  stdin=REDIS_PASSWORD)
    assert res.stdout.splitlines() == ["-NOAUTH Authentication required.", "+OK", "+PONG"], \
        res.stdout + res.stderr
    conf = site.sh("data", "cat /etc/redis/redis.conf").stdout
    assert "user default off" in conf and "Mk6rd" not in conf


def test_a_deploy_dumps_on_the_data_host_migrates_and_serves(site, hosts, provisioned):
    res = site.fab(hosts, "deploy")
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "[app] changed      pre-migration backup: database dumped to " in out
    assert " on data (" in out
    assert "[data] ok           releases: none on this host: app runs the app" in out
    assert "Mk6rd" not in out
    assert release_served(ip(site, "app"))
    dumps = site.sh("data", f"ls /opt/{APP}/backup/previous-deploy/").stdout.split()
    assert len(dumps) == 1 and dumps[0].endswith(".dump"), dumps


def test_celery_runs_through_the_remote_redis_into_the_remote_database(site, provisioned):
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
