import socket
import time

from celery import shared_task
from django.conf import settings

from .models import Heartbeat


@shared_task
def heartbeat(pause: float = 0):
    """Record that a worker ran, ``pause`` seconds after it began (CELERY_BEAT_SCHEDULE runs
    this every 10 seconds; a pause makes a task that a restart's warm shutdown must wait for)."""
    time.sleep(pause)
    return Heartbeat.objects.create(hostname=socket.gethostname(), release=settings.RELEASE).pk
