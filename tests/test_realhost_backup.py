"""Backups on the real sandbox host: backup-db, restore-db, the scheduled script, off-site pull."""

import re
import subprocess
import time

import pytest

from tasks.primitives import BACKGROUND_NICE
from tests.conftest import ProcessSampler

APP = "ratemyderp"
DOMAIN = "ratemyderp.test"
BACKUP = f"/opt/{APP}/backup"
SCRIPT = f"/usr/local/sbin/{APP}-backup"
COUNTS = ("cd / && runuser -u postgres -- psql -X -At -d " + APP + " -c \"SELECT "
          "table_name, (xpath('/row/c/text()', query_to_xml(format('SELECT count(*) AS c "
          "FROM %I.%I', table_schema, table_name), false, true, '')))[1]::text FROM "
          "information_schema.tables WHERE table_schema = 'public' ORDER BY 1\"")


@pytest.fixture(scope="module")
def offsite_key(tmp_path_factory):
    key = tmp_path_factory.mktemp("offsite") / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "offsite@tests",
                    "-f", str(key)], check=True)
    return key


@pytest.fixture(scope="module")
def deployed(target, app_repo, offsite_key):
    """provision (backups with small rotation, an off-site key), then a deploy of the example."""
    target.write_env(DEPLOY_REPO=str(app_repo), DEPLOY_SUBDIR="example",
                     BACKUP_KEEP_DAILY="2", BACKUP_KEEP_WEEKLY="2", BACKUP_KEEP_MONTHLY="2",
                     OFFSITE_PUBKEY=f"{offsite_key}.pub",
                     # no certificate in this module: the site answers over plain HTTP
                     DJANGO_SECURE_SSL_REDIRECT="False")
    target.fab("provision")
    # --force: a new release even when an earlier module left this commit current
    return target.fab("deploy", "--force")


def counts(target) -> dict[str, int]:
    out = target.sh(COUNTS).stdout
    return {t: int(c) for t, c in (line.split("|") for line in out.splitlines())}


def site_status(target) -> str:
    return subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--noproxy",
                           "*", "--max-time", "10", "--resolve", f"{DOMAIN}:80:{target.info.ip}",
                           f"http://{DOMAIN}/"], capture_output=True, text=True).stdout


def dumps(target, kind) -> list[str]:
    return target.sh(f"ls -1 {BACKUP}/{kind}").stdout.split()


def day(name: str) -> str:
    return re.search(r"-(\d{8})T", name)[1]


def test_layout_and_timer(target, deployed):
    assert "pre-migration backup: database dumped to " + BACKUP + "/previous-deploy/" \
        in deployed.stdout
    out = target.sh(f"stat -c '%U:%G %a' {BACKUP} {BACKUP}/daily /var/lib/backups/.pgpass; "
                    f"find {BACKUP} -perm -o=r | wc -l; "
                    f"systemctl is-enabled {APP}-backup.timer; "
                    f"systemctl is-active {APP}-backup.timer").stdout.split("\n")
    assert out[:3] == ["root:backups 750", "backups:backups 750", "backups:backups 600"]
    assert out[3:6] == ["0", "enabled", "active"]


def test_the_timers_backup_yields_the_cpu_to_the_site(target, deployed):
    """The daily job (its unit, as the timer starts it) runs its dump at background priority,
    its processes and their autogroup."""
    with ProcessSampler(target) as sampler:
        target.sh(f"systemctl start {APP}-backup.service")
    dumps_seen = [line for line in sampler.text.splitlines() if "bin/pg_dump -Fc" in line]
    assert dumps_seen, sampler.text
    assert all(line.endswith(f"[autogroup nice {BACKGROUND_NICE}]") for line in dumps_seen), \
        dumps_seen
    assert target.sh(f"systemctl show -p Nice --value {APP}-backup.service").stdout.strip() \
        == str(BACKGROUND_NICE)


def test_backup_db_then_restore_gives_back_the_rows_of_its_moment(target, deployed):
    # Celery beat writes heartbeats: stop the workers so the dump's moment is well defined.
    target.sh("systemctl stop celerybeat.service celery.service")
    try:
        at_dump = counts(target)
        res = target.fab("backup-db")
        m = re.search(rf"database dump: ({BACKUP}/manual/(\S+\.dump)) \(([\d.]+ \w+)\), "
                      "checked with pg_restore --list", res.stdout)
        assert m, res.stdout
        assert target.sh(f"stat -c %U:%G:%a {m[1]}").stdout.strip() == "backups:backups:640"
        target.sh(f"cd / && runuser -u postgres -- psql -q -d {APP} -c \"INSERT INTO "
                  "demo_counter (name, value) SELECT 'after-dump-' || g, g FROM "
                  "generate_series(1, 7) g\"")
        assert counts(target)["demo_counter"] == at_dump["demo_counter"] + 7
        refused = target.fab("restore-db", "--dump", m[2], check=False)
        assert refused.returncode == 1 and "not confirmed" in refused.stdout
        res = target.fab("restore-db", "--dump", m[2], "--yes")
        assert counts(target) == at_dump, res.stdout
        assert "safety dump: the database as it was" in res.stdout
        row = re.search(r"public\.demo_counter\s+(\d+) -> (\d+)", res.stdout)
        assert row and int(row[1]) == at_dump["demo_counter"] + 7
        assert int(row[2]) == at_dump["demo_counter"]
    finally:
        target.sh("systemctl start celery.service celerybeat.service")
    assert site_status(target) == "200"


