"""Tests for the example app, with config.settings.test (sqlite, local-memory cache).

Run from the repository root with a virtualenv holding example/requirements.txt:
    /tmp/example-venv/bin/python -m pytest example/tests
Skipped where Django is not installed (e.g. the library's own .venv).
"""

import importlib
import os
import sys
from pathlib import Path
from urllib.parse import quote

import pytest

pytest.importorskip("django")
pytest.importorskip("celery")
pytest.importorskip("environ")

EXAMPLE_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(EXAMPLE_DIR))
os.environ["DJANGO_SETTINGS_MODULE"] = "config.settings.test"

import django  # noqa: E402

django.setup()

from config.settings.base import read_release  # noqa: E402
from demo.models import Counter, Heartbeat  # noqa: E402
from demo.tasks import heartbeat, media_size  # noqa: E402
from django.core.cache import cache  # noqa: E402
from django.conf import settings  # noqa: E402
from django.db import connection  # noqa: E402
from django.test import Client  # noqa: E402
from django.test.utils import setup_test_environment, teardown_test_environment  # noqa: E402

NASTY_PASSWORD = "p a'b\"c$d\\e#f%g@h:i/j+k?l&m=n;é"

PRODUCTION_ENV = {
    "DJANGO_SETTINGS_MODULE": "config.settings.production",
    "DJANGO_SECRET_KEY": "$starts-with-a-dollar-" + "x" * 50,
    "DJANGO_ADMIN_URL": "admin-xyz/",
    "DJANGO_SECURE_SSL_REDIRECT": "false",
    "DJANGO_ALLOWED_HOSTS": "example.com,www.example.com",
    "DJANGO_STATIC_DIR": "/opt/example/static",
    "DJANGO_MEDIA_DIR": "/opt/example/media",
    "DATABASE_URL": f"postgres://example:{quote(NASTY_PASSWORD, safe='')}@localhost:5432/example",
    "REDIS_URL": "redis://localhost:6379/1",
    "CELERY_BROKER_URL": "redis://localhost:6379/0",
}


@pytest.fixture(scope="module", autouse=True)
def test_database():
    setup_test_environment()
    old_name = connection.creation.create_test_db(verbosity=0)
    yield
    connection.creation.destroy_test_db(old_name, verbosity=0)
    teardown_test_environment()


def test_home_increments_counters_and_shows_release():
    client = Client()
    first = client.get("/")
    second = client.get("/")
    assert first.status_code == second.status_code == 200
    assert f"release: {settings.RELEASE}" in second.text
    assert second.context["visits"] == first.context["visits"] + 1
    assert second.context["cache_visits"] == first.context["cache_visits"] + 1
    assert Counter.objects.get(name="visits").value == second.context["visits"]
    assert "demo/site.css" in second.text


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_health_ok(host):
    response = Client().get("/health/", HTTP_HOST=host)
    assert response.status_code == 200
    assert response.text == "ok"
    assert response["X-Release"] == settings.RELEASE


def test_heartbeat_task_writes_a_row():
    pk = heartbeat()
    beat = Heartbeat.objects.get(pk=pk)
    assert beat.release == settings.RELEASE
    assert beat.hostname
    assert beat.hostname in Client().get("/").text


def test_media_size_task_reads_an_upload(tmp_path, monkeypatch):
    monkeypatch.setattr(settings, "MEDIA_ROOT", str(tmp_path))
    (tmp_path / "up.txt").write_text("hello media\n")
    assert media_size("up.txt") == 12 and cache.get("demo:media:up.txt") == 12


def test_read_release(tmp_path):
    assert read_release(tmp_path / "REVISION") == "unknown"
    (tmp_path / "REVISION").write_text("abc123\n")
    assert read_release(tmp_path / "REVISION") == "abc123"


def test_production_settings_from_environment(monkeypatch):
    for name, value in PRODUCTION_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delitem(sys.modules, "config.settings.production", raising=False)
    production = importlib.import_module("config.settings.production")

    db = production.DATABASES["default"]
    assert db["ENGINE"] == "django.db.backends.postgresql"
    assert db["PASSWORD"] == NASTY_PASSWORD
    assert (db["USER"], db["HOST"], db["PORT"]) == ("example", "localhost", 5432)
    assert db["NAME"] == "example"
    assert production.SECRET_KEY == PRODUCTION_ENV["DJANGO_SECRET_KEY"]
    assert production.ALLOWED_HOSTS == ["example.com", "www.example.com", "localhost", "127.0.0.1"]
    assert production.ADMIN_URL == "admin-xyz/"
    assert production.SECURE_SSL_REDIRECT is False
    assert production.STATIC_ROOT == "/opt/example/static"
    assert production.CACHES["default"]["LOCATION"] == "redis://localhost:6379/1"
    assert production.CELERY_BROKER_URL == "redis://localhost:6379/0"


def test_a_release_names_the_static_files_of_its_own_manifest(tmp_path):
    """Its copy of the manifest (which fabstack's deploy keeps in the release) over the one
    in STATIC_ROOT, which the last collectstatic wrote."""
    import json

    from config.storage import RELEASE_MANIFEST, ReleaseManifestStaticFilesStorage
    from django.test import override_settings

    def manifest(path, hashed):
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps({"paths": {"demo/site.css": hashed}, "version": "1.1",
                                    "hash": "0"}))

    manifest(tmp_path / "static/staticfiles.json", "demo/site.222222222222.css")
    with override_settings(STATIC_ROOT=tmp_path / "static", BASE_DIR=tmp_path / "release"):
        storage = ReleaseManifestStaticFilesStorage()
        assert storage.url("demo/site.css") == "/static/demo/site.222222222222.css"
        manifest(tmp_path / "release" / RELEASE_MANIFEST, "demo/site.111111111111.css")
        storage = ReleaseManifestStaticFilesStorage()
        assert storage.url("demo/site.css") == "/static/demo/site.111111111111.css"
