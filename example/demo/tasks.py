import socket
import time
from pathlib import Path

from celery import shared_task
from django.conf import settings
from django.core.cache import cache

from .models import Heartbeat


@shared_task
def heartbeat(pause: float = 0):
    """Record that a worker ran, ``pause`` seconds after it began (CELERY_BEAT_SCHEDULE runs
    this every 10 seconds; a pause makes a task that a restart's warm shutdown must wait for)."""
    time.sleep(pause)
    return Heartbeat.objects.create(hostname=socket.gethostname(), release=settings.RELEASE).pk


@shared_task
def media_size(name: str) -> int:
    """The size of the uploaded file ``name`` as a worker reads it (on a site of several hosts,
    from the media folder they share), also left in the cache as demo:media:NAME."""
    size = (Path(settings.MEDIA_ROOT) / name).stat().st_size
    cache.set(f"demo:media:{name}", size, timeout=3600)
    return size
