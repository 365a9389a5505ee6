from django.contrib import admin

from .models import Counter, Heartbeat

admin.site.register(Counter)
admin.site.register(Heartbeat, list_display=["created", "hostname", "release"])
