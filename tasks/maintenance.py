"""``fab maintenance on|off``: NGINX answers the app's requests with a 503 page, or stops.

While the page (``/var/www/fabstack-maintenance/APP/fabstack-maintenance.html``) exists, the
app's site is the version of it that answers every request for the app with 503, the page and
``Retry-After: 300``, except requests from the host itself (127.0.0.1, ::1: the deploy's health
check, so a deploy can run behind the page). Static and media files are served as usual. The
site is NGINX's file like any other: tested in context with nginx -t before a reload, and kept
by ``fab provision`` (the page decides which version it writes). ``--message`` is shown on the
page, HTML-escaped. ``fab status`` says when the page is on.
"""

from __future__ import annotations

import os

from fabric import task

from .host import StepFailed, session
from .nginx import Site, maintenance_page, place, site_resources
from .primitives import Directory, File, Service, ensure, q, render
from .scripts import script

MESSAGE_MAX = 1000  # characters
HEADER = "X-Fabstack-Maintenance"  # files/nginx-app.conf.j2 adds it while the page is on
LIVE_TIMEOUT = 15  # seconds NGINX's workers get to take the reloaded configuration


def wait_until_live(h, on: bool) -> None:
    """Ask the site from the host until NGINX's answer says the wanted configuration is live
    (a reload leaves the old workers answering for a moment)."""
    res = h.run(script("maintenance-live.sh.j2", h.settings, want="on" if on else "off",
                       timeout=LIVE_TIMEOUT, header=HEADER),
                what="maintenance page", check=False)
    if not res.ok:
        raise StepFailed("maintenance page", f"NGINX still answers with the page "
                         f"{'off' if on else 'on'} {LIVE_TIMEOUT} s after its reload: see "
                         "journalctl -u nginx")
    h.ok("maintenance page", "on: visitors get the 503 page, the host itself the app" if on
         else "off: visitors get the app")


def maintenance_resources(h, on: bool, message: str | None) -> list:
    """On: the page, then the site that shows it. Off: the site without the page (its
    maintenance version would answer 404 once the page is gone); the page goes afterwards,
    once NGINX serves the app again (:func:`turn_off`)."""
    s = h.settings
    page = maintenance_page(s)
    if not on:
        return [Site(s, maintenance=False, **place(h)), Service("nginx")]
    return [Directory(os.path.dirname(s.layout.maintenance), "root", "root", 0o755),
            Directory(s.layout.maintenance, "root", "root", 0o755),
            File(page, render("maintenance.html.j2", s, **({"message": message}
                                                          if message else {})), mode=0o644),
            *site_resources(h)]


def page_on_during_deploy(h) -> bool:
    """Turn the page on for ``fab deploy --maintenance``; False when it was on already (the
    operator's, with its message: the deploy leaves it as it is)."""
    (state,) = h.probe([f"test -e {q(maintenance_page(h.settings))} && echo on; true"])
    if state.strip() == "on":
        h.ok("maintenance page", "on already: left on after the deploy")
        return False
    ensure(h, *maintenance_resources(h, True, None))
    wait_until_live(h, True)
    return True


def turn_off(h) -> None:
    """The site without the page, live, then the page removed."""
    ensure(h, *maintenance_resources(h, False, None))
    if not h.check:
        wait_until_live(h, False)
    ensure(h, File(maintenance_page(h.settings), present=False))


@task(positional=["state"],
      help={"state": "on or off",
            "message": "Text of the page (HTML-escaped; default: back shortly)",
            "check": "Show what would change and change nothing."})
def maintenance(c, state, message=None, check=False):
    """Turn the maintenance page on or off (503 for the app's requests but the host's own)."""
    with session(c, "maintenance", check) as h:
        if state not in ("on", "off"):
            raise StepFailed("maintenance", f"{state!r}: say on or off")
        if message is not None and state == "off":
            raise StepFailed("maintenance", "--message goes with on, not off")
        if message is not None and not message.strip():
            raise StepFailed("maintenance", "--message is empty")
        if message is not None and len(message) > MESSAGE_MAX:
            raise StepFailed("maintenance", f"--message is {len(message)} characters long; "
                             f"at most {MESSAGE_MAX}")
        if not h.site.has("web"):  # an lb host of its own passes the web hosts' page on
            h.ok("maintenance page", "none on this host: the web hosts "
                 f"({', '.join(web.name for web in h.site.holding('web'))}) show it")
            return
        if state == "off":
            turn_off(h)
            return
        ensure(h, *maintenance_resources(h, True, message))
        if not h.check:
            wait_until_live(h, True)
