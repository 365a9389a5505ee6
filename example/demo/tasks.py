import socket

from celery import shared_task
from django.conf import settings

from .models import Heartbeat


@shared_task
def heartbeat():
    """Record that a worker ran; CELERY_BEAT_SCHEDULE runs this every 10 seconds."""
    return Heartbeat.objects.create(hostname=socket.gethostname(), release=settings.RELEASE).pk
