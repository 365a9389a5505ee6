"""Static files: Django's ManifestStaticFilesStorage, each release reading its own manifest.

collectstatic writes the hashed name of every file (``demo/site.css`` ->
``demo/site.0123456789ab.css``) into the manifest, ``staticfiles.json`` in STATIC_ROOT, which
every release shares: the next release's collectstatic rewrites it. fabstack's deploy keeps a
copy in each release (``.fabstack-staticfiles.json`` beside manage.py); reading that copy, a
release names its own files whichever release collected last: the serving one while the next
is collected, and a release rolled back to.
"""

from django.conf import settings
from django.contrib.staticfiles.storage import ManifestStaticFilesStorage

RELEASE_MANIFEST = ".fabstack-staticfiles.json"


class ReleaseManifestStaticFilesStorage(ManifestStaticFilesStorage):
    def read_manifest(self):
        """This release's copy of the manifest; STATIC_ROOT's while it has none (its own
        collectstatic, before the deploy copies it)."""
        try:
            return (settings.BASE_DIR / RELEASE_MANIFEST).read_text()
        except FileNotFoundError:
            return super().read_manifest()
