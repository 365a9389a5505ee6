"""Local test settings: sqlite, local-memory cache, in-memory broker."""

from .base import *  # noqa: F403

SECRET_KEY = "test-only-not-secret"

DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

CELERY_BROKER_URL = "memory://"
CELERY_TASK_ALWAYS_EAGER = True