def test_download_then_upload_and_restore(target, deployed, tmp_path):
    res = target.fab("backup-db", "--download", "--to", str(tmp_path))
    [local] = list(tmp_path.glob("*.dump"))
    assert f"-> {local}" in res.stdout and oct(local.stat().st_mode & 0o777) == "0o600"
    before = counts(target)
    res = target.fab("restore-db", "--upload", str(local), "--yes")
    assert f"{BACKUP}/uploads/{local.name}" in res.stdout
    assert counts(target)["demo_counter"] == before["demo_counter"]
    assert site_status(target) == "200"


def test_scheduled_script_by_hand_twice_then_with_faked_dates(target, deployed):
    # a media file as the app makes it: its user, its unit's UMask (the backups account is in
    # none of the app's groups)
    target.sh(f"rm -f {BACKUP}/daily/* {BACKUP}/weekly/* {BACKUP}/monthly/*; "
              f"rm -f /var/opt/{APP}/media/a.txt; runuser -u {APP} -- sh -c \"umask "
              f"$(systemctl show -p UMask --value {APP}@blue.service) && "
              f"cat /etc/hostname > /var/opt/{APP}/media/a.txt\"")
    for _ in range(2):
        target.sh(SCRIPT + " scheduled")
        time.sleep(1.1)
    assert len(dumps(target, "daily")) == 2
    snaps = dumps(target, "media")
    inodes = target.sh(f"stat -c %i {BACKUP}/media/{snaps[-2]}/a.txt "
                       f"{BACKUP}/media/{snaps[-1]}/a.txt").stdout.split()
    assert inodes[0] == inodes[1], "media snapshots are not hard-linked"
    for d in range(1, 16):  # 2030-01-01 (a Tuesday) .. 2030-01-15
        target.sh(f"{SCRIPT} scheduled --now 2030-01-{d:02d}T03:15:00")
    assert [day(n) for n in dumps(target, "daily")] == ["20300114", "20300115"]
    assert [day(n) for n in dumps(target, "weekly")] == ["20300107", "20300114"]
    monthly = [day(n) for n in dumps(target, "monthly")]
    assert len(monthly) == 2 and monthly[-1] == "20300101"
    weekly = target.sh(f"stat -c %h {BACKUP}/weekly/*20300114T*").stdout.strip()
    assert weekly == "2"  # the weekly dump is a link to the daily one, not a copy


def test_a_failing_dump_exits_non_zero_logs_and_prunes_nothing(target, deployed):
    listing = target.sh(f"cd {BACKUP} && ls -1 daily weekly monthly").stdout
    target.sh("systemctl stop postgresql.service")
    try:
        res = target.sh(f"{SCRIPT} scheduled --now 2030-02-01T03:15:00", check=False)
        assert res.returncode == 1
        assert "error: pg_dump of" in res.stderr and "nothing pruned" in res.stderr
        log = target.sh(f"journalctl -t {APP}-backup -p err --no-pager -n 5").stdout
        assert "nothing pruned" in log
        assert target.sh(f"cd {BACKUP} && ls -1 daily weekly monthly").stdout == listing
        assert target.sh(f"find {BACKUP} -name '*.part'").stdout == ""
    finally:
        target.sh("systemctl start postgresql.service")


def test_a_deploy_whose_backup_fails_does_not_migrate(target, deployed):
    """The backup account's password is wrong: pg_dump fails, nothing is migrated."""
    pgpass = "/var/lib/backups/.pgpass"
    target.sh(f"cp -p {pgpass} {pgpass}.away && "
              f"echo 'localhost:*:{APP}:{APP}:not-the-password' > {pgpass}")
    try:
        res = target.fab("deploy", "--force", check=False)
    finally:
        target.sh(f"mv {pgpass}.away {pgpass}")
    assert res.returncode == 1
    assert "pre-migration backup" in res.stdout and "not migrating" in res.stdout
    assert "migrations:" not in res.stdout and "keeps serving" in res.stdout
    assert site_status(target) == "200"


def offsite(target, key, *args, remote_cmd=None):
    ssh = (f"ssh -F /dev/null -i {key} -o IdentitiesOnly=yes -o BatchMode=yes "
           f"-o UserKnownHostsFile={target.info.known_hosts} -o HostKeyAlias={target.info.alias}")
    if remote_cmd is not None:
        return subprocess.run([*ssh.split(), f"offsite@{target.info.ip}", *remote_cmd],
                              capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    return subprocess.run(["rsync", "-e", ssh, *args], capture_output=True, text=True,
                          timeout=120)


def test_offsite_account_pulls_backups_read_only_and_nothing_else(target, deployed, offsite_key,
                                                                  tmp_path):
    pulled = tmp_path / "pulled"
    res = offsite(target, offsite_key, "-aH", "--exclude", "*.part",
                  f"offsite@{target.info.ip}:", f"{pulled}/")
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (pulled / "daily").iterdir()) == dumps(target, "daily")
    # no shell, no command
    for cmd in ([], ["id"], ["cat /etc/passwd"]):
        res = offsite(target, offsite_key, remote_cmd=cmd)
        assert res.returncode != 0 and "root:" not in res.stdout and "uid=" not in res.stdout
    # nothing outside the backup folder, nothing written
    for src in (f"offsite@{target.info.ip}:/etc/passwd", f"offsite@{target.info.ip}:../conf/"):
        res = offsite(target, offsite_key, src, f"{tmp_path}/x")
        assert res.returncode != 0 and not (tmp_path / "x").exists()
    res = offsite(target, offsite_key, str(offsite_key) + ".pub",
                  f"offsite@{target.info.ip}:daily/")
    assert res.returncode != 0
    assert target.sh(f"ls {BACKUP}/daily").stdout.count(".pub") == 0
