from django.db import models


class Counter(models.Model):
    name = models.CharField(max_length=50, unique=True)
    value = models.PositiveBigIntegerField(default=0)

    def __str__(self):
        return f"{self.name}={self.value}"


class Heartbeat(models.Model):
    """Written by the Celery beat-scheduled task, so the page shows workers run."""

    created = models.DateTimeField(auto_now_add=True, db_index=True)
    hostname = models.CharField(max_length=255)
    release = models.CharField(max_length=255)

    class Meta:
        ordering = ["-created"]

    def __str__(self):
        return f"{self.created:%Y-%m-%d %H:%M:%S} {self.hostname} {self.release}"
