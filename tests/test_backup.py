"""Backups: the rendered backup script's rotation with a faked date, resources, dump parsing."""

import datetime
import os
import types

import pytest

from tasks import backup
from tasks import settings as settings_mod
from tasks.host import Host, Result, StepFailed
from tasks.primitives import render
from tests.conftest import VALID
from tests.fake import FakeConnection


def load_script(settings, tmp_path):
    """The rendered /usr/local/sbin/APP-backup as a module, its folders under ``tmp_path``."""
    module = types.ModuleType("backup_script")
    exec(compile(render("backup.py.j2", settings), "APP-backup", "exec"), module.__dict__)
    module.BACKUP_DIR = str(tmp_path)
    module.log = lambda message, error=False: None
    return module


def fake_dumps(script):
    """Replace pg_dump with a file of the right name: rotation is what is under test."""
    def dump(kind, now):
        path = os.path.join(script.folder(kind), script.dump_name(now, "rel1"))
        with open(path, "w") as f:
            f.write("dump")
        return path, 4
    script.dump = dump
    script.media = lambda now: None


def listing(tmp_path, kind):
    return sorted(p.name[len("ratemyderp-"):][:8] for p in (tmp_path / kind).iterdir())


def test_script_renders_from_settings_alone_and_compiles(settings):
    text = render("backup.py.j2", settings)
    compile(text, "APP-backup", "exec")
    assert 'DB_NAME = "ratemyderp"' in text and '"daily": 7' in text
    assert f'RUN_AS = "{backup.BACKUP_USER}"' in text
    assert f'PGPASSFILE = "{backup.BACKUP_HOME}/.pgpass"' in text


def test_script_follows_app_name_and_keep_settings():
    s = settings_mod.parse(dict(VALID, APP_NAME="shop", BACKUP_KEEP_DAILY="2"))
    text = render("backup.py.j2", s)
    assert 'BACKUP_DIR = "/opt/shop/backup"' in text and '"daily": 2' in text
    assert "ratemyderp" not in text
    assert "ExecStart=/usr/local/sbin/shop-backup scheduled" in render("backup.service.j2", s)


def test_to_prune_keeps_the_newest_and_ignores_other_files(settings, tmp_path):
    script = load_script(settings, tmp_path)
    names = [f"db-2026010{d}T031500Z-rel.dump" for d in range(1, 6)] + ["notes.txt",
                                                                        "x.dump.part"]
    assert script.to_prune(names, 2) == names[:3]
    assert script.to_prune(names, 10) == []


def test_promotions_first_dump_of_week_and_month(settings, tmp_path):
    script = load_script(settings, tmp_path)
    have = ["db-20260105T031500Z-r.dump"]  # Monday of ISO week 2, January
    assert script.promotions(datetime.datetime(2026, 1, 6), have, have) == []
    assert script.promotions(datetime.datetime(2026, 1, 12), have, have) == ["weekly"]
    assert script.promotions(datetime.datetime(2026, 2, 1), have, have) == ["weekly", "monthly"]
    assert script.promotions(datetime.datetime(2026, 1, 6), [], []) == ["weekly", "monthly"]


def test_ninety_days_of_scheduled_runs_keep_the_right_set(tmp_path):
    s = settings_mod.parse(dict(VALID, BACKUP_KEEP_DAILY="3", BACKUP_KEEP_WEEKLY="2",
                                BACKUP_KEEP_MONTHLY="2"))
    script = load_script(s, tmp_path)
    fake_dumps(script)
    day = datetime.datetime(2026, 1, 1, 3, 15)
    for _ in range(90):  # 2026-01-01 .. 2026-03-31
        assert script.scheduled(day) == 0
        day += datetime.timedelta(days=1)
    assert listing(tmp_path, "daily") == ["20260329", "20260330", "20260331"]
    # first dumps of ISO weeks 13 (Mon 2026-03-23) and 14 (Mon 2026-03-30)
    assert listing(tmp_path, "weekly") == ["20260323", "20260330"]
    assert listing(tmp_path, "monthly") == ["20260201", "20260301"]


def test_a_failed_dump_prunes_nothing_and_exits_1(settings, tmp_path):
    script = load_script(settings, tmp_path)
    fake_dumps(script)
    for day in (1, 2, 3):
        assert script.scheduled(datetime.datetime(2026, 1, day)) == 0
    kinds = ("daily", "weekly", "monthly")
    before = {kind: listing(tmp_path, kind) for kind in kinds}
    assert len(before["daily"]) == 3
    # lower BACKUP_KEEP_*: a rotation now would delete dumps
    script.KEEP.update(daily=1, weekly=0, monthly=0)

    def failing(kind, now):
        raise script.Failed("pg_dump of ratemyderp failed: connection refused")
    script.dump = failing
    assert script.scheduled(datetime.datetime(2026, 1, 4)) == 1
    assert {kind: listing(tmp_path, kind) for kind in kinds} == before


