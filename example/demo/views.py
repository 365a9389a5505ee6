from django.conf import settings
from django.core.cache import cache
from django.db import connection
from django.db.models import F
from django.http import HttpResponse
from django.shortcuts import render

from .models import Counter, Heartbeat

CACHE_KEY = "demo:visits"


def home(request):
    """Touch the database and the cache, and show what the workers wrote."""
    counter, _ = Counter.objects.get_or_create(name="visits")
    Counter.objects.filter(pk=counter.pk).update(value=F("value") + 1)
    counter.refresh_from_db()
    cache.add(CACHE_KEY, 0, timeout=None)
    return render(
        request,
        "demo/home.html",
        {
            "release": settings.RELEASE,
            "visits": counter.value,
            "cache_visits": cache.incr(CACHE_KEY),
            "heartbeats": Heartbeat.objects.all()[:10],
        },
    )


def health(request):
    """200 "ok" (and the release in X-Release) when the database and the cache answer.

    Else 503 and the reason.
    """
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except Exception as exc:
        return HttpResponse(f"database: {exc}", status=503, content_type="text/plain")
    try:
        cache.set("demo:health", "ok", timeout=30)
        if cache.get("demo:health") != "ok":
            raise RuntimeError("value not read back")
    except Exception as exc:
        return HttpResponse(f"cache: {exc}", status=503, content_type="text/plain")
    response = HttpResponse("ok", content_type="text/plain")
    # fabstack's deploy waits until this names the release it just switched to.
    response["X-Release"] = settings.RELEASE
    return response
