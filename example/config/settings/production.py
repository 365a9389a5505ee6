"""Production settings: everything deployment-specific comes from the environment
(systemd loads it from /opt/APP/conf/APP.conf)."""

import os

import environ

from .base import *  # noqa: F403
from .base import ALLOWED_HOSTS

env = environ.Env()

# Read raw: django-environ treats a value starting with "$" as a reference to
# another variable, and generated keys may start with "$".
SECRET_KEY = os.environ["DJANGO_SECRET_KEY"]
ADMIN_URL = env("DJANGO_ADMIN_URL")
# Deploy-time health checks use 127.0.0.1 or localhost as Host.
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS") + ALLOWED_HOSTS

# postgres://USER:PASSWORD@HOST:PORT/NAME, with USER and PASSWORD percent-encoded.
DATABASES = {"default": env.db("DATABASE_URL")}
DATABASES["default"]["CONN_MAX_AGE"] = 60
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True

CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": env("REDIS_URL"),
    }
}

CELERY_BROKER_URL = env("CELERY_BROKER_URL")

STATIC_ROOT = env("DJANGO_STATIC_DIR")
# Hashed names (demo/site.0123456789ab.css): collectstatic adds a release's files beside those
# of the releases before, so a page any kept release renders finds its own CSS.
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "config.storage.ReleaseManifestStaticFilesStorage"},
}
MEDIA_ROOT = env("DJANGO_MEDIA_DIR")

# NGINX terminates TLS and sets X-Forwarded-Proto.
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_SSL_REDIRECT = env.bool("DJANGO_SECURE_SSL_REDIRECT", default=True)
# The deploy health check may come over plain HTTP.
SECURE_REDIRECT_EXEMPT = [r"^health/$"]
# Secure cookies only when the site is served over HTTPS.
SESSION_COOKIE_SECURE = SECURE_SSL_REDIRECT
CSRF_COOKIE_SECURE = SECURE_SSL_REDIRECT
SECURE_HSTS_SECONDS = 60
# An example app must not pin the operator's other subdomains or the preload list.
SILENCED_SYSTEM_CHECKS = ["security.W005", "security.W021"]

# Provided by the deployment; this example sends no mail.
MAILGUN_API_KEY = env("MAILGUN_API_KEY", default="")
MAILGUN_DOMAIN = env("MAILGUN_DOMAIN", default="")