def test_a_failed_dump_is_logged_as_an_error(settings, tmp_path, monkeypatch):
    """The script's own dump() with a pg_dump that cannot connect: its partial file goes."""
    script = load_script(settings, tmp_path / "backup")
    logged = []
    script.log = lambda message, error=False: logged.append((error, message))
    script.media = lambda now: None
    pg_dump = tmp_path / "bin" / "pg_dump"
    pg_dump.parent.mkdir()
    pg_dump.write_text("#!/bin/sh\n"
                       'for a; do [ "$prev" = -f ] && echo partial > "$a"; prev=$a; done\n'
                       "echo 'pg_dump: error: connection refused' >&2; exit 1\n")
    pg_dump.chmod(0o755)
    monkeypatch.setenv("PATH", str(pg_dump.parent))
    assert script.scheduled(datetime.datetime(2026, 1, 1)) == 1
    assert logged == [(True, "pg_dump of ratemyderp failed: pg_dump: error: connection refused; "
                             "nothing pruned")]
    assert os.listdir(tmp_path / "backup" / "daily") == []


# -- resources and tasks -----------------------------------------------------------------------

def resource_paths(host):
    return {getattr(r, "path", None) or r.what: r for r in backup.backup_resources(host)}


def test_layout_is_group_readable_and_never_world_readable(make_host):
    h, _ = make_host()
    res = resource_paths(h)
    top = res["/opt/ratemyderp/backup"]
    assert (top.owner, top.group, top.mode) == ("root", "backups", 0o750)
    for name in backup.FOLDERS:
        d = res[f"/opt/ratemyderp/backup/{name}"]
        assert (d.owner, d.group, d.mode) == ("backups", "backups", 0o750)
    pgpass = res["/var/lib/backups/.pgpass"]
    assert pgpass.mode == 0o600 and pgpass.owner == "backups" and pgpass.secret
    assert pgpass.content == b"localhost:*:ratemyderp:ratemyderp:unit-test-db-password\n"


def test_no_offsite_key_means_no_key_file(make_host):
    h, _ = make_host()
    keys = resource_paths(h)["/var/lib/offsite/.ssh/authorized_keys"]
    assert keys.present is False
    assert "user offsite" not in resource_paths(h)


def test_offsite_key_is_restricted_to_a_read_only_rsync(tmp_path, capsys):
    pub = tmp_path / "offsite.pub"
    pub.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOffsiteKeyForTests op@laptop\n")
    s = settings_mod.parse(dict(VALID, OFFSITE_PUBKEY=str(pub)))
    conn = FakeConnection()
    h = Host(conn, s, executor=conn.exec_script)
    res = resource_paths(h)
    keys = res["/var/lib/offsite/.ssh/authorized_keys"]
    assert keys.content.decode() == ('restrict,command="/usr/bin/rrsync -ro /opt/ratemyderp/'
                                     'backup" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOffsiteKeyFor'
                                     'Tests op@laptop\n')
    assert keys.owner == "root" and keys.mode == 0o640
    assert res["user offsite"].groups == ["backups"]


def test_offsite_pubkey_must_be_a_public_key(tmp_path):
    key = tmp_path / "id_ed25519"
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n-----END OPENSSH PRIVATE KEY-----\n")
    with pytest.raises(settings_mod.SettingsError, match="OFFSITE_PUBKEY"):
        settings_mod.parse(dict(VALID, OFFSITE_PUBKEY=str(key)))


def host_answering(settings, result):
    conn = FakeConnection()
    return Host(conn, settings, executor=lambda command, stdin, wait: result)


def test_dump_database_reports_path_and_size(settings, capsys):
    h = host_answering(settings, Result("/opt/ratemyderp/backup/manual/x.dump 34000\n", "", 0))
    assert backup.dump_database(h, "manual") == ("/opt/ratemyderp/backup/manual/x.dump", 34000)


def test_dump_database_failure_names_the_reason(settings, capsys):
    h = host_answering(settings, Result("", "error: pg_dump of ratemyderp failed: refused", 1))
    with pytest.raises(StepFailed) as err:
        backup.dump_database(h, "previous-deploy")
    assert err.value.what == "database dump" and "refused" in err.value.message


def test_counts_table_lists_every_table():
    text = backup.counts_table({"public.a": 1, "public.b": 2}, {"public.a": 1, "public.c": 0})
    assert text.splitlines() == ["public.a         1 -> 1", "public.b         2 -> -",
                                 "public.c         - -> 0"]


@pytest.mark.parametrize("name", ["../etc/passwd.dump", "a/b/c.dump", "x.sql", "daily/../x.dump"])
def test_find_dump_refuses_paths_outside_the_backup_folders(make_host, name):
    h, _ = make_host()
    with pytest.raises(StepFailed):
        backup.find_dump(h, name)


def test_restore_db_and_backup_db_are_root_tasks():
    from tasks import build_namespace

    ns = build_namespace()
    assert {"backup-db", "restore-db"} <= set(ns.tasks)
    assert set(ns.collections["backup"].tasks) == {"setup"}
